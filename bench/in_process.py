"""The server's hot routes called in process: the app's own objects, no uvicorn, no sockets.

    uv run python bench/in_process.py [--n N] [--rounds R] [--profile FILE]

Builds the app the way `src.main` does (settings from the environment bench/run.py gives a
server, a temporary DATA_DIR with a real SQLite store), runs its startup, holds the only slot
with a sleeping job, then calls `app(scope, receive, send)` for `POST /job` and `GET /health`
N times per round, beside bench/floor_app.py's routes called the same way, alternating every
100 calls. It
prints the CPU time per call (medians over the rounds) and the ratio to the floor: what the
server's own work costs per request, free of the client and of the machine's other load
(hot_paths.py measures the same over real connections). `--profile FILE` writes a cProfile
of the server's `POST /job` calls (read with `python -m pstats FILE`).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "src")]

import run  # noqa: E402  (bench/run.py: the bodies and settings every bench uses)

Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
CHUNK = 100  # calls in a row on one side


def scope(method: str, path: str, body: bytes | None) -> dict[str, Any]:
    headers = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"bench")]
    if body is not None:
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }


async def call(app: Asgi, method: str, path: str, body: bytes | None) -> int:
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body or b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope(method, path, body), receive, send)
    return status


async def cpu_per_call(app: Asgi, method: str, path: str, body: bytes | None, n: int) -> float:
    """CPU microseconds per call, n calls one after another."""
    started = time.process_time()
    for _ in range(n):
        status = await call(app, method, path, body)
        if status != 200:
            raise run.BenchError(f"{method} {path} answered {status}")
    return (time.process_time() - started) / n * 1e6


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--index-dir", type=Path, default=run.OUT_DIR / "index")
    args = parser.parse_args(argv)
    run.ensure_index(args.index_dir)
    tmp = Path(tempfile.mkdtemp(prefix="in-process-"))
    data = tmp / "data"
    paths = [run.DEFAULT_LM_EVAL, run.FAKE_LM_EVAL, run.TRUE]
    os.environ.update(
        {
            **run.OFFLINE,
            "DATA_DIR": str(data),
            "INDEX_DIR": str(args.index_dir),
            "LM_EVAL_PATHS": ",".join(paths),
            "ALLOWED_PATHS": f"{data},{run.ROOT / 'examples'}",
            "ALLOWED_ENV_VARS": "FAKE_*",
            "SHUTDOWN_STOPS_JOBS": "true",
            "MAX_CONCURRENCY": "1",
            "MAX_QUEUED_JOBS": "1000000",
        }
    )
    os.chdir(run.ROOT)
    import floor_app

    from lm_eval_server.app import create_app

    app = create_app()
    floor: Asgi = floor_app.app
    body = run.job_body()
    sleeper = run.job_body(lm_eval_path=run.FAKE_LM_EVAL, env_vars={"FAKE_SLEEP_S": "3600"})
    figures: dict[str, list[float]] = {k: [] for k in ("post", "floor_post", "get", "floor_get")}
    async with app.router.lifespan_context(app):
        await app.state.server.catalog.wait_for_index(120)
        if await call(app, "POST", "/job", sleeper) != 200:
            raise run.BenchError("the sleeper was refused")
        for _ in range(50):  # warm-up: first-call imports and caches
            await call(app, "POST", "/job", body)
            await call(floor, "POST", "/job", body)
        for round_index in range(args.rounds):
            # Server and floor in alternating chunks of CHUNK calls, so that both see the
            # same machine (its speed moves by tens of percent within seconds here).
            for method, path, name, payload in (
                ("POST", "/job", "post", body),
                ("GET", "/health", "get", None),
            ):
                spent = {"": 0.0, "floor_": 0.0}
                for chunk in range(args.n // CHUNK):
                    sides: list[tuple[str, Asgi]] = [("floor_", floor), ("", app)]
                    if (chunk + round_index) % 2:
                        sides.reverse()
                    for prefix, target in sides:
                        spent[prefix] += await cpu_per_call(target, method, path, payload, CHUNK)
                for prefix, total in spent.items():
                    figures[f"{prefix}{name}"].append(total / (args.n // CHUNK))
        if args.profile is not None:
            profiler = cProfile.Profile()
            profiler.enable()
            await cpu_per_call(app, "POST", "/job", body, args.n)
            profiler.disable()
            profiler.dump_stats(args.profile)
        await call(app, "POST", "/jobs/stop", b"")
    for name in ("post", "get"):
        server = statistics.median(figures[name])
        base = statistics.median(figures[f"floor_{name}"])
        label = "POST /job" if name == "post" else "GET /health"
        print(
            f"{label:12} server {server:7.1f} us  floor {base:6.1f} us  ratio {server / base:.2f}"
        )
    print(f"load average {run.loadavg()}; {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
