"""Finding the results lm-eval wrote for a job and flattening its metrics. Pure but for `find_*`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

_NOT_METRICS = {"alias", "name", "sample_len", "samples"}


def find_results_file(output_path: Path, not_before: datetime | None) -> Path | None:
    """The newest results JSON lm-eval wrote under `output_path` since `not_before`.

    lm-eval writes `<output_path>/<model>/results_<date>.json`, or `<stem>_<date>.json` beside
    a `.json` output_path; a shared output_path may hold other jobs' files, hence the time bound.
    """
    if output_path.suffix == ".json":
        candidates = list(output_path.parent.glob(f"{output_path.stem}_*.json"))
    else:
        candidates = list(output_path.glob("**/results_*.json"))
    threshold = not_before.timestamp() - 1 if not_before is not None else 0
    fresh = [p for p in candidates if p.stat().st_mtime >= threshold]
    return max(fresh, key=lambda p: p.stat().st_mtime) if fresh else None


def samples_files(results_file: Path) -> dict[str, Path]:
    """{task: samples file} for the run that wrote `results_file`, from a listing of its
    directory: lm-eval writes `samples_<task>_<date>.jsonl` beside `results_<date>.json`.

    Callers look a task name up in this dict; the name a client sends never becomes part of a
    path, so no value of it (`..`, `/`, a glob, NUL) can reach another file. Symlinks that
    lead out of the directory are left out.
    """
    directory = results_file.parent
    date = results_file.stem.rpartition("_")[2]
    found: dict[str, tuple[bool, str, Path]] = {}
    try:
        entries = list(directory.iterdir())
    except OSError:
        return {}
    for path in entries:
        name = path.name
        if not (name.startswith("samples_") and name.endswith(".jsonl")):
            continue
        task, sep, file_date = name[len("samples_") : -len(".jsonl")].rpartition("_")
        if not sep or not task:
            continue
        try:
            inside = path.resolve(strict=True).parent == directory.resolve()
        except OSError:
            continue
        if not inside or not path.is_file():
            continue
        # This run's file first, else the newest.
        rank = (file_date == date, file_date, path)
        if task not in found or rank > found[task]:
            found[task] = rank
    return {task: rank[2] for task, rank in sorted(found.items())}


def find_samples_file(results_file: Path, task: str) -> Path | None:
    return samples_files(results_file).get(task)


def flatten_metrics(results: dict[str, Any]) -> list[dict[str, Any]]:
    """[{task, metric, filter, value, stderr}] from lm-eval's `"acc,none"` keys."""
    rows: list[dict[str, Any]] = []
    sections = [results.get("results") or {}, results.get("groups") or {}]
    seen: set[tuple[str, str, str]] = set()
    for section in sections:
        for task, values in section.items():
            if not isinstance(values, dict):
                continue
            for key, value in values.items():
                metric, sep, filter_name = key.partition(",")
                if not sep or metric in _NOT_METRICS or metric.endswith("_stderr"):
                    continue
                if (task, metric, filter_name) in seen:
                    continue
                seen.add((task, metric, filter_name))
                stderr = values.get(f"{metric}_stderr,{filter_name}")
                rows.append(
                    {
                        "task": task,
                        "metric": metric,
                        "filter": filter_name,
                        "value": _number_or_text(value),
                        "stderr": _number_or_text(stderr),
                    }
                )
    return rows


def _number_or_text(value: Any) -> float | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return str(value)
