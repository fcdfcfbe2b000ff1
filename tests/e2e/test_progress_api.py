"""Whole-job progress through the API: a real loglikelihood + generate_until job, sampled live.

The job runs lm-eval's `local-completions` against tests/support/logprob_stub.py (a
multiple-choice task needs logprobs and a tokenizer), with a delay per request so that
inference lasts a few seconds while /job/{id} is polled.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

from tests.support.jobs import EXAMPLES_TASKS, TERMINAL, TEST_TASKS, submit
from tests.support.logprob_stub import logprob_model_args, running_logprob_stub

ORDER = [
    "starting",
    "loading model",
    "building requests",
    "loglikelihood",
    "generate_until",
    "writing results",
]


def mixed_tasks(tmp_path: Path) -> Path:
    """demo_mc (20 docs x 4 choices) and arith_gen_tiny (20 docs) in one include_path."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for source in [
        TEST_TASKS / "_load.py",
        TEST_TASKS / "arith_gen.yaml",
        TEST_TASKS / "arith_gen.jsonl",
        TEST_TASKS / "arith_gen_tiny.yaml",
        EXAMPLES_TASKS / "demo_mc.yaml",
        EXAMPLES_TASKS / "demo_mc.jsonl",
    ]:
        shutil.copy(source, tasks / source.name)
    return tasks


def logged_request_counts(stderr: str) -> dict[str, int]:
    """Each request type's count as lm-eval's own log shows it: the total of the
    `Requesting API` bar drawn after its `Running <type> requests` line."""
    counts: dict[str, int] = {}
    current = None
    for record in re.split(r"[\r\n]", stderr):
        if line := re.search(r"\] Running (\w+) requests$", record):
            current = line[1]
        elif (
            current
            and record.startswith("Requesting API")
            and (bar := re.search(r"\| \d+/(\d+) \[", record))
        ):
            counts[current] = int(bar[1])
    return counts


def test_mixed_job_progress_is_whole_and_monotonic(client: Any, tmp_path: Path) -> None:
    tasks = mixed_tasks(tmp_path)
    with running_logprob_stub(delay_s=0.03) as stub:
        body = {
            "model": "local-completions",
            "model_args": logprob_model_args(stub.base_url),
            "tasks": "demo_mc,arith_gen_tiny",
            "include_path": str(tasks),
        }
        job_id = submit(client, body)
        samples: list[dict[str, Any]] = []
        deadline = time.monotonic() + 240
        while True:
            job = client.get(f"/job/{job_id}").json()
            samples.append(job)
            if job["status"] in TERMINAL:
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        answered = stub.request_count

    assert job["status"] == "Completed", job["error"]
    running = [s for s in samples if s["status"] == "Running"]
    pcts = [s["inference_progress_pct"] for s in running] + [job["inference_progress_pct"]]
    assert pcts == sorted(pcts), pcts
    assert pcts[-1] == 100
    assert [p for p in pcts if 0 < p < 100], f"no intermediate progress in {pcts}"
    # A running job always names its phase, from the moment it starts.
    assert all(s["progress"] and s["progress"]["phase"] in ORDER for s in running)
    seen = [s["progress"]["phase"] for s in running]
    assert seen[0] == "starting"
    assert {"loglikelihood", "generate_until"} <= set(seen)
    assert [ORDER.index(p) for p in seen] == sorted(ORDER.index(p) for p in seen), seen
    # The whole job: done and total count both request types (80 + 20) while it runs.
    during_generation = [
        s["progress"] for s in running if s["progress"]["phase"] == "generate_until"
    ]
    assert all(p["total"] == 100 and p["done"] >= 80 for p in during_generation)

    phases = job["progress"]["phases"]
    assert [p["phase"] for p in phases] == ORDER
    counts = {p["phase"]: (p["done"], p["total"]) for p in phases}
    assert counts["building requests"] == (40, 40)  # documents
    stderr = client.get(f"/job/{job_id}/logs", params={"stream": "stderr"}).text
    logged = logged_request_counts(stderr)
    assert logged == {"loglikelihood": 80, "generate_until": 20}
    assert {k: counts[k] for k in logged} == {k: (n, n) for k, n in logged.items()}
    assert (job["progress"]["done"], job["progress"]["total"]) == (100, 100)
    assert answered == 100  # the stub answered exactly the requests counted

    # The list serves the same progress as the job's own page.
    [listed] = [j for j in client.get("/jobs").json()["jobs"] if j["job_id"] == job_id]
    assert listed["progress"] == job["progress"]
    assert listed["inference_progress_pct"] == 100
