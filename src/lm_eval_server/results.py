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


def find_samples_file(results_file: Path, task: str) -> Path | None:
    """lm-eval writes `samples_<task>_<date>.jsonl` beside `results_<date>.json`."""
    date = results_file.stem.rpartition("_")[2]
    candidate = results_file.with_name(f"samples_{task}_{date}.jsonl")
    if candidate.exists():
        return candidate
    matches = sorted(results_file.parent.glob(f"samples_{task}_*.jsonl"))
    return matches[-1] if matches else None


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
