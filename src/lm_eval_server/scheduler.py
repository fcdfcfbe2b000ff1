"""Which queued job runs next: the fair order across owners, per-owner limits and GPU slots.

Pure: no I/O, no asyncio, no clock of its own (the manager passes `now`). The manager owns one
`FairQueue`, one `GpuPool` and one `UsageLedger`, and asks `choose` each time a slot is free.

The rule (docs: "The fair queue"):

1. Only owners below MAX_RUNNING_PER_KEY (when set) take part.
2. Owners in order of their recent usage: the seconds their jobs ran within the last
   FAIR_SHARE_WINDOW_S (running jobs count up to now), least first; ties go to the owner with
   fewer running jobs, then to the owner whose oldest queued job is oldest (lowest job id).
3. Within an owner, first in, first out (job id order).
4. Walking that order, the first job that fits starts: it fits when the GPUs it asks for are
   free. A job that does not fit is passed over (no head-of-line blocking), except that a job
   which needs GPUs, cannot get them, and has waited at least GPU_RESERVE_AFTER_S bars every job
   after it in the order from taking a GPU (jobs needing none still start), so the GPUs it
   needs are bound to come free for it: no job waits for GPUs forever.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Waiting:
    """A queued job as the scheduler sees it."""

    job_id: int
    owner: str
    gpus: int  # devices it needs from the GPU pool (0 when none, or not managed here)
    queued_at: datetime


@dataclass(frozen=True)
class Policy:
    max_running_per_owner: int | None = None
    reserve_after_s: float = 600.0


class FairQueue:
    """Queued jobs, kept per owner and per GPU need, each in FIFO order.

    Only the first job of each (owner, need) can be next, so a decision looks at no more
    candidates than owners times distinct GPU counts, however long the queue is.
    """

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, int], deque[Waiting]] = {}
        self._entries: dict[int, Waiting] = {}
        self._per_owner: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def queued(self, owner: str) -> int:
        return self._per_owner[owner]

    def push(self, entry: Waiting) -> None:
        """Appends a job; job ids grow with submission, so FIFO is job id order."""
        self._buckets.setdefault((entry.owner, entry.gpus), deque()).append(entry)
        self._entries[entry.job_id] = entry
        self._per_owner[entry.owner] += 1

    def remove(self, job_id: int) -> Waiting | None:
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return None
        key = (entry.owner, entry.gpus)
        bucket = self._buckets[key]
        if bucket[0].job_id == job_id:
            bucket.popleft()  # the usual case: the job chosen to run
        else:
            bucket.remove(entry)
        if not bucket:
            del self._buckets[key]
        self._per_owner[entry.owner] -= 1
        if not self._per_owner[entry.owner]:
            del self._per_owner[entry.owner]
        return entry

    def heads(self) -> list[Waiting]:
        return [bucket[0] for bucket in self._buckets.values()]


class GpuPool:
    """The server's GPU device ids and which job holds which."""

    def __init__(self, devices: Sequence[str]) -> None:
        self.devices: tuple[str, ...] = tuple(devices)
        self._holder: dict[str, int] = {}

    @property
    def total(self) -> int:
        return len(self.devices)

    @property
    def in_use(self) -> int:
        return len(self._holder)

    @property
    def free_count(self) -> int:
        return self.total - self.in_use

    def take(self, job_id: int, count: int) -> list[str]:
        """`count` free devices for the job, lowest first in GPUS order."""
        free = [d for d in self.devices if d not in self._holder][:count]
        if len(free) < count:
            raise ValueError(f"job {job_id} needs {count} GPUs; {len(free)} are free")
        for device in free:
            self._holder[device] = job_id
        return free

    def hold(self, job_id: int, devices: Iterable[str]) -> list[str]:
        """Marks devices a re-adopted job already has; returns those this pool manages."""
        held = [d for d in devices if d in self.devices and d not in self._holder]
        for device in held:
            self._holder[device] = job_id
        return held

    def release(self, job_id: int) -> None:
        for device in [d for d, holder in self._holder.items() if holder == job_id]:
            del self._holder[device]


class UsageLedger:
    """Run intervals of finished jobs, kept while they overlap the fair-share window."""

    def __init__(self, window_s: float) -> None:
        self._window = timedelta(seconds=window_s)
        # (finished_at, owner, started_at), appended in finishing order.
        self._spans: deque[tuple[datetime, str, datetime]] = deque()

    def __len__(self) -> int:
        return len(self._spans)

    def add(self, owner: str, started_at: datetime, finished_at: datetime) -> None:
        self._spans.append((finished_at, owner, started_at))
        self._drop_before(finished_at - self._window)

    def _drop_before(self, since: datetime) -> None:
        while self._spans and self._spans[0][0] <= since:
            self._spans.popleft()

    def recent(self, now: datetime, running: Iterable[tuple[str, datetime]]) -> dict[str, float]:
        """Seconds each owner's jobs ran within the window; `running`: (owner, started_at)."""
        since = now - self._window
        self._drop_before(since)
        usage: dict[str, float] = {}
        spans = [(o, s, f) for f, o, s in self._spans] + [(o, s, now) for o, s in running]
        for owner, started, ended in spans:
            seconds = (min(ended, now) - max(started, since)).total_seconds()
            if seconds > 0:
                usage[owner] = usage.get(owner, 0.0) + seconds
        return usage


def fair_order(
    heads: Iterable[Waiting],
    running: Mapping[str, int],
    usage: Mapping[str, float],
    policy: Policy,
) -> list[Waiting]:
    """The candidates in the order they are offered a slot (rules 1-3 of the module doc)."""
    limit = policy.max_running_per_owner
    eligible = [h for h in heads if limit is None or running.get(h.owner, 0) < limit]
    oldest: dict[str, int] = {}
    for head in eligible:
        oldest[head.owner] = min(head.job_id, oldest.get(head.owner, head.job_id))
    return sorted(
        eligible,
        key=lambda h: (
            usage.get(h.owner, 0.0),
            running.get(h.owner, 0),
            oldest[h.owner],
            h.job_id,
        ),
    )


def choose(
    heads: Iterable[Waiting],
    *,
    free_gpus: int,
    running: Mapping[str, int],
    usage: Mapping[str, float],
    policy: Policy,
    now: datetime,
) -> Waiting | None:
    """The job to start in a free slot, or None when no queued job may start now."""
    reserve_after = timedelta(seconds=policy.reserve_after_s)
    barred = False  # a starving GPU job earlier in the order keeps the GPUs for itself
    for job in fair_order(heads, running, usage, policy):
        if job.gpus == 0:
            return job
        if job.gpus <= free_gpus and not barred:
            return job
        if job.gpus > free_gpus and now - job.queued_at >= reserve_after:
            barred = True
    return None
