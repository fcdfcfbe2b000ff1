"""A reproduction's per-sample diff against the job it reproduces.

Samples are paired per task by (`doc_id`, `doc_hash`, `filter`): the same document, scored
under the same filter. A pair is identical when its filtered responses and every per-sample
metric value are equal (exactly: a reproduction either repeats the answers or it does not);
otherwise it differs, and the first few differing pairs are kept as examples. Samples present
in one run only are counted apart (`only_original`, `only_reproduction`): a changed dataset or
`limit` shows there, not as a difference in answers.

`diff_task` and `metric_deltas` are pure; `samples_of` and `reproduction_report` read the two
jobs' files (a worker thread). One side is held in memory as a digest per sample, at most
MAX_PAIRED_SAMPLES of them per job.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval_server.outputs import results, samples
from lm_eval_server.runtime import jobdir

MAX_EXAMPLES = 5
MAX_PAIRED_SAMPLES = 2_000_000
MAX_METRIC_DELTAS = 200
EXAMPLE_TEXT = 500  # characters of one response string an example keeps

Key = tuple[Any, Any, Any]  # (doc_id, doc_hash, filter)


@dataclass(frozen=True)
class Sample:
    key: Key
    responses: Any
    metrics: dict[str, Any]
    ref: Any = None  # how to read the whole line again (a byte offset), for an example


def sample_of(line: Mapping[str, Any], ref: Any = None) -> Sample | None:
    """The compared part of one samples line, or None when it names no document."""
    doc_id = line.get("doc_id")
    if not isinstance(doc_id, int | str):
        return None
    names = line.get("metrics")
    names = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    key = (doc_id, line.get("doc_hash"), line.get("filter"))
    return Sample(key, line.get("filtered_resps"), {n: line.get(n) for n in names}, ref)


def _canonical(value: Any) -> str:
    # NaN == NaN here: both runs wrote the same thing.
    return json.dumps(value, sort_keys=True, default=str, allow_nan=True)


def _digest(sample: Sample) -> bytes:
    text = _canonical([sample.responses, sample.metrics])
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def clip(value: Any, depth: int = 0) -> Any:
    """A response as an example shows it: strings cut to EXAMPLE_TEXT, lists to ten items."""
    if isinstance(value, str):
        return value if len(value) <= EXAMPLE_TEXT else value[:EXAMPLE_TEXT] + "…"
    if depth > 4:
        return None
    if isinstance(value, list):
        return [clip(v, depth + 1) for v in value[:10]]
    if isinstance(value, dict):
        return {str(k)[:100]: clip(v, depth + 1) for k, v in list(value.items())[:20]}
    return value


@dataclass
class TaskDiff:
    task: str
    identical: int = 0
    differing: int = 0
    only_original: int = 0
    only_reproduction: int = 0
    # (metric, filter) -> paired samples whose value of that metric differs
    metric_changes: dict[tuple[str, Any], int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False


def diff_task(
    task: str,
    original: Iterable[Sample],
    reproduction: Iterable[Sample],
    fetch_original: Callable[[Any], Sample | None] | None = None,
    max_examples: int = MAX_EXAMPLES,
    max_samples: int = MAX_PAIRED_SAMPLES,
) -> TaskDiff:
    """Pairs the two runs' samples of one task and counts what is the same. `original` is held
    as (digest, metrics, ref) per key; `fetch_original(ref)` gives an example its original side
    (without it, the original's responses are left out of examples)."""
    diff = TaskDiff(task)
    held: dict[Key, tuple[bytes, dict[str, Any], Any, Any]] = {}
    for sample in original:
        if len(held) >= max_samples:
            diff.truncated = True
            break
        held[sample.key] = (_digest(sample), sample.metrics, sample.ref, sample.responses)
    for sample in reproduction:
        entry = held.pop(sample.key, None)
        if entry is None:
            diff.only_reproduction += 1
            continue
        digest, metrics, ref, _ = entry
        if digest == _digest(sample):
            diff.identical += 1
            continue
        diff.differing += 1
        filter_name = sample.key[2]
        for name in sorted(set(metrics) | set(sample.metrics)):
            if _canonical(metrics.get(name)) != _canonical(sample.metrics.get(name)):
                change = (name, filter_name)
                diff.metric_changes[change] = diff.metric_changes.get(change, 0) + 1
        if len(diff.examples) < max_examples:
            first = fetch_original(ref) if fetch_original is not None else None
            diff.examples.append(
                {
                    "task": task,
                    "doc_id": sample.key[0],
                    "doc_hash": sample.key[1],
                    "filter": filter_name,
                    "original": {
                        "responses": clip(first.responses) if first is not None else None,
                        "metrics": clip(metrics),
                    },
                    "reproduction": {
                        "responses": clip(sample.responses),
                        "metrics": clip(sample.metrics),
                    },
                }
            )
    diff.only_original = len(held)
    return diff


def metric_deltas(
    original: list[dict[str, Any]], reproduction: list[dict[str, Any]], diffs: list[TaskDiff]
) -> list[dict[str, Any]]:
    """Per (task, metric, filter) of either run's results: both values, their difference (when
    both are numbers) and how many paired samples changed that metric (null: none paired)."""
    changes = {(d.task, *k): n for d in diffs for k, n in d.metric_changes.items()}
    # 0 where the task's samples were paired; null where there were none to pair.
    paired = {d.task for d in diffs if d.identical + d.differing}
    first = {(r["task"], r["metric"], r["filter"]): r["value"] for r in original}
    second = {(r["task"], r["metric"], r["filter"]): r["value"] for r in reproduction}
    rows: list[dict[str, Any]] = []
    for key in list(dict.fromkeys([*first, *second]))[:MAX_METRIC_DELTAS]:
        a, b = first.get(key), second.get(key)
        numbers = isinstance(a, float) and isinstance(b, float)
        rows.append(
            {
                "task": key[0],
                "metric": key[1],
                "filter": key[2],
                "original": a,
                "reproduction": b,
                "delta": (b - a) if numbers else None,  # type: ignore[operator]
                "samples_differing": changes.get(key, 0 if key[0] in paired else None),
            }
        )
    return rows


def summarise(of: int, diffs: list[TaskDiff], deltas: list[dict[str, Any]]) -> dict[str, Any]:
    examples = [e for d in diffs for e in d.examples][:MAX_EXAMPLES]
    return {
        "of": of,
        "state": "done",
        "identical": sum(d.identical for d in diffs),
        "differing": sum(d.differing for d in diffs),
        "only_original": sum(d.only_original for d in diffs),
        "only_reproduction": sum(d.only_reproduction for d in diffs),
        "tasks": [
            {
                "task": d.task,
                "identical": d.identical,
                "differing": d.differing,
                "only_original": d.only_original,
                "only_reproduction": d.only_reproduction,
                "truncated": d.truncated,
            }
            for d in diffs
        ],
        "examples": examples,
        "metric_deltas": deltas,
        "note": None,
    }


# ---------------------------------------------------------------- the two jobs' files


def samples_of(path: Path) -> Iterator[Sample]:
    """Each line of a samples file as a Sample whose ref is its byte offset (streamed)."""
    with os.fdopen(jobdir.open_file(path), "rb") as f:
        for n, (offset, _, line) in enumerate(samples._lines(f)):
            if n >= samples.MAX_INDEX_LINES:
                raise jobdir.FileTooLarge(f"{path}: more than {samples.MAX_INDEX_LINES} samples")
            if line is None:
                continue
            try:
                parsed = json.loads(line)
            except ValueError:
                continue
            if isinstance(parsed, dict) and (sample := sample_of(parsed, offset)) is not None:
                yield sample


def sample_at(path: Path, offset: int) -> Sample | None:
    with os.fdopen(jobdir.open_file(path), "rb") as f:
        f.seek(offset)
        line = f.readline(samples.MAX_LINE_BYTES + 1)
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    return sample_of(parsed) if isinstance(parsed, dict) else None


@dataclass(frozen=True)
class RunFiles:
    """Where a finished job's results are: its output root and results file."""

    output_path: Path
    results_file: Path | None

    @property
    def root(self) -> Path:
        return results.results_root(self.output_path)


def unavailable(of: int, note: str) -> dict[str, Any]:
    return {
        "of": of,
        "state": "unavailable",
        "identical": None,
        "differing": None,
        "only_original": None,
        "only_reproduction": None,
        "tasks": [],
        "examples": [],
        "metric_deltas": [],
        "note": note,
    }


def reproduction_report(of: int, original: RunFiles, reproduction: RunFiles) -> dict[str, Any]:
    """The `reproduction` object of a finished reproduction of job `of`. File I/O."""
    if original.results_file is None or reproduction.results_file is None:
        which = "the original" if original.results_file is None else "the reproduction"
        return unavailable(of, f"{which} has no results file (did it complete?)")
    try:
        first = results.read_results(original.results_file, original.root)
        second = results.read_results(reproduction.results_file, reproduction.root)
    except (OSError, ValueError) as exc:
        return unavailable(of, f"a results file cannot be read: {exc}")
    first_files = results.samples_files(original.results_file, original.root)
    second_files = results.samples_files(reproduction.results_file, reproduction.root)
    diffs: list[TaskDiff] = []
    for task in sorted(set(first_files) | set(second_files)):
        a, b = first_files.get(task), second_files.get(task)
        try:
            diffs.append(
                diff_task(
                    task,
                    samples_of(a) if a is not None else (),
                    samples_of(b) if b is not None else (),
                    (lambda ref, a=a: sample_at(a, ref)) if a is not None else None,
                )
            )
        except OSError as exc:
            return unavailable(of, f"the samples of {task} cannot be read: {exc}")
    deltas = metric_deltas(results.flatten_metrics(first), results.flatten_metrics(second), diffs)
    report = summarise(of, diffs, deltas)
    if not diffs:
        report["note"] = (
            "no samples to pair: the original job ran without log_samples, so only the "
            "metrics are compared"
        )
    return report
