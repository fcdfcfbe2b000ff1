from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lm_eval_server.jobs.models import JobRecord, JobStatus
from lm_eval_server.jobs.store import SCHEMA_VERSION, SqliteJobStore, TerminalStateError


def record(job_id: int, **kw: object) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        request={"model": "dummy", "tasks": ["t"]},
        argv=["python", "-m", "lm_eval"],
        argument="python -m lm_eval",
        env_vars={"A": "1"},
        work_dir=f"/tmp/{job_id}",
        output_path=f"/tmp/{job_id}/results",
        **kw,  # type: ignore[arg-type]
    )


def test_round_trip_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    store = SqliteJobStore(db)
    r = record(store.next_id(), idempotency_key="k1")
    store.insert(r)
    r.status = JobStatus.running
    r.pid = 1234
    store.update(r, JobStatus.queued)
    store.close()
    again = SqliteJobStore(db)
    [loaded] = again.load_all()
    assert loaded == r
    assert loaded.created_at.tzinfo is not None
    again.close()


def test_ids_are_never_reused_after_delete(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.db")
    for _ in range(3):
        store.insert(record(store.next_id()))
    store.delete([2, 3])
    assert store.next_id() == 4
    store.close()
    assert SqliteJobStore(tmp_path / "jobs.db").next_id() == 4


def test_terminal_state_is_final(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.db")
    r = record(1, status=JobStatus.completed)
    store.insert(r)
    r.status = JobStatus.running
    with pytest.raises(TerminalStateError):
        store.update(r, JobStatus.completed)
    assert store.load_all()[0].status is JobStatus.completed


def test_schema_version_recorded_and_newer_refused(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    SqliteJobStore(db).close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this server"):
        SqliteJobStore(db)


def test_a_verdict_is_stored_when_the_job_ends(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.db")
    r = record(store.next_id(), status=JobStatus.running)
    store.insert(r)
    r.status = JobStatus.completed
    r.verdict = {"passed": False, "baseline": 1, "candidate": r.job_id, "rules": [], "error": None}
    store.update(r, JobStatus.running)
    store.close()
    [loaded] = SqliteJobStore(tmp_path / "jobs.db").load_all()
    assert loaded.verdict == r.verdict
