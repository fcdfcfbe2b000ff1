"""The audit trail's storage: entries, pages, filters, bounds, retention, persistence."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lm_eval_server.jobs.store import MIGRATIONS, SqliteJobStore
from lm_eval_server.team import audit
from lm_eval_server.team.audit import Action, Audit, MemoryAudit, Query, SqliteAudit
from lm_eval_server.team.principals import Principal

ALICE, BOB, ROOT = Principal("alice"), Principal("bob"), Principal("root", admin=True)
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0
        self.mono = 0.0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds


def open_sqlite(path: Path, **options: object) -> SqliteAudit:
    SqliteJobStore(path).close()  # the store's migrations create the table
    return SqliteAudit(path, **options)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "memory"])
def make_audit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Audit]]:
    opened: list[Audit] = []

    def make(**options: object) -> Audit:
        trail: Audit
        if request.param == "sqlite":
            trail = open_sqlite(tmp_path / "jobs.db", **options)
        else:
            trail = MemoryAudit(**options)  # type: ignore[arg-type]
        opened.append(trail)
        return trail

    yield make
    for trail in opened:
        trail.close()


def test_entries_newest_first_with_filters_and_pages(make_audit: Callable[..., Audit]) -> None:
    clock = Clock()
    trail = make_audit(clock=clock, monotonic=lambda: clock.mono)
    trail.record(ALICE, Action.submit, [1], "Job 1 successfully queued.")
    clock.advance(1)
    trail.record(BOB, Action.submit, [2], "Job 2 successfully queued.")
    clock.advance(1)
    trail.record(ROOT, Action.stop_all, [1, 2], "Stopped 2 job(s).")
    clock.advance(1)
    trail.record(ALICE, "task_upload", target="my_task", outcome="uploaded")

    entries, total = trail.query(Query())
    assert total == 4
    assert [(e.principal, e.action, e.job_ids) for e in entries] == [
        ("alice", "task_upload", ()),
        ("root", "stop_all", (1, 2)),
        ("bob", "submit", (2,)),
        ("alice", "submit", (1,)),
    ]
    assert entries[1].admin and not entries[0].admin
    assert entries[1].at == T0 + timedelta(seconds=2) and entries[1].at.tzinfo is not None
    assert entries[0].target == "my_task" and entries[3].target is None
    assert entries[1].job_count == 2 and entries[1].outcome == "Stopped 2 job(s)."
    assert [e.entry_id for e in entries] == sorted((e.entry_id for e in entries), reverse=True)

    page, total = trail.query(Query(limit=2, offset=1))
    assert total == 4 and [e.action for e in page] == ["stop_all", "submit"]
    page, total = trail.query(Query(principal="alice"))
    assert total == 2 and [e.action for e in page] == ["task_upload", "submit"]
    page, total = trail.query(Query(action="submit", limit=1))
    assert total == 2 and [e.principal for e in page] == ["bob"]
    page, total = trail.query(Query(job_id=1))
    assert total == 2 and [e.action for e in page] == ["stop_all", "submit"]
    assert trail.query(Query(principal="carol")) == ([], 0)
    assert trail.query(Query(limit=0)) == ([], 4)


def test_bounds_on_what_one_entry_and_one_page_hold(make_audit: Callable[..., Audit]) -> None:
    trail = make_audit()
    ids = list(range(1, audit.MAX_JOB_IDS + 501))
    entry = trail.record(ROOT, Action.delete_all, ids, "x" * 10_000, target="t" * 10_000)
    stored = trail.query(Query())[0][0]
    assert stored == entry
    assert stored.job_ids == tuple(ids[: audit.MAX_JOB_IDS])
    assert stored.job_count == len(ids)
    assert len(stored.outcome) == audit.MAX_OUTCOME_CHARS and stored.outcome.endswith("…")
    assert stored.target is not None and len(stored.target) == audit.MAX_TARGET_CHARS
    with pytest.raises(ValueError, match="limit"):
        trail.query(Query(limit=audit.MAX_PAGE + 1))
    for bad in ("Submit", "drop table", "", "x" * 33, "1submit"):
        with pytest.raises(ValueError, match="not a lower_case name"):
            trail.record(ALICE, bad)


def test_retention_removes_old_entries_at_prune_and_hourly(
    make_audit: Callable[..., Audit],
) -> None:
    clock = Clock()
    trail = make_audit(retention_days=1, clock=clock, monotonic=lambda: clock.mono)
    trail.record(ALICE, Action.submit, [1], "old")  # the first record prunes (nothing yet)
    clock.advance(23 * 3600)
    trail.record(ALICE, Action.submit, [2], "newer")
    clock.advance(2 * 3600)  # entry 1 is 25 h old; an hour passed since the last prune
    trail.record(ALICE, Action.submit, [3], "newest")
    assert [e.outcome for e in trail.query(Query())[0]] == ["newest", "newer"]
    clock.advance(24 * 3600 + 1)
    assert trail.prune() == 2
    assert trail.query(Query()) == ([], 0)


def test_without_retention_nothing_is_pruned(make_audit: Callable[..., Audit]) -> None:
    clock = Clock()
    trail = make_audit(clock=clock, monotonic=lambda: clock.mono)
    trail.record(ALICE, Action.submit, [1], "kept")
    clock.advance(3650 * 86400)
    assert trail.prune() == 0
    assert trail.query(Query())[1] == 1


def test_memory_keeps_the_newest_entries_only() -> None:
    trail = MemoryAudit(max_entries=3)
    for job_id in range(1, 6):
        trail.record(ALICE, Action.submit, [job_id], f"Job {job_id}")
    entries, total = trail.query(Query())
    assert total == 3 and [e.job_ids for e in entries] == [(5,), (4,), (3,)]
    assert entries[0].entry_id == 5


def test_sqlite_entries_survive_reopening_and_hold_no_more_than_given(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    trail = open_sqlite(path)
    trail.record(BOB, Action.delete, [7], "Job 7 deleted.")
    trail.close()
    again = open_sqlite(path)
    (entry,), total = again.query(Query())
    assert total == 1
    assert (entry.principal, entry.action, entry.job_ids, entry.outcome) == (
        "bob",
        "delete",
        (7,),
        "Job 7 deleted.",
    )
    again.close()
    db = sqlite3.connect(path)
    columns = [row[1] for row in db.execute("PRAGMA table_info(audit)")]
    assert columns == [
        "entry_id",
        "at",
        "principal",
        "admin",
        "action",
        "job_ids",
        "job_count",
        "target",
        "outcome",
    ]
    db.close()


def test_an_older_database_gains_the_audit_table(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    db = sqlite3.connect(path)
    # The database as it was just before the migration that creates the audit table.
    audit_version = next(
        n for n, sql in enumerate(MIGRATIONS, 1) if "CREATE TABLE IF NOT EXISTS audit" in sql
    )
    for migration in MIGRATIONS[: audit_version - 1]:
        db.executescript(migration)
    db.execute(f"PRAGMA user_version={audit_version - 1}")
    db.close()
    with pytest.raises(RuntimeError, match="no audit table: open the job store first"):
        SqliteAudit(path)
    trail = open_sqlite(path)
    trail.record(ALICE, Action.submit, [1], "ok")
    assert trail.query(Query())[1] == 1
    trail.close()
