"""Finished jobs' results and samples read for a comparison (GET /compare) or a gate
(verdicts.py): the files a job wrote, reached from its results root without following a
symlink (results.py), read in a worker thread, with the server's redaction of results."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from lm_eval_server.errors import FileNotAvailable, JobNotCompleted
from lm_eval_server.jobs.models import JobRecord
from lm_eval_server.outputs import compare, pairing, results
from lm_eval_server.runtime import jobdir
from lm_eval_server.team.redact import Redactor


async def compare_records(
    records: list[JobRecord], redactor: Redactor, alpha: float
) -> dict[str, Any]:
    """The comparison of these jobs (the first the base) from the results and samples files
    they wrote; each must have a results_file. Reads in a worker thread."""
    return await asyncio.to_thread(_compare_records, records, redactor, alpha)


def _compare_records(records: list[JobRecord], redactor: Redactor, alpha: float) -> dict[str, Any]:
    runs = [(r.job_id, read_results(r, redactor)) for r in records]
    notes: list[str] = []
    files = []
    for record in records:
        path = Path(record.results_file or "")
        files.append(results.samples_files(path, _results_root(record)))
    budget = pairing.LineBudget()
    scores: list[dict[str, pairing.DocScores]] = []
    try:
        for i, found in enumerate(files):
            # Only tasks the base logged and some other run too: nothing else can be paired.
            others = files[1:] if i == 0 else files[:1]
            wanted = {t: p for t, p in found.items() if any(t in other for other in others)}
            run: dict[str, pairing.DocScores] = {}
            for task, path in wanted.items():
                try:
                    run[task] = pairing.read_doc_scores(path, budget)
                except OSError:  # gone, or a symlink or FIFO in its place
                    notes.append(
                        f"job {records[i].job_id}: the samples of {task} cannot be read; "
                        "its rows use the unpaired test"
                    )
            scores.append(run)
    except pairing.TooManyLines:
        notes.append(
            f"these runs' samples hold more than {pairing.MAX_PAIRED_LINES} lines (the "
            "server's bound per comparison): every row uses the unpaired test; compare fewer "
            "jobs to pair them"
        )
        scores = [{} for _ in records]
    return compare.compare(runs, scores, alpha, notes)


def read_results(record: JobRecord, redactor: Redactor) -> dict[str, Any]:
    path = Path(record.results_file or "")
    try:
        return redactor.json(results.read_results(path, _results_root(record)))
    except jobdir.FileTooLarge:
        raise FileNotAvailable(
            f"Job {record.job_id}'s results file is larger than {results.MAX_RESULTS_BYTES} "
            "bytes; the server does not serve it"
        ) from None
    except (OSError, ValueError):
        raise JobNotCompleted(
            f"Job {record.job_id} completed but lm-eval wrote no readable results file under "
            f"{record.output_path} (e.g. --predict_only, or the file was removed)"
        ) from None


def _results_root(record: JobRecord) -> Path:
    return results.results_root(Path(record.output_path))
