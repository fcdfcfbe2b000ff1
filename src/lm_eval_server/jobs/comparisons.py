"""Finished jobs' results and samples read for a comparison (GET /compare) or a gate
(verdicts.py): the files a job wrote, reached from its results root without following a
symlink (results.py), read in a worker thread, with the server's redaction of results."""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from lm_eval_server.errors import FileNotAvailable, JobNotCompleted
from lm_eval_server.jobs.models import JobRecord
from lm_eval_server.outputs import compare, pairing, results
from lm_eval_server.runtime import jobdir
from lm_eval_server.team.redact import Redactor

# Comparisons kept (small: rows of numbers), so the dashboard's JSON and Markdown requests for
# one comparison, a reload, or a gate and a compare of the same jobs read the samples once.
COMPARISONS_KEPT = 16


class ComparisonCache:
    """Comparisons by what they were computed from: each file's identity (path, inode, size,
    mtime; a rewritten file is new), alpha and the redactor's generation."""

    def __init__(self, size: int = COMPARISONS_KEPT) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()  # used from worker threads

    def get(self, key: Hashable) -> dict[str, Any] | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: Hashable, value: dict[str, Any]) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)


async def compare_records(
    records: list[JobRecord],
    redactor: Redactor,
    alpha: float,
    cache: ComparisonCache | None = None,
) -> dict[str, Any]:
    """The comparison of these jobs (the first the base) from the results and samples files
    they wrote; each must have a results_file. Reads in a worker thread. The answer is shared
    with the cache: read it, do not change it."""
    return await asyncio.to_thread(_compare_records, records, redactor, alpha, cache)


def _compare_records(
    records: list[JobRecord], redactor: Redactor, alpha: float, cache: ComparisonCache | None
) -> dict[str, Any]:
    files = []
    for record in records:
        path = Path(record.results_file or "")
        files.append(results.samples_files(path, _results_root(record)))
    key = (
        alpha,
        redactor.generation,
        tuple((r.job_id, _identity(Path(r.results_file or ""))) for r in records),
        tuple(tuple((t, _identity(p)) for t, p in found.items()) for found in files),
    )
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    runs = [(r.job_id, read_results(r, redactor)) for r in records]
    notes: list[str] = []
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
    comparison = compare.compare(runs, scores, alpha, notes)
    if cache is not None:
        cache.put(key, comparison)
    return comparison


def _identity(path: Path) -> tuple[str, int, int, int] | None:
    try:
        stat = os.lstat(path)
    except OSError:
        return None
    return (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


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
