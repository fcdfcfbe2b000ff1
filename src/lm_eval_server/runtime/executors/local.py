"""Runs each job as a detached local process under `supervise.py`.

The supervisor is the leader of a new session and process group: stop signals the whole group,
and the job outlives a server crash. Waiting uses a pidfd registered with the event loop, so it
needs no thread and no polling, and works the same for a process this server started and for
one it re-adopted after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lm_eval_server.runtime import jobdir, sandbox, supervise
from lm_eval_server.runtime.executors.base import JobHandle, LaunchSpec

if TYPE_CHECKING:
    from lm_eval_server.runtime.executors.warm_sandboxed import AnyWarmPool

log = logging.getLogger(__name__)


def _is_our_supervisor(pid: int, work_dir: Path) -> bool:
    """Guards against pid reuse: the process must be the supervisor of this job directory."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(part.endswith(b"supervise.py") for part in cmdline) and (
        os.fsencode(str(work_dir)) in cmdline
    )


async def _wait_pidfd(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


class LocalJobHandle:
    def __init__(self, pid: int, work_dir: Path, own_child: bool) -> None:
        self.pid: int | None = pid
        self.ref: str | None = None
        self._work_dir = work_dir
        self._own_child = own_child

    async def wait(self) -> int | None:
        assert self.pid is not None
        await _wait_pidfd(self.pid)
        if self._own_child:
            # Reap our own child so it does not linger as a zombie.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        self._kill_group(signal.SIGKILL)  # stragglers the job left in its group
        return jobdir.read_exit_code(self._work_dir)

    async def stop(self, grace_s: float) -> None:
        self._kill_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(_wait_pidfd(self.pid or 0)), grace_s)
        except TimeoutError:
            log.info("job process group %s ignored SIGTERM for %.1fs; killing", self.pid, grace_s)
        self._kill_group(signal.SIGKILL)

    def _kill_group(self, sig: signal.Signals) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


class LocalExecutor:
    def __init__(self, max_log_bytes: int, warm_pool: AnyWarmPool | None = None) -> None:
        self._max_log_bytes = max_log_bytes
        self._warm_pool = warm_pool  # owned (started, closed) by whoever created it

    async def start(self, spec: LaunchSpec) -> JobHandle:
        spec.work_dir.mkdir(parents=True, exist_ok=True)
        if self._warm_pool is not None:
            pid = await self._warm_pool.run(spec, self._max_log_bytes)
            if pid is not None:
                # The session leader is the warm worker's child: the worker reaps it.
                return LocalJobHandle(pid, spec.work_dir, own_child=False)
        command = [sys.executable, "-I", "-S", supervise.__file__]
        command += [str(spec.work_dir), str(self._max_log_bytes)]
        if spec.view is not None:
            # The supervisor stays outside: it writes the logs and the exit record, and bwrap,
            # its child, confines everything the job runs.
            confined = sandbox.command(spec.view, spec.argv, spec.bwrap)
            command += [supervise.SANDBOXED, "--", *confined]
        else:
            command += ["--", *spec.argv]
        # The job's whole environment (job_env), never the server's: the supervisor starts
        # with `-I` and hands it on unchanged.
        env = dict(spec.env)
        supervisor_log = jobdir.path(spec.work_dir, jobdir.SUPERVISOR_LOG)
        errors = os.open(supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            # posix_spawn: no fork of this (large) process, and no Popen object whose
            # finaliser would complain about a job that is meant to outlive the server.
            pid = os.posix_spawn(
                sys.executable,
                command,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, errors, 1),
                    (os.POSIX_SPAWN_DUP2, errors, 2),
                ],
                setsid=True,
            )
        finally:
            os.close(errors)
        return LocalJobHandle(pid, spec.work_dir, own_child=True)

    def adopt(
        self, job_id: int, work_dir: Path, pid: int | None, ref: str | None
    ) -> JobHandle | None:
        if pid is None or not _is_our_supervisor(pid, work_dir):
            return None
        return LocalJobHandle(pid, work_dir, own_child=False)

    def recorded_exit_code(self, work_dir: Path, ref: str | None) -> int | None:
        return jobdir.read_exit_code(work_dir)

    async def close(self) -> None:
        return None
