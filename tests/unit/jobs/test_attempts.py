"""Attempts: the retry rule and backoff (pure), and earlier attempts' logs kept in attempt-N/;
the manager's retries and resumes with a fake executor and the real SQLite store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lm_eval_server.admission.validation import ValidatedJob
from lm_eval_server.config import Settings
from lm_eval_server.errors import JobNotResumable
from lm_eval_server.jobs import attempts
from lm_eval_server.jobs.manager import JobManager
from lm_eval_server.jobs.models import JobStatus
from lm_eval_server.jobs.store import SqliteJobStore, TerminalStateError
from lm_eval_server.runtime import jobdir
from tests.support.fake_executor import FakeClock, FakeExecutor, eventually


def test_backoff_doubles_from_one_second_and_is_capped() -> None:
    assert [attempts.backoff_s(a, 300) for a in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert attempts.backoff_s(20, 300) == 300
    assert attempts.backoff_s(10_000, 60) == 60  # no overflow for absurd attempt numbers
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert (attempts.retry_at(now, 3, 300) - now).total_seconds() == 4


def test_retries_only_while_attempts_are_left() -> None:
    assert attempts.may_retry(1, 2) and not attempts.may_retry(2, 2)
    assert not attempts.may_retry(1, 1)


def test_archive_moves_one_attempts_files_and_refuses_a_planted_link(tmp_path: Path) -> None:
    work = tmp_path / "job"
    work.mkdir()
    (work / "stderr.log").write_text("attempt one\n")
    (work / "stdout.log").write_text("out\n")
    jobdir.write_exit(work, 1)
    (work / "results").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (work / "attempt-1").symlink_to(elsewhere)  # planted by the job
    target = attempts.archive(work, 1)
    assert target == work / "attempt-1" and not target.is_symlink()
    assert (target / "stderr.log").read_text() == "attempt one\n"
    assert jobdir.read_exit_code(target) == 1
    assert not (work / "stderr.log").exists() and not (work / jobdir.EXIT_RECORD).exists()
    assert (work / "results").is_dir()  # results stay where lm-eval writes them
    assert list(elsewhere.iterdir()) == []
    assert attempts.archived_dir(work, 1) == target
    assert attempts.archived_dir(work, 2) is None
    (work / "attempt-2").symlink_to(elsewhere)
    assert attempts.archived_dir(work, 2) is None  # a link is never read through


# ---------------------------------------------------------------- the manager


def job(**values: Any) -> ValidatedJob:
    return ValidatedJob(
        values={"model": "dummy", "tasks": ["demo"], **values},
        lm_args=["--model", "dummy", "--tasks", "demo"],
        program=["lm_eval"],
        env_vars={"FAKE_A": "1"},
        user_output_path=None,
        timeout_s=None,
        model="dummy",
        model_args={},
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        task_index=False,
        queue_process_interval=3600,
        retry_backoff_max_s=0,
        allowed_env_vars=["FAKE_*"],
        stop_grace_s=1,
    )


@contextlib.asynccontextmanager
async def running(settings: Settings, executor: FakeExecutor) -> AsyncIterator[JobManager]:
    store = SqliteJobStore(settings.db_path)
    manager = JobManager(settings, store, executor, clock=FakeClock())
    await manager.start()
    try:
        yield manager
    finally:
        if not manager.shutting_down:
            await manager.shutdown()
        store.close()


async def started(executor: FakeExecutor, job_id: int, count: int) -> None:
    def ready() -> bool:
        handle = executor.handles.get(job_id)
        return (
            sum(s.job_id == job_id for s in executor.specs) == count
            and handle is not None
            and handle.waits > 0
        )

    await eventually(ready, f"launch {count} of job {job_id}")


def test_a_failed_run_is_retried_until_max_attempts_with_the_stored_inputs(
    settings: Settings,
) -> None:
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(settings, executor) as manager:
            record = manager.submit(job(max_attempts=3))
            await started(executor, 1, 1)
            executor.handles[1].exit(-9)  # killed
            await started(executor, 1, 2)
            assert record.attempt == 2 and record.status is JobStatus.running
            second = executor.specs[-1]
            # Relaunched from the stored request and environment (trimmed after launch).
            assert second.argv == executor.specs[0].argv
            assert second.env["FAKE_A"] == "1"
            executor.handles[1].exit(1)
            await started(executor, 1, 3)
            executor.handles[1].exit(1)
            await eventually(lambda: record.status.is_terminal())
            assert record.status is JobStatus.failed and record.attempt == 3
            assert sum(s.job_id == 1 for s in executor.specs) == 3  # no fourth run

    asyncio.run(scenario())


def test_a_stop_is_never_retried_and_resume_queues_the_next_attempt(settings: Settings) -> None:
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(settings, executor) as manager:
            record = manager.submit(job(max_attempts=3))
            await started(executor, 1, 1)
            await manager.stop(1)
            assert record.status is JobStatus.stopped and record.attempt == 1
            await asyncio.sleep(0.05)
            assert len(executor.specs) == 1
            manager.resume(1)
            await started(executor, 1, 2)
            assert record.attempt == 2
            with pytest.raises(JobNotResumable):
                manager.resume(1)  # running
            executor.handles[1].exit(0)
            await eventually(lambda: record.status is JobStatus.completed)
            with pytest.raises(JobNotResumable):
                manager.resume(1)  # completed
        store = SqliteJobStore(settings.db_path)
        try:
            (stored,) = store.load_all()
            assert (stored.status, stored.attempt, stored.max_attempts) == (
                JobStatus.completed,
                2,
                3,
            )
        finally:
            store.close()

    asyncio.run(scenario())


def test_a_stop_during_a_retrys_wait_ends_at_the_attempt_that_ran(settings: Settings) -> None:
    executor = FakeExecutor()
    waiting = settings.model_copy(update={"retry_backoff_max_s": 60})  # 1 s before attempt 2

    async def scenario() -> None:
        async with running(waiting, executor) as manager:
            record = manager.submit(job(max_attempts=3))
            await started(executor, 1, 1)
            executor.handles[1].exit(1)
            await eventually(lambda: record.retry_at is not None)
            assert record.status is JobStatus.queued and record.attempt == 2
            await manager.stop(1)
            # Attempt 2 never ran: the job is Stopped at attempt 1, with attempt 1's failure.
            assert record.status is JobStatus.stopped
            assert (record.attempt, record.retry_at) == (1, None)
            assert record.error is not None and "attempt 1" in record.error
            assert len(executor.specs) == 1
            manager.resume(1)
            await started(executor, 1, 2)
            assert record.attempt == 2

    asyncio.run(scenario())


def test_a_job_lost_in_a_restart_goes_back_to_the_queue_when_attempts_are_left(
    settings: Settings,
) -> None:
    executor = FakeExecutor()

    async def first_server() -> None:
        async with running(settings, executor) as manager:
            manager.submit(job(max_attempts=2))
            manager.submit(job())  # one attempt: lost is Failed, as before
            await started(executor, 1, 1)
            await started(executor, 2, 1)
            # The server goes away; the jobs' processes die with no exit code.

    async def second_server() -> None:
        restarted = FakeExecutor()
        async with running(settings, restarted) as manager:
            await started(restarted, 1, 1)
            record = manager.get(1)
            assert record.attempt == 2
            assert manager.get(2).status is JobStatus.failed
            assert "left no exit code" in (manager.get(2).error or "")
            restarted.handles[1].exit(0)
            await eventually(lambda: record.status is JobStatus.completed)

    asyncio.run(first_server())
    asyncio.run(second_server())


def test_the_store_reopens_only_failed_or_stopped_jobs_as_queued(settings: Settings) -> None:
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(settings, executor) as manager:
            record = manager.submit(job())
            await started(executor, 1, 1)
            executor.handles[1].exit(0)
            await eventually(lambda: record.status is JobStatus.completed)
            store = SqliteJobStore(settings.db_path)
            try:
                record.status = JobStatus.queued
                with pytest.raises(TerminalStateError):
                    store.reopen(record, JobStatus.completed)
                assert store.launch_inputs(1) == (
                    {"model": "dummy", "tasks": ["demo"]},
                    {"FAKE_A": "1"},
                )
            finally:
                record.status = JobStatus.completed
                store.close()

    asyncio.run(scenario())
