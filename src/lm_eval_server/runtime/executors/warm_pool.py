"""Warm workers, the server's side: a pool of processes that have imported lm-eval once and
fork a ready process per job (the program they run is `warm_worker`).

Opt-in with ``WARM_WORKERS=N`` (local executor only). Each worker is a separate Python started
by the server (``subprocess`` with ``close_fds``, never a fork of the server, so it holds none of
the server's sockets or files), speaking `warm_protocol` on a socket pair. A job forked from a
worker gets the very supervisor a cold job has, so stop (``killpg`` of its session leader),
logs, progress, exit codes and re-adoption after a server restart work exactly as for a cold
job.

The worker stays warm after a fork, so N is about availability (a spare while one is being
replaced) and memory, not concurrency: one worker forks any number of concurrent jobs.

That is `WarmPool`, for ``SANDBOX=off``. With the job sandbox on, `warm_sandboxed`'s
`SandboxedWarmPool` runs each worker inside one owner's sandbox, for one job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval_server.runtime.executors import warm_protocol
from lm_eval_server.runtime.executors.base import LaunchSpec

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Worker:
    slot: int
    proc: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    exited: asyncio.Future[None]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid


class WarmPool:
    """N warm workers, each replaced when it dies; hands a job to a ready one, or declines.

    ``env``: a worker's whole environment (``job_env.worker_environment``): a job's, with a
    HOME and TMPDIR of the worker's own. Modules read some variables when they are imported, so
    only a job whose environment is the same but for HOME and TMPDIR (no env_vars of its own)
    may run in a worker; its fork then gets exactly the job's environment.
    """

    def __init__(
        self,
        size: int,
        env: dict[str, str],
        run_dir: Path,
        *,
        request_timeout_s: float = 30.0,
        ready_timeout_s: float = 600.0,
        max_backoff_s: float = 60.0,
        close_grace_s: float = 5.0,
    ) -> None:
        self.size = size
        self._env = dict(env)
        self._run_dir = run_dir
        self._request_timeout_s = request_timeout_s
        self._ready_timeout_s = ready_timeout_s
        self._max_backoff_s = max_backoff_s
        self._close_grace_s = close_grace_s
        self._workers: dict[int, _Worker] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._next = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Starts the workers and returns at once; they report ready when warmed up."""
        self._run_dir.mkdir(parents=True, exist_ok=True)
        self._tasks = [
            asyncio.create_task(self._keep(slot), name=f"warm-worker-{slot}")
            for slot in range(self.size)
        ]

    async def close(self) -> None:
        """Ends the workers. Jobs they forked run on (own sessions) and are re-adoptable."""
        self._closing = True
        for worker in list(self._workers.values()):
            if worker.ready:
                worker.writer.close()  # end of requests: the worker exits by itself
            else:
                _signal(worker.proc, signal.SIGTERM)  # still importing; nothing to lose
        for slot, task in enumerate(self._tasks):
            if slot not in self._workers:
                task.cancel()  # between workers (back-off): nothing to wait for
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=self._close_grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def ready_count(self) -> int:
        return sum(1 for w in self._workers.values() if w.ready)

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers.values()]

    def ready_info(self) -> list[dict[str, Any]]:
        """What each ready worker reported when it finished warming up."""
        return [dict(w.info) for w in self._workers.values() if w.ready]

    # ------------------------------------------------------------------ jobs
    async def run(self, spec: LaunchSpec, max_log_bytes: int) -> int | None:
        """Forks `spec` from a warm worker: the pid of its session leader, or None if the job
        must start cold (not eligible, or no worker ready, or the worker failed)."""
        # Whether a job may run warm is the launch policy's decision alone (spec.warm_args).
        args = spec.warm_args
        if args is None or self._closing:
            return None
        ready = [w for w in self._workers.values() if w.ready]
        if not ready:
            log.info("job %d: no warm worker ready; starting it cold", spec.job_id)
            return None
        # Round robin: a fork takes milliseconds, so this only spreads copy-on-write growth.
        worker = ready[self._next % len(ready)]
        self._next += 1
        request = warm_protocol.Request(spec.job_id, args, spec.env, spec.work_dir, max_log_bytes)
        # Once the worker has forked, the job runs; losing its pid to a cancellation would
        # leave it untracked, so the exchange finishes even if this task is cancelled.
        exchange = asyncio.ensure_future(self._exchange(worker, request))
        try:
            reply = await asyncio.shield(exchange)
        except asyncio.CancelledError:
            reply = await exchange
            pid = reply.get("pid")
            if isinstance(pid, int):
                log.warning("job %d: cancelled while starting; killing it", spec.job_id)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            raise
        pid = reply.get("pid")
        if isinstance(pid, int):
            return pid
        log.warning(
            "job %d: warm worker %d could not start it (%s); starting it cold",
            spec.job_id,
            worker.pid,
            reply.get("error", "no answer"),
        )
        return None

    async def _exchange(self, worker: _Worker, request: warm_protocol.Request) -> dict[str, Any]:
        async with worker.lock:
            if not worker.ready:
                return {"error": "worker gone"}
            try:
                worker.writer.write(request.encode())
                await worker.writer.drain()
                line = await asyncio.wait_for(worker.reader.readline(), self._request_timeout_s)
            except TimeoutError:
                # A wedged worker is killed; an answer it sent meanwhile is still in the
                # socket, and must be used: the job it names is running.
                log.error("warm worker %d did not answer in time; killing it", worker.pid)
                worker.ready = False
                _signal(worker.proc, signal.SIGKILL)
                line = await worker.reader.readline()
            except (ConnectionError, OSError) as exc:
                worker.ready = False
                return {"error": f"worker gone ({exc})"}
            if not line:
                worker.ready = False
                return {"error": "worker gone"}
            try:
                reply = json.loads(line)
            except ValueError:
                return {"error": f"bad answer {line[:200]!r}"}
            return reply if isinstance(reply, dict) else {"error": "bad answer"}

    # ------------------------------------------------------------------ one slot
    async def _keep(self, slot: int) -> None:
        """Keeps one worker alive: start, wait until it ends, start another (with back-off
        when they keep dying early, e.g. lm-eval fails to import)."""
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._closing:
            started = loop.time()
            try:
                worker = await self._spawn(slot)
            except Exception:
                log.exception("cannot start warm worker %d", slot)
                worker = None
            else:
                try:
                    await self._serve(worker)
                finally:
                    self._workers.pop(slot, None)
                    await self._reap(worker)
            if self._closing:
                return
            was_ready = worker is not None and bool(worker.info)
            healthy = was_ready and loop.time() - started > self._max_backoff_s
            failures = 0 if healthy else failures + 1
            delay = min(self._max_backoff_s, 0.5 * 2 ** (failures - 1)) if failures else 0.0
            log.warning(
                "warm worker %d (pid %s) exited with %s; starting another in %.1f s",
                slot,
                worker.pid if worker else None,
                worker.proc.returncode if worker else None,
                delay,
            )
            await asyncio.sleep(delay)

    async def _spawn(self, slot: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                warm_protocol.worker_command(theirs.fileno()),
                env=self._env,  # never the server's own environment
                # An empty directory: sys.path[0] of the worker while it imports.
                cwd=self._run_dir,
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                close_fds=True,
                # Ctrl-C on the server's terminal is for the server; it ends workers itself.
                start_new_session=True,
            )
        finally:
            theirs.close()
        try:
            reader, writer = await asyncio.open_unix_connection(
                sock=ours, limit=warm_protocol.LINE_LIMIT
            )
            exited = _exit_future(proc.pid)
        except BaseException:
            ours.close()
            _signal(proc, signal.SIGKILL)
            proc.wait()
            raise
        worker = _Worker(slot, proc, reader, writer, exited)
        self._workers[slot] = worker
        log.info("warm worker %d starting (pid %d)", slot, proc.pid)
        return worker

    async def _serve(self, worker: _Worker) -> None:
        info = await ready_message(worker.reader, worker.exited, self._ready_timeout_s)
        if info is not None:
            worker.info = info
            worker.ready = not self._closing
            log.info(
                "warm worker %d ready (pid %d): warm-up %.1f s, RSS %.0f MB, "
                "%s threads, index hook: %s%s",
                worker.slot,
                worker.pid,
                info.get("warmup_s", 0.0),
                info.get("rss_kb", 0) / 1024,
                info.get("threads"),
                info.get("hook") or "installed",
                f"; not preloaded: {info['missing']}" if info.get("missing") else "",
            )
        if not worker.ready:
            _signal(worker.proc, signal.SIGKILL)
        await worker.exited
        worker.ready = False

    async def _reap(self, worker: _Worker) -> None:
        worker.ready = False
        worker.writer.close()
        if not worker.exited.done():
            _signal(worker.proc, signal.SIGKILL)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(worker.exited)
        worker.proc.wait()  # it has exited: this only collects the status


async def ready_message(
    reader: asyncio.StreamReader, exited: asyncio.Future[None], timeout_s: float
) -> dict[str, Any] | None:
    """A worker's ready message (`warm_protocol`), or None if it exits, times out or says
    anything else first."""
    hello = asyncio.ensure_future(reader.readline())
    try:
        done, _ = await asyncio.wait(
            {hello, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if hello not in done or hello.exception() is not None:
            return None
        with contextlib.suppress(ValueError):
            info = json.loads(hello.result() or b"null")
            if isinstance(info, dict) and info.get("ready"):
                return info
        return None
    finally:
        hello.cancel()


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def _exit_future(pid: int) -> asyncio.Future[None]:
    """Resolves when `pid` exits (a pidfd in the event loop: no thread, no polling)."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    fd = os.pidfd_open(pid)

    def on_exit() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_exit)
    return exited


# ----------------------------------------------------------------- sandboxed: per owner, one job
