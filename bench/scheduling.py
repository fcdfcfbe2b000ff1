"""What one scheduling decision costs with a long queue: prints microseconds per `choose` (the
fair order over the queue's heads), per usage computation (the fair-share window's finished
jobs) and per queue push/remove, for 10,000 queued jobs of 20 owners with mixed GPU needs.

    uv run python bench/scheduling.py
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta

from lm_eval_server.jobs.scheduler import FairQueue, GpuPool, Policy, UsageLedger, Waiting, choose

QUEUED = 10_000
OWNERS = 20
FINISHED_IN_WINDOW = 10_000
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def per_op(label: str, count: int, elapsed_s: float) -> None:
    print(f"{label:<46} {count:>7} ops  {elapsed_s * 1e6 / count:9.1f} us/op")


def main() -> None:
    queue = FairQueue()
    entries = [
        Waiting(i, f"owner{i % OWNERS}", (0, 0, 1, 2)[i % 4], T0 - timedelta(seconds=QUEUED - i))
        for i in range(1, QUEUED + 1)
    ]
    start = time.perf_counter()
    for entry in entries:
        queue.push(entry)
    per_op("push", QUEUED, time.perf_counter() - start)

    ledger = UsageLedger(3600)
    for i in range(FINISHED_IN_WINDOW):
        end = T0 - timedelta(seconds=FINISHED_IN_WINDOW - i) * 0.3
        ledger.add(f"owner{i % OWNERS}", end - timedelta(seconds=30), end)
    running = [(f"owner{i}", T0 - timedelta(seconds=i)) for i in range(8)]
    rounds = 200
    start = time.perf_counter()
    for _ in range(rounds):
        usage = ledger.recent(T0, running)
    per_op(f"usage over {len(ledger)} finished jobs", rounds, time.perf_counter() - start)

    pool = GpuPool(["0", "1", "2", "3"])
    pool.take(0, 3)  # one GPU free: 2-GPU heads do not fit
    counts = Counter(owner for owner, _ in running)
    policy = Policy(max_running_per_owner=4, reserve_after_s=600)
    decisions = 0
    start = time.perf_counter()
    while len(queue) > QUEUED // 2:
        chosen = choose(
            queue.heads(),
            free_gpus=pool.free_count,
            running=counts,
            usage=usage,
            policy=policy,
            now=T0,
        )
        assert chosen is not None
        queue.remove(chosen.job_id)
        decisions += 1
    per_op(
        f"choose + remove ({OWNERS} owners, 3 GPU needs)", decisions, time.perf_counter() - start
    )

    start = time.perf_counter()
    removed = 0
    for entry in entries[QUEUED // 2 :: 50]:  # stop a queued job from the middle of its queue
        removed += queue.remove(entry.job_id) is not None
    per_op("remove from the middle (stop a queued job)", removed, time.perf_counter() - start)


if __name__ == "__main__":
    main()
