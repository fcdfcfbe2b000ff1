"""The README's first job on a machine without a network, with and without JOBS_OFFLINE (issue 23).

    uv run python bench/first_job.py [--rounds N]

Starts two real servers (`python -m uvicorn src.main:app`, tests/support/server.py) with the
Hugging Face network variables unset, as a person following the README has them: one with the
default JOBS_OFFLINE=true, one with JOBS_OFFLINE=false (the environment jobs had before). Each
round runs the README's first job (the dummy model on examples/tasks' demo_mc, limit 10) on
both, one after the other, and prints the job's run time (started -> finished) and whether its
log holds MaxRetryError (lm-eval's dummy model loads a tokenizer from the Hub when it saves
results). Compare the two columns of one run; the figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support: the live-server helper

from tests.support.server import ServerProcess  # noqa: E402

NETWORK_VARS = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_EVALUATE_OFFLINE",
)
FIRST_JOB = {"model": "dummy", "tasks": "demo_mc", "include_path": "examples/tasks", "limit": 10}


def run_job(server: ServerProcess) -> tuple[float, bool, str]:
    with server.client() as http:
        job_id = http.post("/job", json=FIRST_JOB).json()["job_id"]
        deadline = time.monotonic() + 600
        while (job := http.get(f"/job/{job_id}").json())["status"] not in (
            "Completed",
            "Failed",
            "Stopped",
        ):
            if time.monotonic() > deadline:
                raise SystemExit(f"job {job_id} did not finish in 600 s")
            time.sleep(0.2)
        log = http.get(f"/job/{job_id}/logs", params={"stream": "stderr"}).text
    return job["duration_s"], "MaxRetryError" in log, job["status"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        # The task index, built once for both servers, as the tests build it.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lm_eval_server.runtime.task_index",
                "build",
                "--data-dir",
                str(index),
            ],
            check=True,
        )
        servers = {}
        for offline in ("true", "false"):
            server = ServerProcess(Path(tmp) / f"data-{offline}", index, JOBS_OFFLINE=offline)
            del server.env["LM_EVAL_PATHS"], server.env["ALLOWED_PATHS"]
            for name in NETWORK_VARS:
                server.env.pop(name, None)
            servers[offline] = server.start()
        try:
            print(f"{'round':>5}  {'JOBS_OFFLINE':>12}  {'status':>9}  {'run s':>7}  MaxRetryError")
            for round_ in range(1, args.rounds + 1):
                for offline, server in servers.items():
                    seconds, retried, status = run_job(server)
                    print(f"{round_:>5}  {offline:>12}  {status:>9}  {seconds:>7.1f}  {retried}")
        finally:
            for server in servers.values():
                server.stop_jobs_and_terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
