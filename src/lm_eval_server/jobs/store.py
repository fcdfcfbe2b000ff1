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
from collections.abc import Iterator, Sequence
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from lm_eval_server.jobs.models import (
    TERMINAL_STATUSES,
    DeliveryState,
    JobRecord,
    JobStatus,
    WebhookDelivery,
)

SCHEMA_VERSION = 10

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
    # A job's webhook from the moment it ended; a pending row outlives its job (it is the
    # notice that the job ended), a finished one goes with it.
    """
    CREATE TABLE IF NOT EXISTS webhook_deliveries (
        job_id INTEGER PRIMARY KEY,
        delivery_id TEXT NOT NULL,
        url TEXT NOT NULL,
        status TEXT NOT NULL,
        exit_code INTEGER,
        results_file TEXT,
        created_at TEXT NOT NULL,
        state TEXT NOT NULL,
        metrics_json TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_status INTEGER,
        last_error TEXT,
        next_attempt_at TEXT,
        delivered_at TEXT
    );
    CREATE INDEX IF NOT EXISTS webhook_deliveries_state ON webhook_deliveries (state);
    """,
    # A webhook's signed body names the owner of its job. Rows from before: their job's owner
    # while the job is still stored, else `default` (a job's owner before there were owners).
    """
    ALTER TABLE webhook_deliveries ADD COLUMN owner TEXT NOT NULL DEFAULT 'default';
    UPDATE webhook_deliveries SET owner = COALESCE(
        (SELECT owner FROM jobs WHERE jobs.job_id = webhook_deliveries.job_id), 'default'
    );
    """,
    # A regression gate's verdict (JSON), evaluated once when its job ends: GET /job shows it
    # and the job's webhook carries it (a delivery keeps its own copy, as it does the metrics).
    """
    ALTER TABLE jobs ADD COLUMN verdict TEXT;
    ALTER TABLE webhook_deliveries ADD COLUMN verdict_json TEXT;
    """,
    # Reproduction receipts (jobs/receipts.py): a finished job's receipt (JSON, read on
    # request, not loaded with the records), the job a reproduction repeats, and its diff.
    """
    ALTER TABLE jobs ADD COLUMN receipt TEXT;
    ALTER TABLE jobs ADD COLUMN reproduction_of INTEGER;
    ALTER TABLE jobs ADD COLUMN reproduction TEXT;
    """,
    # Resume and reuse (issue 21): a job's attempt number and how many it may make by itself,
    # when a retry in its backoff is due (so a restart does not forget it), its response
    # cache's fingerprint and the last attempt's cache hits and misses. Earlier jobs made one
    # attempt, without a cache.
    """
    ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN max_attempts INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN retry_at TEXT;
    ALTER TABLE jobs ADD COLUMN cache_fingerprint TEXT;
    ALTER TABLE jobs ADD COLUMN cache_hits INTEGER;
    ALTER TABLE jobs ADD COLUMN cache_misses INTEGER;
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
    "verdict",
    "reproduction_of",
    "reproduction",
    "attempt",
    "max_attempts",
    "retry_at",
    "cache_fingerprint",
    "cache_hits",
    "cache_misses",
)
_INSERT_JOB = f"INSERT INTO jobs ({','.join(_COLUMNS)}) VALUES ({','.join('?' * len(_COLUMNS))})"
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
    "verdict",
    "attempt",
    "retry_at",
    "cache_hits",
    "cache_misses",
)
_JSON_COLUMNS = {"request", "argv", "env_vars", "gpus", "verdict", "reproduction"}
_TIME_COLUMNS = {"created_at", "started_at", "finished_at", "retry_at"}
# A resume (POST /job/{id}/resume) is the one way out of a terminal state: back to the queue.
RESUMABLE_STATUSES = frozenset({JobStatus.failed, JobStatus.stopped})


_DELIVERY_COLUMNS = tuple(f.name for f in fields(WebhookDelivery))
_DELIVERY_TIMES = {"created_at", "next_attempt_at", "delivered_at"}


def _delivery_row(delivery: WebhookDelivery) -> tuple[Any, ...]:
    values = []
    for name in _DELIVERY_COLUMNS:
        value = getattr(delivery, name)
        if name in _DELIVERY_TIMES:
            value = value.isoformat() if value is not None else None
        elif name == "state":
            value = value.value
        values.append(value)
    return tuple(values)


def _delivery_from_row(row: sqlite3.Row) -> WebhookDelivery:
    kwargs: dict[str, Any] = {}
    for name in _DELIVERY_COLUMNS:
        value = row[name]
        if name in _DELIVERY_TIMES:
            value = datetime.fromisoformat(value) if value is not None else None
        elif name == "state":
            value = DeliveryState(value)
        kwargs[name] = value
    return WebhookDelivery(**kwargs)


class TerminalStateError(RuntimeError):
    """A write tried to move a job out of a terminal state."""


# SQL run in the transaction of a job's insert (the audit row of its submission).
JoinedWrites = Sequence[tuple[str, Sequence[Any]]]


class JobStore(Protocol):
    def next_id(self) -> int: ...
    def insert(self, record: JobRecord, joined: JoinedWrites = ()) -> None: ...
    def update(self, record: JobRecord, previous: JobStatus) -> None: ...
    def delete(self, job_ids: list[int]) -> None: ...
    def load_all(self) -> list[JobRecord]: ...
    def close(self) -> None: ...
    # The request and env_vars as submitted (resume, retry, reproduce, receipts), receipts.
    def launch_inputs(self, job_id: int) -> tuple[dict[str, Any], dict[str, Any]] | None: ...
    def save_receipt(self, job_id: int, receipt: str) -> None: ...
    def get_receipt(self, job_id: int) -> str | None: ...
    def save_reproduction(self, job_id: int, reproduction: dict[str, Any]) -> None: ...
    def reopen(self, record: JobRecord, previous: JobStatus) -> None: ...


class DeliveryStore(Protocol):
    """Webhook deliveries (webhook_sender). A delivery row is written when its job ends."""

    def save_delivery(self, delivery: WebhookDelivery) -> None: ...
    def get_delivery(self, job_id: int) -> WebhookDelivery | None: ...
    def pending_deliveries(self) -> list[WebhookDelivery]: ...
    def ended_without_delivery(self) -> list[JobRecord]: ...


def _check_reopen(previous: JobStatus, new: JobStatus) -> None:
    if previous not in RESUMABLE_STATUSES or new is not JobStatus.queued:
        raise TerminalStateError(f"a {previous.value} job cannot be resumed as {new.value}")


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
        self._last_id: int | None = None  # the highest job id inserted (next_id)
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
            if self._last_id is None:
                # Read once: from then on this store is the table's only writer (the server
                # owns its DATA_DIR) and follows its inserts itself.
                row = self._db.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name='jobs'"
                ).fetchone()
                self._last_id = row[0] if row else 0
            return self._last_id + 1

    def insert(self, record: JobRecord, joined: JoinedWrites = ()) -> None:
        """The job's row and `joined` (its audit row) in one transaction: one commit, and on
        disk together or not at all."""
        with self._lock:
            if not joined:
                self._db.execute(_INSERT_JOB, _to_row(record))
            else:
                with self._transaction():
                    self._db.execute(_INSERT_JOB, _to_row(record))
                    for sql, params in joined:
                        self._db.execute(sql, params)
            if self._last_id is not None:
                # AUTOINCREMENT never hands out an id below the highest ever inserted.
                self._last_id = max(self._last_id, record.job_id)

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

    def reopen(self, record: JobRecord, previous: JobStatus) -> None:
        """A Failed or Stopped job back to Queued (a resume); every other move out of a
        terminal state is still refused."""
        _check_reopen(previous, record.status)
        assignments = ",".join(f"{name}=?" for name in _MUTABLE_COLUMNS)
        with self._lock:
            self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE job_id=?",
                (*_to_row(record, _MUTABLE_COLUMNS), record.job_id),
            )

    def launch_inputs(self, job_id: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The request and env_vars a job was submitted with (the record in memory drops
        them after its launch): what a resume or retry launches from again."""
        with self._lock:
            row = self._db.execute(
                "SELECT request, env_vars FROM jobs WHERE job_id=?", (job_id,)
            ).fetchone()
        if row is None:
            return None
        return json.loads(row["request"]), json.loads(row["env_vars"])

    def delete(self, job_ids: list[int]) -> None:
        if not job_ids:
            return
        ids = [(i,) for i in job_ids]
        with self._lock, self._transaction():
            self._db.executemany("DELETE FROM jobs WHERE job_id=?", ids)
            # A pending webhook stays: it still tells its receiver that the job ended.
            self._db.executemany(
                "DELETE FROM webhook_deliveries WHERE job_id=? AND state!='pending'", ids
            )

    def load_all(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY job_id").fetchall()
        return [_from_row(row) for row in rows]

    # ------------------------------------------------------------------ receipts
    def save_receipt(self, job_id: int, receipt: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET receipt=? WHERE job_id=?", (receipt, job_id))

    def get_receipt(self, job_id: int) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT receipt FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return row[0] if row is not None else None

    def save_reproduction(self, job_id: int, reproduction: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET reproduction=? WHERE job_id=?", (json.dumps(reproduction), job_id)
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ webhook deliveries
    def save_delivery(self, delivery: WebhookDelivery) -> None:
        placeholders = ",".join("?" * len(_DELIVERY_COLUMNS))
        with self._lock, self._transaction():
            self._db.execute(
                f"INSERT OR REPLACE INTO webhook_deliveries ({','.join(_DELIVERY_COLUMNS)}) "
                f"VALUES ({placeholders})",
                _delivery_row(delivery),
            )
            if delivery.state.is_final():
                # Its job was deleted while it was pending: nobody can ask about it any more.
                self._db.execute(
                    "DELETE FROM webhook_deliveries WHERE job_id=? AND NOT EXISTS "
                    "(SELECT 1 FROM jobs WHERE jobs.job_id=webhook_deliveries.job_id)",
                    (delivery.job_id,),
                )

    def get_delivery(self, job_id: int) -> WebhookDelivery | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM webhook_deliveries WHERE job_id=?", (job_id,)
            ).fetchone()
        return _delivery_from_row(row) if row is not None else None

    def pending_deliveries(self) -> list[WebhookDelivery]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM webhook_deliveries WHERE state='pending' ORDER BY job_id"
            ).fetchall()
        return [_delivery_from_row(row) for row in rows]

    def ended_without_delivery(self) -> list[JobRecord]:
        """Jobs with a callback_url that ended but have no delivery row: the server stopped
        between the two writes. Their webhook is still owed."""
        terminal = ",".join(f"'{s.value}'" for s in TERMINAL_STATUSES)
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE status IN ({terminal}) "
                "AND json_extract(request, '$.callback_url') IS NOT NULL "
                "AND job_id NOT IN (SELECT job_id FROM webhook_deliveries) ORDER BY job_id"
            ).fetchall()
        return [_from_row(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class MemoryJobStore:
    """Nothing survives a restart, as in the original server."""

    def __init__(self) -> None:
        self._last_id = 0
        self._job_ids: set[int] = set()
        self._deliveries: dict[int, WebhookDelivery] = {}
        # What a resume, a retry or a reproduce launches from (the record drops them after its
        # launch), and receipts.
        self._receipts: dict[int, str] = {}
        self._inputs: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}

    def next_id(self) -> int:
        return self._last_id + 1

    def insert(self, record: JobRecord, joined: JoinedWrites = ()) -> None:
        if joined:
            # Nothing here could hold them: the caller would lose them silently.
            raise ValueError("a memory store cannot run SQL writes; store them elsewhere")
        self._last_id = max(self._last_id, record.job_id)
        self._job_ids.add(record.job_id)
        self._inputs[record.job_id] = (dict(record.request), dict(record.env_vars))

    def save_receipt(self, job_id: int, receipt: str) -> None:
        if job_id in self._job_ids:
            self._receipts[job_id] = receipt

    def get_receipt(self, job_id: int) -> str | None:
        return self._receipts.get(job_id)

    def save_reproduction(self, job_id: int, reproduction: dict[str, Any]) -> None:
        return None  # the record holds it; nothing survives a restart

    def reopen(self, record: JobRecord, previous: JobStatus) -> None:
        _check_reopen(previous, record.status)

    def launch_inputs(self, job_id: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
        inputs = self._inputs.get(job_id)
        return None if inputs is None else (dict(inputs[0]), dict(inputs[1]))

    def update(self, record: JobRecord, previous: JobStatus) -> None:
        _check_transition(previous, record.status)

    def delete(self, job_ids: list[int]) -> None:
        for job_id in job_ids:
            self._job_ids.discard(job_id)
            self._inputs.pop(job_id, None)
            self._receipts.pop(job_id, None)
            delivery = self._deliveries.get(job_id)
            if delivery is not None and delivery.state is not DeliveryState.pending:
                del self._deliveries[job_id]

    def save_delivery(self, delivery: WebhookDelivery) -> None:
        if delivery.state.is_final() and delivery.job_id not in self._job_ids:
            self._deliveries.pop(delivery.job_id, None)
        else:
            self._deliveries[delivery.job_id] = replace(delivery)

    def get_delivery(self, job_id: int) -> WebhookDelivery | None:
        delivery = self._deliveries.get(job_id)
        return replace(delivery) if delivery is not None else None

    def pending_deliveries(self) -> list[WebhookDelivery]:
        return []  # nothing survives a restart

    def ended_without_delivery(self) -> list[JobRecord]:
        return []

    def load_all(self) -> list[JobRecord]:
        return []

    def close(self) -> None:
        return None
