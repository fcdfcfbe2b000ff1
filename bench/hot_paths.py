"""The server's hot paths against the framework's floor, in one invocation (issue 22).

    uv run python bench/hot_paths.py [--quick] [--rounds N] [--out FILE]

Starts, the same way (`python -m uvicorn MODULE:app --host 127.0.0.1 --port N`), the server
(`src.main:app`, as bench/run.py starts it: MAX_CONCURRENCY=1 with one sleeping job holding the
slot, so submissions stay Queued) and the floor (bench/floor_app.py: a bare FastAPI app with one
JSON POST route and one GET route). Round by round, alternating which goes first, it measures
from 8 keep-alive connections:

- POST: the floor's `POST /job` against the server's `POST /job` (the README's dummy-model
  body, validated in full and stored durably);
- GET: the floor's `GET /health` against the server's `GET /health` (a trivial route: what the
  middleware costs) and `GET /docs`.

Then it fills the server to `--jobs` jobs, half finished (stopped) and half queued, and times
`GET /jobs` (all of them; and one page of queued ones), `GET /job/{id}` (a job with ~300 log
lines) sequentially, beside the floor's `GET /health` latency. Last, drain: `--drain` trivial
jobs (`/usr/bin/true`) through MAX_CONCURRENCY=4, with the default sandbox and SANDBOX=off.

Every figure is printed beside the floor's, as a ratio, with the server CPU per request and the
load average. Results go to bench/out/hot_paths.json. --quick (tests/test_bench.py) runs tiny
sizes: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent


def _load_run() -> ModuleType:
    """bench/run.py (servers, the HTTP client, percentiles), imported by path."""
    spec = importlib.util.spec_from_file_location("bench_run", BENCH_DIR / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run = _load_run()


@dataclass(frozen=True)
class Sizes:
    rounds: int
    posts: int  # per side and round
    gets: int  # per side, route and round
    jobs: int  # jobs held for the listing figures (half finished, half queued)
    list_requests: int
    get_requests: int
    drain: int
    clients: int = 8


FULL = Sizes(
    rounds=3, posts=1500, gets=3000, jobs=10_000, list_requests=30, get_requests=500, drain=1000
)
QUICK = Sizes(rounds=1, posts=30, gets=60, jobs=40, list_requests=3, get_requests=10, drain=10)

# Targets of issue 22: (figure, op, bound).
TARGETS = {
    "post_ratio": (">=", 0.4),
    "list_all_p50_ms": ("<=", 20.0),
    "get_job_p50_ms": ("<=", 2.0),
    "health_ratio": (">=", 0.9),
    "drain_jobs_per_s": (">=", 50.0),
}


class Profile:
    """py-spy recording one process while a phase runs (--profile DIR): collapsed stacks,
    one file per phase, to read with any flame graph tool or `sort | uniq`."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.py_spy = shutil.which("py-spy")
        if directory is not None and self.py_spy is None:
            raise run.BenchError("--profile needs py-spy: `uv tool install py-spy`")

    @contextlib.asynccontextmanager
    async def phase(self, name: str, pid: int) -> AsyncIterator[None]:
        if self.directory is None or self.py_spy is None:
            yield
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        out = self.directory / f"{name}.txt"
        argv = [self.py_spy, "record", "--pid", str(pid), "--rate", "500", "--format", "raw"]
        proc = subprocess.Popen(
            [*argv, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        await asyncio.sleep(0.5)  # attached
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            await asyncio.to_thread(proc.wait, 60)


class Floor:
    """bench/floor_app.py under uvicorn, started like the server."""

    def __init__(self, root: Path) -> None:
        self.port = run.free_port()
        self.log_path = root / "floor.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = run.Http(self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> Floor:
        command = [run.PY, "-m", "uvicorn", "floor_app:app", "--host", "127.0.0.1"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*command, "--port", str(self.port)],
                cwd=BENCH_DIR,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _ = await self.http.request("GET", "/health", timeout_s=5)
                if status == 200:
                    return self
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                await self.http.close()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise run.BenchError(f"floor app did not start: {self.log_path.read_text()}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.proc.wait, 30)


async def hammer(
    port: int, method: str, path: str, body: bytes | None, n: int, clients: int
) -> tuple[float, list[float]]:
    """n requests from `clients` keep-alive connections: (seconds in all, latencies in ms)."""
    remaining = n
    latencies: list[float] = []

    async def worker() -> None:
        nonlocal remaining
        http = run.Http(port)
        try:
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                status, data = await http.request(method, path, body)
                latencies.append((time.perf_counter() - started) * 1000)
                if status != 200:
                    raise run.BenchError(f"{method} {path} answered {status}: {data[:300]!r}")
        finally:
            await http.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(clients, n))))
    return time.perf_counter() - started, latencies


@dataclass
class Load:
    """One side's figures for one kind of request: rates, latencies and CPU per request."""

    rates: list[float]
    p50s: list[float]
    cpu_ms: list[float]

    @classmethod
    def empty(cls) -> Load:
        return cls([], [], [])


async def measure_load(
    target: Any, method: str, path: str, body: bytes | None, n: int, clients: int, into: Load
) -> None:
    cpu_before = run.cpu_s(target.pid)[0]
    elapsed, latencies = await hammer(target.port, method, path, body, n, clients)
    into.rates.append(n / elapsed)
    into.p50s.append(run.percentile(latencies, 50))
    into.cpu_ms.append((run.cpu_s(target.pid)[0] - cpu_before) / n * 1000)


async def sequential_ms(http: Any, path: str, n: int) -> list[float]:
    return await run.timed(http, path, n)


async def fill(srv: Any, sizes: Sizes) -> int:
    """At least sizes.jobs jobs: half of them (or more) finished (stopped), then sizes.jobs // 2
    queued behind a new sleeper. Returns the sleeper holding the slot (the job with logs)."""
    listing = await srv.http.json("GET", "/jobs?limit=0")
    half = sizes.jobs // 2
    if listing["total"] < half:
        await run.post_many(srv.port, run.job_body(), half - listing["total"], sizes.clients)
    await srv.http.json("POST", "/jobs/stop", b"")
    sleeper = await run.start_sleeper(srv.http)
    await run.post_many(srv.port, run.job_body(), half, sizes.clients)
    return int(sleeper)


async def drain(
    ctx_root: Path,
    index_dir: Path,
    paths: list[str],
    n: int,
    phase: Any,
    name: str,
    **env: str,
) -> Any:
    """n trivial jobs through MAX_CONCURRENCY=4 on a fresh server (bench/run.py's drain)."""
    srv = run.Server(ctx_root, index_dir, paths, MAX_CONCURRENCY="4", **env)
    await srv.start()
    try:
        cpu_before = run.cpu_s(srv.pid)
        first_post = time.time()
        async with phase(name, srv.pid):
            _, ids = await run.post_many(srv.port, run.job_body(lm_eval_path=run.TRUE), n, 8)
            await run.wait_idle(srv.http, interval_s=0.2)
        cpu_after = run.cpu_s(srv.pid)
        wanted = set(ids)
        jobs = [j for j in (await srv.http.json("GET", "/jobs"))["jobs"] if j["job_id"] in wanted]
        bad = [j for j in jobs if j["status"] != "Completed"]
        if len(jobs) != n or bad:
            raise run.BenchError(f"{len(bad)} drain jobs did not complete, e.g. {bad[:1]}")
        last = max(run.finished_at(j) for j in jobs)
        return {
            "jobs_per_s": n / (last - first_post),
            "server_cpu_ms": (cpu_after[0] - cpu_before[0]) / n * 1000,
        }
    finally:
        await srv.stop()


# What each side answers in a round: (figure key, method, path).
FLOOR_PLAN = [("floor_post", "POST", "/job"), ("floor_get", "GET", "/health")]
SERVER_PLAN = [("post", "POST", "/job"), ("health", "GET", "/health"), ("docs", "GET", "/docs")]


async def measure(args: argparse.Namespace, sizes: Sizes, tmp: Path) -> dict[str, Any]:
    run.ensure_index(args.index_dir)
    paths = [run.DEFAULT_LM_EVAL, run.FAKE_LM_EVAL, run.TRUE]
    env = {"MAX_CONCURRENCY": "1", "MAX_QUEUED_JOBS": "1000000"}
    (tmp / "server").mkdir()
    srv = run.Server(tmp / "server", args.index_dir, paths, **env)
    floor = Floor(tmp)
    loads = {key: Load.empty() for key in ("floor_post", "post", "floor_get", "health", "docs")}
    out: dict[str, Any] = {}
    profile = Profile(args.profile)
    try:
        await asyncio.gather(srv.start(), floor.start())
        await run.start_sleeper(srv.http)
        body = run.job_body()
        # Warm-up: connections, first-request imports, the page cache.
        warmup = min(50, sizes.posts)
        await hammer(srv.port, "POST", "/job", body, warmup, sizes.clients)
        await hammer(floor.port, "POST", "/job", body, warmup, sizes.clients)
        for round_index in range(sizes.rounds):
            sides = [("floor", floor), ("server", srv)]
            if round_index % 2:
                sides.reverse()
            for side, target in sides:
                plan = FLOOR_PLAN if side == "floor" else SERVER_PLAN
                for key, method, path in plan:
                    payload = body if method == "POST" else None
                    n = sizes.posts if method == "POST" else sizes.gets
                    async with profile.phase(f"{key}-{round_index + 1}", target.pid):
                        await measure_load(
                            target, method, path, payload, n, sizes.clients, loads[key]
                        )
            print(f"round {round_index + 1}/{sizes.rounds}, load {run.loadavg()}", flush=True)
        sleeper = await fill(srv, sizes)
        listing = await srv.http.json("GET", "/jobs")
        counts: dict[str, int] = {}
        for job in listing["jobs"]:
            counts[job["status"]] = counts.get(job["status"], 0) + 1
        out["listed"] = {"total": listing["total"], "by_status": counts}
        page = "/jobs?status=Queued&limit=50&offset=100"
        await sequential_ms(srv.http, "/jobs", 2)  # warm-up
        floor_ms: list[float] = []
        list_ms: list[float] = []
        page_ms: list[float] = []
        get_ms: list[float] = []
        cpu_list: list[float] = []
        for round_index in range(sizes.rounds):
            floor_ms += await sequential_ms(floor.http, "/health", sizes.get_requests)
            cpu_before = run.cpu_s(srv.pid)[0]
            async with profile.phase(f"list-{round_index + 1}", srv.pid):
                list_ms += await sequential_ms(srv.http, "/jobs", sizes.list_requests)
            cpu_list.append((run.cpu_s(srv.pid)[0] - cpu_before) / sizes.list_requests * 1000)
            page_ms += await sequential_ms(srv.http, page, sizes.get_requests)
            get_ms += await sequential_ms(srv.http, f"/job/{sleeper}", sizes.get_requests)
        # The floor for the listing: the same number of bytes, already in memory.
        size = len((await srv.http.request("GET", "/jobs"))[1])
        bytes_ms = await sequential_ms(floor.http, f"/bytes/{size}", sizes.list_requests)
        out["latency"] = {
            "floor_bytes_p50_ms": run.percentile(bytes_ms, 50),
            "list_bytes": size,
            "floor_get_p50_ms": run.percentile(floor_ms, 50),
            "list_all_p50_ms": run.percentile(list_ms, 50),
            "list_all_cpu_ms": statistics.median(cpu_list),
            "list_page_p50_ms": run.percentile(page_ms, 50),
            "get_job_p50_ms": run.percentile(get_ms, 50),
        }
        await srv.http.json("POST", "/jobs/stop", b"")
    finally:
        await asyncio.gather(srv.stop(), floor.stop(), return_exceptions=True)
    out["loads"] = {k: v.__dict__ for k, v in loads.items()}
    out["drain"] = {}
    for name, extra in (("default", {}), ("sandbox_off", {"SANDBOX": "off"})):
        root = tmp / f"drain-{name}"
        root.mkdir()
        out["drain"][name] = await drain(
            root, args.index_dir, paths, sizes.drain, profile.phase, f"drain-{name}", **extra
        )
    return out


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    loads = {
        k: {m: statistics.median(v) for m, v in load.items()} for k, load in raw["loads"].items()
    }

    # Ratios within each round (both sides measured back to back), then their median.
    def ratio(server: str, floor: str, metric: str = "rates") -> float:
        pairs = zip(raw["loads"][server][metric], raw["loads"][floor][metric], strict=True)
        # A --quick run's CPU can round to zero clock ticks.
        return statistics.median(s / f if f else math.nan for s, f in pairs)

    lat = raw["latency"]
    floor_ms = lat["floor_get_p50_ms"]
    figures = {
        "post_per_s": loads["post"]["rates"],
        "floor_post_per_s": loads["floor_post"]["rates"],
        "post_ratio": ratio("post", "floor_post"),
        "post_cpu_ms": loads["post"]["cpu_ms"],
        "floor_post_cpu_ms": loads["floor_post"]["cpu_ms"],
        "post_cpu_ratio": ratio("post", "floor_post", "cpu_ms"),
        "health_per_s": loads["health"]["rates"],
        "floor_get_per_s": loads["floor_get"]["rates"],
        "health_ratio": ratio("health", "floor_get"),
        "health_cpu_ms": loads["health"]["cpu_ms"],
        "floor_get_cpu_ms": loads["floor_get"]["cpu_ms"],
        "health_cpu_ratio": ratio("health", "floor_get", "cpu_ms"),
        "docs_per_s": loads["docs"]["rates"],
        "docs_ratio": ratio("docs", "floor_get"),
        "floor_get_p50_ms": floor_ms,
        "list_all_p50_ms": lat["list_all_p50_ms"],
        "floor_bytes_p50_ms": lat["floor_bytes_p50_ms"],
        "list_all_cpu_ms": lat["list_all_cpu_ms"],
        "list_page_p50_ms": lat["list_page_p50_ms"],
        "get_job_p50_ms": lat["get_job_p50_ms"],
        "drain_jobs_per_s": raw["drain"]["default"]["jobs_per_s"],
        "drain_server_cpu_ms": raw["drain"]["default"]["server_cpu_ms"],
        "drain_off_jobs_per_s": raw["drain"]["sandbox_off"]["jobs_per_s"],
        "drain_off_server_cpu_ms": raw["drain"]["sandbox_off"]["server_cpu_ms"],
    }
    return figures


ROWS = [
    # (label, server figure, floor figure or None, unit, ratio figure or None)
    ("POST /job", "post_per_s", "floor_post_per_s", "req/s", "post_ratio"),
    ("  server CPU per POST", "post_cpu_ms", "floor_post_cpu_ms", "ms", "post_cpu_ratio"),
    ("GET /health (trivial route)", "health_per_s", "floor_get_per_s", "req/s", "health_ratio"),
    ("  server CPU per GET", "health_cpu_ms", "floor_get_cpu_ms", "ms", "health_cpu_ratio"),
    ("GET /docs", "docs_per_s", "floor_get_per_s", "req/s", "docs_ratio"),
    ("GET /jobs, all, p50 (floor: same size)", "list_all_p50_ms", "floor_bytes_p50_ms", "ms", None),
    ("  server CPU per GET /jobs", "list_all_cpu_ms", None, "ms", None),
    ("GET /jobs?status=Queued&limit=50, p50", "list_page_p50_ms", "floor_get_p50_ms", "ms", None),
    ("GET /job/{id} (~300 log lines), p50", "get_job_p50_ms", "floor_get_p50_ms", "ms", None),
    ("drain, trivial jobs, MAX_CONCURRENCY=4", "drain_jobs_per_s", None, "jobs/s", None),
    ("  server CPU per drained job", "drain_server_cpu_ms", None, "ms", None),
    ("drain with SANDBOX=off", "drain_off_jobs_per_s", None, "jobs/s", None),
    ("  server CPU per drained job", "drain_off_server_cpu_ms", None, "ms", None),
]


def _target(name: str, value: float) -> str:
    if name not in TARGETS:
        return ""
    op, bound = TARGETS[name]
    met = value >= bound if op == ">=" else value <= bound
    return f"{op} {run.fmt(bound)}: {'yes' if met else 'NO'}"


def table(figures: dict[str, Any]) -> str:
    rows = [("figure", "server", "floor", "ratio", "target")]
    for label, name, floor_name, unit, ratio_name in ROWS:
        value = figures[name]
        floor_value = figures[floor_name] if floor_name else None
        if ratio_name:
            ratio = figures[ratio_name]
        elif floor_value:
            ratio = value / floor_value
        else:
            ratio = None
        target_name = ratio_name if ratio_name in TARGETS else name
        target_value = figures[target_name]
        rows.append(
            (
                label,
                f"{run.fmt(value)} {unit}",
                f"{run.fmt(floor_value)} {unit}" if floor_value is not None else "-",
                f"{ratio:.3f}x" if ratio is not None else "-",
                _target(target_name, target_value),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=run.OUT_DIR / "hot_paths.json")
    parser.add_argument("--index-dir", type=Path, default=run.OUT_DIR / "index")
    parser.add_argument(
        "--profile", type=Path, default=None, help="record each phase with py-spy into DIR"
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = Sizes(**{**sizes.__dict__, "rounds": args.rounds})
    args.index_dir = args.index_dir.resolve()
    args.out = args.out.resolve()
    load_before = run.loadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lm-eval-hot-") as tmp:
        try:
            raw = asyncio.run(measure(args, sizes, Path(tmp)))
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
    figures = summarise(raw)
    results = {
        "mode": "quick" if args.quick else "full",
        "sizes": sizes.__dict__,
        "machine": run.machine(),
        "loadavg_before": load_before,
        "loadavg_after": run.loadavg(),
        "seconds": round(time.monotonic() - started, 1),
        "figures": figures,
        "raw": raw,
        "cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(figures))
    print(f"\nlisted: {raw['listed']}")
    print(f"load average before {load_before}, after {results['loadavg_after']}; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
