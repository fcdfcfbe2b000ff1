from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

from lm_eval_server.outputs.results import find_results_file, find_samples_file, flatten_metrics


def test_flatten_metrics_pairs_values_with_stderr() -> None:
    data = {
        "results": {
            "demo_mc": {
                "alias": "demo_mc",
                "acc,none": 0.25,
                "acc_stderr,none": 0.1,
                "acc_norm,none": 0.5,
                "acc_norm_stderr,none": "N/A",
                "sample_len": 20,
            },
            "gen": {"exact_match,strict-match": 0.675, "exact_match_stderr,strict-match": 0.03},
        },
        "groups": {"grp": {"acc,none": 0.4, "acc_stderr,none": 0.02}},
    }
    rows = flatten_metrics(data)
    assert {
        "task": "demo_mc",
        "metric": "acc",
        "filter": "none",
        "value": 0.25,
        "stderr": 0.1,
    } in rows
    assert {
        "task": "demo_mc",
        "metric": "acc_norm",
        "filter": "none",
        "value": 0.5,
        "stderr": "N/A",
    } in rows
    assert {
        "task": "gen",
        "metric": "exact_match",
        "filter": "strict-match",
        "value": 0.675,
        "stderr": 0.03,
    } in rows
    assert {"task": "grp", "metric": "acc", "filter": "none", "value": 0.4, "stderr": 0.02} in rows
    assert len(rows) == 4


def test_find_results_ignores_files_older_than_the_job(tmp_path: Path) -> None:
    old = tmp_path / "model" / "results_2020.json"
    old.parent.mkdir()
    old.write_text("{}")
    past = time.time() - 3600
    os.utime(old, (past, past))
    started = datetime.now(UTC)
    assert find_results_file(tmp_path, started) is None
    new = tmp_path / "model" / "results_2026-11-21T10-00-00.1.json"
    new.write_text("{}")
    (tmp_path / "model" / "samples_demo_2026-11-21T10-00-00.1.jsonl").write_text("{}\n")
    assert find_results_file(tmp_path, started) == new
    assert find_samples_file(new, tmp_path, "demo") is not None
    assert find_samples_file(new, tmp_path, "other") is None
