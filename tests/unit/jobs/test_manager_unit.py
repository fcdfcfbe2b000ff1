"""JobManager's state machine with a fake executor and a fake clock (tests/support/fake_executor).

Only the public API is used: submit/stop/delete/get/list/counts, start/shutdown, and what the
real SQLite store holds afterwards. Processes are fake here because the subject is the queue,
the slots and the statuses; tests/e2e/ covers the same paths with real lm_eval processes.
The sweeper's interval is an hour in every test, so a job that starts did so on an event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lm_eval_server.admission.idempotency import claim
from lm_eval_server.admission.validation import ValidatedJob
from lm_eval_server.config import Settings
from lm_eval_server.jobs.manager import (
    IdempotencyConflict,
    JobManager,
    JobNotFound,
    QueueFull,
    ShuttingDown,
)
from lm_eval_server.jobs.models import JobRecord, JobStatus
from lm_eval_server.jobs.store import SqliteJobStore
from lm_eval_server.runtime import jobdir
from tests.support.fake_executor import (
    STOP_EXIT_CODE,
    FakeClock,
    FakeExecutor,
    FakeHandle,
    eventually,
)

GRACE_S = 2.0
NOT_STOPPED = "nothing to stop"


@dataclass
class Env:
    settings: Settings
    store: SqliteJobStore
    clock: FakeClock

    def reopen(self) -> SqliteJobStore:
        """The store a restarted server opens: the same jobs.db, a new connection."""
        self.store = SqliteJobStore(self.settings.db_path)
        return self.store

    def persisted(self) -> dict[int, JobRecord]:
        return {r.job_id: r for r in self.store.load_all()}


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., Env]]:
    stores: list[SqliteJobStore] = []

    def make(**overrides: Any) -> Env:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "task_index": False,
            "stop_grace_s": GRACE_S,
            "queue_process_interval": 3600,
        }
        values.update(overrides)
        settings = Settings(**values)
        store = SqliteJobStore(settings.db_path)
        stores.append(store)
        return Env(settings, store, FakeClock())

    yield make
    for store in stores:
        store.close()


def job(task: str = "demo", timeout_s: float | None = None) -> ValidatedJob:
    return ValidatedJob(
        values={"model": "dummy", "tasks": [task]},
        lm_args=["--model", "dummy", "--tasks", task],
        program=["lm_eval"],
        env_vars={},
        user_output_path=None,
        timeout_s=timeout_s,
    )


@contextlib.asynccontextmanager
async def running(env: Env, executor: FakeExecutor) -> AsyncIterator[JobManager]:
    manager = JobManager(env.settings, env.store, executor, clock=env.clock)
    await manager.start()
    try:
        yield manager
    finally:
        if not manager.shutting_down:
            await manager.shutdown()


async def watched(executor: FakeExecutor, job_id: int) -> FakeHandle:
    """The job's handle, once the manager is waiting on it."""

    def ready() -> bool:
        handle = executor.handles.get(job_id)
        return handle is not None and handle.waits > 0

    await eventually(ready, f"job {job_id} to be watched")
    return executor.handles[job_id]


async def terminal(manager: JobManager, job_id: int) -> JobRecord:
    record = manager.get(job_id)
    await eventually(lambda: record.status.is_terminal(), f"job {job_id} to finish")
    return record


def statuses(manager: JobManager, ids: list[int]) -> list[JobStatus]:
    return [manager.get(i).status for i in ids]


Q, R, C, F, S = (
    JobStatus.queued,
    JobStatus.running,
    JobStatus.completed,
    JobStatus.failed,
    JobStatus.stopped,
)


# ---------------------------------------------------------------- queue order and slots


def test_jobs_start_in_submission_order_up_to_the_concurrency_cap(make_env) -> None:
    env = make_env(max_concurrency=2)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor) as manager:
            ids = [manager.submit(job(f"t{i}")).job_id for i in range(5)]
            assert ids == [1, 2, 3, 4, 5]
            await watched(executor, 1)
            await watched(executor, 2)
            await asyncio.sleep(0.05)  # room for a wrongly dispatched third job to show up
            assert executor.started_ids == [1, 2]
            assert manager.running_count == 2 and manager.queue_depth == 3
            assert statuses(manager, ids) == [R, R, Q, Q, Q]
            assert [s.argv[s.argv.index("--tasks") + 1] for s in executor.specs] == ["t0", "t1"]
            assert [s.work_dir for s in executor.specs] == [
                Path(manager.get(i).work_dir) for i in (1, 2)
            ]
            await manager.stop_all()

    asyncio.run(scenario())


def test_a_freed_slot_starts_the_next_queued_job_at_once(make_env) -> None:
    env = make_env(max_concurrency=2)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor) as manager:
            for i in range(5):
                manager.submit(job(f"t{i}"))
            (await watched(executor, 2)).exit(0)
            await watched(executor, 3)  # the sweeper sleeps an hour: this was the exit's event
            assert executor.started_ids == [1, 2, 3]
            (await watched(executor, 1)).exit(0)
            (await watched(executor, 3)).exit(0)
            (await watched(executor, 4)).exit(0)
            (await watched(executor, 5)).exit(0)
            await terminal(manager, 5)
            assert executor.started_ids == [1, 2, 3, 4, 5]
            assert manager.running_count == 0 and manager.queue_depth == 0

    asyncio.run(scenario())
    assert [r.status for r in env.store.load_all()] == [C] * 5


# ---------------------------------------------------------------- exits


def test_exit_zero_completes_the_job(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()
    t0 = env.clock.now

    async def scenario() -> None:
        async with running(env, executor) as manager:
            record = manager.submit(job())
            handle = await watched(executor, 1)
            assert record.status is R and record.started_at == t0
            assert (record.pid, record.executor_ref) == (10_001, "fake-1")
            env.clock.advance(seconds=42)
            handle.exit(0)
            await terminal(manager, 1)

    asyncio.run(scenario())
    persisted = env.persisted()[1]
    assert persisted.status is C
    assert persisted.exit_code == 0 and persisted.error is None
    assert persisted.started_at == t0
    assert (persisted.finished_at - t0).total_seconds() == 42
    assert (persisted.pid, persisted.executor_ref) == (10_001, "fake-1")


def test_nonzero_exit_fails_with_the_code_and_the_last_traceback(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()
    traceback = [
        "Traceback (most recent call last):",
        '  File "lm_eval/__main__.py", line 10, in <module>',
        "    cli_evaluate()",
        "ValueError: boom",
    ]

    async def scenario() -> JobRecord:
        async with running(env, executor) as manager:
            record = manager.submit(job())
            handle = await watched(executor, 1)
            Path(jobdir.stderr_log(record.work_dir)).write_text(
                "\n".join(
                    [
                        "loading...",
                        "Traceback (most recent call last):",
                        "Old: x",
                        "warming up",
                        *traceback,
                    ]
                )
                + "\n"
            )
            handle.exit(3)
            return await terminal(manager, 1)

    record = asyncio.run(scenario())
    expected = "\n".join(["exit code 3", *traceback])
    assert (record.status, record.exit_code, record.error) == (F, 3, expected)
    persisted = env.persisted()[1]
    assert (persisted.status, persisted.exit_code, persisted.error) == (F, 3, expected)


def test_nonzero_exit_without_a_traceback_reports_the_last_lines(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()

    async def scenario() -> JobRecord:
        async with running(env, executor) as manager:
            record = manager.submit(job())
            handle = await watched(executor, 1)
            lines = [f"line {i}" for i in range(30)]
            Path(jobdir.stderr_log(record.work_dir)).write_text("\n".join(lines) + "\n")
            handle.exit(1)
            return await terminal(manager, 1)

    record = asyncio.run(scenario())
    assert record.status is F
    assert record.error == "\n".join(["exit code 1", *[f"line {i}" for i in range(15, 30)]])


# ---------------------------------------------------------------- stop


def test_stopping_a_queued_job_never_starts_it(make_env) -> None:
    env = make_env(max_concurrency=1)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor) as manager:
            manager.submit(job("a"))
            manager.submit(job("b"))
            manager.submit(job("c"))
            await watched(executor, 1)
            assert await manager.stop(2) == "Job 2 dequeued."
            assert manager.queue_depth == 1
            stopped = manager.get(2)
            assert (stopped.status, stopped.started_at, stopped.exit_code) == (S, None, None)
            assert stopped.finished_at == env.clock.now
            executor.handles[1].exit(0)
            (await watched(executor, 3)).exit(0)
            await terminal(manager, 3)
            assert executor.started_ids == [1, 3]

    asyncio.run(scenario())
    persisted = env.persisted()
    assert [r.status for r in persisted.values()] == [C, S, C]
    assert persisted[2].pid is None and persisted[2].started_at is None


def test_stopping_a_running_job_stops_its_process(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()

    async def scenario() -> tuple[str, JobRecord, FakeHandle]:
        async with running(env, executor) as manager:
            manager.submit(job())
            handle = await watched(executor, 1)
            message = await manager.stop(1)
            # stop returns once the job is terminal, not before
            return message, manager.get(1), handle

    message, record, handle = asyncio.run(scenario())
    assert message == "Job 1 stopped."
    assert handle.stop_calls == [GRACE_S]
    assert (record.status, record.exit_code, record.error) == (S, STOP_EXIT_CODE, None)
    persisted = env.persisted()[1]
    assert (persisted.status, persisted.exit_code) == (S, STOP_EXIT_CODE)


def test_stopping_a_finished_job_says_there_is_nothing_to_stop(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()

    async def scenario() -> tuple[str, FakeHandle]:
        async with running(env, executor) as manager:
            manager.submit(job())
            handle = await watched(executor, 1)
            handle.exit(0)
            await terminal(manager, 1)
            return await manager.stop(1), handle

    message, handle = asyncio.run(scenario())
    assert message == f"Job 1 already Completed; {NOT_STOPPED}."
    assert handle.stop_calls == []
    assert env.persisted()[1].status is C


def test_stopping_an_unknown_job_raises_job_not_found(make_env) -> None:
    env = make_env()

    async def scenario() -> None:
        async with running(env, FakeExecutor()) as manager:
            with pytest.raises(JobNotFound, match="Job 7 not found"):
                await manager.stop(7)

    asyncio.run(scenario())


def test_stop_all_dequeues_waiting_jobs_first_and_starts_nothing_new(make_env) -> None:
    env = make_env(max_concurrency=2)
    executor = FakeExecutor()

    async def scenario() -> list[int]:
        async with running(env, executor) as manager:
            for i in range(5):
                manager.submit(job(f"t{i}"))
            await watched(executor, 1)
            await watched(executor, 2)
            stopped = await manager.stop_all()
            await asyncio.sleep(0.05)  # a job started by a freed slot would show up now
            assert manager.running_count == 0 and manager.queue_depth == 0
            return stopped

    assert asyncio.run(scenario()) == [1, 2, 3, 4, 5]
    assert executor.started_ids == [1, 2]
    assert [executor.handles[i].stop_calls for i in (1, 2)] == [[GRACE_S], [GRACE_S]]
    persisted = env.persisted()
    assert [r.status for r in persisted.values()] == [S] * 5
    assert [persisted[i].started_at for i in (3, 4, 5)] == [None] * 3


def test_stop_at_the_instant_of_dispatch_starts_nothing(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()

    async def scenario() -> str:
        async with running(env, executor) as manager:
            record = manager.submit(job())  # handed to a runner that has not run yet
            assert record.status is Q and manager.running_count == 1
            return await manager.stop(1)

    assert asyncio.run(scenario()) == "Job 1 stopped."
    assert executor.specs == []
    persisted = env.persisted()[1]
    assert (persisted.status, persisted.pid, persisted.started_at) == (S, None, None)


def test_stop_while_launching_stops_the_process_once_it_exists(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()

    async def scenario() -> None:
        executor.gate = asyncio.Event()
        async with running(env, executor) as manager:
            record = manager.submit(job())
            await executor.launching.wait()
            assert record.status is R and record.pid is None
            stopping = asyncio.create_task(manager.stop(1))
            await asyncio.sleep(0.05)
            assert not stopping.done()  # it waits for the process, which does not exist yet
            executor.gate.set()
            assert await stopping == "Job 1 stopped."

    asyncio.run(scenario())
    assert executor.handles[1].stop_calls == [GRACE_S]
    persisted = env.persisted()[1]
    assert (persisted.status, persisted.pid, persisted.exit_code) == (S, 10_001, STOP_EXIT_CODE)


def test_a_stop_racing_a_clean_exit_keeps_the_job_completed(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()

    async def scenario() -> str:
        async with running(env, executor) as manager:
            manager.submit(job())
            handle = await watched(executor, 1)
            handle.exit(0)  # the process is gone; the watcher has not woken up yet
            return await manager.stop(1)

    asyncio.run(scenario())
    persisted = env.persisted()[1]
    assert (persisted.status, persisted.exit_code, persisted.error) == (C, 0, None)


# ---------------------------------------------------------------- timeout


def test_timeout_fails_the_job_once_the_clock_passes_its_deadline(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()

    async def scenario() -> tuple[JobRecord, FakeHandle]:
        async with running(env, executor) as manager:
            record = manager.submit(job(timeout_s=60))
            handle = await watched(executor, 1)
            env.clock.advance(seconds=59)
            await asyncio.sleep(0.7)  # more than one progress tick
            assert record.status is R and handle.stop_calls == []
            env.clock.advance(seconds=2)
            return await terminal(manager, 1), handle

    record, handle = asyncio.run(scenario())
    assert handle.stop_calls == [GRACE_S]
    error = "timeout: the job ran longer than timeout_s=60 and was stopped"
    assert (record.status, record.exit_code, record.error) == (F, STOP_EXIT_CODE, error)
    persisted = env.persisted()[1]
    assert (persisted.status, persisted.error) == (F, error)
    assert persisted.request["timeout_s"] == 60


# ---------------------------------------------------------------- retention


async def complete(manager: JobManager, executor: FakeExecutor, task: str) -> JobRecord:
    record = manager.submit(job(task))
    (await watched(executor, record.job_id)).exit(0)
    return await terminal(manager, record.job_id)


async def gone(path: Path, within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while path.exists() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


def test_retention_keeps_only_max_finished_jobs(make_env) -> None:
    env = make_env(max_finished_jobs=2)
    executor = FakeExecutor()

    async def scenario() -> list[JobRecord]:
        async with running(env, executor) as manager:
            records = [await complete(manager, executor, f"t{i}") for i in range(2)]
            assert [r.job_id for r in manager.list(None, None, 0)[0]] == [1, 2]
            manager.submit(job("running"))  # job 3: not finished, never counted
            await watched(executor, 3)
            records.append(await complete(manager, executor, "t2"))  # job 4
            with pytest.raises(JobNotFound):
                manager.get(1)
            assert [r.job_id for r in manager.list(None, None, 0)[0]] == [2, 3, 4]
            assert sorted(env.persisted()) == [2, 3, 4]
            # The directory goes in a worker thread, after the record.
            await gone(Path(records[0].work_dir))
            assert not Path(records[0].work_dir).exists()
            assert Path(records[1].work_dir).exists()
            await manager.stop_all()
            return records

    _, second, _ = asyncio.run(scenario())
    # stopping job 3 finished it, so job 2 went too
    assert sorted(env.persisted()) == [3, 4]
    assert not Path(second.work_dir).exists()


def test_retention_by_age_removes_jobs_finished_before_the_cutoff(make_env) -> None:
    env = make_env(job_retention_days=1)
    executor = FakeExecutor()

    async def scenario() -> list[JobRecord]:
        async with running(env, executor) as manager:
            old = await complete(manager, executor, "old")
            env.clock.advance(hours=12)
            recent = await complete(manager, executor, "recent")
            env.clock.advance(hours=12, seconds=1)  # `old` finished a day and a second ago
            assert sorted(env.persisted()) == [1, 2]  # nothing is removed until an event
            new = await complete(manager, executor, "new")
            return [old, recent, new]

    old, recent, new = asyncio.run(scenario())
    assert sorted(env.persisted()) == [2, 3]
    assert not Path(old.work_dir).exists()
    assert Path(recent.work_dir).exists() and Path(new.work_dir).exists()


def test_retention_by_age_applies_when_the_server_starts(make_env) -> None:
    env = make_env(job_retention_days=2)

    async def scenario() -> list[JobRecord]:
        executor = FakeExecutor()
        async with running(env, executor) as manager:
            records = [await complete(manager, executor, "a")]
            env.clock.advance(days=1)
            records.append(await complete(manager, executor, "b"))
        env.clock.advance(days=1, seconds=1)
        async with running(env, FakeExecutor()) as manager:
            assert [r.job_id for r in manager.list(None, None, 0)[0]] == [2]
        return records

    a, b = asyncio.run(scenario())
    assert sorted(env.persisted()) == [2]
    assert not Path(a.work_dir).exists() and Path(b.work_dir).exists()


# ---------------------------------------------------------------- delete


def test_deleting_a_running_job_stops_it_then_removes_it(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()

    async def scenario() -> JobRecord:
        async with running(env, executor) as manager:
            record = manager.submit(job())
            await watched(executor, 1)
            await manager.delete(1)
            with pytest.raises(JobNotFound):
                manager.get(1)
            assert manager.running_count == 0
            return record

    record = asyncio.run(scenario())
    assert executor.handles[1].stop_calls == [GRACE_S]
    assert record.status is S  # it was stopped before it was removed
    assert not Path(record.work_dir).exists()
    assert env.store.load_all() == []


def test_deleted_ids_are_never_reused(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()

    async def scenario() -> list[int]:
        async with running(env, executor) as manager:
            for task in ("a", "b", "c"):
                await complete(manager, executor, task)
            await manager.delete(3)
            after_delete = manager.submit(job("d")).job_id
            await manager.delete_all()
            after_delete_all = manager.submit(job("e")).job_id
            await manager.stop_all()
        # and after a restart, from the database's own counter
        async with running(env, FakeExecutor()) as manager:
            await manager.delete_all()
            after_restart = manager.submit(job("f")).job_id
            await manager.stop_all()
        return [after_delete, after_delete_all, after_restart]

    assert asyncio.run(scenario()) == [4, 5, 6]
    assert sorted(env.persisted()) == [6]


def test_delete_all_stops_running_jobs_and_removes_every_job(make_env) -> None:
    env = make_env(max_concurrency=1)
    executor = FakeExecutor()

    async def scenario() -> tuple[list[int], list[JobRecord]]:
        async with running(env, executor) as manager:
            done = await complete(manager, executor, "done")
            records = [done, manager.submit(job("running")), manager.submit(job("queued"))]
            await watched(executor, 2)
            deleted = await manager.delete_all()
            await asyncio.sleep(0.05)
            assert manager.list(None, None, 0) == ([], 0)
            assert manager.running_count == 0 and manager.queue_depth == 0
            return deleted, records

    deleted, records = asyncio.run(scenario())
    assert deleted == [1, 2, 3]
    assert executor.started_ids == [1, 2]  # the queued job was not started by the freed slot
    assert executor.handles[2].stop_calls == [GRACE_S]
    assert env.store.load_all() == []
    assert [Path(r.work_dir).exists() for r in records] == [False] * 3


# ---------------------------------------------------------------- idempotency

BODY = b'{"model": "dummy", "tasks": "demo"}'


def test_the_same_idempotency_claim_returns_the_same_job(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()

    async def scenario() -> tuple[JobRecord, JobRecord]:
        async with running(env, executor) as manager:
            first = manager.submit(job(), claim("k1", "alice", BODY))
            # the same JSON object, serialised differently
            again = manager.submit(job(), claim("k1", "alice", b'{"tasks":"demo","model":"dummy"}'))
            await watched(executor, 1)
            await manager.stop_all()
            return first, again

    first, again = asyncio.run(scenario())
    assert again is first and first.job_id == 1
    assert executor.started_ids == [1]
    assert sorted(env.persisted()) == [1]


def test_an_idempotency_key_reused_with_another_body_is_a_conflict(make_env) -> None:
    env = make_env()

    async def scenario() -> None:
        async with running(env, FakeExecutor()) as manager:
            manager.submit(job(), claim("k1", "alice", BODY))
            with pytest.raises(IdempotencyConflict, match=r"'k1' was already used for job 1"):
                manager.submit(job("other"), claim("k1", "alice", b'{"model": "other"}'))
            await manager.stop_all()

    asyncio.run(scenario())
    assert sorted(env.persisted()) == [1]


def test_an_idempotency_key_of_another_caller_is_a_new_job(make_env) -> None:
    env = make_env()

    async def scenario() -> list[int]:
        async with running(env, FakeExecutor()) as manager:
            ids = [
                manager.submit(job(), claim("k1", "alice", BODY)).job_id,
                manager.submit(job(), claim("k1", "bob", BODY)).job_id,
            ]
            await manager.stop_all()
            return ids

    assert asyncio.run(scenario()) == [1, 2]
    assert sorted(env.persisted()) == [1, 2]


def test_idempotency_claims_survive_a_restart(make_env) -> None:
    env = make_env()

    async def scenario() -> None:
        executor = FakeExecutor()
        async with running(env, executor) as manager:
            first = manager.submit(job(), claim("k1", "alice", BODY))
            (await watched(executor, 1)).exit(0)
            await terminal(manager, 1)
        env.reopen()
        executor = FakeExecutor()
        async with running(env, executor) as manager:
            again = manager.submit(job(), claim("k1", "alice", BODY))
            assert (again.job_id, again.status) == (first.job_id, C)
            with pytest.raises(IdempotencyConflict):
                manager.submit(job(), claim("k1", "alice", b"{}"))
            assert executor.specs == []

    asyncio.run(scenario())
    assert sorted(env.persisted()) == [1]


# ---------------------------------------------------------------- restart


async def leave_running(env: Env, count: int = 1, **submit: Any) -> list[JobRecord]:
    """A server that starts `count` jobs and shuts down leaving them running (the default)."""
    executor = FakeExecutor()
    async with running(env, executor) as manager:
        records = [manager.submit(job(f"t{i}")) for i in range(count)]
        for record in records[: env.settings.max_concurrency]:
            await watched(executor, record.job_id)
    assert all(not h.stop_calls for h in executor.handles.values())
    return records


def test_restart_adopts_a_live_job_which_completes_when_it_exits(make_env) -> None:
    env = make_env()

    async def scenario() -> FakeExecutor:
        [record] = await leave_running(env)
        assert env.persisted()[1].status is R
        env.reopen()
        executor = FakeExecutor()
        executor.alive = {1}
        async with running(env, executor) as manager:
            assert manager.get(1).status is R and manager.running_count == 1
            handle = await watched(executor, 1)
            handle.exit(0)
            await terminal(manager, 1)
        assert executor.adopt_calls == [(1, Path(record.work_dir), 10_001, "fake-1")]
        return executor

    executor = asyncio.run(scenario())
    assert executor.specs == []  # adopted, not started again
    persisted = env.persisted()[1]
    assert (persisted.status, persisted.exit_code, persisted.error) == (C, 0, None)


def test_restart_completes_a_job_that_ended_with_exit_code_0_while_down(make_env) -> None:
    env = make_env()

    async def scenario() -> None:
        [record] = await leave_running(env)
        jobdir.write_exit(record.work_dir, 0)
        env.reopen()
        async with running(env, FakeExecutor()) as manager:
            assert manager.running_count == 0
            assert (manager.get(1).status, manager.get(1).exit_code) == (C, 0)

    asyncio.run(scenario())
    persisted = env.persisted()[1]
    assert (persisted.status, persisted.exit_code, persisted.error) == (C, 0, None)
    assert persisted.finished_at == env.clock.now


def test_restart_fails_a_job_that_ended_without_an_exit_code_while_down(make_env) -> None:
    env = make_env()

    async def scenario() -> None:
        await leave_running(env)
        env.reopen()
        async with running(env, FakeExecutor()) as manager:
            assert manager.get(1).status is F

    asyncio.run(scenario())
    persisted = env.persisted()[1]
    assert (persisted.status, persisted.exit_code) == (F, None)
    assert persisted.error == (
        "the job's process ended while the server was down and left no exit code"
    )


def test_restart_explains_a_job_that_failed_while_down(make_env) -> None:
    env = make_env()

    async def scenario() -> None:
        [record] = await leave_running(env)
        Path(jobdir.stderr_log(record.work_dir)).write_text(
            "Traceback (most recent call last):\nValueError: boom\n"
        )
        jobdir.write_exit(record.work_dir, 2)
        env.reopen()
        async with running(env, FakeExecutor()):
            pass

    asyncio.run(scenario())
    persisted = env.persisted()[1]
    assert (persisted.status, persisted.exit_code) == (F, 2)
    assert persisted.error == "exit code 2\nTraceback (most recent call last):\nValueError: boom"


def test_restart_resumes_queued_jobs_in_order_after_the_adopted_one(make_env) -> None:
    env = make_env(max_concurrency=1)

    async def scenario() -> FakeExecutor:
        await leave_running(env, count=3)
        assert [r.status for r in env.persisted().values()] == [R, Q, Q]
        env.reopen()
        executor = FakeExecutor()
        executor.alive = {1}
        async with running(env, executor) as manager:
            assert manager.queue_depth == 2
            (await watched(executor, 1)).exit(0)
            (await watched(executor, 2)).exit(0)
            (await watched(executor, 3)).exit(1)
            await terminal(manager, 3)
        return executor

    executor = asyncio.run(scenario())
    assert executor.started_ids == [2, 3]
    assert [r.status for r in env.persisted().values()] == [C, C, F]


# ---------------------------------------------------------------- failing watchers


def test_an_executor_that_cannot_start_fails_the_job_and_frees_its_slot(make_env) -> None:
    env = make_env(max_concurrency=1)
    executor = FakeExecutor()
    executor.start_errors[1] = FileNotFoundError("lm_eval: no such file")

    async def scenario() -> None:
        async with running(env, executor) as manager:
            manager.submit(job("a"))
            manager.submit(job("b"))
            (await watched(executor, 2)).exit(0)
            await terminal(manager, 2)

    asyncio.run(scenario())
    assert executor.started_ids == [1, 2]
    persisted = env.persisted()
    assert persisted[1].status is F
    assert persisted[1].error == "the job could not start: lm_eval: no such file"
    assert persisted[1].pid is None
    assert persisted[2].status is C


def test_a_failing_watcher_fails_the_job_and_stops_its_process(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()

    async def scenario() -> JobRecord:
        async with running(env, executor) as manager:
            manager.submit(job())
            handle = await watched(executor, 1)
            handle.break_wait(RuntimeError("watcher broke"))
            record = await terminal(manager, 1)
            assert manager.running_count == 0
            return record

    record = asyncio.run(scenario())
    assert executor.handles[1].stop_calls == [GRACE_S]
    expected = "the server lost track of the job: RuntimeError('watcher broke')"
    assert (record.status, record.error) == (F, expected)
    assert env.persisted()[1].error == expected


# ---------------------------------------------------------------- shutdown and admission


def test_shutdown_leaves_running_jobs_running_by_default(make_env) -> None:
    env = make_env(max_concurrency=1)

    async def scenario() -> None:
        await leave_running(env, count=2)  # asserts that no handle was stopped

    asyncio.run(scenario())
    persisted = env.persisted()
    assert [r.status for r in persisted.values()] == [R, Q]
    assert persisted[1].finished_at is None and persisted[1].pid == 10_001


def test_shutdown_stops_running_jobs_when_configured(make_env) -> None:
    env = make_env(shutdown_stops_jobs=True, max_concurrency=1)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor) as manager:
            manager.submit(job("a"))
            manager.submit(job("b"))
            await watched(executor, 1)
            await manager.shutdown()
            assert manager.running_count == 0

    asyncio.run(scenario())
    assert executor.started_ids == [1]
    assert executor.handles[1].stop_calls == [GRACE_S]
    persisted = env.persisted()
    # the queued job waits for the next server; the running one was stopped
    assert [r.status for r in persisted.values()] == [S, Q]
    assert persisted[1].exit_code == STOP_EXIT_CODE


def test_submit_during_shutdown_is_refused(make_env) -> None:
    env = make_env(shutdown_stops_jobs=True)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor) as manager:
            manager.submit(job())
            await watched(executor, 1)
            shutting = asyncio.create_task(manager.shutdown())
            await asyncio.sleep(0)  # shutdown has begun and is waiting for the runner
            assert not shutting.done()
            with pytest.raises(ShuttingDown, match="shutting down"):
                manager.submit(job("late"))
            await shutting
            with pytest.raises(ShuttingDown):
                manager.submit(job("later"))

    asyncio.run(scenario())
    assert executor.started_ids == [1]
    assert sorted(env.persisted()) == [1]


def test_a_full_queue_refuses_new_jobs(make_env) -> None:
    env = make_env(max_concurrency=1, max_queued_jobs=2)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor) as manager:
            manager.submit(job("running"))  # takes the slot, leaves the queue
            manager.submit(job("q1"))
            manager.submit(job("q2"))
            assert manager.queue_depth == 2
            with pytest.raises(QueueFull, match="MAX_QUEUED_JOBS") as refused:
                manager.submit(job("q3"))
            assert refused.value.retry_after_s > 0
            (await watched(executor, 1)).exit(0)
            await watched(executor, 2)
            assert manager.submit(job("q3")).job_id == 4  # a place freed up
            await manager.stop_all()

    asyncio.run(scenario())
    assert sorted(env.persisted()) == [1, 2, 3, 4]


def test_list_and_counts_follow_the_state_machine(make_env) -> None:
    env = make_env(max_concurrency=1)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor) as manager:
            await complete(manager, executor, "done")
            manager.submit(job("running"))
            manager.submit(job("q1"))
            manager.submit(job("q2"))
            await watched(executor, 2)
            await manager.stop(3)
            counts = manager.counts()
            assert counts == {Q: 1, R: 1, C: 1, F: 0, S: 1}
            page, total = manager.list({Q, R, S}, limit=2, offset=1)
            assert ([r.job_id for r in page], total) == ([3, 4], 3)
            await manager.stop_all()

    asyncio.run(scenario())


def test_deleting_a_queued_job_removes_it_before_it_starts(make_env) -> None:
    env = make_env(max_concurrency=1)
    executor = FakeExecutor()

    async def scenario() -> JobRecord:
        async with running(env, executor) as manager:
            manager.submit(job("a"))
            queued = manager.submit(job("b"))
            await watched(executor, 1)
            await manager.delete(2)
            assert manager.queue_depth == 0
            executor.handles[1].exit(0)
            await terminal(manager, 1)
            await asyncio.sleep(0.05)
            return queued

    queued = asyncio.run(scenario())
    assert executor.started_ids == [1]
    assert not Path(queued.work_dir).exists()
    assert sorted(env.persisted()) == [1]


def test_an_idempotency_key_of_a_deleted_job_makes_a_new_job(make_env) -> None:
    env = make_env()

    async def scenario() -> list[int]:
        async with running(env, FakeExecutor()) as manager:
            first = manager.submit(job(), claim("k1", "alice", BODY)).job_id
            await manager.delete(first)
            again = manager.submit(job(), claim("k1", "alice", BODY)).job_id
            await manager.stop_all()
            return [first, again]

    assert asyncio.run(scenario()) == [1, 2]
    assert sorted(env.persisted()) == [2]


def test_an_idempotent_retry_is_answered_when_the_queue_is_full(make_env) -> None:
    env = make_env(max_concurrency=1, max_queued_jobs=1)

    async def scenario() -> None:
        async with running(env, FakeExecutor()) as manager:
            manager.submit(job("running"))
            queued = manager.submit(job("queued"), claim("k1", "alice", BODY))
            with pytest.raises(QueueFull):
                manager.submit(job("more"))
            assert manager.submit(job("queued"), claim("k1", "alice", BODY)) is queued
            await manager.stop_all()

    asyncio.run(scenario())
    assert sorted(env.persisted()) == [1, 2]


def test_an_adopted_job_can_be_stopped(make_env) -> None:
    env = make_env()

    async def scenario() -> tuple[str, FakeHandle]:
        await leave_running(env)
        env.reopen()
        executor = FakeExecutor()
        executor.alive = {1}
        async with running(env, executor) as manager:
            handle = await watched(executor, 1)
            return await manager.stop(1), handle

    message, handle = asyncio.run(scenario())
    assert message == "Job 1 stopped."
    assert handle.stop_calls == [GRACE_S]
    persisted = env.persisted()[1]
    assert (persisted.status, persisted.exit_code) == (S, STOP_EXIT_CODE)


def test_a_stop_signalled_just_before_shutdown_still_stops_the_job(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()

    async def scenario() -> str:
        async with running(env, executor) as manager:
            manager.submit(job())
            await watched(executor, 1)
            stopping = asyncio.create_task(manager.stop(1))
            await asyncio.sleep(0)  # the stop is signalled; the runner has not acted on it
            await manager.shutdown()
            return await stopping

    message = asyncio.run(scenario())
    assert message == "Job 1 stopped."
    assert executor.handles[1].stop_calls == [GRACE_S]
    assert env.persisted()[1].status is S


def test_a_timeout_counts_from_the_first_start_across_a_restart(make_env) -> None:
    env = make_env()

    async def scenario() -> FakeHandle:
        executor = FakeExecutor()
        async with running(env, executor) as manager:
            manager.submit(job(timeout_s=60))
            await watched(executor, 1)
        env.clock.advance(seconds=61)  # the deadline passed while the server was down
        env.reopen()
        executor = FakeExecutor()
        executor.alive = {1}
        async with running(env, executor) as manager:
            handle = await watched(executor, 1)
            await terminal(manager, 1)
        return handle

    handle = asyncio.run(scenario())
    assert handle.stop_calls == [GRACE_S]
    persisted = env.persisted()[1]
    assert (persisted.status, persisted.exit_code) == (F, STOP_EXIT_CODE)
    assert persisted.error == "timeout: the job ran longer than timeout_s=60 and was stopped"


def test_launched_jobs_keep_no_request_body_or_environment_in_memory(make_env) -> None:
    """Issue 14 item 6: a megabyte of env_vars per job must not stay in memory for every job
    the server keeps; the store keeps them, and the summary fields stay available."""
    env = make_env()
    executor = FakeExecutor()
    big = {f"VAR_{i}": "x" * 1000 for i in range(50)}
    heavy = ValidatedJob(
        values={"model": "dummy", "tasks": ["demo"], "limit": 10, "gen_kwargs": "y" * 10_000},
        lm_args=["--model", "dummy", "--tasks", "demo"],
        program=["lm_eval"],
        env_vars=big,
        user_output_path=None,
        timeout_s=60.0,
    )

    async def scenario() -> tuple[JobRecord, JobRecord, dict[str, str]]:
        async with running(env, executor) as manager:
            first = manager.submit(heavy)
            handle = await watched(executor, 1)
            launched_env = dict(executor.specs[0].env)
            running_copy = manager.get(1)
            assert running_copy.env_vars == {} and "gen_kwargs" not in running_copy.request
            handle.exit(0)
            done = await terminal(manager, 1)
            return first, done, launched_env

    first, done, launched_env = asyncio.run(scenario())
    # The launch had everything; afterwards only what summaries and timeouts read remains.
    assert {k: launched_env[k] for k in big} == big
    assert done is first and done.env_vars == {}
    assert done.request == {"model": "dummy", "tasks": ["demo"], "timeout_s": 60.0}
    assert (done.model, done.tasks) == ("dummy", ["demo"])
    # The store still holds the whole request and environment, written once at submission.
    persisted = env.persisted()[1]
    assert persisted.env_vars == big
    assert persisted.request["gen_kwargs"] == "y" * 10_000 and persisted.request["limit"] == 10
    assert persisted.status is C
