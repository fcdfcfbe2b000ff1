"""Schema v2: idempotency keys bound to a caller and a body, and the upgrade from v1."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from lm_eval_server.admission.idempotency import ANONYMOUS, body_digest, caller_id, claim
from lm_eval_server.jobs.models import JobRecord
from lm_eval_server.jobs.store import MIGRATIONS, SCHEMA_VERSION, SqliteJobStore


def record(job_id: int, **kw: object) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        request={"model": "dummy"},
        argv=["python"],
        argument="python",
        env_vars={},
        work_dir=f"/tmp/{job_id}",
        output_path=f"/tmp/{job_id}/results",
        **kw,  # type: ignore[arg-type]
    )


def test_v1_database_upgrades_and_drops_unbound_keys(tmp_path: Path) -> None:
    db_path = tmp_path / "jobs.db"
    db = sqlite3.connect(db_path)
    db.executescript(MIGRATIONS[0])
    db.execute(
        "INSERT INTO jobs (status, request, argv, argument, env_vars, work_dir, output_path, "
        "created_at, idempotency_key) VALUES ('Completed', '{}', '[]', 'x', '{}', '/tmp/1', "
        "'/tmp/1/r', '2026-01-01T00:00:00+00:00', 'legacy-key')"
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = SqliteJobStore(db_path)
    [old] = store.load_all()
    assert old.job_id == 1 and old.idempotency_key is None and old.idempotency_body is None
    bound = claim("k", ANONYMOUS, b'{"a": 1}')
    new = record(store.next_id(), idempotency_key=bound.scope, idempotency_body=bound.body_sha256)
    store.insert(new)
    store.close()
    again = SqliteJobStore(db_path)
    assert again.load_all()[1] == new
    again.close()
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
    assert old.owner == "default"  # jobs from before principals belong to the bare-key owner


def test_claims_separate_callers_and_bodies() -> None:
    alice, bob = caller_id(b"alice-key"), caller_id(b"bob-key")
    assert alice != bob and caller_id(b"alice-key") == alice
    assert b"alice" not in alice.encode()
    assert claim("k", alice, b"{}").scope != claim("k", bob, b"{}").scope
    # Canonical JSON: order and whitespace do not matter, values do.
    assert body_digest(b'{"a": 1, "b": [1, 2]}') == body_digest(b'{"b":[1,2],"a":1}')
    assert body_digest(b'{"a": 1}') != body_digest(b'{"a": "1"}')
    assert body_digest(b"not json") != body_digest(b"not json!")
