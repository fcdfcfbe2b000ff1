"""Benchmarks of lm-eval-server (issue 8): dispatch, drain, submit, listing, memory, logs, e2e.

    uv run python bench/run.py [--quick] [--only NAME[,NAME]] [--runs N] [--out FILE]

Each benchmark starts real server processes the way users do (`python -m uvicorn src.main:app`
from the repository root, settings as environment variables, a temporary DATA_DIR; the task
index cache lives in bench/out/index so it is built once), drives them over HTTP and prints
one table: figure, median over --runs runs, target, met. Ratios are taken within one run (both
sides measured back to back), then their median. Everything goes to bench/out/results.json
with every run's values, the machine and its load average: on a shared machine read figures
with the load beside them.

--quick runs tiny sizes with one shared server per setting (a smoke test: `tests/test_bench.py`
runs it so the bench cannot rot); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
OUT_DIR = BENCH / "out"
# Resolved as the server resolves request paths (examples/ links into the package).
EXAMPLES_TASKS = (ROOT / "examples" / "tasks").resolve()
FAKE_SCRIPT = ROOT / "tests" / "support" / "fake_lm_eval.py"
LOG_LIMIT_BYTES = 1 << 30
SUPERVISOR = ROOT / "src" / "lm_eval_server" / "runtime" / "supervise.py"
PY = sys.executable
DEFAULT_LM_EVAL = f"{PY} -m lm_eval"
FAKE_LM_EVAL = f"{PY} {FAKE_SCRIPT}"
TRUE = shutil.which("true") or "/bin/true"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# What the server's executor adds to every job's environment (manager._job_env).
JOB_ENV = {"PYTHONUNBUFFERED": "1"}


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------- sizes and figures


@dataclass(frozen=True)
class Sizes:
    dispatch_jobs: int
    drain_jobs: int
    submit_jobs: int
    clients: int
    listing_jobs: int
    list_requests: int
    get_requests: int
    log_bytes: int
    e2e_limit: int
    quick: bool


FULL = Sizes(
    dispatch_jobs=200,
    drain_jobs=1000,
    submit_jobs=5000,
    clients=8,
    listing_jobs=10_000,
    list_requests=20,
    get_requests=500,
    log_bytes=200 * 1024 * 1024,
    e2e_limit=10,
    quick=False,
)
QUICK = Sizes(
    dispatch_jobs=10,
    drain_jobs=20,
    submit_jobs=100,
    clients=8,
    listing_jobs=50,
    list_requests=3,
    get_requests=20,
    log_bytes=1024 * 1024,
    e2e_limit=2,
    quick=True,
)


@dataclass(frozen=True)
class Spec:
    name: str
    bench: str
    unit: str
    target: tuple[str, float] | None
    about: str


SPECS: list[Spec] = [
    Spec("dispatch_p50_ms", "dispatch", "ms", None, "POST /job sent -> job command started"),
    Spec("dispatch_p99_ms", "dispatch", "ms", ("<=", 20), "same, p99 over sequential jobs"),
    Spec("dispatch_post_p50_ms", "dispatch", "ms", None, "POST /job answered (in dispatch)"),
    Spec(
        "dispatch_supervisor_p50_ms",
        "dispatch",
        "ms",
        None,
        "supervise.py spawned directly -> command started (no server)",
    ),
    Spec(
        "python_start_p50_ms",
        "dispatch",
        "ms",
        None,
        "`python -I -S` spawned -> first statement (interpreter start-up)",
    ),
    Spec("drain_jobs_per_s", "drain", "jobs/s", (">=", 50), "trivial jobs, MAX_CONCURRENCY=4"),
    Spec("drain_server_cpu_ms", "drain", "ms", None, "server CPU per drained job"),
    Spec(
        "drain_job_cpu_ms",
        "drain",
        "ms",
        None,
        "CPU per drained job of its processes (supervisor + /usr/bin/true)",
    ),
    Spec("submit_per_s", "submit", "req/s", (">=", 1000), "POST /job, 8 clients, jobs stay Queued"),
    Spec("submit_p50_ms", "submit", "ms", None, "POST /job latency under that load, p50"),
    Spec("submit_p99_ms", "submit", "ms", None, "POST /job latency under that load, p99"),
    Spec("submit_server_cpu_ms", "submit", "ms", None, "server CPU per POST /job"),
    Spec("submit_client_cpu_ms", "submit", "ms", None, "load generator's CPU per POST /job"),
    Spec("list_jobs_p50_ms", "listing", "ms", ("<=", 50), "GET /jobs, all finished jobs"),
    Spec("list_jobs_server_cpu_ms", "listing", "ms", None, "server CPU per GET /jobs"),
    Spec("get_job_p50_ms", "listing", "ms", ("<=", 2), "GET /job/{id}, a job with ~300 log lines"),
    Spec("get_job_nolog_p50_ms", "listing", "ms", None, "GET /job/{id}, random jobs, no logs"),
    Spec("rss_idle_mb", "memory", "MB", ("<=", 120), "server VmRSS idle, TASK_INDEX=false"),
    Spec("rss_idle_index_mb", "memory", "MB", None, "server VmRSS idle, task index loaded"),
    Spec("rss_finished_mb", "memory", "MB", ("<=", 250), "server VmRSS, finished jobs listed"),
    Spec("log_direct_s", "logs", "s", None, "fake lm_eval writing to stderr, run directly"),
    Spec(
        "log_supervised_s",
        "logs",
        "s",
        None,
        "the same under supervise.py alone (no server)",
    ),
    Spec("log_server_s", "logs", "s", None, "the same as a job: POST -> Completed"),
    Spec("log_job_end_s", "logs", "s", None, "  of which POST -> job process ended (exit.json)"),
    Spec("log_server_cpu_s", "logs", "s", None, "server CPU while that job ran"),
    Spec("log_ratio", "logs", "x", ("<=", 1.1), "server / direct, same run"),
    Spec("log_rss_growth_mb", "logs", "MB", ("<=", 50), "server VmRSS peak - before, during it"),
    Spec("log_api_stall_ms", "logs", "ms", None, "slowest GET /health during that job"),
    Spec("e2e_direct_s", "e2e", "s", None, "`python -m lm_eval` dummy/demo_mc, run directly"),
    Spec("e2e_launcher_s", "e2e", "s", None, "the same job via the server, POST -> Completed"),
    Spec("e2e_plain_s", "e2e", "s", None, "the same, USE_LAUNCHER=false"),
    Spec("e2e_launcher_ratio", "e2e", "x", ("<=", 1.05), "server (launcher) / direct"),
    Spec("e2e_plain_ratio", "e2e", "x", ("<=", 1.05), "server (USE_LAUNCHER=false) / direct"),
    Spec("e2e_direct_cpu_s", "e2e", "s", None, "CPU of the direct run's process"),
    Spec("e2e_launcher_cpu_s", "e2e", "s", None, "CPU of the job's processes (with supervisor)"),
    Spec("e2e_plain_cpu_s", "e2e", "s", None, "the same, USE_LAUNCHER=false"),
]
FIGURE_NAMES = [spec.name for spec in SPECS]
BENCHES = ["dispatch", "drain", "submit", "listing", "memory", "logs", "e2e"]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise BenchError("no samples")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of a process, and of its children it has reaped (which
    include theirs: for the server, the job supervisors and the commands they ran)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) * TICK_S, (cutime + cstime) * TICK_S


# ---------------------------------------------------------------- a lean HTTP client


# uvicorn closes a keep-alive connection after 5 s without a request (--timeout-keep-alive).
IDLE_REUSE_S = 3.0


class Http:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams.

    The load generator shares the machine's two cores with the server; a client this small
    keeps the figures about the server rather than about httpx.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._used = 0.0

    async def request(
        self, method: str, path: str, body: bytes | None = None, timeout_s: float = 300
    ) -> tuple[int, bytes]:
        try:
            return await asyncio.wait_for(self._request(method, path, body), timeout_s)
        except BaseException:
            await self.close()  # a half-read answer would garble the next one
            raise

    async def json(self, method: str, path: str, body: bytes | None = None) -> Any:
        status, data = await self.request(method, path, body)
        if status != 200:
            raise BenchError(f"{method} {path} answered {status}: {data[:500]!r}")
        return json.loads(data)

    async def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        if self._writer is not None and time.monotonic() - self._used > IDLE_REUSE_S:
            await self.close()  # uvicorn drops connections idle for 5 s
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self._reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + (body or b""))
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            data = await self._reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while size := int((await self._reader.readuntil(b"\r\n")).strip(), 16):
                parts.append((await self._reader.readexactly(size + 2))[:-2])
            await self._reader.readuntil(b"\r\n")
            data = b"".join(parts)
        else:
            data = await self._reader.read()
        if headers.get("connection") == "close" or "content-length" not in headers:
            await self.close()
        self._used = time.monotonic()
        return status, data

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


def job_body(**extra: Any) -> bytes:
    """A normal dummy-model request, so validation (parser, registry, task index, paths) is real."""
    body = {"model": "dummy", "tasks": "demo_mc", "include_path": str(EXAMPLES_TASKS), "limit": 8}
    return json.dumps({**body, **extra}).encode()


async def post_many(port: int, body: bytes, n: int, clients: int) -> tuple[list[float], list[int]]:
    """n POST /job from `clients` concurrent connections: (latencies in s, job ids)."""
    remaining = n
    latencies: list[float] = []
    ids: list[int] = []

    async def worker() -> None:
        nonlocal remaining
        http = Http(port)
        try:
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                status, data = await http.request("POST", "/job", body)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    raise BenchError(f"POST /job answered {status}: {data[:500]!r}")
                ids.append(int(json.loads(data)["job_id"]))
        finally:
            await http.close()

    await asyncio.gather(*(worker() for _ in range(min(clients, n))))
    return latencies, ids


async def wait_idle(http: Http, timeout_s: float = 600, interval_s: float = 0.01) -> None:
    """Until no job is Queued or Running (a cheap filtered count)."""
    deadline = time.monotonic() + timeout_s
    while (await http.json("GET", "/jobs?status=Queued,Running&limit=0"))["total"]:
        if time.monotonic() > deadline:
            raise BenchError(f"jobs still queued or running after {timeout_s}s")
        await asyncio.sleep(interval_s)


async def wait_status(http: Http, job_id: int, statuses: set[str], timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        job = await http.json("GET", f"/job/{job_id}")
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise BenchError(f"job {job_id} still {job['status']} after {timeout_s}s")
        await asyncio.sleep(0.02)


async def check_completed(http: Http, job_id: int) -> Any:
    job = await http.json("GET", f"/job/{job_id}")
    if job["status"] != "Completed":
        raise BenchError(f"job {job_id} is {job['status']}: {job.get('error')}")
    return job


async def start_sleeper(http: Http) -> int:
    """A running job that holds the only slot (MAX_CONCURRENCY=1), with ~300 lines of logs."""
    body = job_body(
        lm_eval_path=FAKE_LM_EVAL,
        env_vars={"FAKE_SLEEP_S": "3600", "FAKE_STDERR_BYTES": "20000"},
    )
    job_id = int((await http.json("POST", "/job", body))["job_id"])
    await wait_status(http, job_id, {"Running"})
    log = None
    for _ in range(500):  # until the fake has written its stderr
        job = await http.json("GET", f"/job/{job_id}")
        if any("sleeping" in line for line in job["stderr"]):
            log = job
            break
        await asyncio.sleep(0.02)
    if log is None:
        raise BenchError("the sleeper job wrote no log")
    return job_id


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`python -m uvicorn src.main:app` from the repository root, as the README starts it."""

    def __init__(self, root: Path, index_dir: Path, lm_eval_paths: list[str], **env: str) -> None:
        self.data_dir = root / "data"
        self.port = free_port()
        self.log_path = root / "server.log"
        self.env = {
            **os.environ,
            **OFFLINE,
            "DATA_DIR": str(self.data_dir),
            "INDEX_DIR": str(index_dir),
            "LM_EVAL_PATHS": ",".join(lm_eval_paths),
            "ALLOWED_PATHS": f"{self.data_dir},{ROOT / 'examples'}",
            "STOP_GRACE_S": "3",
            "ALLOWED_ENV_VARS": "FAKE_*",  # what tests/support/fake_lm_eval.py follows
            # An interrupted bench must not leave its sleeping jobs behind.
            "SHUTDOWN_STOPS_JOBS": "true",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = Http(self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def job_dir(self, job_id: int) -> Path:
        return self.data_dir / "jobs" / str(job_id)

    async def start(self, ready: bool = True) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [PY, "-m", "uvicorn", "src.main:app", "--host", "127.0.0.1"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*command, "--port", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        path = "/ready" if ready else "/health"
        while True:
            try:
                status, _ = await self.http.request("GET", path, timeout_s=5)
                if status == 200:
                    return self
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                await self.http.close()
            if self.proc.poll() is not None:
                raise BenchError(f"server exited: {self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"server not {path[1:]} after 120 s")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stops its jobs, then the server (SIGTERM; it also stops jobs on the way out)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            with contextlib.suppress(Exception):
                await self.http.request("POST", "/jobs/stop", b"", timeout_s=120)
            await self.http.close()
        finally:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)


@dataclass
class Context:
    sizes: Sizes
    index_dir: Path
    tmp: Path
    stamp_cmd: list[str]
    run_index: int = 0
    _pool: dict[tuple[tuple[str, str], ...], Server] = field(default_factory=dict)
    _bench_servers: list[Server] = field(default_factory=list)
    _populated: tuple[Server, int] | None = None
    _count: int = 0
    _started: list[Server] = field(default_factory=list)

    @property
    def lm_eval_paths(self) -> list[str]:
        return [DEFAULT_LM_EVAL, FAKE_LM_EVAL, TRUE, shlex.join(self.stamp_cmd)]

    def scratch(self, name: str) -> Path:
        self._count += 1
        path = self.tmp / f"{self._count:03d}-{name}"
        path.mkdir(parents=True)
        return path

    async def _start(self, **env: str) -> Server:
        srv = Server(self.scratch("server"), self.index_dir, self.lm_eval_paths, **env)
        self._started.append(srv)  # stopped by close() whatever happens
        return await srv.start()

    async def server(self, **env: str) -> Server:
        """A server with these settings: fresh for each benchmark, or in --quick mode one
        shared by every benchmark that asks for the same settings."""
        if self.sizes.quick:
            key = tuple(sorted(env.items()))
            if key not in self._pool:
                self._pool[key] = await self._start(**env)
            return self._pool[key]
        srv = await self._start(**env)
        self._bench_servers.append(srv)
        return srv

    async def populated(self) -> tuple[Server, int]:
        """A server holding `listing_jobs` finished jobs, created through the API (one
        sleeping job holds the only slot, the rest queue, then /jobs/stop), shared by the
        listing and memory benchmarks of one run. Returns it and the sleeper's id (the job
        with logs)."""
        if self._populated is None:
            env = {"MAX_CONCURRENCY": "1", "MAX_QUEUED_JOBS": "1000000"}
            srv = await (self.server(**env) if self.sizes.quick else self._start(**env))
            sleeper = await start_sleeper(srv.http)
            await post_many(srv.port, job_body(), self.sizes.listing_jobs - 1, self.sizes.clients)
            await srv.http.json("POST", "/jobs/stop", b"")
            self._populated = (srv, sleeper)
        return self._populated

    async def end_bench(self) -> None:
        servers, self._bench_servers = self._bench_servers, []
        for srv in servers:
            await srv.stop()

    async def end_run(self) -> None:
        await self.end_bench()
        if self._populated is not None and not self.sizes.quick:
            await self._populated[0].stop()
            self._populated = None

    async def close(self) -> None:
        """Stops every server this bench started, even after an error or a signal."""
        for srv in self._started:
            with contextlib.suppress(Exception):
                await asyncio.shield(srv.stop())


# ---------------------------------------------------------------- probes


def prepare_stamp(out_dir: Path) -> list[str]:
    """The dispatch probe's command: bench/stamp.c compiled, or stamp.py without a compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    source = BENCH / "stamp.c"
    binary = out_dir / "stamp"
    if compiler:
        if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
            out_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True)
        return [str(binary)]
    return [PY, "-I", "-S", str(BENCH / "stamp.py")]


async def read_stamp(path: Path, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text()
            if text.endswith("\n"):
                return int(text)
        if time.monotonic() > deadline:
            raise BenchError(f"{path} not written within {timeout_s}s")
        await asyncio.sleep(0.002)


def spawn_and_stamp(argv: list[str], cwd: Path) -> float:
    """ms from posix_spawn (setsid, like the local executor) to the probe's stamp."""
    stamp = cwd / "stamp"
    stamp.unlink(missing_ok=True)
    # stamp.py writes where BENCH_STAMP says when run without the supervisor's chdir.
    env = {**os.environ, **JOB_ENV, "BENCH_STAMP": str(stamp)}
    started = time.monotonic_ns()
    pid = os.posix_spawn(
        argv[0],
        argv,
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
        ],
        setsid=True,
    )
    os.waitpid(pid, 0)
    return (int(stamp.read_text()) - started) / 1e6


# ---------------------------------------------------------------- benchmarks

Figures = dict[str, float]


async def bench_dispatch(ctx: Context) -> Figures:
    srv = await ctx.server()
    http = srv.http
    body = job_body(lm_eval_path=shlex.join(ctx.stamp_cmd))
    latencies: list[float] = []
    answered: list[float] = []
    warmup = 3
    for index in range(warmup + ctx.sizes.dispatch_jobs):
        await wait_idle(http, interval_s=0.002)  # a free slot and a quiet server
        sent = time.monotonic_ns()
        status, data = await http.request("POST", "/job", body)
        replied = time.monotonic_ns()
        if status != 200:
            raise BenchError(f"POST /job answered {status}: {data[:500]!r}")
        job_id = int(json.loads(data)["job_id"])
        started = await read_stamp(srv.job_dir(job_id) / "stamp")
        if index >= warmup:
            latencies.append((started - sent) / 1e6)
            answered.append((replied - sent) / 1e6)
    await wait_idle(http)
    await check_completed(http, job_id)

    # The same probe under the supervisor alone, and a bare interpreter start, for comparison.
    direct = ctx.scratch("supervisor")
    n = max(10, ctx.sizes.dispatch_jobs // 4)
    supervised = [
        spawn_and_stamp(
            [PY, "-I", "-S", str(SUPERVISOR), str(direct), "1073741824", "--", *ctx.stamp_cmd],
            direct,
        )
        for _ in range(n)
    ]
    bare = [spawn_and_stamp([PY, "-I", "-S", str(BENCH / "stamp.py")], direct) for _ in range(n)]
    return {
        "dispatch_p50_ms": percentile(latencies, 50),
        "dispatch_p99_ms": percentile(latencies, 99),
        "dispatch_post_p50_ms": percentile(answered, 50),
        "dispatch_supervisor_p50_ms": percentile(supervised, 50),
        "python_start_p50_ms": percentile(bare, 50),
    }


def finished_at(job: dict[str, Any]) -> float:
    return datetime.fromisoformat(job["finished_at"]).timestamp()


async def bench_drain(ctx: Context) -> Figures:
    srv = await ctx.server()
    http = srv.http
    await wait_idle(http)
    n = ctx.sizes.drain_jobs
    cpu_before = cpu_s(srv.pid)
    first_post = time.time()
    _, ids = await post_many(srv.port, job_body(lm_eval_path=TRUE), n, ctx.sizes.clients)
    await wait_idle(http, interval_s=0.2)
    cpu_after = cpu_s(srv.pid)
    wanted = set(ids)
    jobs = [j for j in (await http.json("GET", "/jobs"))["jobs"] if j["job_id"] in wanted]
    bad = [j for j in jobs if j["status"] != "Completed"]
    if len(jobs) != n or bad:
        raise BenchError(f"{len(bad)} drain jobs did not complete, e.g. {bad[:1]}")
    last = max(finished_at(j) for j in jobs)
    return {
        "drain_jobs_per_s": n / (last - first_post),
        "drain_server_cpu_ms": (cpu_after[0] - cpu_before[0]) / n * 1000,
        "drain_job_cpu_ms": (cpu_after[1] - cpu_before[1]) / n * 1000,
    }


async def bench_submit(ctx: Context) -> Figures:
    srv = await ctx.server(MAX_CONCURRENCY="1", MAX_QUEUED_JOBS="1000000")
    http = srv.http
    await start_sleeper(http)
    body = job_body()
    await post_many(srv.port, body, 50, ctx.sizes.clients)  # warm-up
    cpu_before = cpu_s(srv.pid)[0]
    client_before = time.process_time()
    started = time.perf_counter()
    latencies, _ = await post_many(srv.port, body, ctx.sizes.submit_jobs, ctx.sizes.clients)
    elapsed = time.perf_counter() - started
    client = time.process_time() - client_before
    cpu = cpu_s(srv.pid)[0] - cpu_before
    await http.json("POST", "/jobs/stop", b"")
    return {
        "submit_per_s": ctx.sizes.submit_jobs / elapsed,
        "submit_p50_ms": percentile(latencies, 50) * 1000,
        "submit_p99_ms": percentile(latencies, 99) * 1000,
        "submit_server_cpu_ms": cpu / ctx.sizes.submit_jobs * 1000,
        "submit_client_cpu_ms": client / ctx.sizes.submit_jobs * 1000,
    }


async def timed(http: Http, path: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        status, data = await http.request("GET", path)
        times.append((time.perf_counter() - started) * 1000)
        if status != 200:
            raise BenchError(f"GET {path} answered {status}: {data[:300]!r}")
    return times


async def bench_listing(ctx: Context) -> Figures:
    srv, sleeper = await ctx.populated()
    http = srv.http
    listing = await http.json("GET", "/jobs")
    if listing["total"] < ctx.sizes.listing_jobs:
        raise BenchError(f"only {listing['total']} jobs listed")
    if (await http.json("GET", f"/job/{sleeper}"))["stderr"] == []:
        raise BenchError("the job with logs has none")
    await timed(http, "/jobs", 2)  # warm-up
    cpu_before = cpu_s(srv.pid)[0]
    list_ms = await timed(http, "/jobs", ctx.sizes.list_requests)
    list_cpu_ms = (cpu_s(srv.pid)[0] - cpu_before) / ctx.sizes.list_requests * 1000
    get_ms = await timed(http, f"/job/{sleeper}", ctx.sizes.get_requests)
    ids = [j["job_id"] for j in listing["jobs"] if j["job_id"] != sleeper]
    step = max(1, len(ids) // ctx.sizes.get_requests)
    nolog_ms: list[float] = []
    for job_id in ids[::step][: ctx.sizes.get_requests]:
        nolog_ms += await timed(http, f"/job/{job_id}", 1)
    return {
        "list_jobs_p50_ms": percentile(list_ms, 50),
        "list_jobs_server_cpu_ms": list_cpu_ms,
        "get_job_p50_ms": percentile(get_ms, 50),
        "get_job_nolog_p50_ms": percentile(nolog_ms, 50),
    }


async def settle_rss(srv: Server) -> float:
    for path in ("/health", "/jobs?limit=10", "/ready", "/metrics"):
        await srv.http.request("GET", path)
    await asyncio.sleep(1.0)
    return rss_mb(srv.pid)


async def bench_memory(ctx: Context) -> Figures:
    idle = await ctx.server(TASK_INDEX="false")
    idle_mb = await settle_rss(idle)
    indexed = await ctx.server()
    indexed_mb = await settle_rss(indexed)
    populated, _ = await ctx.populated()
    populated_mb = await settle_rss(populated)
    return {
        "rss_idle_mb": idle_mb,
        "rss_idle_index_mb": indexed_mb,
        "rss_finished_mb": populated_mb,
    }


async def run_timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    with open(cwd / "stdout.log", "wb") as out, open(cwd / "stderr.log", "wb") as err:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        try:
            code = await proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            raise
        elapsed = time.monotonic() - started
    if code != 0:
        tail = (cwd / "stderr.log").read_bytes()[-2000:].decode(errors="replace")
        raise BenchError(f"{shlex.join(argv)} exited {code}: {tail}")
    return elapsed


async def via_server(srv: Server, body: bytes) -> tuple[float, dict[str, Any]]:
    """Seconds from POST /job to the job seen Completed (polled every 10 ms)."""
    started = time.monotonic()
    job_id = int((await srv.http.json("POST", "/job", body))["job_id"])
    await wait_idle(srv.http, interval_s=0.01)
    elapsed = time.monotonic() - started
    return elapsed, await check_completed(srv.http, job_id)


async def bench_logs(ctx: Context) -> Figures:
    total = ctx.sizes.log_bytes
    env = {**os.environ, **OFFLINE, **JOB_ENV, "FAKE_STDERR_BYTES": str(total)}
    # The whole flood must stay on disk to be compared: the default MAX_LOG_BYTES (100 MiB)
    # would keep only its tail. The same limit as the supervised run below.
    srv = await ctx.server(MAX_LOG_BYTES=str(LOG_LIMIT_BYTES))
    await wait_idle(srv.http)
    figures: Figures = {}

    async def direct() -> None:
        cwd = ctx.scratch("logs-direct")
        figures["log_direct_s"] = await run_timed([PY, str(FAKE_SCRIPT)], cwd, env)
        shutil.rmtree(cwd)

    async def supervised() -> None:
        cwd = ctx.scratch("logs-supervised")
        argv = [PY, "-I", "-S", str(SUPERVISOR), str(cwd), str(LOG_LIMIT_BYTES), "--", PY]
        argv.append(str(FAKE_SCRIPT))
        figures["log_supervised_s"] = await run_timed(argv, cwd, env)
        shutil.rmtree(cwd)

    async def served() -> None:
        before = rss_mb(srv.pid)
        peak = before
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb(srv.pid))
                await asyncio.sleep(0.01)

        async def probe() -> None:
            nonlocal slowest
            http = Http(srv.port)
            try:
                while not done.is_set():
                    started = time.perf_counter()
                    await http.request("GET", "/health")
                    slowest = max(slowest, time.perf_counter() - started)
                    await asyncio.sleep(0.02)
            finally:
                await http.close()

        slowest = 0.0
        sampler = asyncio.create_task(sample())
        prober = asyncio.create_task(probe())
        cpu_before = cpu_s(srv.pid)[0]
        posted = time.time()
        try:
            body = job_body(lm_eval_path=FAKE_LM_EVAL, env_vars={"FAKE_STDERR_BYTES": str(total)})
            elapsed, job = await via_server(srv, body)
        finally:
            done.set()
            await asyncio.gather(sampler, prober)
        work_dir = srv.job_dir(job["job_id"])
        if (work_dir / "stderr.log").stat().st_size != total:
            raise BenchError(f"{work_dir}/stderr.log does not hold {total} bytes")
        ended_at = json.loads((work_dir / "exit.json").read_text())["ended_at"]
        figures["log_server_s"] = elapsed
        figures["log_job_end_s"] = ended_at - posted
        figures["log_server_cpu_s"] = cpu_s(srv.pid)[0] - cpu_before
        figures["log_rss_growth_mb"] = max(peak, rss_mb(srv.pid)) - before
        figures["log_api_stall_ms"] = slowest * 1000
        await srv.http.request("DELETE", f"/job/{job['job_id']}")

    order = [direct, supervised, served]
    shift = ctx.run_index % len(order)
    for step in order[shift:] + order[:shift]:
        await step()
    figures["log_ratio"] = figures["log_server_s"] / figures["log_direct_s"]
    return figures


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def bench_e2e(ctx: Context) -> Figures:
    limit = ctx.sizes.e2e_limit
    launcher, plain = await asyncio.gather(ctx.server(), ctx.server(USE_LAUNCHER="false"))
    body = job_body(limit=limit)
    env = {**os.environ, **OFFLINE, **JOB_ENV}
    arguments: list[str] = []

    async def direct() -> tuple[float, float]:
        cwd = ctx.scratch("e2e-direct")
        argv = [PY, "-m", "lm_eval", "--tasks", "demo_mc", "--model", "dummy"]
        argv += ["--limit", str(limit), "--include_path", str(EXAMPLES_TASKS)]
        argv += ["--output_path", str(cwd / "results")]
        cpu_before = children_cpu_s()  # the servers are never reaped while the bench runs
        elapsed = await run_timed(argv, cwd, env)
        arguments.append(shlex.join(argv[:-2]))
        return elapsed, children_cpu_s() - cpu_before

    async def served(srv: Server) -> tuple[float, float]:
        cpu_before = cpu_s(srv.pid)[1]
        elapsed, job = await via_server(srv, body)
        arguments.append(shlex.join(shlex.split(job["argument"])[:-2]))  # minus --output_path
        return elapsed, cpu_s(srv.pid)[1] - cpu_before

    runs: dict[str, Callable[[], Awaitable[tuple[float, float]]]] = {
        "direct": direct,
        "launcher": lambda: served(launcher),
        "plain": lambda: served(plain),
    }
    results: dict[str, tuple[float, float]] = {}
    if ctx.sizes.quick:  # a smoke test: all at once, to stay short
        values = await asyncio.gather(*(run() for run in runs.values()))
        results = dict(zip(runs, values, strict=True))
    else:  # one after the other, starting with a different one each run
        # The first lm-eval run to index its ~14,700 task YAMLs after other work reads them
        # from a cold cache (~1 s more CPU here): warm it up so the order does not matter.
        await direct()
        arguments.clear()
        order = list(runs)
        shift = ctx.run_index % len(order)
        for name in order[shift:] + order[:shift]:
            results[name] = await runs[name]()
    if len(set(arguments)) != 1:
        raise BenchError(f"the server ran another command than the direct run: {arguments}")
    wall = {name: value[0] for name, value in results.items()}
    cpu = {name: value[1] for name, value in results.items()}
    return {
        "e2e_direct_s": wall["direct"],
        "e2e_launcher_s": wall["launcher"],
        "e2e_plain_s": wall["plain"],
        "e2e_launcher_ratio": wall["launcher"] / wall["direct"],
        "e2e_plain_ratio": wall["plain"] / wall["direct"],
        "e2e_direct_cpu_s": cpu["direct"],
        "e2e_launcher_cpu_s": cpu["launcher"],
        "e2e_plain_cpu_s": cpu["plain"],
    }


BENCH_FUNCS: dict[str, Callable[[Context], Awaitable[Figures]]] = {
    "dispatch": bench_dispatch,
    "drain": bench_drain,
    "submit": bench_submit,
    "listing": bench_listing,
    "memory": bench_memory,
    "logs": bench_logs,
    "e2e": bench_e2e,
}


# ---------------------------------------------------------------- runner


def ensure_index(index_dir: Path) -> None:
    """The task index cache, built once (lm-eval takes seconds to index its tasks)."""
    from lm_eval_server.runtime import task_index

    if task_index.load_names(index_dir) is not None:
        return
    print(f"building the task index cache in {index_dir} ...", flush=True)
    subprocess.run(
        [PY, "-m", "lm_eval_server.runtime.task_index", "build", "--data-dir", str(index_dir)],
        check=True,
        env={**os.environ, **OFFLINE},
    )


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "lm_eval": importlib.metadata.version("lm_eval"),
        "uvicorn": importlib.metadata.version("uvicorn"),
        "fastapi": importlib.metadata.version("fastapi"),
    }


def verdict(spec: Spec, value: float | None) -> bool | None:
    if spec.target is None or value is None:
        return None
    op, bound = spec.target
    return value <= bound if op == "<=" else value >= bound


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def table(figures: dict[str, Any]) -> str:
    rows = [("figure", "median", "runs", "target", "met?", "what")]
    for spec in SPECS:
        entry = figures.get(spec.name)
        if entry is None:
            continue
        target = f"{spec.target[0]} {fmt(spec.target[1])}" if spec.target else ""
        met = {True: "yes", False: "NO", None: ""}[entry["met"]]
        runs = " ".join(fmt(v) for v in entry["values"])
        rows.append(
            (spec.name, f"{fmt(entry['median'])} {spec.unit}", runs, target, met, spec.about)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)


async def run_all(args: argparse.Namespace, sizes: Sizes, names: list[str]) -> dict[str, Any]:
    per_run: list[Figures] = []
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lm-eval-bench-") as tmp:
        ctx = Context(sizes, args.index_dir, Path(tmp), prepare_stamp(args.out.parent))
        # Ctrl-C or SIGTERM (also for a bench started in the background, where SIGINT is
        # ignored) cancels the run; the servers and their jobs are stopped on the way out.
        main_task = asyncio.current_task()
        assert main_task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
        try:
            for run in range(args.runs):
                ctx.run_index = run
                figures: Figures = {}
                for name in names:
                    started = time.monotonic()
                    print(f"run {run + 1}/{args.runs}: {name} ...", end="", flush=True)
                    try:
                        figures.update(await BENCH_FUNCS[name](ctx))
                    except Exception as exc:
                        errors.append(f"run {run + 1} {name}: {type(exc).__name__}: {exc}")
                        print(f" FAILED: {exc}", flush=True)
                    else:
                        took = time.monotonic() - started
                        print(f" {took:.1f}s, load {loadavg()}", flush=True)
                    finally:
                        await ctx.end_bench()
                await ctx.end_run()
                per_run.append(figures)
        finally:
            await ctx.close()
    return {"per_run": per_run, "errors": errors, "stamp": ctx.stamp_cmd}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument(
        "--only", action="append", default=[], help=f"benchmarks to run: {','.join(BENCHES)}"
    )
    parser.add_argument("--runs", type=int, default=None, help="runs (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "results.json")
    parser.add_argument(
        "--index-dir", type=Path, default=OUT_DIR / "index", help="task index cache (INDEX_DIR)"
    )
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.out = args.out.resolve()
    args.index_dir = args.index_dir.resolve()
    names = [n.strip() for part in args.only for n in part.split(",") if n.strip()] or BENCHES
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {BENCHES}")
    names = [n for n in BENCHES if n in names]
    sizes = QUICK if args.quick else FULL

    ensure_index(args.index_dir)
    load_before = loadavg()
    started = time.monotonic()
    try:
        outcome = asyncio.run(run_all(args, sizes, names))
    except asyncio.CancelledError:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    figures: dict[str, Any] = {}
    for spec in SPECS:
        values = [run[spec.name] for run in outcome["per_run"] if spec.name in run]
        if not values:
            continue
        median = statistics.median(values)
        figures[spec.name] = {
            "median": median,
            "values": values,
            "unit": spec.unit,
            "target": f"{spec.target[0]} {spec.target[1]}" if spec.target else None,
            "met": verdict(spec, median),
            "about": spec.about,
        }
    results = {
        "mode": "quick" if sizes.quick else "full",
        "runs": args.runs,
        "benchmarks": names,
        "sizes": sizes.__dict__,
        "dispatch_probe": shlex.join(outcome["stamp"]),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "seconds": round(time.monotonic() - started, 1),
        "figures": figures,
        "errors": outcome["errors"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(figures))
    print(f"\nload average before {load_before}, after {results['loadavg_after']}; {args.out}")
    for error in outcome["errors"]:
        print(f"ERROR {error}", file=sys.stderr)
    return 1 if outcome["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
