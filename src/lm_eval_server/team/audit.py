"""The audit trail: who submitted, stopped or deleted which jobs, and when.

An entry is written after an action took effect; a refused request (401, 404, 422, 429, ...)
changed nothing and records nothing. An entry holds the principal's name, the action, job ids,
an optional target (for actions on things other than jobs, e.g. an uploaded task's name) and a
short outcome the server wrote: never a request body, an environment, a header or a key.

With STORE=sqlite the entries live in jobs.db's `audit` table (created by the store's
migrations) and survive restarts; with STORE=memory they live as long as the process.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from lm_eval_server.team.principals import Principal


def utcnow() -> datetime:
    return datetime.now(UTC)


class Action(StrEnum):
    """The actions the job routes record. Other parts record their own names (any string
    ACTION_PATTERN accepts, e.g. `task_upload`): the trail is not limited to this list."""

    submit = "submit"
    stop = "stop"
    delete = "delete"
    stop_all = "stop_all"
    delete_all = "delete_all"
    resume = "resume"


# One SQL statement and its parameters, run by whoever owns the transaction.
SqlWrite = tuple[str, tuple[Any, ...]]

ACTION_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")
# An entry for a bulk action lists this many job ids; job_count says how many there were.
MAX_JOB_IDS = 1000
MAX_TARGET_CHARS = 200
MAX_OUTCOME_CHARS = 300
MAX_PAGE = 1000  # entries in one GET /audit answer
MEMORY_MAX_ENTRIES = 100_000  # STORE=memory keeps the newest this many
PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True)
class Entry:
    entry_id: int
    at: datetime
    principal: str
    admin: bool
    action: str
    job_ids: tuple[int, ...]
    job_count: int
    target: str | None
    outcome: str


@dataclass(frozen=True)
class Query:
    """One page of entries, newest first, narrowed by whichever filters are set."""

    limit: int = 100
    offset: int = 0
    principal: str | None = None
    action: str | None = None
    job_id: int | None = None

    def matches(self, entry: Entry) -> bool:
        return (
            (self.principal is None or entry.principal == self.principal)
            and (self.action is None or entry.action == self.action)
            and (self.job_id is None or self.job_id in entry.job_ids)
        )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Audit:
    """Records entries and answers pages of them; the storage is the subclass's."""

    def __init__(
        self,
        retention_days: float | None = None,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._retention = timedelta(days=retention_days) if retention_days else None
        self._clock = clock
        self._monotonic = monotonic
        self._last_prune: float | None = None

    def record(
        self,
        who: Principal,
        action: str,
        job_ids: Sequence[int] = (),
        outcome: str = "",
        target: str | None = None,
    ) -> Entry:
        """Append an entry for an action that took effect. `outcome` and `target` are the
        caller's own short words (clipped), never request text that might hold a secret."""
        stored = self._insert(self.entry(who, action, job_ids, outcome, target))
        self._maybe_prune()
        return stored

    def entry(
        self,
        who: Principal,
        action: str,
        job_ids: Sequence[int] = (),
        outcome: str = "",
        target: str | None = None,
    ) -> Entry:
        """The entry `record` would append, not stored yet (entry_id 0): for a write joined to
        another transaction (`joined_write`)."""
        if not ACTION_PATTERN.fullmatch(action):
            raise ValueError(f"audit action {action!r} is not a lower_case name")
        ids = tuple(int(i) for i in job_ids)
        return Entry(
            entry_id=0,
            at=self._clock(),
            principal=who.name,
            admin=who.admin,
            action=str(action),
            job_ids=ids[:MAX_JOB_IDS],
            job_count=len(ids),
            target=_clip(target, MAX_TARGET_CHARS) if target is not None else None,
            outcome=_clip(outcome, MAX_OUTCOME_CHARS),
        )

    def joined_write(self, entry: Entry) -> SqlWrite | None:
        """The SQL that stores `entry`, for the job store to run in the transaction of the
        change it records (one commit per submission: the job row and its audit row are on
        disk together, or neither is). None when entries do not live in jobs.db; then
        `joined` stores it."""
        return None

    def joined(self, entry: Entry) -> None:
        """After the transaction holding `joined_write(entry)` committed (or, without one,
        after the change it records): what `record` does besides the write."""
        if self.joined_write(entry) is None:
            self._insert(entry)
        self._maybe_prune()

    def query(self, query: Query) -> tuple[list[Entry], int]:
        """(the page, how many entries match in all)."""
        if not 0 <= query.limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 0 and {MAX_PAGE}")
        return self._select(query)

    def prune(self) -> int:
        """Removes entries older than the retention period; returns how many."""
        self._last_prune = self._monotonic()
        if self._retention is None:
            return 0
        return self._delete_before(self._clock() - self._retention)

    def _maybe_prune(self) -> None:
        if self._last_prune is None or self._monotonic() - self._last_prune >= PRUNE_EVERY_S:
            self.prune()

    def close(self) -> None:
        return None

    def _insert(self, entry: Entry) -> Entry:
        raise NotImplementedError

    def _select(self, query: Query) -> tuple[list[Entry], int]:
        raise NotImplementedError

    def _delete_before(self, cutoff: datetime) -> int:
        raise NotImplementedError


class MemoryAudit(Audit):
    """STORE=memory: the newest MEMORY_MAX_ENTRIES entries, gone at a restart."""

    def __init__(self, max_entries: int = MEMORY_MAX_ENTRIES, **options: Any) -> None:
        super().__init__(**options)
        self._entries: deque[Entry] = deque(maxlen=max_entries)
        self._last_id = 0

    def _insert(self, entry: Entry) -> Entry:
        self._last_id += 1
        stored = Entry(**{**entry.__dict__, "entry_id": self._last_id})
        self._entries.append(stored)
        return stored

    def _select(self, query: Query) -> tuple[list[Entry], int]:
        matching = [e for e in reversed(self._entries) if query.matches(e)]
        return matching[query.offset : query.offset + query.limit], len(matching)

    def _delete_before(self, cutoff: datetime) -> int:
        removed = 0
        while self._entries and self._entries[0].at < cutoff:
            self._entries.popleft()
            removed += 1
        return removed


class SqliteAudit(Audit):
    """The `audit` table of jobs.db, through a connection of its own. The job store creates
    the table (its migrations own the schema), so it must have opened the file first."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(**options)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        try:
            self._db.execute("SELECT entry_id FROM audit LIMIT 0")
        except sqlite3.OperationalError as exc:
            self._db.close()
            raise RuntimeError(
                f"{path} has no audit table: open the job store first (it migrates the schema)"
            ) from exc

    def _insert(self, entry: Entry) -> Entry:
        sql, params = self.joined_write(entry)
        with self._lock:
            cursor = self._db.execute(sql, params)
        return Entry(**{**entry.__dict__, "entry_id": int(cursor.lastrowid or 0)})

    def joined_write(self, entry: Entry) -> SqlWrite:
        return (
            "INSERT INTO audit (at, principal, admin, action, job_ids, job_count, target, "
            "outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                _timestamp(entry.at),
                entry.principal,
                int(entry.admin),
                entry.action,
                json.dumps(list(entry.job_ids)),
                entry.job_count,
                entry.target,
                entry.outcome,
            ),
        )

    def _select(self, query: Query) -> tuple[list[Entry], int]:
        clauses: list[str] = []
        params: list[object] = []
        if query.principal is not None:
            clauses.append("principal = ?")
            params.append(query.principal)
        if query.action is not None:
            clauses.append("action = ?")
            params.append(query.action)
        if query.job_id is not None:
            clauses.append("EXISTS (SELECT 1 FROM json_each(audit.job_ids) WHERE value = ?)")
            params.append(query.job_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM audit {where}", params).fetchone()[0]
            rows = self._db.execute(
                f"SELECT * FROM audit {where} ORDER BY entry_id DESC LIMIT ? OFFSET ?",
                [*params, query.limit, query.offset],
            ).fetchall()
        return [_from_row(row) for row in rows], int(total)

    def _delete_before(self, cutoff: datetime) -> int:
        with self._lock:
            cursor = self._db.execute("DELETE FROM audit WHERE at < ?", (_timestamp(cutoff),))
        return cursor.rowcount

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()


def _timestamp(at: datetime) -> str:
    # One fixed width and zone, so that text order is time order (retention compares text).
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _from_row(row: sqlite3.Row) -> Entry:
    return Entry(
        entry_id=row["entry_id"],
        at=datetime.fromisoformat(row["at"]),
        principal=row["principal"],
        admin=bool(row["admin"]),
        action=row["action"],
        job_ids=tuple(json.loads(row["job_ids"])),
        job_count=row["job_count"],
        target=row["target"],
        outcome=row["outcome"],
    )
