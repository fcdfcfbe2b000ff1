"""Warm workers under the job sandbox, the server's side: `SandboxedWarmPool` runs each
worker inside a sandbox with exactly the view a cold job of one owner gets, and each worker
serves one job (`warm_pool.WarmPool` is the pool for ``SANDBOX=off``):

* **Per owner, single use.** A worker is started as ``bwrap <the owner's job view> -- python -m
  warm_worker --control-fd FD --slot SLOT``: its writable directory is a fresh, empty slot
  ``DATA_DIR/warm/slots/<n>-<random>`` (in place of a job directory), and ``DATA_DIR/jobs`` is
  an empty tmpfs of its own. At hand-over the server moves the job directory's entries into
  the slot and renames the slot to be the job directory (the sandbox's bind mount follows the
  directory); the job's session leader, forked by the worker, links ``<job dir> -> SLOT``
  inside the sandbox before anything uses the job's paths. So the job's argv and environment
  are exactly a cold job's, and it sees only its own directory, its owner's cache and uploads
  and what every job sees. The worker is its sandbox's PID 1 and stays until the job's session
  leader (its supervisor) has ended; when it exits, the kernel ends whatever the job left in
  the sandbox's PID namespace. Jobs never share a sandbox: the pool starts a replacement for
  every worker that took a job.
* **Which owners.** The pool keeps at most N workers warming or ready in all (N slots).
  Owners are ranked by their latest warm-eligible job start (the default owner first, before
  any job): the N most recent share the slots round robin (one owner gets all N; owners A, B
  and N = 3 get two and one). A slot whose worker is gone or taken starts one for the ranked
  owner furthest below its share; when a new owner's job arrives, an owner above its share
  gives up a ready worker. A job whose owner has no ready worker, whose view differs from the
  worker's (a request's own ``output_path`` outside its directory, a directory of the view that
  appeared or went since the worker started) starts cold; a stale worker is retired.
* **Pids.** Inside, the worker reports pids of its PID namespace. The server finds the host
  pid of the job's session leader among the worker's children by the last field of their
  ``NSpid:`` line in ``/proc/<pid>/status`` and only then tells the worker to let the job go,
  so stop (killpg), pidfd waits and re-adoption (``executors.local``) use host pids as for a
  cold job. After the go, the server closes its ends of the worker's control socket and output
  pipe: nothing in the sandbox can reach the server through them.
* **Lifetime.** bwrap's parent is the server, so a worker's sandbox is started with
  ``--as-pid-1`` instead of ``--die-with-parent`` (``sandbox.command``): a job must outlive a
  server restart and be re-adopted, as cold jobs are. An idle worker sees its control socket
  close and exits; a worker that holds a job exits when the job's supervisor has.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval_server.runtime import sandbox
from lm_eval_server.runtime.executors import warm_protocol
from lm_eval_server.runtime.executors.base import LaunchSpec
from lm_eval_server.runtime.executors.warm_pool import WarmPool, ready_message

log = logging.getLogger(__name__)


SLOTS = "slots"  # under the pool's run dir (DATA_DIR/warm): the workers' writable directories
# A sandboxed worker's HOME and TMPDIR: its sandbox's private /tmp. Never a directory a job
# could be given: a job's own HOME and TMPDIR are set in its fork.
WORKER_SCRATCH_HOME = "/tmp"
OUTPUT_LINE_BYTES = 2000  # longest line of a worker's output copied into the server log


@dataclass(frozen=True)
class WorkerSandbox:
    """What the pool needs to start its owners' workers in their sandboxes."""

    views: sandbox.Views
    bwrap: str
    jobs_dir: Path  # resolved; inside each worker, an empty tmpfs of its own
    # Warmed for before any job has run: the open server's (or bare key's) principal, or the
    # only principal; None (several named keys): no worker until an owner's job has started.
    default_owner: str | None


@dataclass(eq=False)
class _SandboxedWorker:
    slot: int
    owner: str
    slot_dir: Path
    view: sandbox.View
    fingerprint: tuple[tuple[str, str], ...]
    pid: int  # bwrap's outer process, the server's child
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    exit_watch: _ExitWatch
    output_fd: int  # the read end of the worker's stdout/stderr pipe; -1 once closed
    released: asyncio.Event = field(default_factory=asyncio.Event)  # taken or retired
    ready: bool = False
    taken: bool = False  # handed a job: its slot starts another worker
    moved: bool = False  # its slot is a job's directory now
    host_pid: int | None = None  # the worker's Python, its sandbox's PID 1
    info: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None

    @property
    def exited(self) -> asyncio.Future[None]:
        return self.exit_watch.exited


class _ExitWatch:
    """A future that resolves when `pid` exits (a pidfd in the event loop), and can be given
    up (a worker left running with its job when the server shuts down)."""

    def __init__(self, pid: int) -> None:
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = self._loop.create_future()
        self._fd = os.pidfd_open(pid)
        self._loop.add_reader(self._fd, self._on_exit)

    def _on_exit(self) -> None:
        self.close()
        if not self.exited.done():
            self.exited.set_result(None)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


class SandboxedWarmPool:
    """WarmPool's interface with the job sandbox on: N slots of single-use workers, each in
    its owner's sandbox (see the module docstring)."""

    def __init__(
        self,
        size: int,
        env: dict[str, str],
        run_dir: Path,
        sandboxing: WorkerSandbox,
        *,
        request_timeout_s: float = 30.0,
        ready_timeout_s: float = 600.0,
        max_backoff_s: float = 60.0,
        close_grace_s: float = 5.0,
    ) -> None:
        self.size = size
        # A job's environment, with HOME and TMPDIR in the worker's own sandbox.
        self._env = {**env, "HOME": WORKER_SCRATCH_HOME, "TMPDIR": WORKER_SCRATCH_HOME}
        self._run_dir = run_dir
        self._slots_dir = run_dir / SLOTS
        self._sandbox = sandboxing
        self._request_timeout_s = request_timeout_s
        self._ready_timeout_s = ready_timeout_s
        self._max_backoff_s = max_backoff_s
        self._close_grace_s = close_grace_s
        self._idle: dict[int, _SandboxedWorker] = {}  # by slot: warming or ready
        self._assigned: dict[int, str] = {}  # by slot: the owner of its worker, from the choice
        # Each owner's view as its latest job had it (LaunchSpec.owner_view): what its next
        # worker is given. Before any job: `sandboxing.views` builds it.
        self._templates: dict[str, sandbox.View] = {}
        self._busy: dict[_SandboxedWorker, asyncio.Task[None]] = {}  # holding a job
        # Owners by their latest warm-eligible job start, most recent first.
        self._recent: list[str] = (
            [] if sandboxing.default_owner is None else [sandboxing.default_owner]
        )
        self._owner_known = asyncio.Event()
        if self._recent:
            self._owner_known.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._run_dir.mkdir(parents=True, exist_ok=True)
        # What a previous server's idle workers left (a slot that took a job was renamed).
        shutil.rmtree(self._slots_dir, ignore_errors=True)
        self._slots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._tasks = [
            asyncio.create_task(self._keep(slot), name=f"warm-worker-{slot}")
            for slot in range(self.size)
        ]

    async def close(self) -> None:
        """Ends the idle workers. Workers that hold a job stay with it (its sandbox ends with
        them): the job runs on and is re-adoptable, as a cold job is."""
        self._closing = True
        for worker in list(self._idle.values()):
            if worker.ready:
                worker.writer.close()  # end of requests: the worker exits by itself
            else:
                self._kill(worker)  # still importing; nothing to lose
        for slot, task in enumerate(self._tasks):
            if slot not in self._idle:
                task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self._close_grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker, task in list(self._busy.items()):
            task.cancel()
            self._disconnect(worker)
            worker.exit_watch.close()
        await asyncio.gather(*self._busy.values(), return_exceptions=True)

    @property
    def ready_count(self) -> int:
        return sum(1 for w in self._idle.values() if w.ready)

    @property
    def worker_pids(self) -> list[int]:
        """Host pids of the ready workers' Python processes."""
        return [w.host_pid for w in self._idle.values() if w.ready and w.host_pid is not None]

    def ready_info(self) -> list[dict[str, Any]]:
        """What each ready worker reported, with its host pid and its owner."""
        return [
            {**w.info, "pid": w.host_pid, "owner": w.owner} for w in self._idle.values() if w.ready
        ]

    # ------------------------------------------------------------------ owners
    def _shares(self) -> Counter[str]:
        """How many of the N slots each recent owner should hold."""
        owners = self._recent
        return Counter(owners[i % len(owners)] for i in range(self.size))

    def _owner_for_new_worker(self) -> str:
        shares = self._shares()
        held = Counter(self._assigned.values())
        # The owner furthest below its share; between equals, the most recent.
        return max(self._recent, key=lambda o: (shares[o] - held[o], -self._recent.index(o)))

    def _note(self, owner: str) -> None:
        if owner in self._recent:
            self._recent.remove(owner)
        self._recent.insert(0, owner)
        del self._recent[self.size :]
        for gone in set(self._templates) - set(self._recent):
            del self._templates[gone]
        self._owner_known.set()

    def _rebalance(self) -> None:
        """Retire the workers of owners above their share (least recent owners first), so
        that their slots start workers for owners below theirs."""
        shares = self._shares()
        held = Counter(self._assigned.values())
        if all(held[o] >= n for o, n in shares.items()):
            return
        for worker in sorted(self._idle.values(), key=self._staleness, reverse=True):
            if held[worker.owner] > shares[worker.owner]:
                held[worker.owner] -= 1
                self._retire(worker, "its owner is above its share of the warm slots")

    def _staleness(self, worker: _SandboxedWorker) -> int:
        return self._recent.index(worker.owner) if worker.owner in self._recent else self.size

    # ------------------------------------------------------------------ jobs
    async def run(self, spec: LaunchSpec, max_log_bytes: int) -> int | None:
        """Hands `spec` to a ready worker of its owner whose sandbox is the job's: the host pid
        of its session leader, or None if the job must start cold."""
        args = spec.warm_args
        if args is None or self._closing or spec.view is None or spec.owner is None:
            return None
        self._note(spec.owner)
        if spec.owner_view is not None:
            self._templates[spec.owner] = spec.owner_view
        worker = self._take(spec)
        self._rebalance()
        if worker is None:
            log.info(
                "job %d: no warm worker ready for %s; starting it cold", spec.job_id, spec.owner
            )
            return None
        try:
            _move_into_slot(spec.work_dir, worker.slot_dir)
        except OSError as exc:
            log.warning("job %d: cannot hand its directory over (%s); cold", spec.job_id, exc)
            self._kill(worker)
            return None
        worker.moved = True
        request = warm_protocol.Request(
            spec.job_id, args, spec.env, spec.work_dir, max_log_bytes, worker.host_pid
        )
        # Once the job has been let go, it runs: finish the exchange even if cancelled.
        exchange = asyncio.ensure_future(self._hand_over(worker, request))
        try:
            answer = await asyncio.shield(exchange)
        except asyncio.CancelledError:
            await exchange
            log.warning("job %d: cancelled while starting; ending its sandbox", spec.job_id)
            self._kill(worker)
            raise
        if isinstance(answer, int):
            return answer
        log.warning(
            "job %d: warm worker %s could not start it (%s); starting it cold",
            spec.job_id,
            worker.host_pid,
            answer,
        )
        # Its directory is the job's now: nothing in that sandbox may outlive this point.
        self._kill(worker)
        try:
            await asyncio.wait_for(asyncio.shield(worker.exited), self._request_timeout_s)
        except TimeoutError:
            raise RuntimeError(
                f"the warm worker's sandbox (bwrap pid {worker.pid}) did not end after a "
                "failed hand-over; not starting the job beside it"
            ) from None
        return None

    def _take(self, spec: LaunchSpec) -> _SandboxedWorker | None:
        """A ready worker of the job's owner whose sandbox is exactly the job's. Workers made
        for an older view of the owner retire; a job whose request adds to its owner's view
        (its own output_path, a path to show it) finds none."""
        assert spec.view is not None
        for worker in list(self._idle.values()):
            if not worker.ready or worker.owner != spec.owner or worker.exited.done():
                continue
            stale = spec.owner_view is not None and not _same_confinement(
                spec.owner_view, worker.view
            )
            if stale or _fingerprint(worker.view) != worker.fingerprint:
                self._retire(worker, "the owner's view has changed since it started")
                continue
            if not _same_confinement(spec.view, worker.view):
                continue
            worker.ready = False
            worker.taken = True
            del self._idle[worker.slot]
            self._assigned.pop(worker.slot, None)
            self._busy[worker] = asyncio.create_task(self._wait_busy(worker))
            worker.released.set()  # its slot starts another worker now
            return worker
        return None

    async def _hand_over(
        self, worker: _SandboxedWorker, request: warm_protocol.Request
    ) -> int | str:
        """The request, the answer, the host pid, the go: the leader's host pid, or why not."""
        try:
            worker.writer.write(request.encode())
            await worker.writer.drain()
            line = await asyncio.wait_for(worker.reader.readline(), self._request_timeout_s)
        except TimeoutError:
            return "no answer in time"
        except (ConnectionError, OSError) as exc:
            return f"worker gone ({exc})"
        try:
            reply = json.loads(line) if line else None
        except ValueError:
            return f"bad answer {line[:200]!r}"
        ns_pid = reply.get("pid") if isinstance(reply, dict) else None
        if not isinstance(ns_pid, int):
            return str(reply.get("error", reply)) if isinstance(reply, dict) else "worker gone"
        leader = None
        if worker.host_pid is not None:
            leader = _child_with_ns_pid(worker.host_pid, ns_pid)
        if leader is None:
            return f"its session leader ({ns_pid} in the sandbox) is not its child"
        try:
            worker.writer.write(warm_protocol.encode(warm_protocol.GO))
            await worker.writer.drain()
        except (ConnectionError, OSError) as exc:
            return f"worker gone ({exc})"
        finally:
            # The job's code runs in that sandbox from now on: stop listening to it.
            self._disconnect(worker)
        return leader

    # ------------------------------------------------------------------ one slot
    async def _keep(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._closing:
            await self._owner_known.wait()
            started = loop.time()
            worker: _SandboxedWorker | None = None
            # Chosen and counted at once: another slot choosing meanwhile sees this one.
            self._assigned[slot] = self._owner_for_new_worker()
            try:
                worker = await self._spawn(slot, self._assigned[slot])
            except Exception:
                log.exception("cannot start warm worker %d", slot)
            else:
                self._rebalance()  # owners may have changed while it was being made
                try:
                    await self._serve(worker)
                finally:
                    if self._idle.get(slot) is worker:
                        del self._idle[slot]
                    if not worker.taken:
                        await self._reap(worker)
            finally:
                self._assigned.pop(slot, None)
            if self._closing:
                return
            if worker is not None and worker.taken:
                failures = 0
                continue  # its job has it; warm the next one at once
            was_ready = worker is not None and bool(worker.info)
            healthy = was_ready and loop.time() - started > self._max_backoff_s
            retired = worker is not None and worker.released.is_set()
            failures = 0 if healthy or retired else failures + 1
            delay = min(self._max_backoff_s, 0.5 * 2 ** (failures - 1)) if failures else 0.0
            log.log(
                logging.INFO if retired else logging.WARNING,
                "warm worker %d (%s) exited with %s; starting another in %.1f s",
                slot,
                worker.owner if worker else None,
                worker.returncode if worker else None,
                delay,
            )
            await asyncio.sleep(delay)

    async def _spawn(self, slot: int, owner: str) -> _SandboxedWorker:
        slot_dir = Path(await asyncio.to_thread(_make_slot, self._slots_dir, f"{slot}-{owner}-"))
        try:
            template = self._templates.get(owner)
            if template is None:
                base = await asyncio.to_thread(self._sandbox.views.job, owner, slot_dir)
            else:
                base = dataclasses.replace(template, work_dir=str(slot_dir))
            view = dataclasses.replace(base, scratch=(str(self._sandbox.jobs_dir),))
            fingerprint = await asyncio.to_thread(_fingerprint, view)
        except BaseException:
            shutil.rmtree(slot_dir, ignore_errors=True)
            raise
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        try:
            argv = sandbox.command(
                view,
                warm_protocol.worker_command(theirs.fileno(), str(slot_dir)),
                self._sandbox.bwrap,
                as_pid_1=True,
            )
            os.set_inheritable(theirs.fileno(), True)
            # posix_spawn, as for cold jobs: no fork of this process, and no Popen object to
            # warn about a worker that is meant to outlive the server with its job. Every fd
            # of the server is close-on-exec; only these three and the socket are passed on.
            pid = os.posix_spawn(
                argv[0],
                argv,
                self._env,  # never the server's own environment
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, out_w, 2),
                ],
                setsid=True,
            )
        except BaseException:
            ours.close()
            os.close(out_r)
            shutil.rmtree(slot_dir, ignore_errors=True)
            raise
        finally:
            theirs.close()
            os.close(out_w)
        try:
            reader, writer = await asyncio.open_unix_connection(
                sock=ours, limit=warm_protocol.LINE_LIMIT
            )
            exit_watch = _ExitWatch(pid)
        except BaseException:
            ours.close()
            os.close(out_r)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            shutil.rmtree(slot_dir, ignore_errors=True)
            raise
        worker = _SandboxedWorker(
            slot, owner, slot_dir, view, fingerprint, pid, reader, writer, exit_watch, out_r
        )
        self._copy_output(worker)
        self._idle[slot] = worker
        log.info("warm worker %d for %s starting (bwrap pid %d)", slot, owner, pid)
        return worker

    async def _serve(self, worker: _SandboxedWorker) -> None:
        """Until the worker is ready, then until it has exited, been taken or retired."""
        info = await ready_message(worker.reader, worker.exited, self._ready_timeout_s)
        if info is not None:
            self._found_ready(worker, info)
        if not worker.ready and not worker.released.is_set():
            self._kill(worker)
        released = asyncio.ensure_future(worker.released.wait())
        try:
            await asyncio.wait({worker.exited, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            released.cancel()
        worker.ready = False
        if not worker.taken and not worker.exited.done():
            # Retired: it ends at the end of its requests (its socket is closed).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.exited), self._close_grace_s)

    def _found_ready(self, worker: _SandboxedWorker, info: dict[str, Any]) -> None:
        ns_pid = info.get("pid")
        if isinstance(ns_pid, int):
            # bwrap's child (--as-pid-1); a bwrap of another build may fork once more.
            worker.host_pid = _child_with_ns_pid(worker.pid, ns_pid) or next(
                (p for c in _children(worker.pid) if (p := _child_with_ns_pid(c, ns_pid))), None
            )
        if worker.host_pid is None:
            log.error("warm worker %d: cannot find its process on the host", worker.slot)
            return
        worker.info = info
        worker.ready = not self._closing and not worker.released.is_set()
        log.info(
            "warm worker %d ready for %s (pid %d): warm-up %.1f s, RSS %.0f MB, %s threads, "
            "index hook: %s%s",
            worker.slot,
            worker.owner,
            worker.host_pid,
            info.get("warmup_s", 0.0),
            info.get("rss_kb", 0) / 1024,
            info.get("threads"),
            info.get("hook") or "installed",
            f"; not preloaded: {info['missing']}" if info.get("missing") else "",
        )

    def _retire(self, worker: _SandboxedWorker, why: str) -> None:
        log.info("warm worker %d for %s retires: %s", worker.slot, worker.owner, why)
        worker.released.set()
        if self._assigned.get(worker.slot) == worker.owner:
            del self._assigned[worker.slot]  # counted as gone: its slot chooses again
        if worker.ready:
            worker.ready = False
            worker.writer.close()  # it exits at the end of its requests
        else:
            self._kill(worker)

    def _kill(self, worker: _SandboxedWorker) -> None:
        """Ends the worker's sandbox: the worker is its PID namespace's init, so every process
        in it ends with it."""
        worker.ready = False
        if worker.exited.done():
            return
        targets = [worker.host_pid] if worker.host_pid is not None else _children(worker.pid)
        for pid in [*targets, worker.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _disconnect(self, worker: _SandboxedWorker) -> None:
        worker.writer.close()
        if worker.output_fd >= 0:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(worker.output_fd)
            os.close(worker.output_fd)
            worker.output_fd = -1

    def _copy_output(self, worker: _SandboxedWorker) -> None:
        """The worker's stdout/stderr (warm-up warnings, a traceback) into the server log."""
        loop = asyncio.get_running_loop()
        pending = bytearray()

        def readable() -> None:
            try:
                data = os.read(worker.output_fd, 65536)
            except OSError:
                data = b""
            pending.extend(data)
            *lines, rest = pending.split(b"\n")
            if not data or len(rest) > OUTPUT_LINE_BYTES:
                lines.append(rest)
                rest = b""
            pending[:] = rest
            for line in lines:
                if line:
                    text = line[:OUTPUT_LINE_BYTES].decode(errors="replace")
                    log.info("warm worker %d (%s): %s", worker.slot, worker.owner, text)
            if not data:
                self._disconnect(worker)

        loop.add_reader(worker.output_fd, readable)

    async def _reap(self, worker: _SandboxedWorker) -> None:
        worker.ready = False
        self._disconnect(worker)
        if not worker.exited.done():
            self._kill(worker)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(worker.exited)
        self._collect(worker)

    async def _wait_busy(self, worker: _SandboxedWorker) -> None:
        """A worker that took a job: reaped when it ends (with its job)."""
        await worker.exited
        self._disconnect(worker)
        self._collect(worker)
        self._busy.pop(worker, None)

    def _collect(self, worker: _SandboxedWorker) -> None:
        if worker.returncode is None:
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(worker.pid, 0)
                worker.returncode = os.waitstatus_to_exitcode(status)
        if not worker.moved:
            shutil.rmtree(worker.slot_dir, ignore_errors=True)


def _make_slot(slots_dir: Path, prefix: str) -> str:
    slots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = slots_dir / f"{prefix}{secrets.token_hex(6)}"
    path.mkdir(mode=0o700)
    return str(path.resolve())


def _same_confinement(job: sandbox.View, worker: sandbox.View) -> bool:
    """The job's view is the worker's but for where its directory is mounted."""
    return dataclasses.replace(job, work_dir=worker.work_dir, scratch=worker.scratch) == worker


def _fingerprint(view: sandbox.View) -> tuple[tuple[str, str], ...]:
    """What the mounts of `view` depend on besides its paths: whether each path is there (and
    a directory) when the sandbox is made. A worker started before its owner's first upload
    has no uploads mounted; a job started after it would."""
    paths: list[str] = []
    for item in dataclasses.fields(view):
        if item.name in ("work_dir", "scratch"):
            continue  # made for the worker itself
        value = getattr(view, item.name)
        if isinstance(value, tuple):
            # Paths, or (source, target) pairs: the sources are what must be there.
            paths += [entry if isinstance(entry, str) else entry[0] for entry in value]

    def kind(path: str) -> str:
        if os.path.isdir(path):
            return "dir"
        return "file" if os.path.lexists(path) else "absent"

    return tuple((p, kind(p)) for p in paths)


def _move_into_slot(work_dir: Path, slot_dir: Path) -> None:
    """Makes the (empty) slot the job's directory: the job directory's entries move into it,
    and it is renamed to the job directory's name. Undone on failure."""
    if os.listdir(slot_dir):
        raise OSError(f"the slot {slot_dir} is not empty")
    os.chmod(slot_dir, stat.S_IMODE(os.stat(work_dir).st_mode))
    moved: list[str] = []
    try:
        for name in os.listdir(work_dir):
            os.rename(work_dir / name, slot_dir / name)
            moved.append(name)
        os.rmdir(work_dir)
        try:
            os.rename(slot_dir, work_dir)
        except OSError:
            os.mkdir(work_dir)
            raise
    except OSError:
        for name in reversed(moved):
            with contextlib.suppress(OSError):
                os.rename(slot_dir / name, work_dir / name)
        raise


def _children(pid: int) -> list[int]:
    """The children of `pid` (its main thread's, which is what forks here)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    found = []  # a kernel without CONFIG_PROC_CHILDREN
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat_line = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            if int(stat_line.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _ns_pids(pid: int) -> list[int]:
    """`pid` in each PID namespace it is in, outermost first (`NSpid:`)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return []
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return [int(n) for n in line.split()[1:]]
    return []


def _child_with_ns_pid(parent: int, ns_pid: int) -> int | None:
    """The host pid of the child of `parent` that is `ns_pid` in its own PID namespace."""
    for child in _children(parent):
        pids = _ns_pids(child)
        if len(pids) > 1 and pids[-1] == ns_pid:
            return child
    return None


AnyWarmPool = WarmPool | SandboxedWarmPool  # what the local executor hands jobs to
