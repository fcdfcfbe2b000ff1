"""/health latency while hostile POST /job floods run (issue 12, item 7).

    uv run python bench/floods.py [--quick] [--seconds S] [--clients N] [--out FILE]

Starts one real server the way bench/run.py does (`python -m uvicorn src.main:app`, default
settings, the task index cache in bench/out/index), then for each flood sends that body back
to back from --clients connections for --seconds while one more connection asks GET /health
every 10 ms. Prints one table: the flood's answer, how many were sent and their p50, the
server's CPU per flood request, and /health p50/p99/max during the flood (target: p99 <= 50 ms).
A first row measures /health with no flood. Everything goes to bench/out/floods.json with the
machine and its load average: on a shared machine read the figures with the load beside them.

--quick (the smoke test in tests/test_bench.py) runs each flood for a moment from one client,
with include_path trees of hundreds of directories (MAX_INCLUDE_ENTRIES=500): its figures mean
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shutil
import sys
import tempfile
import time
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
HEALTH_P99_TARGET_MS = 50.0
PROBE_INTERVAL_S = 0.01
MAX_BODY_BYTES = 1024 * 1024  # the server's default MAX_BODY_BYTES


@dataclass(frozen=True)
class Flood:
    name: str
    body: bytes
    expect: int  # the status every answer must have
    about: str


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def floods(scratch: Path, include_cap: int) -> list[Flood]:
    """The flood bodies; the include_path ones are made around `include_cap` directories."""
    job = {"model": "dummy", "tasks": "demo_mc", "include_path": str(run.EXAMPLES_TASKS)}
    over = scratch / "include-over"
    for i in range(include_cap + include_cap // 200 + 1):
        (over / f"d{i:05d}").mkdir(parents=True)
    under = scratch / "include-under"
    for i in range(include_cap * 9 // 10):
        (under / f"d{i:05d}").mkdir(parents=True)
    names = ",".join(f"task_{i:06d}" for i in range(200_000))
    tasks_body = compact({**job, "tasks": ""})
    room = MAX_BODY_BYTES - len(tasks_body) - 64
    fields = compact({f"f{i}": 1 for i in range(80_000)})
    assert len(fields) <= MAX_BODY_BYTES
    return [
        Flood(
            "unknown_tasks_300",
            compact({**job, "tasks": [f"zz_unknown_{i}" for i in range(300)]}),
            422,
            "300 unknown task names (close matches for the first 5)",
        ),
        Flood("unknown_fields_80k", fields, 422, "80,000 unknown fields, 1 MB"),
        Flood(
            "include_over_cap",
            compact({**job, "include_path": str(over)}),
            422,
            f"include_path with {include_cap + include_cap // 200 + 1:,} directories "
            f"(over MAX_INCLUDE_ENTRIES={include_cap:,})",
        ),
        Flood(
            "include_under_cap",
            compact({**job, "tasks": "zz_no_such_task", "include_path": str(under)}),
            422,
            f"include_path with {include_cap * 9 // 10:,} directories, walked in full "
            "(in a thread) on every request",
        ),
        Flood(
            "task_names_1mb",
            compact({**job, "tasks": names[:room]}),
            422,
            "1 MB of comma-separated task names (over MAX_TASKS_PER_REQUEST)",
        ),
        Flood(
            "nested_1mb",
            compact({**job, "metadata": 0}).replace(
                b'"metadata":0', b'"metadata":' + b"[" * 400_000 + b"]" * 400_000
            ),
            422,
            "1 MB of nested arrays (over MAX_BODY_DEPTH)",
        ),
    ]


async def probe_health(port: int, stop: asyncio.Event) -> list[float]:
    http = run.Http(port)
    latencies: list[float] = []
    try:
        while not stop.is_set():
            started = time.perf_counter()
            status, _ = await http.request("GET", "/health", timeout_s=30)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise run.BenchError(f"/health answered {status}")
            await asyncio.sleep(PROBE_INTERVAL_S)
    finally:
        await http.close()
    return latencies


async def probe_main(port: int) -> None:
    """`floods.py --probe PORT`: probe /health until stdin closes, then print the latencies.

    The prober is a process of its own so that the flood client (writing megabytes) cannot
    delay it: what it measures is the server.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)
    print("ready", flush=True)
    latencies = await probe_health(port, stop)
    print(json.dumps(latencies))


async def probe_in_process(port: int, started: asyncio.Event, stop: asyncio.Event) -> list[float]:
    proc = await asyncio.create_subprocess_exec(
        run.PY,
        __file__,
        "--probe",
        str(port),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    await proc.stdout.readline()
    started.set()
    await stop.wait()
    out, _ = await proc.communicate(b"stop\n")
    if proc.returncode != 0:
        raise run.BenchError(f"the /health prober failed ({proc.returncode})")
    return [float(x) for x in json.loads(out)]


async def send_flood(
    port: int, flood: Flood, until: float, clients: int
) -> tuple[list[float], set[int]]:
    latencies: list[float] = []
    statuses: set[int] = set()

    async def client() -> None:
        http = run.Http(port)
        try:
            while time.monotonic() < until or not latencies:
                started = time.perf_counter()
                status, data = await http.request("POST", "/job", flood.body, timeout_s=120)
                latencies.append(time.perf_counter() - started)
                statuses.add(status)
                if status != flood.expect:
                    raise run.BenchError(f"{flood.name}: answered {status}: {data[:300]!r}")
        finally:
            await http.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, statuses


async def measure(srv: Any, flood: Flood | None, seconds: float, clients: int) -> dict[str, Any]:
    stop = asyncio.Event()
    started = asyncio.Event()
    probe = asyncio.create_task(probe_in_process(srv.port, started, stop))
    await asyncio.wait([probe, asyncio.create_task(started.wait())], return_when="FIRST_COMPLETED")
    if probe.done():
        await probe  # it failed to start: its error
    cpu_before = sum(run.cpu_s(srv.pid))
    sent: list[float] = []
    statuses: set[int] = set()
    try:
        if flood is None:
            await asyncio.sleep(seconds)
        else:
            sent, statuses = await send_flood(srv.port, flood, time.monotonic() + seconds, clients)
    finally:
        stop.set()
        health = await probe
    cpu = sum(run.cpu_s(srv.pid)) - cpu_before
    ms = [x * 1000 for x in health]
    return {
        "flood": flood.name if flood else "none",
        "about": flood.about if flood else "no flood: /health alone",
        "body_bytes": len(flood.body) if flood else 0,
        "status": sorted(statuses),
        "requests": len(sent),
        "request_p50_ms": run.percentile([x * 1000 for x in sent], 50) if sent else None,
        "server_cpu_ms_per_request": cpu * 1000 / len(sent) if sent else None,
        "health_samples": len(ms),
        "health_p50_ms": run.percentile(ms, 50),
        "health_p99_ms": run.percentile(ms, 99),
        "health_max_ms": max(ms),
        "met": run.percentile(ms, 99) <= HEALTH_P99_TARGET_MS,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "flood",
        "answer",
        "sent",
        "req p50",
        "cpu/req",
        "/health p50",
        "p99",
        "max",
        "p99<=50ms",
    )
    lines = [head]
    for row in rows:
        lines.append(
            (
                row["flood"],
                ",".join(map(str, row["status"])) or "-",
                str(row["requests"]),
                f"{run.fmt(row['request_p50_ms'])} ms" if row["requests"] else "-",
                f"{run.fmt(row['server_cpu_ms_per_request'])} ms" if row["requests"] else "-",
                f"{run.fmt(row['health_p50_ms'])} ms",
                f"{run.fmt(row['health_p99_ms'])} ms",
                f"{run.fmt(row['health_max_ms'])} ms",
                "yes" if row["met"] else "NO",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in lines
    )


async def run_floods(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lm-eval-floods-") as tmp:
        scratch = Path(tmp)
        print("making the flood bodies ...", flush=True)
        bodies = floods(scratch, args.include_cap)
        srv = run.Server(
            scratch / "server",
            args.index_dir,
            [run.DEFAULT_LM_EVAL],
            MAX_INCLUDE_ENTRIES=str(args.include_cap),
        )
        srv.env["ALLOWED_PATHS"] += f",{scratch}"
        try:
            await srv.start()
            # Warm-up: the suggestion index is built on the first unknown task name, once.
            await send_flood(srv.port, bodies[0], 0, 1)
            for flood in [None, *bodies]:
                name = flood.name if flood else "none"
                print(f"{name} ...", end="", flush=True)
                row = await measure(srv, flood, args.seconds, 1 if flood is None else args.clients)
                rows.append(row)
                print(
                    f" /health p99 {run.fmt(row['health_p99_ms'])} ms, load {run.loadavg()}",
                    flush=True,
                )
            jobs = await srv.http.json("GET", "/jobs?limit=0")
            if jobs["total"]:
                raise run.BenchError(f"a flood queued {jobs['total']} job(s)")
        finally:
            await srv.stop()
            shutil.rmtree(scratch / "server", ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a moment per flood (smoke test)")
    parser.add_argument("--seconds", type=float, default=None, help="per flood (default 5)")
    parser.add_argument("--clients", type=int, default=None, help="flood connections (2)")
    parser.add_argument("--out", type=Path, default=run.OUT_DIR / "floods.json")
    parser.add_argument("--index-dir", type=Path, default=run.OUT_DIR / "index")
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        asyncio.run(probe_main(args.probe))
        return 0
    args.seconds = args.seconds or (0.3 if args.quick else 5.0)
    args.clients = args.clients or (1 if args.quick else 2)
    # The default MAX_INCLUDE_ENTRIES; --quick makes its include_path trees small.
    args.include_cap = 500 if args.quick else 10_000
    args.index_dir = args.index_dir.resolve()
    run.ensure_index(args.index_dir)
    load_before = run.loadavg()
    rows = asyncio.run(run_floods(args))
    results = {
        "mode": "quick" if args.quick else "full",
        "seconds_per_flood": args.seconds,
        "clients": args.clients,
        "machine": run.machine(),
        "loadavg_before": load_before,
        "loadavg_after": run.loadavg(),
        "target": f"/health p99 <= {HEALTH_P99_TARGET_MS} ms",
        "floods": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(rows))
    for row in rows:
        print(f"  {row['flood']}: {row['about']}")
    print(f"\nload average before {load_before}, after {results['loadavg_after']}; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
