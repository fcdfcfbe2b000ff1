"""What the response cache saves (issue 21): a repeat and a resume from 50 % against a fresh run.

    uv run python bench/resume_cache.py [--quick] [--docs N] [--delay-s S] [--no-hf] [--out FILE]

Starts one real server the way bench/run.py does (`python -m uvicorn src.main:app`, the task
index cache in bench/out/index) and, per backend, runs the same evaluation three ways:

- fresh: a model fingerprint nobody has used (a new completions server, a new copy of the model);
- repeat: the same job again, after the fresh one completed;
- resume: another new fingerprint, stopped once half its requests are answered, then resumed
  (POST /job/{id}/resume); the figures are the resumed attempt's.

Backends: the test completions server (tests/support/completions_server.py) with a per-request
delay, on arith_gen (one generate_until request per doc); and the tiny GPT-2 the tests build
(tests/support/tiny_model.py, `hf` on CPU), on arith_gen, skipped without torch or with --no-hf.

"model time" is the seconds the job spent answering requests (the response cache's own
`answer_s`: lookups, the model's calls and stores, written to the job's response-cache.json);
"wall" is the job's duration_s (interpreter start, imports and task loading included, which no
cache removes). Targets: repeat <= 5 % and resume from 50 % <= 60 % of a fresh run's model time.
Everything goes to bench/out/resume_cache.json. --quick (tests/test_bench.py) runs tiny sizes:
its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.support: the completions server and the tiny model

from tests.support.completions_server import model_args_for, running_stub_server  # noqa: E402

from lm_eval_server.admission.fingerprint import model_fingerprint  # noqa: E402


def _load_run() -> ModuleType:
    """bench/run.py (servers, the HTTP client), imported by path."""
    spec = importlib.util.spec_from_file_location("bench_run", BENCH_DIR / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run = _load_run()
TEST_TASKS = ROOT / "tests" / "data" / "tasks"
TASK = "arith_gen"
REPEAT_TARGET = 0.05
RESUME_TARGET = 0.60
STATS_FILE = "response-cache.json"


def job_stats(job_dir: Path) -> dict[str, Any]:
    return json.loads((job_dir / STATS_FILE).read_text())


async def finish(srv: Any, job_id: int) -> dict[str, Any]:
    await run.wait_status(srv.http, job_id, {"Completed", "Failed", "Stopped"}, timeout_s=1800)
    job = await run.check_completed(srv.http, job_id)
    stats = job_stats(srv.job_dir(job_id))
    return {
        "model_s": stats["answer_s"],
        "wall_s": job["duration_s"],
        "hits": job["cache"]["hits"],
        "misses": job["cache"]["misses"],
    }


async def post(srv: Any, body: dict[str, Any]) -> int:
    return int((await srv.http.json("POST", "/job", json.dumps(body).encode()))["job_id"])


async def stop_at(srv: Any, job_id: int, answered: Any, half: int) -> None:
    deadline = time.monotonic() + 1800
    while answered() < half:
        if time.monotonic() > deadline:
            raise run.BenchError(f"job {job_id} never reached {half} answered requests")
        await asyncio.sleep(0.01)
    await srv.http.json("POST", f"/job/{job_id}/stop", b"")


async def three_ways(
    srv: Any, fresh_body: dict[str, Any], resume_body: dict[str, Any], answered: Any, docs: int
) -> dict[str, Any]:
    fresh = await finish(srv, await post(srv, fresh_body))
    repeat = await finish(srv, await post(srv, fresh_body))
    job_id = await post(srv, resume_body)
    await stop_at(srv, job_id, answered, docs // 2)
    await run.wait_status(srv.http, job_id, {"Stopped"}, timeout_s=120)
    await srv.http.json("POST", f"/job/{job_id}/resume", b"")
    resume = await finish(srv, job_id)
    return {"fresh": fresh, "repeat": repeat, "resume": resume}


async def completions(srv: Any, docs: int, delay_s: float) -> dict[str, Any]:
    with running_stub_server(delay_s=delay_s) as first, running_stub_server(delay_s=delay_s) as b:

        def body(base_url: str) -> dict[str, Any]:
            return {
                "model": "local-completions",
                "model_args": model_args_for(base_url),
                "tasks": TASK,
                "include_path": str(TEST_TASKS),
                "limit": docs,
            }

        result = await three_ways(
            srv, body(first.base_url), body(b.base_url), lambda: b.request_count, docs
        )
        result["model_requests"] = {"first": first.request_count, "resumed": b.request_count}
        return result


def rows(data_dir: Path, model_args: str) -> int:
    """Answers stored so far in the response cache file of this hf model (the job's owner is
    `default`: the server has no keys)."""
    fp = model_fingerprint("default", "hf", model_args, importlib.metadata.version("lm_eval"))
    files = list(data_dir.rglob(f"{fp}.sqlite"))
    if not files:
        return 0
    try:
        db = sqlite3.connect(f"file:{files[0]}?mode=ro", uri=True, timeout=5)
        try:
            return int(db.execute("SELECT count(*) FROM responses").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


async def hf(srv: Any, models: Path, docs: int) -> dict[str, Any]:
    from tests.support.tiny_model import build_model

    first = models / "tiny-gpt2"
    first.mkdir(parents=True)
    build_model(first)
    second = models / "tiny-gpt2-copy"  # the same weights, another fingerprint
    shutil.copytree(first, second)

    def body(path: Path) -> dict[str, Any]:
        return {
            "model": "hf",
            "model_args": f"pretrained={path},dtype=float32",
            "device": "cpu",
            "tasks": TASK,
            "include_path": str(TEST_TASKS),
            "limit": docs,
        }

    resumed = body(second)
    return await three_ways(
        srv, body(first), resumed, lambda: rows(srv.data_dir, resumed["model_args"]), docs
    )


def figures(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows_: dict[str, Any] = {}
    for backend, r in results.items():
        fresh = r["fresh"]
        for way, target in (("repeat", REPEAT_TARGET), ("resume", RESUME_TARGET)):
            ratio = r[way]["model_s"] / fresh["model_s"] if fresh["model_s"] else float("nan")
            rows_[f"{backend}_{way}"] = {
                "model_s": r[way]["model_s"],
                "fresh_model_s": fresh["model_s"],
                "model_ratio": ratio,
                "wall_s": r[way]["wall_s"],
                "fresh_wall_s": fresh["wall_s"],
                "wall_ratio": r[way]["wall_s"] / fresh["wall_s"],
                "hits": r[way]["hits"],
                "misses": r[way]["misses"],
                "target": target,
                "met": ratio <= target,
            }
    return rows_


def table(rows_: dict[str, Any]) -> str:
    head = f"{'figure':<22} {'model s':>9} {'fresh':>9} {'ratio':>7} {'wall s':>8} {'fresh':>8}"
    lines = [head + f" {'ratio':>6} {'hits':>5} {'miss':>5}  target"]
    for name, row in rows_.items():
        met = "met" if row["met"] else "NOT met"
        lines.append(
            f"{name:<22} {row['model_s']:>9.3f} {row['fresh_model_s']:>9.3f} "
            f"{row['model_ratio']:>7.3f} {row['wall_s']:>8.2f} {row['fresh_wall_s']:>8.2f} "
            f"{row['wall_ratio']:>6.3f} {row['hits']:>5} {row['misses']:>5}  "
            f"<= {row['target']:.2f} {met}"
        )
    return "\n".join(lines)


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    run.ensure_index(args.index_dir)
    models = tmp / "models"
    srv = run.Server(
        tmp / "server",
        args.index_dir,
        [run.DEFAULT_LM_EVAL],
        ALLOWED_PATHS=f"{tmp / 'server' / 'data'},{ROOT / 'examples'},{TEST_TASKS},{models}",
        MAX_CONCURRENCY="1",
    )
    results: dict[str, Any] = {}
    try:
        await srv.start()
        results["completions"] = await completions(srv, args.docs, args.delay_s)
        if args.hf:
            results["hf"] = await hf(srv, models, args.docs)
    finally:
        await srv.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--docs", type=int, default=200, help="arith_gen docs (requests)")
    parser.add_argument("--delay-s", type=float, default=0.05, help="completions server delay")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the tiny GPT-2")
    parser.add_argument("--out", type=Path, default=run.OUT_DIR / "resume_cache.json")
    parser.add_argument("--index-dir", type=Path, default=run.OUT_DIR / "index")
    args = parser.parse_args(argv)
    if args.quick:
        args.docs, args.delay_s, args.hf = 10, 0.02, False
    if args.hf and importlib.util.find_spec("torch") is None:
        print("torch is not installed: the hf backend is skipped (uv sync --extra hf)")
        args.hf = False
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load_before = run.loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        results = asyncio.run(measure(args, Path(tmp)))
    rows_ = figures(results)
    print(table(rows_))
    out = {
        "mode": "quick" if args.quick else "full",
        "docs": args.docs,
        "delay_s": args.delay_s,
        "figures": rows_,
        "runs": results,
        "machine": run.machine(),
        "loadavg_before": load_before,
        "loadavg_after": run.loadavg(),
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
