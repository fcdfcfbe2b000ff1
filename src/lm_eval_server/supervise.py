"""The per-job supervisor: runs one command, pumps its output to the job's log files and records
its exit code in the job directory.

It runs detached from the server (its own session), so a server that crashes or restarts
neither kills the job nor loses its exit code. Standard library only, and started with
`python -I -S`, so it costs a few milliseconds and no caller environment can hook it.

    python -I -S supervise.py WORK_DIR MAX_LOG_BYTES -- COMMAND...
    python -I -S supervise.py WORK_DIR MAX_LOG_BYTES --attach PID STDOUT_FD STDERR_FD

The second form is for a warm worker (`lm_eval_server.warm`): the job's process, PID, is
already running as a child of this process (forked before this program was exec'd) and
writes to the pipes STDOUT_FD and STDERR_FD, inherited too. Everything else is the same.

Files in WORK_DIR: stdout.log, stderr.log (each rotated to `.1` past half of MAX_LOG_BYTES, so
the tail is always kept), `<stream>.log.cut` (bytes dropped), exit.json (written atomically
when the command ends).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 1 << 16


class RotatingLog:
    """Appends to NAME; past `segment_bytes` the file becomes NAME.1 and NAME starts afresh."""

    def __init__(self, path: Path, segment_bytes: int) -> None:
        self.path = path
        self.segment_bytes = segment_bytes
        self.file = open(path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the job
        self.size = self.file.tell()

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.segment_bytes and self.size > 0:
            self._rotate()
        self.file.write(data)
        self.size += len(data)

    def _rotate(self) -> None:
        self.file.close()
        old = self.path.with_name(self.path.name + ".1")
        if old.exists():
            cut = self.path.with_name(self.path.name + ".cut")
            dropped = int(cut.read_text() or 0) if cut.exists() else 0
            _write_atomic(cut, str(dropped + old.stat().st_size))
        os.replace(self.path, old)
        self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115
        self.size = 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(work_dir: Path, max_log_bytes: int, command: list[str]) -> int:
    _ignore_stop_signals()
    logs = _open_logs(work_dir, max_log_bytes)
    try:
        child = subprocess.Popen(
            command,
            cwd=work_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # The command gets default signal handling back.
            preexec_fn=_default_signals,
        )
    except OSError as exc:
        logs["stderr"].write(f"lm-eval-server: cannot start {command[0]!r}: {exc}\n".encode())
        _write_atomic(work_dir / "exit.json", json.dumps({"exit_code": 127}))
        return 127
    assert child.stdout is not None and child.stderr is not None
    return _supervise(work_dir, child, child.stdout.fileno(), child.stderr.fileno(), logs)


def run_attached(
    work_dir: Path, max_log_bytes: int, pid: int, stdout_fd: int, stderr_fd: int
) -> int:
    """Supervise `pid`, a child of this process already running, as `run` does its command."""
    _ignore_stop_signals()
    logs = _open_logs(work_dir, max_log_bytes)
    return _supervise(work_dir, _Attached(pid), stdout_fd, stderr_fd, logs)


class _Attached:
    """The part of Popen's interface `_supervise` uses, for a child this process did not spawn."""

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


def _ignore_stop_signals() -> None:
    # The stop signal goes to the whole process group; the command decides how to end, and
    # this process stays to record how it did.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _open_logs(work_dir: Path, max_log_bytes: int) -> dict[str, RotatingLog]:
    segment = max(1024, max_log_bytes // 2)
    return {
        "stdout": RotatingLog(work_dir / "stdout.log", segment),
        "stderr": RotatingLog(work_dir / "stderr.log", segment),
    }


def _supervise(
    work_dir: Path,
    child: subprocess.Popen[bytes] | _Attached,
    stdout_fd: int,
    stderr_fd: int,
    logs: dict[str, RotatingLog],
) -> int:
    _write_atomic(work_dir / "child.pid", str(child.pid))
    _pump(child, {stdout_fd: logs["stdout"], stderr_fd: logs["stderr"]})
    code = child.wait()
    _write_atomic(work_dir / "exit.json", json.dumps({"exit_code": code, "ended_at": time.time()}))
    return code


def _default_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _pump(child: subprocess.Popen[bytes] | _Attached, streams: dict[int, RotatingLog]) -> None:
    """Copies each readable fd to its log until all reach EOF (or the child is gone)."""
    selector = selectors.DefaultSelector()
    for fd, log in streams.items():
        selector.register(fd, selectors.EVENT_READ, log)
    open_streams = len(streams)
    while open_streams:
        events = selector.select(timeout=1.0)
        if not events and child.poll() is not None:
            # The command is gone but a grandchild still holds a pipe: stop waiting for it.
            break
        for key, _ in events:
            data = os.read(key.fd, CHUNK)
            if data:
                key.data.write(data)
            else:
                selector.unregister(key.fileobj)
                open_streams -= 1
    selector.close()


USAGE = (
    "usage: supervise.py WORK_DIR MAX_LOG_BYTES -- COMMAND...\n"
    "       supervise.py WORK_DIR MAX_LOG_BYTES --attach PID STDOUT_FD STDERR_FD"
)


def main(argv: list[str]) -> int:
    if len(argv) == 6 and argv[2] == "--attach":
        pid, stdout_fd, stderr_fd = (int(a) for a in argv[3:])
        return run_attached(Path(argv[0]), int(argv[1]), pid, stdout_fd, stderr_fd)
    if len(argv) < 4 or argv[2] != "--":
        print(USAGE, file=sys.stderr)
        return 2
    return run(Path(argv[0]), int(argv[1]), argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
