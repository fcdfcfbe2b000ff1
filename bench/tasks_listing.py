"""How long GET /tasks takes over the whole task index (~14.7k names), in process: prints the
median and 95th percentile in ms for a few queries.

    uv run python bench/tasks_listing.py [INDEX_DIR]

INDEX_DIR holds a built index (`python -m lm_eval_server.runtime.task_index build --data-dir DIR`);
without one, a temporary index is built first (about 20 s of CPU).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from lm_eval_server.app import create_app
from lm_eval_server.config import Settings

QUERIES = {
    "first page, no search": {},
    "search 'arc'": {"search": "arc"},
    "search 'arc_ea', limit 20 (autocomplete)": {"search": "arc_ea", "limit": 20},
    "kind=group, limit 500": {"kind": "group", "limit": 500},
    "search matching nothing": {"search": "zzzz_nothing"},
}
ROUNDS = 200


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp) / "index"
        if len(sys.argv) == 1:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "lm_eval_server.runtime.task_index",
                    "build",
                    "--data-dir",
                    index,
                ],
                check=True,
            )
        settings = Settings(
            data_dir=Path(tmp) / "data", index_dir=index, allowed_hosts=["testserver"]
        )
        with TestClient(create_app(settings)) as client:
            assert client.get("/tasks").status_code == 200, "no usable index in INDEX_DIR"
            for label, params in QUERIES.items():
                times = []
                for _ in range(ROUNDS):
                    started = time.perf_counter()
                    response = client.get("/tasks", params=params)
                    times.append((time.perf_counter() - started) * 1000)
                total = response.json()["total"]
                times.sort()
                p95 = times[int(len(times) * 0.95)]
                print(
                    f"{label:44s} total={total:6d}  median {statistics.median(times):6.2f} ms"
                    f"  p95 {p95:6.2f} ms"
                )


if __name__ == "__main__":
    main()
