"""The per-job supervisor: runs one command, pumps its output to the job's log files and records
its exit code in the job directory.

It runs detached from the server (its own session), so a server that crashes or restarts
neither kills the job nor loses its exit code. It is started with `python -I -S`, so no caller
environment can hook it, and imports only built-in modules (`os`, `select`, `_signal`), so it
starts the command a few milliseconds after it was spawned.

    python -I -S supervise.py WORK_DIR MAX_LOG_BYTES [--sandboxed] -- COMMAND...
    python -I -S supervise.py WORK_DIR MAX_LOG_BYTES --attach PID STDOUT_FD STDERR_FD

`--sandboxed`: COMMAND is bwrap (lm_eval_server.runtime.sandbox), which reports a command killed by
signal N as 128+N; the exit record says -N, as for a command run directly.

The second form is for a warm worker (`lm_eval_server.runtime.executors.warm_worker`): the job's
process, PID, is already running as a child of this process (forked before this program was
exec'd) and writes to the pipes STDOUT_FD and STDERR_FD, inherited too. Everything else is the
same.

The files it writes in WORK_DIR are named by `jobdir`: the two logs (each rotated past half of
MAX_LOG_BYTES, so the tail is always kept), the count of bytes dropped, the command's pid and
the exit record (written atomically when the command ends).
"""

from __future__ import annotations

import _signal  # the C module: `signal` would import enum, which costs milliseconds here
import os
import select
import sys

if __package__:
    from lm_eval_server.runtime import jobdir
else:
    # Started as `python -I -S supervise.py`: neither site-packages nor the package is on
    # sys.path, only what we put there. jobdir imports nothing but built-in modules.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jobdir

CHUNK = 1 << 16
SANDBOXED = "--sandboxed"
STOP_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)


class RotatingLog:
    """Appends to NAME; past `segment_bytes` the file becomes NAME.1 and NAME starts afresh."""

    def __init__(self, path: str | os.PathLike[str], segment_bytes: int) -> None:
        self.path = os.fspath(path)
        self.segment_bytes = segment_bytes
        self.fd = _open_append(self.path)
        self.size = os.fstat(self.fd).st_size

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.segment_bytes and self.size > 0:
            self._rotate()
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.size += len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _rotate(self) -> None:
        os.close(self.fd)
        old = jobdir.rotated_segment(self.path)
        # lstat, never stat: the job owns this directory and may have put a link here.
        if os.path.lexists(old):
            cut = jobdir.cut_record(self.path)
            dropped = _read_count(cut)
            jobdir.write_atomic(cut, str(dropped + os.lstat(old).st_size))
        os.replace(self.path, old)
        self.fd = _open_append(self.path)
        self.size = 0


_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def _open_append(path: str) -> int:
    """The log file at `path`, a plain file of this directory only. The job can write the
    directory (and this process runs outside its sandbox, as the server's user): a symlink,
    FIFO, hard link or anything else it planted at `path` is removed, never written through."""
    for _ in range(100):
        try:
            fd = os.open(path, _APPEND | os.O_CREAT, 0o644)
        except OSError:  # ELOOP (a symlink), ENXIO (a FIFO), EISDIR, ...
            _remove(path)
            continue
        info = os.fstat(fd)
        if (info.st_mode & 0o170000) == 0o100000 and info.st_nlink == 1:
            return fd
        os.close(fd)
        _remove(path)
    raise OSError(f"cannot create the log file {path}")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except IsADirectoryError:
        os.rename(path, f"{path}.planted{os.urandom(4).hex()}")
    except FileNotFoundError:
        pass


def _read_count(path: str) -> int:
    """The number in the cut record; 0 for anything that is not a plain file holding one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        if (os.fstat(fd).st_mode & 0o170000) != 0o100000:
            return 0
        text = os.read(fd, 64).decode(errors="replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else 0


class _Child:
    """A child process of this one, waited for with waitpid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def run(
    work_dir: str | os.PathLike[str],
    max_log_bytes: int,
    command: list[str],
    sandboxed: bool = False,
) -> int:
    work_dir = os.fspath(work_dir)
    ignore_stop_signals()
    logs = _open_logs(work_dir, max_log_bytes)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    # posix_spawn has no "cwd": the supervisor moves there itself (it needs no other).
    os.chdir(work_dir)
    try:
        pid = os.posix_spawnp(
            command[0],
            command,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
            ],
            # The stop signals this process ignores get their default action back.
            setsigdef=STOP_SIGNALS,
        )
    except OSError as exc:
        logs["stderr"].write(f"lm-eval-server: cannot start {command[0]!r}: {exc}\n".encode())
        jobdir.write_exit(work_dir, 127)
        return 127
    finally:
        os.close(out_w)
        os.close(err_w)
    return _supervise(work_dir, _Child(pid), out_r, err_r, logs, sandboxed)


def sandbox_exit_status(code: int) -> int:
    # bwrap's encoding, as a shell's: 128+N for a command killed by signal N.
    return -(code - 128) if 128 < code < 128 + 65 else code


def run_attached(
    work_dir: str | os.PathLike[str], max_log_bytes: int, pid: int, stdout_fd: int, stderr_fd: int
) -> int:
    """Supervise `pid`, a child of this process already running, as `run` does its command."""
    work_dir = os.fspath(work_dir)
    ignore_stop_signals()
    logs = _open_logs(work_dir, max_log_bytes)
    return _supervise(work_dir, _Child(pid), stdout_fd, stderr_fd, logs)


def ignore_stop_signals() -> None:
    # The stop signal goes to the whole process group; the command decides how to end, and
    # this process stays to record how it did.
    for sig in STOP_SIGNALS:
        _signal.signal(sig, _signal.SIG_IGN)


def _open_logs(work_dir: str, max_log_bytes: int) -> dict[str, RotatingLog]:
    segment = max(1024, max_log_bytes // 2)
    return {
        stream: RotatingLog(jobdir.log_path(work_dir, stream), segment) for stream in jobdir.STREAMS
    }


def _supervise(
    work_dir: str,
    child: _Child,
    stdout_fd: int,
    stderr_fd: int,
    logs: dict[str, RotatingLog],
    sandboxed: bool = False,
) -> int:
    jobdir.write_atomic(jobdir.path(work_dir, jobdir.CHILD_PID), str(child.pid))
    _pump(child, {stdout_fd: logs["stdout"], stderr_fd: logs["stderr"]})
    code = child.wait()
    if sandboxed:
        code = sandbox_exit_status(code)
    jobdir.write_exit(work_dir, code)
    return code


def _pump(child: _Child, streams: dict[int, RotatingLog]) -> None:
    """Copies each readable fd to its log until all reach EOF (or the child is gone)."""
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN | select.POLLHUP)
    open_streams = len(streams)
    while open_streams:
        events = poller.poll(1000)
        if not events and child.poll() is not None:
            # The command is gone but a grandchild still holds a pipe: stop waiting for it.
            break
        for fd, _ in events:
            data = os.read(fd, CHUNK)
            if data:
                streams[fd].write(data)
            else:
                poller.unregister(fd)
                open_streams -= 1


USAGE = (
    "usage: supervise.py WORK_DIR MAX_LOG_BYTES [--sandboxed] -- COMMAND...\n"
    "       supervise.py WORK_DIR MAX_LOG_BYTES --attach PID STDOUT_FD STDERR_FD"
)


def main(argv: list[str]) -> int:
    if len(argv) == 6 and argv[2] == "--attach":
        pid, stdout_fd, stderr_fd = (int(a) for a in argv[3:])
        return run_attached(argv[0], int(argv[1]), pid, stdout_fd, stderr_fd)
    sandboxed = len(argv) > 2 and argv[2] == SANDBOXED
    if sandboxed:
        argv = argv[:2] + argv[3:]
    if len(argv) < 4 or argv[2] != "--":
        sys.stderr.write(USAGE + "\n")
        return 2
    return run(argv[0], int(argv[1]), argv[3:], sandboxed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
