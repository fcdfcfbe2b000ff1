"""Which finished jobs to remove (JOB_RETENTION_DAYS, MAX_FINISHED_JOBS), and removing their files.

Choosing is a pure function of the jobs, the settings and the time; removing a job's directory
can take seconds (results, samples, logs), so it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterable
from datetime import datetime, timedelta

from lm_eval_server.jobs.models import JobRecord


def expired(
    records: Iterable[JobRecord],
    now: datetime,
    retention_days: float | None,
    max_finished: int | None,
) -> list[JobRecord]:
    """Finished jobs older than `retention_days`, plus the oldest beyond `max_finished`."""
    if retention_days is None and max_finished is None:
        return []
    finished = sorted(
        (r for r in records if r.status.is_terminal()),
        key=lambda r: (r.finished_at or r.created_at, r.job_id),
    )
    victims: dict[int, JobRecord] = {}
    if retention_days is not None:
        cutoff = now - timedelta(days=retention_days)
        victims = {r.job_id: r for r in finished if (r.finished_at or r.created_at) < cutoff}
    if max_finished is not None:
        beyond = len(finished) - max_finished
        for record in finished[: max(beyond, 0)]:
            victims.setdefault(record.job_id, record)
    return sorted(victims.values(), key=lambda r: r.job_id)


def _remove_now(work_dirs: list[str]) -> None:
    for work_dir in work_dirs:
        shutil.rmtree(work_dir, ignore_errors=True)


async def remove_dirs(work_dirs: list[str]) -> None:
    if work_dirs:
        await asyncio.to_thread(_remove_now, work_dirs)
