"""Webhooks: the URL rule, payload, signature and retry schedule (pure), the settings, and the
persisted delivery rows."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from lm_eval_server.admission.urls import normalise_url
from lm_eval_server.config import Settings
from lm_eval_server.jobs.models import DeliveryState, JobRecord, JobStatus, WebhookDelivery
from lm_eval_server.jobs.store import MIGRATIONS, MemoryJobStore, SqliteJobStore
from lm_eval_server.outputs import results
from lm_eval_server.team.redact import Redactor
from lm_eval_server.webhooks import rules as webhooks

PREFIXES = [normalise_url("http://hooks.example:8080/ci/", "test")]


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("http://hooks.example:8080/ci/job", "http://hooks.example:8080/ci/job"),
        ("HTTP://Hooks.Example:8080/ci/a/b", "http://hooks.example:8080/ci/a/b"),
        ("http://hooks.example:8080/ci", "http://hooks.example:8080/ci"),  # the prefix itself
        ("http://hooks.example:8080/ci/?", "http://hooks.example:8080/ci/"),  # empty query
    ],
)
def test_callback_under_a_prefix_is_sent_in_its_normal_form(url: str, target: str) -> None:
    assert webhooks.callback_target(url, PREFIXES) == target


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example:8080/cix",  # not at a path segment boundary
        "http://hooks.example/ci/x",  # another port
        "https://hooks.example:8080/ci/x",  # another scheme
        "http://hooks.example.evil.test:8080/ci/x",
        "http://user:pw@hooks.example:8080/ci/x",  # user info
        "http://hooks.example:8080@evil.test/ci/x",
        "http://evil.test#@hooks.example:8080/ci/x",
        "http://hooks.example:8080/ci/../admin",
        "http://hooks.example:8080/ci/%2e%2e/admin",
        "http://hooks.example:8080/ci/x?token=1",
        "http://hooks.example:8080/ci/x#frag",
        "http://hooks.example:8080/ci/x\n",
        "http://hooks.example:8080\\@evil.test/ci/",
        "ftp://hooks.example:8080/ci/x",
        "file:///etc/passwd",
        "hooks.example:8080/ci/x",
        "",
        "http://hooks.example:8080/ci/" + "a" * 3000,
    ],
)
def test_callback_outside_the_prefixes_is_refused_naming_the_setting(url: str) -> None:
    with pytest.raises(webhooks.CallbackRefused, match="callback_url"):
        webhooks.callback_target(url, PREFIXES)


def test_without_prefixes_every_callback_is_refused_naming_the_setting() -> None:
    with pytest.raises(webhooks.CallbackRefused, match="WEBHOOK_URL_PREFIXES"):
        webhooks.callback_target("http://hooks.example:8080/ci/x", [])


def test_signature_is_hmac_sha256_of_the_exact_body() -> None:
    body = b"The quick brown fox jumps over the lazy dog"
    assert webhooks.signature(body, b"key") == (
        "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    )
    payload = webhooks.build_payload(
        "d1", 7, "Completed", 0, [], 1_700_000_000, owner="alice", callback_url="http://h:80/ci"
    )
    body = webhooks.encode(payload)
    headers = webhooks.headers(body, b"secret", "d1", 1_700_000_000, 2)
    expected = hmac.new(b"secret", body, hashlib.sha256).hexdigest()
    assert headers == {
        "Content-Type": "application/json",
        "User-Agent": "lm-eval-server-webhook",
        "X-Signature": f"sha256={expected}",
        "X-Webhook-Id": "d1",
        "X-Webhook-Timestamp": "1700000000",
        "X-Webhook-Attempt": "2",
    }
    assert body == (
        b'{"delivery_id":"d1","job_id":7,"owner":"alice","callback_url":"http://h:80/ci",'
        b'"status":"Completed","exit_code":0,"metrics":[],"timestamp":1700000000}'
    )


def test_metrics_are_the_flattened_results_with_non_finite_numbers_as_text() -> None:
    data = (
        b'{"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": NaN,'
        b' "f1,none": 1, "f1_stderr,none": "N/A"}}}'
    )
    assert webhooks.metrics_from_results(data) == [
        {"task": "t", "metric": "acc", "filter": "none", "value": 0.5, "stderr": "nan"},
        {"task": "t", "metric": "f1", "filter": "none", "value": 1.0, "stderr": "N/A"},
    ]
    assert webhooks.metrics_from_results(None) is None
    assert webhooks.metrics_from_results(b"not json") is None
    assert webhooks.metrics_from_results(b"[1]") is None


def test_metrics_are_redacted_as_the_results_route_serves_them() -> None:
    redactor = Redactor()
    redactor.add_secrets(["sk-live-0123456789"])
    data = b'{"results": {"t": {"note,none": "key sk-live-0123456789", "acc,none": 1}}}'
    rows = webhooks.metrics_from_results(data, redactor.json)
    assert rows is not None and [r["value"] for r in rows] == ["key ***", 1.0]
    assert rows == results.flatten_metrics(redactor.json(json.loads(data)))


def test_retry_schedule_doubles_up_to_the_maximum() -> None:
    delays = [webhooks.retry_delay_s(n, 2.0, 300.0) for n in range(1, 11)]
    assert delays == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert webhooks.retry_delay_s(10_000, 2.0, 300.0) == 300


def test_attempt_errors() -> None:
    assert webhooks.attempt_error(204, None, 10) is None
    assert webhooks.attempt_error(500, None, 10) == "HTTP 500"
    assert "redirects are not followed" in str(webhooks.attempt_error(302, None, 10))
    assert "WEBHOOK_TIMEOUT_S" in str(webhooks.attempt_error(None, TimeoutError(), 10))
    long = webhooks.attempt_error(None, OSError("x" * 5000), 10)
    assert long is not None and len(long) == webhooks.MAX_ERROR_CHARS


# ----------------------------------------------------------------------------- settings


def test_prefixes_without_a_secret_stop_startup(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="WEBHOOK_SECRET"):
        Settings(data_dir=tmp_path, webhook_url_prefixes="http://hooks.example/ci/")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(
            data_dir=tmp_path, webhook_url_prefixes="http://hooks.example/ci/", webhook_secret="x"
        )
    with pytest.raises(ValidationError, match="WEBHOOK_URL_PREFIXES"):
        Settings(data_dir=tmp_path, webhook_url_prefixes="http://u@hooks.example/")


def test_prefixes_are_normalised_and_the_secret_stays_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEBHOOK_URL_PREFIXES", "HTTP://Hooks.Example/ci, https://b.example")
    monkeypatch.setenv("WEBHOOK_SECRET", "a-secret-of-enough-length")
    settings = Settings(data_dir=tmp_path)
    assert settings.webhook_url_prefixes == [
        "http://hooks.example:80/ci/",
        "https://b.example:443/",
    ]
    assert "a-secret-of-enough-length" not in repr(settings)
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == "a-secret-of-enough-length"


def test_no_prefixes_no_secret_is_the_default(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.webhook_url_prefixes == [] and settings.webhook_secret is None


def test_the_secret_never_reaches_a_job(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="setting of this server"):
        Settings(data_dir=tmp_path, job_env_passthrough="PATH,WEBHOOK_SECRET")


# ----------------------------------------------------------------------------- store

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _record(job_id: int, callback_url: str | None = "http://h:80/ci/x") -> JobRecord:
    request = {"model": "dummy", "tasks": "t"}
    if callback_url:
        request["callback_url"] = callback_url
    return JobRecord(job_id, request, ["lm_eval"], "lm_eval", {}, "/tmp/w", "/tmp/w/results")


def _delivery(job_id: int, state: DeliveryState = DeliveryState.pending) -> WebhookDelivery:
    return WebhookDelivery(
        job_id=job_id,
        delivery_id=f"d{job_id}",
        url="http://h:80/ci/x",
        status="Completed",
        exit_code=0,
        results_file="/tmp/w/results.json",
        created_at=NOW,
        owner="alice",
        state=state,
        metrics_json="[]",
        attempts=2,
        last_status=500,
        last_error="HTTP 500",
        next_attempt_at=NOW,
    )


def _finish(store: SqliteJobStore | MemoryJobStore, record: JobRecord) -> None:
    store.insert(record)
    record.status = JobStatus.completed
    store.update(record, JobStatus.queued)


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_a_pending_delivery_outlives_its_job_and_a_finished_one_goes_with_it(
    tmp_path: Path, kind: str
) -> None:
    store = SqliteJobStore(tmp_path / "jobs.db") if kind == "sqlite" else MemoryJobStore()
    for job_id in (1, 2):
        _finish(store, _record(job_id))
    store.save_delivery(_delivery(1))
    store.save_delivery(_delivery(2, DeliveryState.delivered))
    assert store.get_delivery(1) == _delivery(1)
    store.delete([1, 2])
    assert store.get_delivery(1) == _delivery(1)
    assert store.get_delivery(2) is None
    done = _delivery(1, DeliveryState.delivered)
    store.save_delivery(done)  # its job is gone: nobody can ask about it any more
    assert store.get_delivery(1) is None


def test_pending_rows_and_ended_jobs_without_a_row_are_found_after_a_restart(
    tmp_path: Path,
) -> None:
    store = SqliteJobStore(tmp_path / "jobs.db")
    for job_id in (1, 2, 3):
        _finish(store, _record(job_id))
    _finish(store, _record(4, callback_url=None))
    store.insert(_record(5))  # still queued
    store.save_delivery(_delivery(1))
    store.save_delivery(_delivery(2, DeliveryState.failed))
    store.close()
    store = SqliteJobStore(tmp_path / "jobs.db")
    assert store.pending_deliveries() == [_delivery(1)]
    assert [r.job_id for r in store.ended_without_delivery()] == [3]


def test_a_version_3_database_gains_the_deliveries_table(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "jobs.db")
    for migration in MIGRATIONS[:3]:
        db.executescript(migration)
    db.execute(
        "INSERT INTO jobs (status, request, argv, argument, env_vars, work_dir, output_path, "
        "created_at) VALUES ('Completed', '{}', '[]', 'lm_eval', '{}', '/w', '/o', ?)",
        (NOW.isoformat(),),
    )
    db.execute("PRAGMA user_version=3")
    db.commit()
    db.close()
    store = SqliteJobStore(tmp_path / "jobs.db")
    assert [r.status for r in store.load_all()] == [JobStatus.completed]
    assert store.pending_deliveries() == [] and store.ended_without_delivery() == []


def test_a_version_6_database_gives_its_deliveries_the_owner_of_their_job(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "jobs.db")
    for migration in MIGRATIONS[:6]:
        db.executescript(migration)
    db.execute(
        "INSERT INTO jobs (status, request, argv, argument, env_vars, work_dir, output_path, "
        "created_at, owner) VALUES ('Completed', '{}', '[]', 'lm_eval', '{}', '/w', '/o', ?, "
        "'alice')",
        (NOW.isoformat(),),
    )
    for job_id in (1, 2):  # job 2 was deleted while its delivery was pending
        db.execute(
            "INSERT INTO webhook_deliveries (job_id, delivery_id, url, status, created_at, "
            "state) VALUES (?, ?, 'http://h:80/ci/x', 'Completed', ?, 'pending')",
            (job_id, f"d{job_id}", NOW.isoformat()),
        )
    db.execute("PRAGMA user_version=6")
    db.commit()
    db.close()
    store = SqliteJobStore(tmp_path / "jobs.db")
    assert [(d.job_id, d.owner) for d in store.pending_deliveries()] == [
        (1, "alice"),
        (2, "default"),
    ]


def test_a_gated_jobs_body_carries_its_verdict_and_others_are_unchanged() -> None:
    verdict = {"passed": False, "baseline": 1, "candidate": 7, "rules": [], "error": None}
    args = ("d1", 7, "Completed", 0, [], 1_700_000_000)
    plain = webhooks.build_payload(*args, owner="alice", callback_url="http://h:80/ci")
    gated = webhooks.build_payload(
        *args, owner="alice", callback_url="http://h:80/ci", verdict=verdict
    )
    assert "verdict" not in plain
    assert list(gated) == [*list(plain)[:-1], "verdict", "timestamp"]
    assert gated["verdict"] == verdict
