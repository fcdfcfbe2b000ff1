"""The job directory: what each file in it is called, the exit record, and atomic writes.

Everything that reads or writes a job's files asks this module for their names. It imports only
built-in modules and `os`, because the per-job supervisor (started with `python -I -S`, where
every millisecond of start-up delays the job) imports it too.

    DATA_DIR/jobs/<id>/
      stdout.log, stderr.log   the job's output. Past half of MAX_LOG_BYTES a log becomes
                               `<log>.1` and starts afresh; `<log>.cut` counts the bytes dropped
      exit.json                {"exit_code": N, "ended_at": T}, written atomically at the end
      child.pid                the command's pid (the supervisor is the session leader)
      supervisor.log           the supervisor's own errors, if any
      home/, tmp/              the job's HOME and TMPDIR
      results/                 lm-eval's --output_path when the request names none
      config.yaml              the validated snapshot of a request's `config` file
      job-env.json             a Ray job's environment (0600), removed by the job once read
"""

from __future__ import annotations

import os
import time

STREAMS = ("stdout", "stderr")
EXIT_RECORD = "exit.json"
CHILD_PID = "child.pid"
SUPERVISOR_LOG = "supervisor.log"
HOME = "home"
TMP = "tmp"
RESULTS = "results"
CONFIG_SNAPSHOT = "config.yaml"
ENV_FILE = "job-env.json"

PathLike = str | os.PathLike[str]


def log_path(work_dir: PathLike, stream: str) -> str:
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}")
    return os.path.join(os.fspath(work_dir), f"{stream}.log")


def stdout_log(work_dir: PathLike) -> str:
    return log_path(work_dir, "stdout")


def stderr_log(work_dir: PathLike) -> str:
    return log_path(work_dir, "stderr")


def rotated_segment(log: PathLike) -> str:
    """The previous segment of a log, kept so that the tail survives a rotation."""
    return os.fspath(log) + ".1"


def cut_record(log: PathLike) -> str:
    """The file counting the bytes dropped from the head of a log."""
    return os.fspath(log) + ".cut"


def path(work_dir: PathLike, name: str) -> str:
    return os.path.join(os.fspath(work_dir), name)


def write_atomic(target: PathLike, data: str | bytes, mode: int = 0o644) -> None:
    """Readers see the old content or the new one, never a part."""
    target = os.fspath(target)
    tmp = f"{target}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data.encode() if isinstance(data, str) else data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, target)


def write_exit(work_dir: PathLike, code: int) -> None:
    # Formatted by hand: importing json would cost the supervisor more than the rest of it.
    record = '{"exit_code": %d, "ended_at": %.6f}' % (code, time.time())  # noqa: UP031
    write_atomic(path(work_dir, EXIT_RECORD), record)


def read_exit_code(work_dir: PathLike) -> int | None:
    """The exit code the supervisor recorded, or None when there is none (yet)."""
    import json

    try:
        with open(path(work_dir, EXIT_RECORD), "rb") as f:
            return int(json.loads(f.read())["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
