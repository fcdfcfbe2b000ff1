"""comparisons.py: reading two jobs' files for a comparison, and the cache of comparisons."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lm_eval_server.jobs.comparisons import ComparisonCache, _compare_records
from lm_eval_server.jobs.models import JobRecord, JobStatus
from lm_eval_server.team.redact import Redactor


def job(tmp_path: Path, job_id: int, right: list[int]) -> JobRecord:
    out = tmp_path / str(job_id) / "results"
    model_dir = out / "m"
    model_dir.mkdir(parents=True)
    acc = len(right) / 10
    results = {"results": {"t": {"acc,none": acc, "acc_stderr,none": 0.1}}}
    (model_dir / "results_2026-01-01T00-00-00.json").write_text(json.dumps(results))
    lines = [
        {
            "doc_id": i,
            "filter": "none",
            "metrics": ["acc"],
            "doc_hash": f"h{i}",
            "acc": float(i in right),
        }
        for i in range(10)
    ]
    samples = model_dir / "samples_t_2026-01-01T00-00-00.jsonl"
    samples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return JobRecord(
        job_id=job_id,
        request={},
        argv=[],
        argument="",
        env_vars={},
        work_dir=str(tmp_path / str(job_id)),
        output_path=str(out),
        status=JobStatus.completed,
        results_file=str(model_dir / "results_2026-01-01T00-00-00.json"),
    )


def test_pairs_the_jobs_samples_and_caches_until_a_file_changes(tmp_path: Path) -> None:
    records = [job(tmp_path, 1, list(range(8))), job(tmp_path, 2, list(range(4)))]
    cache = ComparisonCache()
    first = _compare_records(records, Redactor(), 0.05, cache)
    [row] = first["rows"]
    assert row["tests"] == [None, "mcnemar"] and row["discordant"][1] == {
        "regressed": 4,
        "improved": 0,
    }
    assert _compare_records(records, Redactor(), 0.05, cache) is first
    assert _compare_records(records, Redactor(), 0.01, cache) is not first  # another alpha
    # A samples file rewritten (new size and mtime) is read again.
    samples = Path(records[1].results_file or "").parent / "samples_t_2026-01-01T00-00-00.jsonl"
    lines = samples.read_text().replace('"acc": 0.0', '"acc": 1.0')
    samples.write_text(lines)
    os.utime(samples, ns=(1, 1))
    again = _compare_records(records, Redactor(), 0.05, cache)
    assert again is not first and again["rows"][0]["discordant"][1] == {
        "regressed": 0,
        "improved": 2,
    }
