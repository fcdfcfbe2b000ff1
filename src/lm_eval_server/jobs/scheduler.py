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
   free. A job that does not fit is passed over (no head-of-line blocking).
5. No starvation: the first job in that order that needs GPUs and has waited (since it was
   submitted) at least GPU_RESERVE_AFTER_S holds a reservation. It starts as soon as its GPUs
   are free, before any other job; until then no other job may take a GPU (jobs needing none
   still start). GPUs only come free meanwhile, so it runs once enough of the running jobs end.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, eq=False)  # identity: removing one from a long queue stays cheap
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


@dataclass(frozen=True)
class _Span:
    owner: str
    started_at: datetime
    finished_at: datetime
    seq: int  # tells apart spans with equal times

    @property
    def us(self) -> int:
        return _us(self.finished_at - self.started_at)


def _us(delta: timedelta) -> int:
    """Whole microseconds: sums and differences stay exact, so equal usage ties exactly."""
    return delta // timedelta(microseconds=1)


class UsageLedger:
    """Run intervals of finished jobs, kept while they overlap the fair-share window.

    Each owner's total is kept as runs are added and dropped; a decision then only subtracts,
    for the few runs that straddle the window's start (at most the jobs that were running at
    that instant), their part before it: its cost does not grow with the jobs finished in the
    window.
    """

    def __init__(self, window_s: float) -> None:
        self._window = timedelta(seconds=window_s)
        self._spans: deque[_Span] = deque()  # by finished_at
        self._totals_us: Counter[str] = Counter()
        self._unclipped: list[tuple[datetime, int, _Span]] = []  # heap: started_at >= since
        self._clipped: dict[int, _Span] = {}  # started_at < since < finished_at
        self._since: datetime | None = None
        self._seq = 0

    def __len__(self) -> int:
        return len(self._spans)

    def add(self, owner: str, started_at: datetime, finished_at: datetime) -> None:
        if finished_at <= started_at:
            return
        self._seq += 1
        span = _Span(owner, started_at, finished_at, self._seq)
        if self._spans and finished_at < self._spans[-1].finished_at:
            # Out of finishing order (records loaded at startup): keep the deque sorted.
            at = len(self._spans)
            while at and self._spans[at - 1].finished_at > finished_at:
                at -= 1
            self._spans.insert(at, span)
        else:
            self._spans.append(span)
        self._totals_us[owner] += span.us
        if self._since is not None and started_at < self._since:
            self._clipped[span.seq] = span
        else:
            heapq.heappush(self._unclipped, (started_at, span.seq, span))
        self._advance(max(finished_at - self._window, self._since or finished_at - self._window))

    def _advance(self, since: datetime) -> None:
        if self._since is not None and since < self._since:
            self._rebuild(since)  # the clock went back
        self._since = since
        while self._unclipped and self._unclipped[0][0] < since:
            span = heapq.heappop(self._unclipped)[2]
            self._clipped[span.seq] = span
        while self._spans and self._spans[0].finished_at <= since:
            span = self._spans.popleft()
            self._totals_us[span.owner] -= span.us
            if not self._totals_us[span.owner]:
                del self._totals_us[span.owner]
            self._clipped.pop(span.seq, None)

    def _rebuild(self, since: datetime) -> None:
        self._clipped = {s.seq: s for s in self._spans if s.started_at < since}
        self._unclipped = [(s.started_at, s.seq, s) for s in self._spans if s.started_at >= since]
        heapq.heapify(self._unclipped)

    def recent(self, now: datetime, running: Iterable[tuple[str, datetime]]) -> dict[str, float]:
        """Seconds each owner's jobs ran within the window; `running`: (owner, started_at)."""
        since = now - self._window
        self._advance(since)
        usage_us = Counter(self._totals_us)
        for span in self._clipped.values():
            usage_us[span.owner] -= _us(since - span.started_at)
        for owner, started_at in running:
            usage_us[owner] += max(0, _us(now - max(started_at, since)))
        return {owner: us / 1e6 for owner, us in usage_us.items() if us > 0}


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
    order = fair_order(heads, running, usage, policy)
    reserve_after = timedelta(seconds=policy.reserve_after_s)
    reserved = next((j for j in order if j.gpus and now - j.queued_at >= reserve_after), None)
    if reserved is not None:
        # It has waited long enough: it starts the moment its GPUs are free, and until then
        # no job takes a GPU (jobs needing none still start; they take no device from it).
        if reserved.gpus <= free_gpus:
            return reserved
        return next((j for j in order if not j.gpus), None)
    return next((j for j in order if j.gpus <= free_gpus), None)
