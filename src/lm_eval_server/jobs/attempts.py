"""Attempts of one job: when a failure is retried, how long the retry waits (pure), and
where an earlier attempt's logs are kept (`archive`, `archived_dir`).

A job makes at most `max_attempts` runs by itself: a run whose process failed, was killed, or
was lost (a server restart that left no exit code, a Ray node gone) is retried after
2^(attempt-1) seconds, at most RETRY_BACKOFF_MAX_S. A stop by a user, a timeout and a job
that could not be launched at all (a secret gone) are never retried. POST /job/{id}/resume
starts one more attempt by hand, whatever max_attempts says.
"""

from __future__ import annotations

import contextlib
import os
import stat
from datetime import datetime, timedelta
from pathlib import Path

from lm_eval_server.runtime import jobdir

ATTEMPT_DIR_PREFIX = "attempt-"


def backoff_s(attempt: int, max_s: float) -> float:
    """The wait before the run after `attempt` (1 -> 1 s, 2 -> 2 s, 3 -> 4 s, ...)."""
    exponent = min(max(attempt - 1, 0), 30)
    return float(min(2.0**exponent, max_s))


def retry_at(now: datetime, attempt: int, max_s: float) -> datetime:
    return now + timedelta(seconds=backoff_s(attempt, max_s))


def may_retry(attempt: int, max_attempts: int) -> bool:
    return attempt < max_attempts


def attempt_dir(work_dir: Path, attempt: int) -> Path:
    """Where attempt `attempt`'s logs go once a later attempt starts."""
    return work_dir / f"{ATTEMPT_DIR_PREFIX}{attempt}"


# What one attempt leaves in the job's directory, moved aside when the next one starts.
def attempt_files() -> list[str]:
    from lm_eval_server.jobs.cache_policy import STATS_FILE

    names = [jobdir.EXIT_RECORD, jobdir.CHILD_PID, jobdir.SUPERVISOR_LOG, STATS_FILE]
    for stream in jobdir.STREAMS:
        log = os.path.basename(jobdir.log_path(".", stream))
        names += [log, os.path.basename(jobdir.rotated_segment(log))]
        names.append(os.path.basename(jobdir.cut_record(log)))
    return names


def archive(work_dir: Path, attempt: int) -> Path:
    """Moves attempt `attempt`'s logs and exit record into attempt-N/ (file work: off the
    event loop). The job may write its directory, so nothing in it is followed: a planted
    attempt-N that is not a plain directory is removed first, and renames go through
    directory fds."""
    target = attempt_dir(work_dir, attempt)
    wfd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        name = target.name
        try:
            info = os.lstat(name, dir_fd=wfd)
        except FileNotFoundError:
            info = None
        if info is not None and not stat.S_ISDIR(info.st_mode):
            os.unlink(name, dir_fd=wfd)
            info = None
        if info is None:
            os.mkdir(name, 0o755, dir_fd=wfd)
        afd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=wfd)
        try:
            for entry in attempt_files():
                with contextlib.suppress(FileNotFoundError):
                    os.rename(entry, entry, src_dir_fd=wfd, dst_dir_fd=afd)
        finally:
            os.close(afd)
    finally:
        os.close(wfd)
    return target


def archived_dir(work_dir: Path, attempt: int) -> Path | None:
    """attempt-N of the job's directory if it is a plain directory inside it (not a link)."""
    target = attempt_dir(work_dir, attempt)
    try:
        info = os.lstat(target)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode):
        return None
    if os.path.realpath(target) != os.path.join(os.path.realpath(work_dir), target.name):
        return None
    return target
