"""The README's own commands, against a server started the README's way with default settings."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.jobs import ROOT, submit, wait_for
from tests.support.server import ServerProcess

# The test session sets these for every process (tests/conftest.py); a person following the
# README has none of them, and neither has this test's server.
NETWORK_VARS = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_EVALUATE_OFFLINE",
)


def test_first_job_in_a_minute_and_example_json(tmp_path: Path, index_dir: Path) -> None:
    server = ServerProcess(tmp_path / "data", index_dir)
    # README defaults: no LM_EVAL_PATHS / ALLOWED_PATHS overrides, no offline switches.
    del server.env["LM_EVAL_PATHS"], server.env["ALLOWED_PATHS"]
    for name in NETWORK_VARS:
        server.env.pop(name, None)
    server.start()
    try:
        with server.client() as http:
            first = {
                "model": "dummy",
                "tasks": "demo_mc",
                "include_path": "examples/tasks",
                "limit": 10,
            }
            response = http.post("/job", json=first)
            assert response.json() == {
                "status": "success",
                "message": "Job 1 successfully queued.",
                "job_id": 1,
            }
            example = json.loads((ROOT / "example.json").read_text())
            example_id = submit(http, example)
            assert http.get(f"/job/{example_id}/stop").status_code == 200
            job = wait_for(http, 1)
            assert job["status"] == "Completed", job["error"]
            # lm-eval's dummy model loads a tokenizer from the Hub when it saves results: a job
            # that may try the Hub spends ~45 s retrying it on a machine without a network.
            # The figure is printed, not asserted (no timed assertions); the log is the check.
            print(f"README first job: {job['duration_s']} s from start to Completed")
            stderr = http.get("/job/1/logs", params={"stream": "stderr"}).text
            assert "Selected Tasks" in stderr  # the real log, not an empty one
            assert "MaxRetryError" not in stderr and "huggingface.co" not in stderr
            metrics = http.get("/job/1/results").json()["metrics"]
            assert [m["metric"] for m in metrics] == ["acc"]
            assert http.delete("/job/1").json()["message"] == "Job 1 deleted."
    finally:
        server.stop_jobs_and_terminate()
