"""Webhooks end to end: real jobs (lm-eval's dummy model, the completions stub, the stand-in
lm_eval where only the exit matters), real servers killed and restarted, and a local listener
that records every request it gets."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from lm_eval_server.app import create_app
from tests.support.completions_server import model_args_for, running_stub_server
from tests.support.jobs import (
    DUMMY_JOB,
    TEST_TASKS,
    fake_job,
    group_members,
    submit,
    wait_for,
)
from tests.support.server import free_port
from tests.support.webhook_listener import HANG, Received, WebhookListener

SECRET = "webhook-test-secret-0123456789"


def hook_settings(listener_port: int, **extra: Any) -> dict[str, Any]:
    return {
        "webhook_url_prefixes": [f"http://127.0.0.1:{listener_port}/hooks/"],
        "webhook_secret": SECRET,
        **extra,
    }


def hook_env(listener_port: int, **extra: str) -> dict[str, str]:
    return {
        "WEBHOOK_URL_PREFIXES": f"http://127.0.0.1:{listener_port}/hooks/",
        "WEBHOOK_SECRET": SECRET,
        **extra,
    }


def callback(port: int, path: str = "ci") -> str:
    return f"http://127.0.0.1:{port}/hooks/{path}"


def wait_webhook(
    http: Any,
    job_id: int,
    done: Callable[[dict[str, Any]], bool],
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        webhook = http.get(f"/job/{job_id}").json()["webhook"]
        if done(webhook):
            return dict(webhook)
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id}'s webhook after {timeout_s}s: {webhook}")
        time.sleep(0.1)


def delivered(webhook: dict[str, Any]) -> bool:
    return bool(webhook["state"] == "delivered")


def assert_signed_delivery(
    request: Received, job: dict[str, Any], metrics: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """The request is a correctly signed webhook for `job`, with exactly these metrics."""
    assert request.signed_with(SECRET), request.headers
    assert request.headers["content-type"] == "application/json"
    body = request.json()
    assert body == {
        "delivery_id": request.headers["x-webhook-id"],
        "job_id": job["job_id"],
        # Whose job, and the very URL this request went to: signed, so a body cannot be
        # replayed to another receiver (they share WEBHOOK_SECRET) or pass for another owner's.
        "owner": job["owner"],
        "callback_url": f"http://{request.headers['host']}{request.path}",
        "status": job["status"],
        "exit_code": job["exit_code"],
        "metrics": metrics,
        "timestamp": int(request.headers["x-webhook-timestamp"]),
    }
    assert abs(body["timestamp"] - time.time()) < 600
    return dict(body)


def deliveries_in_db(data_dir: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(data_dir / "jobs.db")
    try:
        return db.execute("SELECT job_id, state FROM webhook_deliveries").fetchall()
    finally:
        db.close()


# ----------------------------------------------------------------------------- in process


def test_completed_job_sends_one_signed_webhook_with_its_metrics(
    make_client: Callable[..., Any],
) -> None:
    with WebhookListener() as hook:
        client = make_client(**hook_settings(hook.port))
        job_id = submit(client, {**DUMMY_JOB, "callback_url": callback(hook.port)})
        webhook = client.get(f"/job/{job_id}").json()["webhook"]
        assert webhook["url"] == callback(hook.port) and webhook["state"] in ("waiting", "pending")
        job = wait_for(client, job_id)
        assert job["status"] == "Completed", job["error"]
        webhook = wait_webhook(client, job_id, delivered)
        [request] = hook.requests
        assert request.path == "/hooks/ci"
        results = client.get(f"/job/{job_id}/results").json()
        assert [m["metric"] for m in results["metrics"]] == ["acc"]  # demo_mc's one metric
        body = assert_signed_delivery(request, job, results["metrics"])
        assert request.headers["x-webhook-attempt"] == "1"
        assert webhook == {
            "url": callback(hook.port),
            "state": "delivered",
            "attempts": 1,
            "last_status": 200,
            "last_error": None,
            "next_attempt_at": None,
            "delivered_at": webhook["delivered_at"],
            "delivery_id": body["delivery_id"],
        }
        assert webhook["delivered_at"] >= job["finished_at"]
        # A job without a callback_url has no webhook, and sends nothing.
        other = submit(client, fake_job())
        wait_for(client, other)
        assert client.get(f"/job/{other}").json()["webhook"] is None
        time.sleep(0.5)
        assert len(hook.requests) == 1


def test_a_failing_receiver_gets_the_webhook_after_retries(
    make_client: Callable[..., Any],
) -> None:
    port = free_port()  # nothing listens yet: connection refused
    client = make_client(**hook_settings(port, webhook_retry_base_s=0.3))
    job_id = submit(client, {**DUMMY_JOB, "callback_url": callback(port)})
    job = wait_for(client, job_id)
    assert job["status"] == "Completed", job["error"]
    refused = wait_webhook(client, job_id, lambda w: w["attempts"] >= 2)
    assert refused["state"] == "pending" and refused["last_status"] is None
    assert "ConnectError" in refused["last_error"]
    assert refused["next_attempt_at"] is not None
    with WebhookListener(plan=[500, 503], port=port) as hook:
        webhook = wait_webhook(client, job_id, delivered)
        first, second, third = hook.requests
    metrics = client.get(f"/job/{job_id}/results").json()["metrics"]
    bodies = [assert_signed_delivery(r, job, metrics) for r in (first, second, third)]
    # One delivery, attempted again: the same id every time, the attempt counted up.
    assert {b["delivery_id"] for b in bodies} == {webhook["delivery_id"]}
    attempts = [int(r.headers["x-webhook-attempt"]) for r in (first, second, third)]
    refused_count = attempts[0] - 1
    assert refused_count >= 2 and attempts == [refused_count + n for n in (1, 2, 3)]
    assert webhook["attempts"] == attempts[-1]
    assert webhook["last_status"] == 200 and webhook["last_error"] is None
    # The wait after the n-th failed attempt is 0.3 s x 2^(n-1).
    assert second.at - first.at >= 0.3 * 2 ** (attempts[0] - 1) - 0.05
    assert third.at - second.at >= 0.3 * 2 ** (attempts[1] - 1) - 0.05


def test_callback_outside_the_prefixes_is_refused_and_nothing_is_sent(
    make_client: Callable[..., Any],
) -> None:
    with WebhookListener() as hook:
        plain = make_client()
        response = plain.post("/job", json={**fake_job(), "callback_url": callback(hook.port)})
        assert response.status_code == 422
        assert "WEBHOOK_URL_PREFIXES" in response.json()["detail"]
        client = make_client(**hook_settings(hook.port))
        refused = [
            f"http://127.0.0.1:{hook.port}/other/ci",
            f"http://127.0.0.1:{hook.port}/hooksx",
            f"http://127.0.0.1:{hook.port}/hooks/../admin",
            f"http://localhost:{hook.port}/hooks/ci",  # the same listener by another name
            f"https://127.0.0.1:{hook.port}/hooks/ci",
            f"http://user:pw@127.0.0.1:{hook.port}/hooks/ci",
            f"http://127.0.0.1:{hook.port}/hooks/ci?x=1",
            f"ftp://127.0.0.1:{hook.port}/hooks/ci",
        ]
        for url in refused:
            response = client.post("/job", json={**fake_job(), "callback_url": url})
            assert response.status_code == 422, url
            assert "callback_url" in response.json()["detail"], response.json()
        too_long = client.post(
            "/job", json={**fake_job(), "callback_url": callback(hook.port, "x" * 3000)}
        )
        assert too_long.status_code == 422 and "callback_url" in too_long.text
        not_text = client.post("/job", json={**fake_job(), "callback_url": 5})
        assert not_text.status_code == 422
        assert client.get("/jobs").json()["total"] == 0
        assert plain.get("/jobs").json()["total"] == 0
        time.sleep(0.5)
        assert hook.requests == []


def test_redirects_are_not_followed_and_attempts_are_bounded(
    make_client: Callable[..., Any],
) -> None:
    with WebhookListener(plan=[302, 307]) as hook:
        client = make_client(
            **hook_settings(hook.port, webhook_max_attempts=2, webhook_retry_base_s=0.1)
        )
        job_id = submit(client, {**fake_job(FAKE_EXIT="3"), "callback_url": callback(hook.port)})
        job = wait_for(client, job_id)
        assert job["status"] == "Failed" and job["exit_code"] == 3
        webhook = wait_webhook(client, job_id, lambda w: w["state"] == "failed")
        assert webhook["attempts"] == 2 and webhook["last_status"] == 307
        assert "redirects are not followed" in webhook["last_error"]
        time.sleep(0.5)
        assert [r.path for r in hook.requests] == ["/hooks/ci", "/hooks/ci"]  # no /redirected
        for request in hook.requests:
            assert_signed_delivery(request, job, None)  # a Failed job: metrics null


def test_a_stopped_job_reports_stopped(make_client: Callable[..., Any]) -> None:
    with WebhookListener() as hook:
        client = make_client(**hook_settings(hook.port))
        job_id = submit(
            client, {**fake_job(FAKE_SLEEP_S="60"), "callback_url": callback(hook.port)}
        )
        wait_for(client, job_id, {"Running"})
        assert wait_webhook(client, job_id, lambda w: True)["state"] == "waiting"
        client.post(f"/job/{job_id}/stop")
        job = wait_for(client, job_id)
        wait_webhook(client, job_id, delivered)
        [request] = hook.requests
        body = assert_signed_delivery(request, job, None)
        assert body["status"] == "Stopped"


def test_the_signed_body_names_each_owner_and_the_url_it_was_sent_to(servers: Any) -> None:
    """Two owners, two receivers sharing the server's one WEBHOOK_SECRET: each signed body says
    whose job it reports and which URL it was meant for, so a receiver can refuse a body that
    was signed for another receiver (or another owner) and replayed to it."""
    alice_key, bob_key = "alice-key-0123456789", "bob-key-0123456789"
    with WebhookListener() as hook:
        server = servers(**hook_env(hook.port, API_KEYS=f"alice:{alice_key},bob:{bob_key}"))
        jobs = {}
        for owner, key in (("alice", alice_key), ("bob", bob_key)):
            with httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
            ) as http:
                body = {**fake_job(), "callback_url": callback(hook.port, f"{owner}-run")}
                job_id = submit(http, body)
                wait_for(http, job_id)
                wait_webhook(http, job_id, delivered)
                jobs[owner] = http.get(f"/job/{job_id}").json()
        by_path = {r.path: r for r in hook.requests}
        assert sorted(by_path) == ["/hooks/alice-run", "/hooks/bob-run"]
        for owner, job in jobs.items():
            request = by_path[f"/hooks/{owner}-run"]
            body = assert_signed_delivery(request, job, None)
            assert body["owner"] == owner
            assert (
                body["callback_url"] == job["webhook"]["url"] == callback(hook.port, f"{owner}-run")
            )
        # A receiver's check: alice's body replayed to bob's URL still verifies (one shared
        # secret) but names alice's URL, so bob's receiver refuses it.
        replayed = by_path["/hooks/alice-run"]
        assert replayed.signed_with(SECRET)
        assert replayed.json()["callback_url"] != callback(hook.port, "bob-run")


def test_memory_store_delivers_too(make_client: Callable[..., Any]) -> None:
    with WebhookListener(plan=[500]) as hook:
        client = make_client(**hook_settings(hook.port, store="memory", webhook_retry_base_s=0.1))
        job_id = submit(client, {**fake_job(), "callback_url": callback(hook.port)})
        job = wait_for(client, job_id)
        webhook = wait_webhook(client, job_id, delivered)
        assert webhook["attempts"] == 2 and len(hook.requests) == 2
        for request in hook.requests:
            assert_signed_delivery(request, job, None)


def test_a_prefix_the_operator_removes_stops_its_pending_deliveries(
    make_settings: Callable[..., Any],
) -> None:
    port = free_port()  # down: the delivery stays pending
    first = make_settings(**hook_settings(port, webhook_retry_base_s=0.2))
    with TestClient(create_app(first)) as client:
        job_id = submit(client, {**fake_job(), "callback_url": callback(port)})
        wait_for(client, job_id)
        wait_webhook(client, job_id, lambda w: w["attempts"] >= 1)
    with WebhookListener(port=port) as hook:
        narrowed = make_settings(
            webhook_url_prefixes=[f"http://127.0.0.1:{port}/other/"], webhook_secret=SECRET
        )
        with TestClient(create_app(narrowed)) as client:
            webhook = wait_webhook(client, job_id, lambda w: w["state"] == "failed")
        assert webhook["last_error"].startswith("not sent: callback_url")
        assert "WEBHOOK_URL_PREFIXES" in webhook["last_error"]
        time.sleep(0.5)
        assert hook.requests == []


def test_deleting_a_job_does_not_cancel_its_pending_webhook(
    make_client: Callable[..., Any], tmp_path: Path
) -> None:
    port = free_port()
    client = make_client(**hook_settings(port, webhook_retry_base_s=0.5))
    job_id = submit(client, {**fake_job(FAKE_EXIT="2"), "callback_url": callback(port)})
    job = wait_for(client, job_id)
    wait_webhook(client, job_id, lambda w: w["attempts"] >= 1)
    assert client.delete(f"/job/{job_id}").status_code == 200
    assert client.get(f"/job/{job_id}").status_code == 404
    assert deliveries_in_db(tmp_path / "data") == [(job_id, "pending")]
    with WebhookListener(port=port) as hook:
        [request] = hook.wait_for(1)
        assert_signed_delivery(request, job, None)
        deadline = time.monotonic() + 30
        while deliveries_in_db(tmp_path / "data"):  # delivered, and its job is gone: dropped
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        assert len(hook.requests) == 1


def test_a_hanging_receiver_holds_at_most_the_concurrency_limit(
    make_client: Callable[..., Any],
) -> None:
    with WebhookListener(plan=[HANG] * 4) as hook:
        client = make_client(**hook_settings(hook.port, webhook_concurrency=2))
        ids = [
            submit(client, {**fake_job(), "callback_url": callback(hook.port, str(n))})
            for n in range(4)
        ]
        for job_id in ids:
            wait_for(client, job_id)
        hook.wait_for(2)
        time.sleep(1.0)
        # Two requests held open; the other deliveries wait for a worker, not a new request.
        assert len(hook.requests) == 2 and hook.max_in_flight == 2
        states = [client.get(f"/job/{j}").json()["webhook"]["state"] for j in ids]
        assert states == ["pending"] * 4
        hook.release()
        for job_id in ids:
            wait_webhook(client, job_id, delivered)
        assert hook.max_in_flight == 2
        assert sorted(r.json()["job_id"] for r in hook.requests) == ids


# ----------------------------------------------------------------------------- restarts


def test_webhook_pending_when_the_server_is_killed_arrives_once_after_restart(
    servers: Any,
) -> None:
    port = free_port()  # the listener is down: the first attempt is refused
    server = servers(**hook_env(port, WEBHOOK_RETRY_BASE_S="3"))
    with server.client() as http:
        job_id = submit(http, {**DUMMY_JOB, "callback_url": callback(port)})
        job = wait_for(http, job_id)
        assert job["status"] == "Completed", job["error"]
        pending = wait_webhook(http, job_id, lambda w: w["attempts"] == 1)
        assert pending["state"] == "pending"
    server.kill()
    with WebhookListener(port=port) as hook:
        restarted = servers(**hook_env(port, WEBHOOK_RETRY_BASE_S="3"))
        with restarted.client() as http:
            webhook = wait_webhook(http, job_id, delivered)
            metrics = http.get(f"/job/{job_id}/results").json()["metrics"]
        time.sleep(1.0)
        [request] = hook.requests
    body = assert_signed_delivery(request, job, metrics)
    assert body["delivery_id"] == pending["delivery_id"] == webhook["delivery_id"]
    assert webhook["attempts"] == 2 and request.headers["x-webhook-attempt"] == "2"
    assert metrics and metrics[0]["task"] == "demo_mc"


def test_job_that_ends_while_the_server_is_down_is_reported_after_restart(
    servers: Any,
) -> None:
    with running_stub_server(delay_s=0.25) as stub, WebhookListener() as hook:
        server = servers(**hook_env(hook.port))
        body = {
            "model": "local-completions",
            "model_args": model_args_for(stub.base_url),
            "tasks": "arith_gen_tiny",
            "include_path": str(TEST_TASKS),
            "callback_url": callback(hook.port),
        }
        with server.client() as http:
            job_id = submit(http, body)
            deadline = time.monotonic() + 120
            while stub.request_count < 2:  # inference has begun
                assert time.monotonic() < deadline
                time.sleep(0.05)
        db = sqlite3.connect(server.data_dir / "jobs.db")
        pid = db.execute("SELECT pid FROM jobs WHERE job_id=?", (job_id,)).fetchone()[0]
        db.close()
        server.kill()
        while group_members(pid):  # the job finishes on its own, unattended
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert hook.requests == []
        restarted = servers(**hook_env(hook.port))
        with restarted.client() as http:
            job = wait_for(http, job_id)
            assert job["status"] == "Completed", job["error"]
            webhook = wait_webhook(http, job_id, delivered)
            metrics = http.get(f"/job/{job_id}/results").json()["metrics"]
        time.sleep(0.5)
        [request] = hook.requests
    assert_signed_delivery(request, job, metrics)
    assert webhook["attempts"] == 1
    # The known answer: the stub answers 13 of arith_gen_tiny's 20 questions right.
    assert [(m["metric"], m["value"]) for m in metrics] == [("exact_match", 13 / 20)]


def test_an_attempt_cut_short_by_a_crash_is_made_again_with_the_same_id(
    servers: Any,
) -> None:
    with WebhookListener(plan=[HANG], hang_s=60) as hook:
        env = hook_env(hook.port, WEBHOOK_TIMEOUT_S="120")
        server = servers(**env)
        with server.client() as http:
            job_id = submit(http, {**fake_job(), "callback_url": callback(hook.port)})
            job = wait_for(http, job_id)
            hook.wait_for(1)  # the receiver holds the first attempt open
        server.kill()
        restarted = servers(**env)
        with restarted.client() as http:
            webhook = wait_webhook(http, job_id, delivered)
        first, second = hook.requests
    # At least once: the receiver saw the delivery twice, with one id to deduplicate on.
    one = assert_signed_delivery(first, job, None)
    two = assert_signed_delivery(second, job, None)
    assert one["delivery_id"] == two["delivery_id"] == webhook["delivery_id"]
    assert webhook["attempts"] == 1  # the cut-short attempt never finished, so never counted
