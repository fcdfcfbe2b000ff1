"""Stop and delete at each instant of the state machine, with real processes and a real store.

The instants between `_schedule` handing a job to its runner and the runner starting the
process are too short to hit reliably over HTTP (tests/e2e/test_http_guard.py hammers them
there); here each one is reached exactly, by not yielding to the event loop or by holding the
executor's start.
"""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path

import pytest

from lm_eval_server.admission.validation import ValidatedJob
from lm_eval_server.config import Settings
from lm_eval_server.jobs.manager import JobManager, JobNotFound
from lm_eval_server.jobs.models import JobStatus
from lm_eval_server.jobs.store import SqliteJobStore
from lm_eval_server.runtime.executors.base import JobHandle, LaunchSpec
from lm_eval_server.runtime.executors.local import LocalExecutor
from tests.support.jobs import FAKE_LM_EVAL, group_members


def sleeper(seconds: str = "60") -> ValidatedJob:
    return ValidatedJob(
        values={"model": "dummy", "tasks": ["demo_mc"]},
        lm_args=["--model", "dummy", "--tasks", "demo_mc"],
        program=shlex.split(FAKE_LM_EVAL),
        env_vars={"FAKE_SLEEP_S": seconds},
        user_output_path=None,
        timeout_s=None,
    )


class _GatedExecutor(LocalExecutor):
    """A real local executor whose start waits for the test: the job is 'launching'."""

    def __init__(self, max_log_bytes: int) -> None:
        super().__init__(max_log_bytes)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.handles: list[JobHandle] = []

    async def start(self, spec: LaunchSpec) -> JobHandle:
        self.entered.set()
        await self.gate.wait()
        handle = await super().start(spec)
        self.handles.append(handle)
        return handle


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, task_index=False, stop_grace_s=2, max_concurrency=1)


def test_stop_at_the_instant_of_dispatch_starts_nothing(settings: Settings) -> None:
    store = SqliteJobStore(settings.db_path)

    async def scenario() -> tuple[str, JobStatus, Path]:
        manager = JobManager(settings, store, LocalExecutor(settings.max_log_bytes))
        await manager.start()
        record = manager.submit(sleeper())  # a free slot: handed to a runner at once
        assert record.status is JobStatus.queued and manager.running_count == 1
        message = await manager.stop(record.job_id)  # before the runner ever ran
        await manager.shutdown()
        return message, record.status, Path(record.work_dir)

    message, status, work_dir = asyncio.run(scenario())
    assert message.endswith("stopped.")
    assert status is JobStatus.stopped
    assert not (work_dir / "supervisor.log").exists()  # the executor was never asked
    [persisted] = store.load_all()
    assert persisted.status is JobStatus.stopped and persisted.pid is None


def test_delete_at_the_instant_of_dispatch_starts_nothing(settings: Settings) -> None:
    store = SqliteJobStore(settings.db_path)

    async def scenario() -> Path:
        manager = JobManager(settings, store, LocalExecutor(settings.max_log_bytes))
        await manager.start()
        record = manager.submit(sleeper())
        await manager.delete(record.job_id)
        await asyncio.sleep(0.2)  # a runner that outlived the delete would launch now
        with pytest.raises(JobNotFound):
            manager.get(record.job_id)
        assert manager.running_count == 0
        await manager.shutdown()
        return Path(record.work_dir)

    work_dir = asyncio.run(scenario())
    assert not work_dir.exists()
    assert store.load_all() == []


def test_stop_while_launching_stops_the_process_it_starts(settings: Settings) -> None:
    store = SqliteJobStore(settings.db_path)
    executor = _GatedExecutor(settings.max_log_bytes)

    async def scenario() -> tuple[JobStatus, int | None]:
        manager = JobManager(settings, store, executor)
        await manager.start()
        record = manager.submit(sleeper())
        await executor.entered.wait()
        assert record.status is JobStatus.running and record.pid is None
        stopping = asyncio.create_task(manager.stop(record.job_id))
        await asyncio.sleep(0.05)
        assert not stopping.done()  # waits for the runner, not for nothing
        executor.gate.set()
        await stopping
        await manager.shutdown()
        return record.status, record.pid

    status, pid = asyncio.run(scenario())
    assert status is JobStatus.stopped
    assert pid is not None and group_members(pid) == []


def test_stop_all_while_one_job_is_dispatched_and_others_wait(settings: Settings) -> None:
    store = SqliteJobStore(settings.db_path)

    async def scenario() -> list[JobStatus]:
        manager = JobManager(settings, store, LocalExecutor(settings.max_log_bytes))
        await manager.start()
        records = [manager.submit(sleeper()) for _ in range(4)]
        stopped = await manager.stop_all()
        assert stopped == [r.job_id for r in records]
        await asyncio.sleep(0.2)  # nothing may start after stop_all returned
        assert manager.running_count == 0 and manager.queue_depth == 0
        await manager.shutdown()
        return [r.status for r in records]

    assert asyncio.run(scenario()) == [JobStatus.stopped] * 4
    assert all(r.pid is None for r in store.load_all())
