"""One commit per submission: the job's row and its audit row in one transaction."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lm_eval_server.jobs.store import MemoryJobStore, SqliteJobStore
from lm_eval_server.team.audit import Action, MemoryAudit, Query, SqliteAudit
from lm_eval_server.team.principals import Principal
from tests.unit.jobs.test_store import record

ALICE = Principal("alice")


def test_the_job_row_and_its_audit_row_commit_together(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    store = SqliteJobStore(db)
    audit = SqliteAudit(db)
    entry = audit.entry(ALICE, Action.submit, [1], "Job 1 successfully queued.")
    write = audit.joined_write(entry)
    assert write is not None
    commits: list[str] = []
    # Count the transactions the store's connection ends: one for both rows.
    store._db.set_trace_callback(  # type: ignore[attr-defined]
        lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None
    )
    store.insert(record(1), [write])
    audit.joined(entry)
    assert commits == ["COMMIT"]
    # A fresh connection (another process, after a crash) sees both.
    with sqlite3.connect(db) as other:
        assert other.execute("SELECT job_id FROM jobs").fetchall() == [(1,)]
        assert other.execute("SELECT principal, job_ids FROM audit").fetchall() == [
            ("alice", "[1]")
        ]
    entries, total = audit.query(Query())
    assert total == 1 and entries[0].outcome == "Job 1 successfully queued."
    store.close()
    audit.close()


def test_a_failing_joined_write_leaves_neither_row(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    store = SqliteJobStore(db)
    with pytest.raises(sqlite3.OperationalError):
        store.insert(record(1), [("INSERT INTO no_such_table VALUES (?)", (1,))])
    assert store.load_all() == []
    store.insert(record(2))  # the store is usable after the rollback
    assert [r.job_id for r in store.load_all()] == [2]
    store.close()


def test_memory_audit_stores_its_entry_itself_and_a_memory_store_refuses_sql() -> None:
    audit = MemoryAudit()
    entry = audit.entry(ALICE, Action.submit, [7], "Job 7 successfully queued.")
    assert audit.joined_write(entry) is None
    audit.joined(entry)
    entries, total = audit.query(Query())
    assert total == 1 and entries[0].job_ids == (7,) and entries[0].entry_id == 1
    with pytest.raises(ValueError, match="memory store"):
        MemoryJobStore().insert(record(1), [("INSERT INTO audit VALUES (?)", (1,))])
