"""A fake executor and a fake clock for unit tests of JobManager's state machine.

These are the one stand-in the tests use: JobManager's tests are about the queue, the slots and
the statuses, not about processes (tests/e2e/ runs real ones). Every handle ends only when the
test says so, so each instant of a job's life can be reached exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lm_eval_server.runtime import jobdir
from lm_eval_server.runtime.executors.base import LaunchSpec

STOP_EXIT_CODE = -15  # what a process killed by SIGTERM reports


class FakeClock:
    """The manager's clock: time moves only when the test advances it."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


class FakeHandle:
    """A job's process: `wait` returns once the test calls `exit` (or `stop` ends it)."""

    def __init__(self, job_id: int, pid: int | None, ref: str | None) -> None:
        self.job_id = job_id
        self.pid = pid
        self.ref = ref
        self.code: int | None = None
        self.exited = False
        self.stop_calls: list[float] = []
        self.waits = 0
        self._wait_error: BaseException | None = None
        self._wake = asyncio.Event()

    def exit(self, code: int | None) -> None:
        """The process ends on its own with `code`."""
        if not self.exited:
            self.exited = True
            self.code = code
            self._wake.set()

    def break_wait(self, error: BaseException) -> None:
        """The watcher fails (a bug, a lost cluster): `wait` raises `error`."""
        self._wait_error = error
        self._wake.set()

    async def wait(self) -> int | None:
        self.waits += 1
        await self._wake.wait()
        if self._wait_error is not None:
            raise self._wait_error
        return self.code

    async def stop(self, grace_s: float) -> None:
        self.stop_calls.append(grace_s)
        self.exit(STOP_EXIT_CODE)


class FakeExecutor:
    name = "fake"

    def __init__(self) -> None:
        self.specs: list[LaunchSpec] = []
        self.handles: dict[int, FakeHandle] = {}
        # Job ids whose start raises this error.
        self.start_errors: dict[int, Exception] = {}
        # When set, start waits for it (the job is "launching"); `launching` says it got there.
        self.gate: asyncio.Event | None = None
        self.launching = asyncio.Event()
        # Job ids still running when a (restarted) manager asks to adopt them.
        self.alive: set[int] = set()
        self.adopt_calls: list[tuple[int, Path, int | None, str | None]] = []
        self.closed = False

    @property
    def started_ids(self) -> list[int]:
        return [spec.job_id for spec in self.specs]

    async def start(self, spec: LaunchSpec) -> FakeHandle:
        self.specs.append(spec)
        if self.gate is not None:
            self.launching.set()
            await self.gate.wait()
        error = self.start_errors.get(spec.job_id)
        if error is not None:
            raise error
        handle = FakeHandle(spec.job_id, pid=10_000 + spec.job_id, ref=f"fake-{spec.job_id}")
        self.handles[spec.job_id] = handle
        return handle

    def adopt(
        self, job_id: int, work_dir: Path, pid: int | None, ref: str | None
    ) -> FakeHandle | None:
        self.adopt_calls.append((job_id, work_dir, pid, ref))
        if job_id not in self.alive:
            return None
        handle = FakeHandle(job_id, pid, ref)
        self.handles[job_id] = handle
        return handle

    def recorded_exit_code(self, work_dir: Path, ref: str | None) -> int | None:
        # What the real supervisor leaves: tests write it with jobdir.write_exit.
        return jobdir.read_exit_code(work_dir)

    async def close(self) -> None:
        self.closed = True


async def eventually(
    predicate: Callable[[], bool], what: str = "the condition", timeout_s: float = 10.0
) -> None:
    """Waits (bounded, in real time) until `predicate()` holds; the event loop keeps running."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)
