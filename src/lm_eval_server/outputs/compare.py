"""Comparing the metrics of finished runs, and the tables to paste into a report. Pure.

One row per (task, metric, filter) present in any run, in order of first appearance (the first
job's rows first). A run without that metric has null there.

The significance rule: for job j after the first, with values v0, vj and standard errors
s0, sj as lm-eval reported them, the difference d = vj - v0 is significant when
|d| > 1.96 * sqrt(s0^2 + sj^2) (a two-sided z-test at the 5% level, treating the two runs as
independent). The flag is null when it cannot be told: a value is missing or not a number, or
either stderr is missing or "N/A" (lm-eval's word for a metric without one, e.g. with
--bootstrap_iters 0). Two stderrs of exactly 0 make any non-zero difference significant. The
first job's own delta is 0 and its flag false.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from lm_eval_server.errors import InvalidRequest
from lm_eval_server.outputs.results import flatten_metrics

Z_95 = 1.96
MAX_JOBS = 20


def parse_job_ids(text: str) -> list[int]:
    """`jobs=1,2,3` -> [1, 2, 3]: 2 to MAX_JOBS distinct job ids, the first one the base."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > MAX_JOBS:
        raise InvalidRequest(f"jobs: at most {MAX_JOBS} jobs can be compared, got {len(parts)}")
    ids: list[int] = []
    for part in parts:
        if not (part.isascii() and part.isdigit() and len(part) <= 18):
            raise InvalidRequest(
                f"jobs: {part[:40]!r} is not a job id; give comma-separated ids, e.g. jobs=1,2"
            )
        job_id = int(part)
        if job_id in ids:
            raise InvalidRequest(f"jobs: job {job_id} is listed twice; list each job once")
        ids.append(job_id)
    if len(ids) < 2:
        raise InvalidRequest("jobs: give at least 2 job ids to compare, e.g. jobs=1,2")
    return ids


def compare(runs: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """{"jobs", "rows"} from [(job_id, results JSON as lm-eval wrote it)], first job = base."""
    table: dict[tuple[str, str, str], list[dict[str, Any] | None]] = {}
    for position, (_, data) in enumerate(runs):
        for metric in flatten_metrics(data):
            key = (metric["task"], metric["metric"], metric["filter"])
            cells = table.setdefault(key, [None] * len(runs))
            cells[position] = metric
    rows = []
    for (task, metric, filter_name), cells in table.items():
        values = [_finite(c["value"]) if c else None for c in cells]
        stderrs = [_finite(c["stderr"]) if c else None for c in cells]
        deltas = [_delta(values[0], v) for v in values]
        significant = [
            significance(d, stderrs[0], s) if i else (False if d is not None else None)
            for i, (d, s) in enumerate(zip(deltas, stderrs, strict=True))
        ]
        rows.append(
            {
                "task": task,
                "metric": metric,
                "filter": filter_name,
                "values": values,
                "stderrs": stderrs,
                "deltas": deltas,
                "significant": significant,
            }
        )
    return {"jobs": [job_id for job_id, _ in runs], "rows": rows}


def significance(delta: float | None, se_base: Any, se_other: Any) -> bool | None:
    a, b = _number(se_base), _number(se_other)
    if delta is None or a is None or b is None:
        return None
    return abs(delta) > Z_95 * math.sqrt(a * a + b * b)


def _delta(base: Any, value: Any) -> float | None:
    a, b = _number(base), _number(value)
    return None if a is None or b is None else b - a


def _finite(value: Any) -> Any:
    """NaN and infinities have no JSON spelling: they read as missing."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# ---------------------------------------------------------------- tables


def to_csv(comparison: dict[str, Any]) -> str:
    jobs = comparison["jobs"]
    header = ["task", "metric", "filter"]
    for i, job in enumerate(jobs):
        header += [f"value_{job}", f"stderr_{job}"]
        if i:
            header += [f"delta_{job}", f"significant_{job}"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in comparison["rows"]:
        cells: list[Any] = [row["task"], row["metric"], row["filter"]]
        for i in range(len(jobs)):
            cells += [_csv_cell(row["values"][i]), _csv_cell(row["stderrs"][i])]
            if i:
                cells += [_csv_cell(row["deltas"][i]), _csv_cell(row["significant"][i])]
        writer.writerow(cells)
    return out.getvalue()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def to_markdown(comparison: dict[str, Any]) -> str:
    jobs = comparison["jobs"]
    header = ["Task", "Metric", "Filter"]
    for i, job in enumerate(jobs):
        header.append(f"Job {job}")
        if i:
            header.append(f"Δ {job}")
    lines = [_md_line(header), _md_line(["---"] * 3 + ["---:"] * (len(header) - 3))]
    for row in comparison["rows"]:
        cells = [row["task"], row["metric"], row["filter"]]
        for i in range(len(jobs)):
            cells.append(value_text(row["values"][i], row["stderrs"][i]))
            if i:
                cells.append(delta_text(row["deltas"][i], row["significant"][i]))
        lines.append(_md_line(cells))
    lines += [
        "",
        f"Δ: difference from job {jobs[0]}; * marks |Δ| > 1.96·√(se₁² + se₂²).",
    ]
    return "\n".join(lines) + "\n"


def value_text(value: Any, stderr: Any) -> str:
    if value is None:
        return "-"
    text = _fmt(value)
    return f"{text} ± {_fmt(stderr)}" if _number(stderr) is not None else text


def delta_text(delta: float | None, significant: bool | None) -> str:
    if delta is None:
        return "-"
    return f"{delta:+.4f}" + (" *" if significant else "")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _md_line(cells: list[str]) -> str:
    # A pipe inside a cell would end it; a newline would end the table.
    escaped = [str(c).replace("|", "\\|").replace("\n", " ") for c in cells]
    return "| " + " | ".join(escaped) + " |"
