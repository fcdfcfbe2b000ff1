"""Warm workers, the worker's side: the program that imports lm-eval once and forks a ready
process per job. The server's side is `warm_pool`; what they say to each other, `warm_protocol`.

    python -m lm_eval_server.runtime.executors.warm_worker --control-fd FD [--slot DIR]

It imports what a job imports (``PRELOAD_MODULES``), installs the launcher's cached-index hook,
loads the built-in task index, freezes its heap (``gc.freeze``), tells the server it is ready
and then waits for requests on FD.

With ``--slot DIR`` it runs inside its owner's job sandbox (started there by the pool, DIR its
one writable directory, ``DATA_DIR/jobs`` an empty tmpfs of its own) and serves exactly one
job: by then the server has renamed DIR to be that job's directory (the bind mount follows it),
and the job's session leader links ``<job dir> -> DIR`` inside the sandbox before anything uses
the job's paths, so argv and environment are exactly a cold job's. The worker is the PID 1 of
its sandbox (``bwrap --as-pid-1``) and stays, reaping, until the session leader has ended: when
it exits, the kernel ends every process left in the sandbox's PID namespace.

For each request it forks the job's session leader (``os.setsid``), which forks the job process
and then execs ``supervise.py --attach``: the very supervisor a cold job has, which pumps the
job's stdout/stderr into the job's logs and writes the exit record. The job process runs
lm-eval's CLI in the forked interpreter, with stdio, signals, ``sys.argv``, ``sys.path[0]``,
cwd and random seeds set up as a fresh interpreter would have them, and ends the way an
interpreter ends (threads joined, atexit handlers run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from lm_eval_server.runtime import job_env, jobdir, launcher, supervise
from lm_eval_server.runtime.executors import warm_protocol
from lm_eval_server.runtime.executors.warm_protocol import Request

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


def _say(message: str) -> None:
    sys.stderr.write(warm_protocol.MARKER_PREFIX + message + "\n")
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
    plain_reason = launcher.prepare(preload=True)
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
    # The session leaders are our children; their supervisors record the exit codes.
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
    data = warm_protocol.encode(message)
    while data:
        data = data[os.write(fd, data) :]


@dataclass(frozen=True)
class _Warm:
    """What every job forked from this worker needs to know about it."""

    pid: int
    start_dir: str  # sys.path[0], as `python -m` set it
    plain_reason: str | None  # why the index hook is not installed, if it is not
    # What the warm-up's imports did to os.environ (lm_eval sets HF_XET_HIGH_PERFORMANCE, ...):
    # a cold job's imports do the same to its environment. None: the import removed it.
    import_changes: dict[str, str | None] = field(default_factory=dict)
    # A sandboxed worker's writable directory, which becomes its one job's directory.
    slot: str | None = None


def environ_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, str | None]:
    changes: dict[str, str | None] = {k: v for k, v in after.items() if before.get(k) != v}
    changes.update({k: None for k in before if k not in after})
    return changes


def job_environ(env: dict[str, str], import_changes: dict[str, str | None]) -> dict[str, str]:
    """A forked job's os.environ: its own environment as a cold job's imports leave it."""
    result = dict(env)
    for name, value in import_changes.items():
        if name in job_env.PER_JOB_NAMES:
            continue
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def serve(control_fd: int) -> int:
    os.set_inheritable(control_fd, False)
    start_dir = os.getcwd()
    environ_before = dict(os.environ)
    info = warm_up()
    changes = environ_changes(environ_before, dict(os.environ))
    warm = _Warm(os.getpid(), start_dir, info["hook"], changes)
    signal.signal(signal.SIGCHLD, _reap_children)
    try:
        _send(control_fd, info)
        for line in _lines(control_fd):
            try:
                job = Request.decode(line)
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


def serve_once(control_fd: int, slot: str) -> int:
    """A sandboxed worker: warm up, run one job, stay until its session leader has ended."""
    os.set_inheritable(control_fd, False)
    start_dir = os.getcwd()
    environ_before = dict(os.environ)
    info = warm_up()
    changes = environ_changes(environ_before, dict(os.environ))
    warm = _Warm(os.getpid(), start_dir, info["hook"], changes, os.path.realpath(slot))
    leader = None
    try:
        _send(control_fd, info)
        lines = _lines(control_fd)
        line = next(lines, None)
        if line is None:
            return 0  # retired before it got a job
        try:
            leader, gate = _fork_job(Request.decode(line), control_fd, warm)
        except Exception as err:
            _send(control_fd, {"error": f"{type(err).__name__}: {err}"})
            return 1
        try:
            _send(control_fd, {"pid": leader})
            answer = next(lines, None)
            go = answer is not None and _is_go(answer)
            # From here on the job's code runs in this sandbox: nothing it can reach through
            # this process (ptrace, /proc/<pid>/fd) may lead to the server. The server closes
            # its ends of this socket and of the worker's output pipe too.
            os.close(control_fd)
            _silence_stdio()
            if go:
                os.write(gate, b"go")
        finally:
            os.close(gate)
    except ConnectionError:
        pass  # the server is gone: a job not told to go never starts
    finally:
        if leader is not None:
            _wait_for(leader)
    return 0


def _wait_for(leader: int) -> None:
    """As the sandbox's PID 1, this process inherits what the job orphans: reap everything
    until the session leader has ended; the kernel ends the rest when this process exits."""
    while True:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            return
        if pid == leader:
            return


def _is_go(line: bytes) -> bool:
    try:
        return json.loads(line) == warm_protocol.GO
    except ValueError:
        return False


def _silence_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _fork_job(job: Request, control_fd: int, warm: _Warm) -> tuple[int, int]:
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


def _session_leader(job: Request, control_fd: int, gate_r: int, warm: _Warm) -> None:
    """In the fork: become the job's session, fork the job, exec the supervisor."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # our own child's status is ours to collect
    os.setsid()
    supervise.ignore_stop_signals()
    os.close(control_fd)
    if os.read(gate_r, 2) != b"go":
        _say(f"job {job.job_id}: the worker went away before the job started; not started")
        return
    os.close(gate_r)
    if warm.slot is not None:
        # DATA_DIR/jobs is this sandbox's own tmpfs; the slot is the job's directory now.
        os.symlink(warm.slot, job.work_dir)
    os.chdir(job.work_dir)
    # As for a cold job: the supervisor's own output goes to its log in the job directory.
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


def _job_process(job: Request, out_w: int, err_w: int, warm: _Warm) -> int:
    """In the job's fork: set up as a fresh `python -m lm_eval_server.runtime.launcher` would be,
    run
    lm-eval's CLI, and end as that interpreter would. Returns the exit code."""
    # Signal dispositions of a fresh interpreter started by the supervisor.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)
    _fresh_stdio()
    # Exactly the job's environment, nothing of the worker's (which had another HOME/TMPDIR).
    os.environ.clear()
    os.environ.update(job_environ(job.env, warm.import_changes))
    tempfile.tempdir = None  # found again from TMPDIR on first use
    # `python -m` puts its cwd first on sys.path; a cold job's cwd is its work dir.
    if sys.path and sys.path[0] == warm.start_dir:
        sys.path[0] = str(job.work_dir)
    if warm.slot is not None:
        _cwd_as_job_dir(warm.slot, str(job.work_dir))
    # `random` reseeds itself after fork; numpy's global generator does not.
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    _say(f"{warm_protocol.FORKED_MARKER} {job.worker_pid or warm.pid}")
    if warm.plain_reason is not None:
        launcher.plain_lm_eval_notice(warm.plain_reason)
    try:
        launcher.run_lm_eval(job.args)
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


def _cwd_as_job_dir(slot: str, work_dir: str) -> None:
    """In a sandboxed worker the job's directory is `work_dir`, a link to `slot` (where the
    directory is mounted): the kernel names the working directory by the slot. A cold job's
    is mounted at `work_dir` itself, so os.getcwd() names any directory inside the slot by
    `work_dir` instead, and Python code sees the paths a cold job sees."""
    real_getcwd, real_getcwdb = os.getcwd, os.getcwdb
    slot_b, work_dir_b = os.fsencode(slot), os.fsencode(work_dir)

    def getcwd() -> str:
        cwd = real_getcwd()
        if cwd == slot or cwd.startswith(slot + "/"):
            return work_dir + cwd[len(slot) :]
        return cwd

    def getcwdb() -> bytes:
        cwd = real_getcwdb()
        if cwd == slot_b or cwd.startswith(slot_b + b"/"):
            return work_dir_b + cwd[len(slot_b) :]
        return cwd

    os.getcwd = getcwd
    os.getcwdb = getcwdb


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
    parser = argparse.ArgumentParser(prog=f"python -m {warm_protocol.WORKER_MODULE}")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--slot", help="sandboxed: this writable directory, one job")
    args = parser.parse_args(argv)
    if args.slot is not None:
        return serve_once(args.control_fd, args.slot)
    return serve(args.control_fd)


if __name__ == "__main__":
    sys.exit(main())
