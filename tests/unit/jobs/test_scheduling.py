"""Quotas, the fair queue and GPU slots, through JobManager with a fake executor and clock.

The decision itself is jobs.scheduler (tests/unit/jobs/test_scheduler.py); here the manager
asks it: per-key limits at submission, the order jobs start in as slots free, which devices a
job is given and keeps across a restart. tests/e2e/test_scheduling.py runs the same through
the HTTP API with real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from lm_eval_server.admission.idempotency import claim
from lm_eval_server.admission.validation import ValidatedJob
from lm_eval_server.errors import QuotaExceeded
from lm_eval_server.jobs.manager import JobManager
from lm_eval_server.jobs.models import JobStatus
from tests.support.fake_executor import FakeExecutor, eventually
from tests.unit.jobs import test_manager_unit
from tests.unit.jobs.test_manager_unit import Env, terminal, watched

make_env = test_manager_unit.make_env  # the fixture: settings and a real SQLite store

Q, R, C, F = JobStatus.queued, JobStatus.running, JobStatus.completed, JobStatus.failed


def job(task: str = "demo", num_gpus: float | None = None) -> ValidatedJob:
    return ValidatedJob(
        values={"model": "dummy", "tasks": [task]},
        lm_args=["--model", "dummy", "--tasks", task],
        program=["lm_eval"],
        env_vars={},
        user_output_path=None,
        timeout_s=None,
        resources={} if num_gpus is None else {"num_gpus": num_gpus},
    )


@contextlib.asynccontextmanager
async def running(
    env: Env, executor: FakeExecutor, gpus: Sequence[str] | None = None
) -> AsyncIterator[JobManager]:
    manager = JobManager(env.settings, env.store, executor, clock=env.clock, gpu_devices=gpus)
    await manager.start()
    try:
        yield manager
    finally:
        if not manager.shutting_down:
            await manager.shutdown()


def spec_of(executor: FakeExecutor, job_id: int) -> Any:
    return next(s for s in executor.specs if s.job_id == job_id)


async def run_in_turn(manager: JobManager, executor: FakeExecutor, env: Env, count: int) -> None:
    """With one slot: lets the first `count` jobs the executor starts run 30 s each (fake
    clock), one after the other."""
    for position in range(count):
        await eventually(
            lambda n=position: len(executor.started_ids) > n, f"start number {position + 1}"
        )
        current = executor.started_ids[position]
        handle = await watched(executor, current)
        env.clock.advance(seconds=30)
        handle.exit(0)
        await terminal(manager, current)


async def ran(manager: JobManager, executor: FakeExecutor, env: Env, job_id: int, **for_: float):
    """The (started) job runs for that long on the fake clock, then exits."""
    handle = await watched(executor, job_id)
    env.clock.advance(**for_)
    handle.exit(0)
    await terminal(manager, job_id)


async def settle() -> None:
    """Room for a wrongly dispatched job to show up before asserting that none did."""
    await asyncio.sleep(0.05)


# ---------------------------------------------------------------- quotas


def test_max_queued_per_key_refuses_that_owner_only(make_env) -> None:
    env = make_env(max_concurrency=1, max_queued_per_key=2)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor) as manager:
            manager.submit(job("a1"), owner="alice")  # runs: not queued, not counted
            a2 = manager.submit(job("a2"), claim("k-a2", "alice", b"a2"), owner="alice")
            manager.submit(job("a3"), owner="alice")
            with pytest.raises(QuotaExceeded) as refused:
                manager.submit(job("a4"), owner="alice")
            message = str(refused.value)
            assert "MAX_QUEUED_PER_KEY=2" in message and "alice already has 2 queued" in message
            assert refused.value.status_code == 429
            assert refused.value.headers == {"Retry-After": str(refused.value.retry_after_s)}
            # An idempotent retry of a queued job is the same job, not a new one: no refusal.
            again = manager.submit(job("a2"), claim("k-a2", "alice", b"a2"), owner="alice")
            assert again is a2
            # Other owners are not affected.
            assert manager.submit(job("b1"), owner="bob").owner == "bob"
            assert manager.submit(job("b2"), owner="bob").job_id == 5
            # A place frees when one of alice's jobs leaves the queue.
            await manager.stop(a2.job_id)
            assert manager.submit(job("a4"), owner="alice").job_id == 6
            await manager.stop_all()

    asyncio.run(scenario())


def test_max_running_per_key_keeps_further_jobs_queued_while_others_run(make_env) -> None:
    env = make_env(max_concurrency=3, max_running_per_key=1)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor) as manager:
            a = [manager.submit(job(f"a{i}"), owner="alice").job_id for i in range(3)]
            await watched(executor, a[0])
            await settle()
            assert executor.started_ids == [a[0]]  # two slots free, yet alice's jobs wait
            assert [manager.get(i).status for i in a] == [R, Q, Q]
            b1 = manager.submit(job("b1"), owner="bob").job_id
            await watched(executor, b1)  # bob takes a free slot at once
            (await watched(executor, a[0])).exit(0)
            await watched(executor, a[1])
            await settle()
            assert executor.started_ids == [a[0], b1, a[1]]
            assert manager.get(a[2]).status is Q
            await manager.stop_all()

    asyncio.run(scenario())


# ---------------------------------------------------------------- the fair queue


def test_the_issues_case_bob_runs_second_not_eleventh(make_env) -> None:
    env = make_env(max_concurrency=1)
    executor = FakeExecutor()

    async def scenario() -> list[int]:
        async with running(env, executor) as manager:
            alice = [manager.submit(job(f"a{i}"), owner="alice").job_id for i in range(10)]
            bob = manager.submit(job("b"), owner="bob").job_id
            await watched(executor, 1)
            await run_in_turn(manager, executor, env, 11)
            assert (alice, bob) == (list(range(1, 11)), 11)
            return executor.started_ids

    assert asyncio.run(scenario()) == [1, 11, *range(2, 11)]


def test_the_owner_with_least_recent_running_time_goes_first(make_env) -> None:
    env = make_env(max_concurrency=1, fair_share_window_s=3600)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor) as manager:
            # bob ran 10 minutes, alice 5: alice's job goes first though bob's is older.
            await ran(
                manager, executor, env, manager.submit(job("b0"), owner="bob").job_id, minutes=10
            )
            await ran(
                manager, executor, env, manager.submit(job("a0"), owner="alice").job_id, minutes=5
            )
            blocker = manager.submit(job("x"), owner="carol").job_id
            bob = manager.submit(job("b1"), owner="bob").job_id
            alice = manager.submit(job("a1"), owner="alice").job_id
            await ran(manager, executor, env, blocker, seconds=1)
            await watched(executor, alice)
            assert executor.started_ids[-1] == alice
            # Alice's running job counts up to now: after 6 minutes she has used more.
            await ran(manager, executor, env, alice, minutes=6)
            await watched(executor, bob)
            await manager.stop_all()

    asyncio.run(scenario())


def test_running_time_outside_the_window_does_not_count(make_env) -> None:
    env = make_env(max_concurrency=1, fair_share_window_s=600)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor) as manager:
            await ran(
                manager, executor, env, manager.submit(job("b0"), owner="bob").job_id, minutes=30
            )
            await ran(
                manager, executor, env, manager.submit(job("a0"), owner="alice").job_id, minutes=5
            )
            # 11 minutes later bob's 30 minutes ended 16 minutes ago (outside the 10-minute
            # window), alice's 5 minutes ended 11 minutes ago: both count 0, so the owner
            # with the oldest queued job goes first: bob.
            env.clock.advance(minutes=11)
            blocker = manager.submit(job("x"), owner="carol").job_id
            bob = manager.submit(job("b1"), owner="bob").job_id
            alice = manager.submit(job("a1"), owner="alice").job_id
            await ran(manager, executor, env, blocker, seconds=0)
            await watched(executor, bob)
            assert manager.get(alice).status is Q
            await manager.stop_all()

    asyncio.run(scenario())


def test_equal_usage_goes_to_fewer_running_jobs_then_to_the_oldest_queued_job(make_env) -> None:
    env = make_env(max_concurrency=2)
    executor = FakeExecutor()

    async def scenario() -> list[int]:
        async with running(env, executor) as manager:
            c1 = manager.submit(job("c1"), owner="carol").job_id
            c2 = manager.submit(job("c2"), owner="carol").job_id
            await watched(executor, c2)
            a1, a2 = (manager.submit(job(t), owner="alice").job_id for t in ("a1", "a2"))
            b1, b2 = (manager.submit(job(t), owner="bob").job_id for t in ("b1", "b2"))
            # No time passes: every owner's usage is 0. alice's a1 is the oldest queued job;
            # then alice has one running and bob none, so bob's b1 comes before her a2.
            (await watched(executor, c1)).exit(0)
            await watched(executor, a1)
            (await watched(executor, c2)).exit(0)
            await watched(executor, b1)
            assert executor.started_ids == [c1, c2, a1, b1]
            assert [manager.get(i).status for i in (a2, b2)] == [Q, Q]
            await manager.stop_all()
            return executor.started_ids

    asyncio.run(scenario())


def test_queued_jobs_keep_their_order_across_a_restart(make_env) -> None:
    env = make_env(max_concurrency=1)

    async def scenario() -> list[int]:
        executor = FakeExecutor()
        async with running(env, executor) as manager:
            for i in range(3):
                manager.submit(job(f"a{i}"), owner="alice")
            manager.submit(job("b"), owner="bob")
            await watched(executor, 1)
            env.clock.advance(seconds=60)
        env.reopen()
        executor = FakeExecutor()
        executor.alive = {1}
        async with running(env, executor) as manager:
            (await watched(executor, 1)).exit(0)  # the adopted job
            await terminal(manager, 1)
            await run_in_turn(manager, executor, env, 3)
            return executor.started_ids

    # alice's adopted job ran a minute: bob's job goes next, then alice's in order.
    assert asyncio.run(scenario()) == [4, 2, 3]


# ---------------------------------------------------------------- GPU slots


def test_gpu_jobs_get_distinct_devices_and_wait_for_free_ones(make_env) -> None:
    env = make_env(max_concurrency=8)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor, gpus=["0", "1"]) as manager:
            g1 = manager.submit(job("g1", 1)).job_id
            g2 = manager.submit(job("g2", 1)).job_id
            g3 = manager.submit(job("g3", 1)).job_id
            big = manager.submit(job("big", 2)).job_id
            cpu = manager.submit(job("cpu", 0)).job_id
            unsaid = manager.submit(job("unsaid")).job_id
            await watched(executor, unsaid)
            await settle()
            # Two slots' worth of GPUs: g3 and big wait; jobs needing none pass them by.
            assert executor.started_ids == [g1, g2, cpu, unsaid]
            assert [manager.get(i).gpus for i in (g1, g2, cpu, unsaid)] == [["0"], ["1"], [], []]
            assert spec_of(executor, g1).env["CUDA_VISIBLE_DEVICES"] == "0"
            assert spec_of(executor, g2).env["CUDA_VISIBLE_DEVICES"] == "1"
            assert spec_of(executor, g1).env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
            assert spec_of(executor, cpu).env["CUDA_VISIBLE_DEVICES"] == ""
            assert [manager.get(i).status for i in (g3, big)] == [Q, Q]
            assert (manager.gpus_total, manager.gpus_in_use) == (2, 2)
            assert env.persisted()[g2].gpus == ["1"]

            (await watched(executor, g2)).exit(0)
            await watched(executor, g3)
            assert manager.get(g3).gpus == ["1"]  # the freed device
            assert manager.get(g2).gpus == ["1"]  # history: what it had
            (await watched(executor, g1)).exit(0)
            await settle()
            assert manager.get(big).status is Q  # one free, two needed
            (await watched(executor, g3)).exit(0)
            await watched(executor, big)
            assert manager.get(big).gpus == ["0", "1"]
            assert spec_of(executor, big).env["CUDA_VISIBLE_DEVICES"] == "0,1"
            assert spec_of(executor, big).num_gpus == 2
            await manager.stop_all()
            assert manager.gpus_in_use == 0

    asyncio.run(scenario())


def test_a_waiting_gpu_job_is_passed_by_smaller_ones_until_it_has_waited_long(make_env) -> None:
    env = make_env(max_concurrency=8, gpu_reserve_after_s=600)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor, gpus=["0", "1"]) as manager:
            g1 = manager.submit(job("g1", 1), owner="alice").job_id
            big = manager.submit(job("big", 2), owner="bob").job_id
            small = manager.submit(job("small", 1), owner="carol").job_id
            await watched(executor, small)  # backfilled: big has not waited long yet
            assert manager.get(small).gpus == ["1"]
            env.clock.advance(seconds=600)
            (await watched(executor, small)).exit(0)
            small2 = manager.submit(job("small2", 1), owner="carol").job_id
            cpu = manager.submit(job("cpu", 0), owner="carol").job_id
            await watched(executor, cpu)  # needs no GPU: not held back
            await settle()
            # big has waited 600 s: device 1 stays free for it, small2 waits behind it.
            assert [manager.get(i).status for i in (big, small2)] == [Q, Q]
            assert manager.gpus_in_use == 1
            (await watched(executor, g1)).exit(0)
            await watched(executor, big)
            assert manager.get(big).gpus == ["0", "1"]
            (await watched(executor, big)).exit(0)
            await watched(executor, small2)
            await manager.stop_all()

    asyncio.run(scenario())


def test_a_reserved_gpu_job_is_not_passed_even_by_owners_ahead_of_it(make_env) -> None:
    env = make_env(max_concurrency=8, gpu_reserve_after_s=600)
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor, gpus=["0", "1"]) as manager:
            b0 = manager.submit(job("b0", 0), owner="bob").job_id
            await ran(manager, executor, env, b0, seconds=60)  # bob has some recent usage
            g1 = manager.submit(job("g1", 1), owner="alice").job_id
            await watched(executor, g1)
            big = manager.submit(job("big", 2), owner="bob").job_id
            env.clock.advance(seconds=600)
            # carol has used nothing, so she comes before bob in the fair order; still, bob's
            # job has waited 600 s for two GPUs and holds them: carol's 1-GPU job waits.
            c1 = manager.submit(job("c1", 1), owner="carol").job_id
            c0 = manager.submit(job("c0", 0), owner="carol").job_id
            await watched(executor, c0)
            await settle()
            assert [manager.get(i).status for i in (big, c1)] == [Q, Q]
            assert manager.gpus_in_use == 1
            (await watched(executor, g1)).exit(0)
            await watched(executor, big)
            assert manager.get(big).gpus == ["0", "1"] and manager.get(c1).status is Q
            (await watched(executor, big)).exit(0)
            await watched(executor, c1)
            await manager.stop_all()

    asyncio.run(scenario())


def test_an_adopted_job_keeps_its_devices_across_a_restart(make_env) -> None:
    env = make_env(max_concurrency=8)

    async def scenario() -> None:
        executor = FakeExecutor()
        async with running(env, executor, gpus=["0", "1"]) as manager:
            g1 = manager.submit(job("g1", 1)).job_id
            g2 = manager.submit(job("g2", 1)).job_id
            await watched(executor, g2)
            (await watched(executor, g1)).exit(0)
            await terminal(manager, g1)
            waiting = manager.submit(job("two", 2)).job_id
            await settle()
            assert manager.get(waiting).status is Q
        env.reopen()
        executor = FakeExecutor()
        executor.alive = {g2}
        async with running(env, executor, gpus=["0", "1"]) as manager:
            await watched(executor, g2)
            assert manager.get(g2).gpus == ["1"] and manager.gpus_in_use == 1
            one = manager.submit(job("one", 1)).job_id
            await settle()
            # The 2-GPU job queued before the restart still waits; the new 1-GPU job gets
            # device 0, never the adopted job's device 1.
            assert manager.get(waiting).status is Q
            await watched(executor, one)
            assert manager.get(one).gpus == ["0"]
            (await watched(executor, g2)).exit(0)
            (await watched(executor, one)).exit(0)
            await watched(executor, waiting)
            assert manager.get(waiting).gpus == ["0", "1"]
            await manager.stop_all()

    asyncio.run(scenario())


def test_a_queued_job_needing_more_gpus_than_a_restarted_server_has_fails(make_env) -> None:
    env = make_env(max_concurrency=1)

    async def scenario() -> None:
        executor = FakeExecutor()
        async with running(env, executor, gpus=["0", "1"]) as manager:
            manager.submit(job("first", 1))
            manager.submit(job("two", 2))
            await watched(executor, 1)
        env.reopen()
        async with running(env, FakeExecutor(), gpus=["0"]) as manager:
            record = manager.get(2)
            assert record.status is F
            assert "asks for 2 GPUs" in (record.error or "")
            assert "GPUS" in (record.error or "")

    asyncio.run(scenario())


def test_without_gpu_slots_jobs_get_no_device_variables(make_env) -> None:
    env = make_env()
    executor = FakeExecutor()

    async def scenario() -> None:
        async with running(env, executor, gpus=None) as manager:
            record = manager.submit(job("ray-style", 0.5))
            await watched(executor, record.job_id)
            assert record.gpus is None
            assert "CUDA_DEVICE_ORDER" not in spec_of(executor, record.job_id).env
            assert spec_of(executor, record.job_id).num_gpus == 0.5  # Ray's business
            await manager.stop_all()

    asyncio.run(scenario())
