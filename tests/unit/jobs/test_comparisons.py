"""comparisons.py: reading two jobs' files for a comparison, and the cache of comparisons."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from lm_eval_server.jobs import verdicts
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


def test_a_gate_that_cannot_be_evaluated_gets_an_error_verdict(tmp_path: Path) -> None:
    base, cand = job(tmp_path, 1, list(range(8))), job(tmp_path, 2, list(range(4)))
    rules = [{"metric": "acc", "no_significant_drop": True}]
    cand.request = {"gate": {"baseline": 1, "rules": rules}}
    jobs = {1: base, 2: cand}
    verdict = asyncio.run(verdicts.judge(cand, jobs.get, Redactor()))
    # 4 regressed, 0 improved: p = 2 / 2^4 = 0.125, a drop but not a significant one.
    assert verdict is not None and verdict["passed"] is True and verdict["error"] is None
    [check] = verdict["rules"]
    assert check["discordant"] == {"regressed": 4, "improved": 0} and check["p_value"] == 0.125
    assert "not significantly" in check["reason"]
    base.status = JobStatus.running
    running = asyncio.run(verdicts.judge(cand, jobs.get, Redactor()))
    assert running is not None and running["error"] == (
        "the baseline job 1 is Running; a gate compares with a Completed job"
    )
    gone = asyncio.run(verdicts.judge(cand, {2: cand}.get, Redactor()))
    assert gone is not None and gone["error"] == "the baseline job 1 no longer exists"
    cand.request = {}
    assert asyncio.run(verdicts.judge(cand, jobs.get, Redactor())) is None
