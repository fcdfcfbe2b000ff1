"""JobStore: the only code that reads or writes persisted job records.

SQLite in WAL mode at DATA_DIR/jobs.db is the durable default; every write commits before the
call returns, so an acknowledged change survives a crash of the server. `MemoryJobStore` keeps
the original server's in-memory behaviour. Both refuse to move a job out of a terminal state.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from lm_eval_server.models import JobRecord, JobStatus

SCHEMA_VERSION = 5

# Each entry migrates the schema from version N-1 to N; append, never edit.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE IF NOT EXISTS jobs (
        job_id INTEGER PRIMARY KEY AUTOINCREMENT,
        status TEXT NOT NULL,
        request TEXT NOT NULL,
        argv TEXT NOT NULL,
        argument TEXT NOT NULL,
        env_vars TEXT NOT NULL,
        work_dir TEXT NOT NULL,
        output_path TEXT NOT NULL,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        exit_code INTEGER,
        error TEXT,
        pid INTEGER,
        results_file TEXT,
        idempotency_key TEXT UNIQUE,
        executor_ref TEXT
    );
    """,
    # Idempotency keys are bound to the caller and the body. Keys stored before that were
    # bound to neither, so honouring them could hand one caller's job to another: drop them.
    """
    ALTER TABLE jobs ADD COLUMN idempotency_body TEXT;
    UPDATE jobs SET idempotency_key = NULL;
    """,
    # Jobs belong to the principal whose key submitted them; earlier jobs to `default`, the
    # principal of a bare key and of a server without keys, so they stay where they were seen.
    """
    ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT 'default';
    CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner);
    """,
    # The GPU devices a job holds (JSON list), so a job re-adopted after a restart keeps them
    # and no other job is given them; NULL where the server hands out no devices.
    """
    ALTER TABLE jobs ADD COLUMN gpus TEXT;
    """,
    # The audit trail (audit.py): who did what to which jobs, newest read first. Job ids are
    # plain numbers, not references: an entry outlives the jobs it names.
    """
    CREATE TABLE IF NOT EXISTS audit (
        entry_id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        principal TEXT NOT NULL,
        admin INTEGER NOT NULL,
        action TEXT NOT NULL,
        job_ids TEXT NOT NULL,
        job_count INTEGER NOT NULL,
        target TEXT,
        outcome TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS audit_principal ON audit (principal, entry_id);
    CREATE INDEX IF NOT EXISTS audit_action ON audit (action, entry_id);
    CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
    """,
]

_COLUMNS = (
    "job_id",
    "status",
    "request",
    "argv",
    "argument",
    "env_vars",
    "work_dir",
    "output_path",
    "created_at",
    "started_at",
    "finished_at",
    "exit_code",
    "error",
    "pid",
    "results_file",
    "idempotency_key",
    "executor_ref",
    "idempotency_body",
    "owner",
    "gpus",
)
_MUTABLE_COLUMNS = (
    "status",
    "started_at",
    "finished_at",
    "exit_code",
    "error",
    "pid",
    "results_file",
    "executor_ref",
    "gpus",
)
_JSON_COLUMNS = {"request", "argv", "env_vars", "gpus"}
_TIME_COLUMNS = {"created_at", "started_at", "finished_at"}


class TerminalStateError(RuntimeError):
    """A write tried to move a job out of a terminal state."""


class JobStore(Protocol):
    def next_id(self) -> int: ...
    def insert(self, record: JobRecord) -> None: ...
    def update(self, record: JobRecord, previous: JobStatus) -> None: ...
    def delete(self, job_ids: list[int]) -> None: ...
    def load_all(self) -> list[JobRecord]: ...
    def close(self) -> None: ...


def _check_transition(previous: JobStatus, new: JobStatus) -> None:
    if previous.is_terminal() and new != previous:
        raise TerminalStateError(f"job is {previous.value}; it cannot become {new.value}")


def _to_row(record: JobRecord, columns: tuple[str, ...] = _COLUMNS) -> tuple[Any, ...]:
    values = []
    for name in columns:
        value = getattr(record, name)
        if name in _JSON_COLUMNS:
            value = json.dumps(value) if value is not None else None
        elif name in _TIME_COLUMNS:
            value = value.isoformat() if value is not None else None
        elif name == "status":
            value = value.value
        values.append(value)
    return tuple(values)


def _from_row(row: sqlite3.Row) -> JobRecord:
    kwargs: dict[str, Any] = {}
    for name in _COLUMNS:
        value = row[name]
        if name in _JSON_COLUMNS:
            value = json.loads(value) if value is not None else None
        elif name in _TIME_COLUMNS:
            value = datetime.fromisoformat(value) if value is not None else None
        elif name == "status":
            value = JobStatus(value)
        kwargs[name] = value
    return JobRecord(**kwargs)


def _owner_only(path: Path) -> None:
    """Records hold requests' env_vars (API keys): the database is 0600. SQLite creates its
    -wal and -shm files with the database file's mode; older ones are tightened too."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)


class SqliteJobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _owner_only(path)
        # One connection guarded by a lock: writes come from the event loop thread, but
        # check_same_thread=False lets maintenance run from a worker thread safely.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a crash of the process (not of the OS) without an fsync
        # per commit, which is the failure this store is for.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"jobs.db has schema version {version}, newer than this server's "
                    f"{SCHEMA_VERSION}; upgrade the server or use another DATA_DIR"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[target - 1].split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version={target}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    def next_id(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='jobs'").fetchone()
        return (row[0] if row else 0) + 1

    def insert(self, record: JobRecord) -> None:
        placeholders = ",".join("?" * len(_COLUMNS))
        with self._lock:
            self._db.execute(
                f"INSERT INTO jobs ({','.join(_COLUMNS)}) VALUES ({placeholders})",
                _to_row(record),
            )

    def update(self, record: JobRecord, previous: JobStatus) -> None:
        _check_transition(previous, record.status)
        # Only what changes over a job's life: the request, argv and environment are written
        # once, so the manager may drop its in-memory copies of them after the launch.
        # Serialising only these also keeps a megabyte request body off every status write.
        assignments = ",".join(f"{name}=?" for name in _MUTABLE_COLUMNS)
        with self._lock:
            self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE job_id=?",
                (*_to_row(record, _MUTABLE_COLUMNS), record.job_id),
            )

    def delete(self, job_ids: list[int]) -> None:
        if not job_ids:
            return
        with self._lock:
            self._db.executemany("DELETE FROM jobs WHERE job_id=?", [(i,) for i in job_ids])

    def load_all(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY job_id").fetchall()
        return [_from_row(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class MemoryJobStore:
    """Nothing survives a restart, as in the original server."""

    def __init__(self) -> None:
        self._last_id = 0

    def next_id(self) -> int:
        return self._last_id + 1

    def insert(self, record: JobRecord) -> None:
        self._last_id = max(self._last_id, record.job_id)

    def update(self, record: JobRecord, previous: JobStatus) -> None:
        _check_transition(previous, record.status)

    def delete(self, job_ids: list[int]) -> None:
        return None

    def load_all(self) -> list[JobRecord]:
        return []

    def close(self) -> None:
        return None
