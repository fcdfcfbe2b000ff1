"""The scheduling decision (jobs.scheduler) and GPU discovery (jobs.gpus),
as pure functions: no manager, no processes."""

from __future__ import annotations

import random
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from lm_eval_server.config import Settings
from lm_eval_server.jobs import gpus
from lm_eval_server.jobs.scheduler import (
    FairQueue,
    GpuPool,
    Policy,
    UsageLedger,
    Waiting,
    choose,
    fair_order,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def waiting(job_id: int, owner: str, gpus_needed: int = 0, age_s: float = 0) -> Waiting:
    return Waiting(job_id, owner, gpus_needed, T0 - timedelta(seconds=age_s))


def pick(
    queue: list[Waiting],
    free_gpus: int = 0,
    running: dict[str, int] | None = None,
    usage: dict[str, float] | None = None,
    **policy: Any,
) -> int | None:
    fq = FairQueue()
    for entry in queue:
        fq.push(entry)
    chosen = choose(
        fq.heads(),
        free_gpus=free_gpus,
        running=running or {},
        usage=usage or {},
        policy=Policy(**policy),
        now=T0,
    )
    return chosen.job_id if chosen else None


# ---------------------------------------------------------------- the fair order


def test_least_recent_usage_first_then_fewer_running_then_oldest_queued_job() -> None:
    queue = [waiting(1, "alice"), waiting(2, "alice"), waiting(3, "bob"), waiting(4, "carol")]
    assert pick(queue) == 1  # all equal: the oldest queued job
    assert pick(queue, usage={"alice": 5.0}) == 3
    assert pick(queue, usage={"alice": 5.0, "bob": 5.0}) == 4
    assert pick(queue, running={"alice": 1}) == 3
    # Usage decides before running counts.
    assert pick(queue, running={"bob": 3}, usage={"alice": 1.0, "carol": 2.0}) == 3


def test_fifo_within_an_owner_and_owners_grouped() -> None:
    fq = FairQueue()
    for entry in [waiting(5, "bob"), waiting(1, "alice"), waiting(9, "alice", 1)]:
        fq.push(entry)
    order = fair_order(fq.heads(), {}, {"bob": 1.0}, Policy())
    assert [w.job_id for w in order] == [1, 9, 5]


def test_owners_at_max_running_per_key_take_no_part() -> None:
    queue = [waiting(1, "alice"), waiting(2, "bob")]
    running = {"alice": 2, "bob": 2}
    assert pick(queue, running=running, max_running_per_owner=2) is None
    assert pick(queue, running={"alice": 2, "bob": 1}, max_running_per_owner=2) == 2
    assert pick(queue, running=running, max_running_per_owner=3) == 1


# ---------------------------------------------------------------- GPUs in the decision


def test_a_job_that_does_not_fit_is_passed_over_by_one_that_does() -> None:
    queue = [waiting(1, "alice", 2), waiting(2, "alice", 1), waiting(3, "bob", 0)]
    assert pick(queue, free_gpus=2) == 1
    assert pick(queue, free_gpus=1) == 2  # same owner's smaller job: backfill
    assert pick(queue, free_gpus=0) == 3
    assert pick(queue[:2], free_gpus=0) is None


def test_a_job_that_waited_long_for_gpus_reserves_them() -> None:
    old_big = waiting(1, "alice", 2, age_s=600)
    queue = [old_big, waiting(2, "bob", 1), waiting(3, "carol", 0)]
    usage = {"alice": 0.0, "bob": 1.0, "carol": 2.0}
    # alice's job is first in the order and starving: bob's 1-GPU job may not take the free GPU.
    assert pick(queue, free_gpus=1, usage=usage, reserve_after_s=600) == 3
    assert pick(queue[:2], free_gpus=1, usage=usage, reserve_after_s=600) is None
    # Not waited long enough yet: backfill.
    assert pick(queue, free_gpus=1, usage=usage, reserve_after_s=601) == 2
    # Jobs before it in the order may not take GPUs either.
    assert pick(queue[:2], free_gpus=1, usage={"alice": 9.0}, reserve_after_s=600) is None
    # Once its GPUs are free it starts, before jobs earlier in the fair order.
    assert pick(queue, free_gpus=2, usage=usage, reserve_after_s=600) == 1
    assert pick(queue, free_gpus=2, usage={"alice": 9.0}, reserve_after_s=600) == 1
    # Several have waited long: the first in the fair order holds the reservation.
    two_old = [old_big, waiting(2, "bob", 1, age_s=900)]
    assert pick(two_old, free_gpus=1, usage={"alice": 1.0}, reserve_after_s=600) == 2
    assert pick(two_old, free_gpus=1, usage={"bob": 1.0}, reserve_after_s=600) is None
    # 0 means at once: no backfilling past a blocked GPU job.
    young = [waiting(1, "alice", 2), waiting(2, "bob", 1)]
    assert pick(young, free_gpus=1, usage=usage, reserve_after_s=0) is None


def test_an_owner_over_its_running_limit_holds_no_reservation() -> None:
    queue = [waiting(1, "alice", 2, age_s=3600), waiting(2, "bob", 1)]
    assert pick(queue, free_gpus=1, running={"alice": 1}, max_running_per_owner=1) == 2


# ---------------------------------------------------------------- the structures


def test_fair_queue_counts_per_owner_and_removes_from_any_place() -> None:
    fq = FairQueue()
    for entry in [waiting(1, "a"), waiting(2, "a"), waiting(3, "a"), waiting(4, "b", 1)]:
        fq.push(entry)
    assert (len(fq), fq.queued("a"), fq.queued("b"), fq.queued("c")) == (4, 3, 1, 0)
    assert fq.remove(2) is not None and fq.remove(2) is None
    assert [h.job_id for h in fq.heads()] == [1, 4]
    fq.remove(1)
    fq.remove(4)
    assert [h.job_id for h in fq.heads()] == [3]
    assert 3 in fq and 1 not in fq and (len(fq), fq.queued("a"), fq.queued("b")) == (1, 1, 0)


def test_gpu_pool_hands_out_free_devices_in_order_and_takes_them_back() -> None:
    pool = GpuPool(["0", "1", "2"])
    assert pool.take(7, 1) == ["0"]
    assert pool.take(8, 2) == ["1", "2"]
    assert (pool.in_use, pool.free_count) == (3, 0)
    with pytest.raises(ValueError, match="needs 1 GPUs; 0 are free"):
        pool.take(9, 1)
    pool.release(8)
    assert pool.take(9, 0) == [] and pool.take(9, 1) == ["1"]
    # A re-adopted job keeps what it had; unknown or taken devices are not given twice.
    fresh = GpuPool(["0", "1"])
    assert fresh.hold(3, ["1", "7"]) == ["1"]
    assert fresh.hold(4, ["1"]) == []
    assert fresh.take(5, 1) == ["0"]


def test_usage_counts_only_the_window_and_running_jobs_up_to_now() -> None:
    ledger = UsageLedger(3600)
    m = timedelta(minutes=1)
    ledger.add("bob", T0 - 80 * m, T0 - 70 * m)  # all outside the window at T0
    ledger.add("alice", T0 - 90 * m, T0 - 50 * m)  # 10 of its minutes are in it
    usage = ledger.recent(T0, [("carol", T0 - 5 * m), ("alice", T0)])
    assert usage == {"alice": 600.0, "carol": 300.0}
    assert len(ledger) == 1  # bob's span is dropped
    # Finished jobs are dropped as the window moves on, even if nobody asks for usage.
    for minute in range(100):
        ledger.add("dave", T0 + minute * m, T0 + (minute + 1) * m)
    assert len(ledger) == 60


def brute_usage(
    spans: list[tuple[str, datetime, datetime]], now: datetime, window_s: float
) -> dict[str, float]:
    since = now - timedelta(seconds=window_s)
    usage: dict[str, float] = {}
    for owner, started, finished in spans:
        seconds = (min(finished, now) - max(started, since)).total_seconds()
        if seconds > 0:
            usage[owner] = usage.get(owner, 0.0) + seconds
    return {o: round(u, 6) for o, u in usage.items() if u > 0}


def test_usage_matches_a_brute_force_sum_as_the_clock_moves() -> None:
    rng = random.Random(15)
    window_s = 900
    ledger = UsageLedger(window_s)
    spans: list[tuple[str, datetime, datetime]] = []
    now = T0
    for step in range(400):
        now += timedelta(seconds=rng.choice([0, 1, 7, 30, 120, 600]))
        if rng.random() < 0.7:
            owner = rng.choice("abc")
            started = now - timedelta(seconds=rng.randint(0, 2000), microseconds=rng.randint(0, 9))
            finished = now - timedelta(seconds=rng.randint(0, 5)) if step % 9 else now
            if finished > started:
                ledger.add(owner, started, finished)
                spans.append((owner, started, finished))
        running = [("a", now - timedelta(seconds=rng.randint(0, 1000)))]
        got = {o: round(u, 6) for o, u in ledger.recent(now, running).items()}
        assert got == brute_usage([*spans, ("a", running[0][1], now)], now, window_s), step


def test_usage_after_the_clock_is_set_back() -> None:
    ledger = UsageLedger(600)
    m = timedelta(minutes=1)
    ledger.add("a", T0 - 12 * m, T0 - 2 * m)
    assert ledger.recent(T0, []) == {"a": 480.0}  # 8 of its 10 minutes in the window
    # Five minutes back: the window starts earlier, so more of the run counts again.
    assert ledger.recent(T0 - 5 * m, []) == {"a": 600.0}
    assert ledger.recent(T0, []) == {"a": 480.0}


# ---------------------------------------------------------------- finding the devices


SMI = """GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-6e5b1d9c-0f7c-2c47-8d1e-1b2c3d4e5f60)
  MIG 1g.5gb      Device  0: (UUID: MIG-2d3f0e4a-5b6c-5d7e-8f90-a1b2c3d4e5f6)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-7f6c2e0d-1a8d-3d58-9e2f-2c3d4e5f6a71)
"""


def test_nvidia_smi_gpus_are_its_indices() -> None:
    assert gpus.from_nvidia_smi(SMI) == ["0", "1"]
    assert gpus.from_nvidia_smi("No devices found.\n") == []


def test_cuda_visible_devices_is_read_as_cuda_reads_it() -> None:
    assert gpus.from_cuda_visible_devices("2,3") == ["2", "3"]
    assert gpus.from_cuda_visible_devices(" 1 , GPU-6e5b1d9c-0f7c") == ["1", "GPU-6e5b1d9c-0f7c"]
    assert gpus.from_cuda_visible_devices("") == []
    assert gpus.from_cuda_visible_devices("-1") == []
    assert gpus.from_cuda_visible_devices("0,-1,2") == ["0"]  # CUDA stops at an invalid entry


def test_detection_order_gpus_then_cuda_visible_devices_then_nvidia_smi() -> None:
    calls: list[list[str]] = []

    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        assert kwargs["timeout"] == gpus.NVIDIA_SMI_TIMEOUT_S
        return subprocess.CompletedProcess(argv, 0, SMI, "")

    def which(name: str) -> str:
        return f"/usr/bin/{name}"

    found = gpus.detect(["5"], {"CUDA_VISIBLE_DEVICES": "1"}, run, which)
    assert (found.ids, found.source) == (["5"], "GPUS")
    found = gpus.detect(None, {"CUDA_VISIBLE_DEVICES": "1"}, run, which)
    assert (found.ids, found.source) == (["1"], "CUDA_VISIBLE_DEVICES")
    assert calls == []
    found = gpus.detect(None, {}, run, which)
    assert (found.ids, found.source) == (["0", "1"], "nvidia-smi")
    assert calls == [["/usr/bin/nvidia-smi", "-L"]]
    assert gpus.detect(None, {}, run, lambda _: None).ids == []
    assert gpus.detect([], {"CUDA_VISIBLE_DEVICES": "0"}, run, which).ids == []


def test_a_hanging_or_failing_nvidia_smi_means_no_gpus() -> None:
    def hang(argv: list[str], **kwargs: Any) -> Any:
        raise subprocess.TimeoutExpired(argv, kwargs["timeout"])

    def fail(argv: list[str], **kwargs: Any) -> Any:
        return subprocess.CompletedProcess(argv, 9, "", "NVIDIA-SMI has failed")

    for run in (hang, fail):
        found = gpus.detect(None, {}, run, lambda name: "/usr/bin/nvidia-smi")
        assert (found.ids, found.source) == ([], "none")


def test_a_real_nvidia_smi_is_run_with_a_bounded_timeout(tmp_path: Path) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{SMI}EOF\n")
    smi.chmod(0o755)
    found = gpus.detect(None, {}, which=lambda name: str(smi))
    assert (found.ids, found.source) == (["0", "1"], "nvidia-smi")


def test_request_checks_name_the_field_and_the_setting() -> None:
    assert gpus.check_request({"num_gpus": 2.0}, ["0", "1"]) is None
    assert gpus.check_request({}, []) is None and gpus.check_request(None, []) is None
    too_many = gpus.check_request({"num_gpus": 3.0}, ["0", "1"])
    assert too_many is not None and "GPUS=0,1" in too_many and "at most 2" in too_many
    none = gpus.check_request({"num_gpus": 1.0}, [])
    assert none is not None and "GPUS is empty" in none
    fraction = gpus.check_request({"num_gpus": 0.5}, ["0"])
    assert fraction is not None and "whole number" in fraction and "EXECUTOR=ray" in fraction
    assert gpus.need({"num_gpus": 2.0}) == 2 and gpus.need({"num_gpus": 0.5}) == 1


def test_gpus_setting_is_checked_at_startup(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path, gpus="0, 1").gpus == ["0", "1"]
    assert Settings(data_dir=tmp_path, gpus="").gpus == []
    assert Settings(data_dir=tmp_path).gpus is None
    for bad, message in (("0,0", "listed twice"), ("0,a b", "not a device id")):
        with pytest.raises(ValidationError, match=message):
            Settings(data_dir=tmp_path, gpus=bad)
    with pytest.raises(ValidationError, match="GPUS works with EXECUTOR=local only"):
        Settings(data_dir=tmp_path, gpus="0", executor="ray", ray_address="http://h:8265")
