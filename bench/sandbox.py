"""What the job sandbox costs per job (issue 20): SANDBOX=bwrap against SANDBOX=off, in one run.

    uv run python bench/sandbox.py [--quick] [--rounds N] [--dispatch N] [--jobs N] [--out FILE]

Starts two real servers the way bench/run.py does (`python -m uvicorn src.main:app`, the task
index cache in bench/out/index), one with SANDBOX=bwrap and one with SANDBOX=off, and measures
them alternately, round by round, so that both see the same machine:

- dispatch: POST /job sent -> the job's command has started (bench/stamp.c writes the time it
  starts; an allowlisted lm_eval_path), p50 and p99 over sequential jobs;
- lm_eval: a real `lm_eval` run (the dummy model on examples/tasks' demo_mc, limit 10), from
  POST /job to Completed: the start-up a user waits for (imports, the task index, the run).

Prints one table with both sides and their ratio (sandbox / off; target for the real run:
<= 1.10). Everything goes to bench/out/sandbox.json with the machine and its load average.
--quick (tests/test_bench.py) runs one tiny round: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shlex
import sys
import tempfile
import time
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
MODES = ("bwrap", "off")
LM_EVAL_TARGET_RATIO = 1.10
LM_EVAL_BODY = {
    "model": "dummy",
    "tasks": "demo_mc",
    "include_path": str(run.EXAMPLES_TASKS),
    "limit": 10,
}


async def dispatch_ms(srv: Any, stamp_cmd: list[str], n: int) -> list[float]:
    body = run.job_body(lm_eval_path=shlex.join(stamp_cmd))
    latencies = []
    for _ in range(n):
        await run.wait_idle(srv.http, interval_s=0.002)
        sent = time.monotonic_ns()
        job = await srv.http.json("POST", "/job", body)
        started = await run.read_stamp(srv.job_dir(int(job["job_id"])) / "stamp")
        latencies.append((started - sent) / 1e6)
    await run.wait_idle(srv.http)
    return latencies


async def lm_eval_s(srv: Any, n: int) -> list[float]:
    body = json.dumps(LM_EVAL_BODY).encode()
    return [(await run.via_server(srv, body))[0] for _ in range(n)]


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    run.ensure_index(args.index_dir)
    stamp_cmd = run.prepare_stamp(args.out.parent)
    paths = [run.DEFAULT_LM_EVAL, shlex.join(stamp_cmd)]
    servers = {
        mode: run.Server(tmp / mode, args.index_dir, paths, SANDBOX=mode, MAX_CONCURRENCY="1")
        for mode in MODES
    }
    samples: dict[str, dict[str, list[float]]] = {m: {"dispatch": [], "lm_eval": []} for m in MODES}
    try:
        for srv in servers.values():
            await srv.start()
        for mode, srv in servers.items():
            ready = await srv.http.json("GET", "/ready")
            if ready["sandbox"]["mode"] != mode:
                raise run.BenchError(f"SANDBOX={mode} server runs {ready['sandbox']}")
            await dispatch_ms(srv, stamp_cmd, 2)  # warm-up: page cache, first connections
        for round_index in range(args.rounds):
            order = MODES if round_index % 2 == 0 else MODES[::-1]
            for mode in order:
                srv = servers[mode]
                samples[mode]["dispatch"] += await dispatch_ms(srv, stamp_cmd, args.dispatch)
                samples[mode]["lm_eval"] += await lm_eval_s(srv, args.jobs)
    finally:
        for srv in servers.values():
            await srv.stop()
    return samples


def figures(samples: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, unit, quantiles in (("dispatch", "ms", (50, 99)), ("lm_eval", "s", (50,))):
        for q in quantiles:
            on = run.percentile(samples["bwrap"][name], q)
            off = run.percentile(samples["off"][name], q)
            rows[f"{name}_p{q}"] = {"unit": unit, "bwrap": on, "off": off, "ratio": on / off}
    return rows


def table(rows: dict[str, Any]) -> str:
    lines = [f"{'figure':<14} {'SANDBOX=bwrap':>14} {'SANDBOX=off':>12} {'ratio':>7}"]
    for name, row in rows.items():
        unit = row["unit"]
        lines.append(
            f"{name:<14} {run.fmt(row['bwrap']) + ' ' + unit:>14} "
            f"{run.fmt(row['off']) + ' ' + unit:>12} {row['ratio']:>7.3f}"
        )
    ratio = rows["lm_eval_p50"]["ratio"]
    met = "met" if ratio <= LM_EVAL_TARGET_RATIO else "NOT met"
    lines.append(f"lm_eval run with the sandbox / without: {ratio:.3f} (target <= 1.10: {met})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny round (a smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dispatch", type=int, default=30, help="dispatch jobs per round")
    parser.add_argument("--jobs", type=int, default=3, help="lm_eval jobs per round")
    parser.add_argument("--out", type=Path, default=run.OUT_DIR / "sandbox.json")
    parser.add_argument("--index-dir", type=Path, default=run.OUT_DIR / "index")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.dispatch, args.jobs = 1, 2, 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load_before = run.loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        samples = asyncio.run(measure(args, Path(tmp)))
    rows = figures(samples)
    print(table(rows))
    result = {
        "mode": "quick" if args.quick else "full",
        "rounds": args.rounds,
        "figures": rows,
        "samples": samples,
        "machine": run.machine(),
        "loadavg_before": load_before,
        "loadavg_after": run.loadavg(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
