"""`lm-eval-server compare` against a live server, on two runs with known scores."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.completions_server import is_answered_correctly, running_stub_server
from tests.support.jobs import stub_job, submit, wait_for
from tests.support.server import ServerProcess
from tests.test_cli import ok, run

API_KEY = "cli-test-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, index_dir: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("cli-compare-server") / "data"
    server = ServerProcess(data_dir, index_dir, API_KEYS=API_KEY, MAX_CONCURRENCY="2").start()
    yield server
    server.stop_jobs_and_terminate()


def run_tiny(http: httpx.Client, correct_per_cycle: int) -> int:
    with running_stub_server(correct_per_cycle=correct_per_cycle) as stub:
        job_id = submit(http, stub_job(stub.base_url, "arith_gen_tiny"))
        job = wait_for(http, job_id, timeout_s=240)
    assert job["status"] == "Completed", job["error"]
    return job_id


def test_cli_compare_prints_the_known_difference(server: ServerProcess) -> None:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ) as http:
        base, better = run_tiny(http, 27), run_tiny(http, 35)
    right = [sum(is_answered_correctly(q, n) for q in range(20)) for n in (27, 35)]
    assert right == [13, 18]
    values = [r / 20 for r in right]

    data: dict[str, Any] = json.loads(
        ok(run(server, "compare", str(base), str(better), "--format", "json"))
    )
    [row] = data["rows"]
    assert row["values"] == values and row["deltas"] == [0.0, values[1] - values[0]]
    # 0.25 < 1.96 * sqrt(0.1094^2 + 0.0688^2) = 0.2534: twenty docs cannot tell these apart.
    assert row["significant"] == [False, False]

    lines = ok(run(server, "compare", str(base), str(better))).splitlines()
    assert lines[0].split() == [
        "TASK",
        "FILTER",
        "METRIC",
        f"#{base}",
        f"#{better}",
        f"Δ#{better}",
        f"p#{better}",
    ]
    cells = lines[1].split()
    assert cells[:3] == ["arith_gen_tiny", "none", "exact_match"]
    assert cells[3] == "0.6500" and cells[6] == "0.9000" and cells[-3] == "+0.2500"
    # Without samples: the unpaired z-test's p-value, 0.053 (not below 0.05).
    assert cells[-2:] == [f"{row['p_values'][1]:.2g}", "unpaired_z"] and cells[-2] == "0.053"
    assert lines[-1].startswith(f"Δ: difference from job {base}")

    table = ok(run(server, "compare", str(base), str(better), "--format", "csv"))
    [record] = list(csv.DictReader(io.StringIO(table)))
    assert record[f"value_{better}"] == "0.9" and record[f"significant_{better}"] == "false"
    markdown = ok(run(server, "compare", str(base), str(better), "--format", "markdown"))
    assert markdown.splitlines()[2].endswith("| +0.2500 | 0.053 (unpaired z) |")

    refused = run(server, "compare", str(base), str(base))
    assert refused.returncode == 1
    assert f"HTTP 422: jobs: job {base} is listed twice" in refused.stderr
    missing = run(server, "compare", str(base), "9999")
    assert missing.returncode == 1 and "HTTP 404: Job 9999 not found." in missing.stderr
