"""The job directory: what each file in it is called, the exit record, atomic writes, and
opening what a job left there.

Everything that reads or writes a job's files asks this module for their names. It imports only
built-in modules and `os`, because the per-job supervisor (started with `python -I -S`, where
every millisecond of start-up delays the job) imports it too.

The job can write its own directory, so any file in it may have been replaced by a symlink (to
`jobs.db`, another job's results), a FIFO (a read that never returns) or a huge file. Readers
open them with `open_file`/`read_file`: the last component is never followed, only a regular
file is opened, nothing blocks, and a read has a bound. `write_atomic` creates its temporary
file exclusively under an unguessable name, so a planted symlink is never written through.

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
      job-facts.json           the job's package versions and environment names (the
                               launcher writes them; the receipt reads them, bounded)
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
JOB_FACTS = "job-facts.json"

PathLike = str | os.PathLike[str]
# The exit record and the log's cut count are a few dozen bytes.
SMALL_RECORD_BYTES = 4096
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_S_IFMT, _S_IFREG = 0o170000, 0o100000


class UnsafeFile(OSError):
    """Where a job file should be there is a symlink, FIFO, device or directory instead."""


class FileTooLarge(OSError):
    """A job file holds more bytes than its reader takes."""


def open_file(target: PathLike, *, dir_fd: int | None = None) -> int:
    """A read-only fd of `target` if it is a regular file. A symlink as its last component is
    not followed, a FIFO or device is not opened for real (O_NONBLOCK) and raises UnsafeFile;
    FileNotFoundError as usual. The caller closes the fd."""
    try:
        fd = os.open(target, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        import errno

        if exc.errno == errno.ELOOP:
            raise UnsafeFile(exc.errno, "a symlink, not a job file", os.fspath(target)) from None
        raise
    if os.fstat(fd).st_mode & _S_IFMT != _S_IFREG:
        os.close(fd)
        raise UnsafeFile(f"{os.fspath(target)}: not a regular file")
    return fd


def read_file(target: PathLike, max_bytes: int, *, dir_fd: int | None = None) -> bytes:
    """The content of the regular file `target` (see open_file); FileTooLarge past max_bytes."""
    fd = open_file(target, dir_fd=dir_fd)
    try:
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise FileTooLarge(f"{os.fspath(target)}: larger than {max_bytes} bytes")
    return data


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
    """Readers see the old content or the new one, never a part. The temporary file is new
    (O_EXCL, a name nobody can guess), so nothing planted in its place is written through;
    the rename replaces whatever `target` was, a symlink included, without following it."""
    target = os.fspath(target)
    tmp = f"{target}.tmp{os.getpid()}.{os.urandom(8).hex()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            view = memoryview(data.encode() if isinstance(data, str) else data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:  # noqa: SIM105 - contextlib would cost the supervisor's start-up
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_exit(work_dir: PathLike, code: int) -> None:
    # Formatted by hand: importing json would cost the supervisor more than the rest of it.
    record = '{"exit_code": %d, "ended_at": %.6f}' % (code, time.time())  # noqa: UP031
    write_atomic(path(work_dir, EXIT_RECORD), record)


def read_exit_code(work_dir: PathLike) -> int | None:
    """The exit code the supervisor recorded, or None when there is none (yet), or when what
    is there is not a small regular file holding one (see open_file)."""
    import json

    try:
        record = json.loads(read_file(path(work_dir, EXIT_RECORD), SMALL_RECORD_BYTES))
        code = record["exit_code"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return code if type(code) is int else None


def log_written_bytes(log: PathLike) -> int:
    """Bytes appended to a log so far: those rotation dropped (the cut record), the rotated
    segment's and the current file's; a segment that is not a plain file counts nothing."""
    log = os.fspath(log)
    try:
        written = max(0, int(read_file(cut_record(log), SMALL_RECORD_BYTES) or 0))
    except (OSError, ValueError):
        written = 0
    for segment in (rotated_segment(log), log):
        try:
            info = os.lstat(segment)
        except OSError:
            continue
        if (info.st_mode & 0o170000) == 0o100000:
            written += info.st_size
    return written
