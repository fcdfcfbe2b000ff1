"""JobManager with a real store and real processes, where an executor fails mid-job."""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path

from lm_eval_server.admission.validation import ValidatedJob
from lm_eval_server.config import Settings
from lm_eval_server.jobs.manager import JobManager
from lm_eval_server.jobs.models import JobStatus
from lm_eval_server.jobs.store import SqliteJobStore
from lm_eval_server.runtime.executors.base import JobHandle, LaunchSpec
from lm_eval_server.runtime.executors.local import LocalExecutor
from tests.support.jobs import FAKE_LM_EVAL, group_members


class _BrokenWait:
    """Wraps a real handle whose watcher breaks (as a bug or a lost cluster would)."""

    def __init__(self, inner: JobHandle) -> None:
        self._inner = inner
        self.pid = inner.pid
        self.ref = inner.ref

    async def wait(self) -> int | None:
        await asyncio.sleep(0.3)
        raise RuntimeError("watcher broke")

    async def stop(self, grace_s: float) -> None:
        await self._inner.stop(grace_s)


class _BrokenExecutor(LocalExecutor):
    async def start(self, spec: LaunchSpec) -> JobHandle:
        return _BrokenWait(await super().start(spec))


def test_a_failing_watcher_fails_the_job_and_stops_its_process(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, task_index=False, stop_grace_s=2)
    store = SqliteJobStore(settings.db_path)
    job = ValidatedJob(
        values={"model": "dummy", "tasks": ["demo_mc"]},
        lm_args=["--model", "dummy", "--tasks", "demo_mc"],
        program=shlex.split(FAKE_LM_EVAL),
        env_vars={"FAKE_SLEEP_S": "60"},
        user_output_path=None,
        timeout_s=None,
    )

    async def scenario() -> tuple[JobStatus, str | None, int | None]:
        manager = JobManager(settings, store, _BrokenExecutor(settings.max_log_bytes))
        await manager.start()
        record = manager.submit(job)
        for _ in range(200):
            await asyncio.sleep(0.05)
            if record.status.is_terminal():
                break
        await manager.shutdown()
        return record.status, record.error, record.pid

    status, error, pid = asyncio.run(scenario())
    assert status is JobStatus.failed
    assert error is not None and "lost track" in error and "watcher broke" in error
    assert pid is not None and group_members(pid) == []
    [persisted] = store.load_all()
    assert persisted.status is JobStatus.failed
