"""Warm workers: processes that have imported lm-eval once and fork a ready process per job.

Opt-in with ``WARM_WORKERS=N`` (local executor only). Each worker is a separate Python started
by the server (``python -m lm_eval_server.warm --control-fd FD``; ``subprocess`` with
``close_fds``, never a fork of the server, so it holds none of the server's sockets or files).
It imports what a job imports (``PRELOAD_MODULES``), installs the launcher's cached-index hook,
loads the built-in task index, freezes its heap (``gc.freeze``) and then waits for requests on a
socket pair shared with the server. The protocol is one JSON object per line:

    worker -> server   {"ready": true, "pid": ..., "rss_kb": ..., "warmup_s": ..., ...}
    server -> worker   {"job_id": 7, "args": [lm-eval argv], "env": {...},
                        "work_dir": "...", "max_log_bytes": N}
    worker -> server   {"pid": LEADER}  or  {"error": "..."}   (the server then starts it cold)

For each request the worker forks the job's session leader (``os.setsid``), which forks the
job process and then execs ``supervise.py --attach``: the very supervisor a cold job has, which
pumps the job's stdout/stderr into the job's logs and writes exit.json. So stop (``killpg`` of
the leader), logs, progress, exit codes and re-adoption after a server restart work exactly as
for a cold job. The job process runs lm-eval's CLI in the forked interpreter, with stdio,
signals, ``sys.argv``, ``sys.path[0]``, cwd and random seeds set up as a fresh interpreter
would have them, and ends the way an interpreter ends (threads joined, atexit handlers run).

The worker stays warm after a fork, so N is about availability (a spare while one is being
replaced) and memory, not concurrency: one worker forks any number of concurrent jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval_server import jobdir
from lm_eval_server.executors.base import LaunchSpec

log = logging.getLogger(__name__)

MARKER_PREFIX = "lm_eval_server.warm: "
FORKED_MARKER = "forked from warm worker"

# What a job of the dummy or an API model imports, measured with lm-eval 0.4.13 (module list of
# a finished `python -m lm_eval run`); the heavy ones are datasets, pandas, scipy and the task
# machinery. A module missing here costs its job only the import; one that cannot be imported
# is skipped. Model backends that pull in torch are left out on purpose: torch starts thread
# pools and CUDA must never be initialised in a process that forks.
PRELOAD_MODULES = (
    "lm_eval.__main__",
    "lm_eval.config.evaluate_config",
    "lm_eval.evaluator",
    "lm_eval.evaluator_utils",
    "lm_eval.loggers",
    "lm_eval.tasks",
    "lm_eval.api.task",
    "lm_eval.api.metrics",
    "lm_eval.api.model",
    "lm_eval.api.registry",
    "lm_eval.api.samplers",
    "lm_eval.filters",
    "lm_eval.caching.cache",
    "lm_eval.prompts",
    "lm_eval.result_schema",
    "lm_eval.models.dummy",
    "lm_eval.models.api_models",
    "lm_eval.models.openai_completions",
    "datasets",
    "scipy.io",  # imported by datasets when it loads a dataset (its streaming patches)
    "multiprocessing.synchronize",
    "pytablewriter",
    "tenacity",
    "aiohttp",
)

_LINE_LIMIT = 1 << 20


# ===================================================================== server side


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


def launcher_args(argv: list[str]) -> list[str] | None:
    """The lm-eval arguments of a job that runs ``python -m lm_eval_server.launcher``."""
    prefix = [sys.executable, "-m", "lm_eval_server.launcher"]
    return argv[len(prefix) :] if argv[: len(prefix)] == prefix else None


class WarmPool:
    """N warm workers, each replaced when it dies; hands a job to a ready one, or declines.

    ``env``: the variables a job gets on top of the server's environment (the manager's base
    job environment); a worker is started with exactly those, so only a job whose environment
    is the same may run in it.
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
        args = launcher_args(spec.argv) if spec.warm_eligible else None
        if args is None or spec.env != self._env or self._closing:
            return None
        ready = [w for w in self._workers.values() if w.ready]
        if not ready:
            log.info("job %d: no warm worker ready; starting it cold", spec.job_id)
            return None
        # Round robin: a fork takes milliseconds, so this only spreads copy-on-write growth.
        worker = ready[self._next % len(ready)]
        self._next += 1
        request = {
            "job_id": spec.job_id,
            "args": args,
            "env": spec.env,
            "work_dir": str(spec.work_dir),
            "max_log_bytes": max_log_bytes,
        }
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

    async def _exchange(self, worker: _Worker, request: dict[str, Any]) -> dict[str, Any]:
        async with worker.lock:
            if not worker.ready:
                return {"error": "worker gone"}
            try:
                worker.writer.write(json.dumps(request).encode() + b"\n")
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
                [sys.executable, "-m", "lm_eval_server.warm", "--control-fd", str(theirs.fileno())],
                env={**os.environ, **self._env},
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
            reader, writer = await asyncio.open_unix_connection(sock=ours, limit=_LINE_LIMIT)
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
        hello = asyncio.ensure_future(worker.reader.readline())
        done, _ = await asyncio.wait(
            {hello, worker.exited},
            timeout=self._ready_timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if hello in done and hello.exception() is None:
            with contextlib.suppress(ValueError):
                info = json.loads(hello.result() or b"null")
                if isinstance(info, dict) and info.get("ready"):
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
        hello.cancel()
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


# ===================================================================== worker side


@dataclass(frozen=True)
class _Job:
    job_id: int
    args: list[str]
    env: dict[str, str]
    work_dir: Path
    max_log_bytes: int

    @classmethod
    def parse(cls, line: bytes) -> _Job:
        data = json.loads(line)
        return cls(
            job_id=int(data["job_id"]),
            args=[str(a) for a in data["args"]],
            env={str(k): str(v) for k, v in data["env"].items()},
            work_dir=Path(data["work_dir"]),
            max_log_bytes=int(data["max_log_bytes"]),
        )


def _say(message: str) -> None:
    sys.stderr.write(MARKER_PREFIX + message + "\n")
    sys.stderr.flush()


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def warm_up() -> dict[str, Any]:
    """Imports, hooks and loads what jobs need; returns what the ready message reports."""
    started = time.monotonic()
    missing = []
    for name in PRELOAD_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:
            missing.append(f"{name} ({type(err).__name__}: {err})")
    from lm_eval_server import launcher

    plain_reason = launcher._prepare(preload=True)
    # Everything so far lives as long as the worker: freezing it keeps every fork's garbage
    # collector off those pages, so they stay shared instead of being copied on first scan.
    gc.collect()
    gc.freeze()
    return {
        "ready": True,
        "pid": os.getpid(),
        "warmup_s": round(time.monotonic() - started, 3),
        "rss_kb": _rss_kb(),
        # Native threads included (/proc): fork copies only the calling thread.
        "threads": len(os.listdir("/proc/self/task")),
        "hook": plain_reason,
        "missing": missing,
    }


def _reap_children(_signum: int, _frame: Any) -> None:
    # The session leaders are our children; their exit codes are recorded in exit.json.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _lines(fd: int) -> Any:
    buffer = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line


def _send(fd: int, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode() + b"\n"
    while data:
        data = data[os.write(fd, data) :]


@dataclass(frozen=True)
class _Warm:
    """What every job forked from this worker needs to know about it."""

    pid: int
    start_dir: str  # sys.path[0], as `python -m` set it
    plain_reason: str | None  # why the index hook is not installed, if it is not


def serve(control_fd: int) -> int:
    os.set_inheritable(control_fd, False)
    start_dir = os.getcwd()
    info = warm_up()
    warm = _Warm(os.getpid(), start_dir, info["hook"])
    signal.signal(signal.SIGCHLD, _reap_children)
    try:
        _send(control_fd, info)
        for line in _lines(control_fd):
            try:
                job = _Job.parse(line)
                leader, gate = _fork_job(job, control_fd, warm)
            except Exception as err:
                _send(control_fd, {"error": f"{type(err).__name__}: {err}"})
                continue
            try:
                _send(control_fd, {"pid": leader})
                # Only now may the job run: had the server not heard of it, it would start
                # the job cold as well.
                os.write(gate, b"go")
            finally:
                os.close(gate)
    except ConnectionError:
        pass  # the server is gone
    return 0


def _fork_job(job: _Job, control_fd: int, warm: _Warm) -> tuple[int, int]:
    """Forks the job's session leader; returns its pid and the pipe that lets it start."""
    gate_r, gate_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70  # EX_SOFTWARE: only if something below fails before exec
        try:
            os.close(gate_w)
            _session_leader(job, control_fd, gate_r, warm)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(gate_r)
    return pid, gate_w


def _session_leader(job: _Job, control_fd: int, gate_r: int, warm: _Warm) -> None:
    """In the fork: become the job's session, fork the job, exec the supervisor."""
    from lm_eval_server import supervise

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # our own child's status is ours to collect
    os.setsid()
    supervise.ignore_stop_signals()
    os.close(control_fd)
    if os.read(gate_r, 2) != b"go":
        _say(f"job {job.job_id}: the worker went away before the job started; not started")
        return
    os.close(gate_r)
    os.chdir(job.work_dir)
    # As for a cold job: the supervisor's own output goes to supervisor.log.
    errors = os.open(jobdir.SUPERVISOR_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(errors, 1)
    os.dup2(errors, 2)
    os.close(errors)
    os.close(devnull)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(out_r)
            os.close(err_r)
            code = _job_process(job, out_w, err_w, warm)
        finally:
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    os.set_inheritable(out_r, True)
    os.set_inheritable(err_r, True)
    argv = [sys.executable, "-I", "-S", supervise.__file__, str(job.work_dir)]
    argv += [str(job.max_log_bytes), "--attach", str(child), str(out_r), str(err_r)]
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:
        # Nobody would read the job's pipes: end it, and say why where a cold job would.
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        message = f"lm-eval-server: cannot start the supervisor: {exc}\n"
        supervise.RotatingLog(jobdir.stderr_log(job.work_dir), 1 << 30).write(message.encode())
        jobdir.write_exit(job.work_dir, 127)


def _fresh_stdio() -> None:
    """sys.stdout/err as Python makes them for a job (PYTHONUNBUFFERED=1, pipes on 1 and 2),
    whatever the worker's own stdio was (maybe the server's terminal)."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        raw = io.FileIO(fd, "w", closefd=False)
        with contextlib.suppress(AttributeError):
            raw.name = f"<{name}>"  # type: ignore[misc]
        new = io.TextIOWrapper(
            raw, encoding=old.encoding, errors=old.errors, newline="\n", write_through=True
        )
        setattr(sys, name, new)
        setattr(sys, f"__{name}__", new)


def _job_process(job: _Job, out_w: int, err_w: int, warm: _Warm) -> int:
    """In the job's fork: set up as a fresh `python -m lm_eval_server.launcher` would be, run
    lm-eval's CLI, and end as that interpreter would. Returns the exit code."""
    from lm_eval_server import launcher

    # Signal dispositions of a fresh interpreter started by the supervisor.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)
    _fresh_stdio()
    os.environ.update(job.env)
    # `python -m` puts its cwd first on sys.path; a cold job's cwd is its work dir.
    if sys.path and sys.path[0] == warm.start_dir:
        sys.path[0] = str(job.work_dir)
    # `random` reseeds itself after fork; numpy's global generator does not.
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    _say(f"{FORKED_MARKER} {warm.pid}")
    if warm.plain_reason is not None:
        launcher.plain_lm_eval_notice(warm.plain_reason)
    try:
        launcher._run_lm_eval(job.args)
        code = 0
    except SystemExit as exc:
        code = _system_exit_code(exc)
    except KeyboardInterrupt:
        traceback.print_exc()
        _interpreter_exit()
        # A fresh interpreter ends an uncaught KeyboardInterrupt by dying of SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _interpreter_exit()
    return code


def _system_exit_code(exc: SystemExit) -> int:
    # Python's own rules for `sys.exit(x)` at the top level.
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def _interpreter_exit() -> None:
    """What Py_FinalizeEx does that a job can observe: join non-daemon threads, run atexit
    handlers, flush stdio."""
    import atexit
    import threading

    with contextlib.suppress(Exception):
        threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm_eval_server.warm")
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args(argv)
    return serve(args.control_fd)


if __name__ == "__main__":
    sys.exit(main())
