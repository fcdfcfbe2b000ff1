"""Comparing the metrics of finished runs, and the tables to paste into a report. Pure.

One row per (task, metric, filter) present in any run, in order of first appearance (the first
job's rows first). A run without that metric has null there.

Significance, for job j after the first (the base), at level `alpha` (default 0.05):

- When both runs logged samples for the task and the metric has a number per document, the
  documents are paired by doc_id and doc_hash (pairing.py) and tested with the pairs
  (paired.py): McNemar's exact test when every score is 0 or 1 (acc, acc_norm, exact_match,
  ...), a paired t-test otherwise. The row says which (`tests`), the p-value, how many
  documents were paired, and for McNemar the discordant counts (`regressed`: right in the base,
  wrong in j; `improved`: the other way).
- Otherwise the unpaired z-test on the values and stderrs lm-eval reported, d = vj - v0 against
  sqrt(s0^2 + sj^2) (`unpaired_z`); it cannot be told (null) when a value is missing or not a
  number, or either stderr is missing or "N/A" (lm-eval's word for a metric without one, e.g.
  with --bootstrap_iters 0). Two stderrs of exactly 0 make any non-zero difference significant.

`significant` is p < alpha by the row's test; `unpaired_significant` is the unpaired z-test's
answer on the same row, so a reader sees what pairing changed. The first job's own delta is 0
and its flag false. `warnings` list what makes two runs not comparable (pairing.py).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from lm_eval_server.errors import InvalidRequest
from lm_eval_server.outputs import paired, pairing
from lm_eval_server.outputs.pairing import comparability_warnings
from lm_eval_server.outputs.results import flatten_metrics

Z_95 = 1.96
DEFAULT_ALPHA = 0.05
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


def compare(
    runs: list[tuple[int, dict[str, Any]]],
    doc_scores: list[dict[str, pairing.DocScores]] | None = None,
    alpha: float = DEFAULT_ALPHA,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """{"jobs", "alpha", "rows", "warnings"} from [(job_id, results JSON as lm-eval wrote it)],
    first job = base; `doc_scores[i]`: run i's per-document scores by task (empty: none)."""
    scores = doc_scores if doc_scores is not None else [{} for _ in runs]
    table: dict[tuple[str, str, str], list[dict[str, Any] | None]] = {}
    for position, (_, data) in enumerate(runs):
        for metric in flatten_metrics(data):
            key = (metric["task"], metric["metric"], metric["filter"])
            cells = table.setdefault(key, [None] * len(runs))
            cells[position] = metric
    rows = [_row(key, cells, scores, alpha) for key, cells in table.items()]
    base_id, base = runs[0]
    warnings = [
        w for job_id, data in runs[1:] for w in comparability_warnings(base_id, base, job_id, data)
    ]
    warnings += [{"jobs": [], "task": None, "field": None, "message": n} for n in notes or []]
    return {
        "jobs": [job_id for job_id, _ in runs],
        "alpha": alpha,
        "rows": rows,
        "warnings": warnings,
    }


def _row(
    key: tuple[str, str, str],
    cells: list[dict[str, Any] | None],
    scores: list[dict[str, pairing.DocScores]],
    alpha: float,
) -> dict[str, Any]:
    task, metric, filter_name = key
    values = [_finite(c["value"]) if c else None for c in cells]
    stderrs = [_finite(c["stderr"]) if c else None for c in cells]
    deltas = [_delta(values[0], v) for v in values]
    tests: list[str | None] = [None]
    p_values: list[float | None] = [None]
    n_paired: list[int | None] = [None]
    discordant: list[dict[str, int] | None] = [None]
    significant: list[bool | None] = [False if deltas[0] is not None else None]
    unpaired: list[bool | None] = list(significant)
    base_docs = _docs(scores[0], task, metric, filter_name)
    for i in range(1, len(cells)):
        z_p = paired.unpaired_z(deltas[i], _number(stderrs[0]), _number(stderrs[i]))
        unpaired.append(None if z_p is None else z_p < alpha)
        other_docs = _docs(scores[i], task, metric, filter_name)
        result = None
        if base_docs is not None and other_docs is not None and cells[i] is not None:
            xs, ys = pairing.pair(base_docs, other_docs)
            if xs:
                result = paired.paired(xs, ys)
        if result is None:
            tests.append("unpaired_z" if z_p is not None else None)
            p_values.append(z_p)
            n_paired.append(None)
            discordant.append(None)
        else:
            tests.append(result.test)
            p_values.append(result.p_value)
            n_paired.append(result.n_paired)
            discordant.append(
                {"regressed": result.regressed, "improved": result.improved}
                if result.regressed is not None and result.improved is not None
                else None
            )
        p = p_values[-1]
        significant.append(None if p is None else p < alpha)
    return {
        "task": task,
        "metric": metric,
        "filter": filter_name,
        "values": values,
        "stderrs": stderrs,
        "deltas": deltas,
        "significant": significant,
        "tests": tests,
        "p_values": p_values,
        "n_paired": n_paired,
        "discordant": discordant,
        "unpaired_significant": unpaired,
    }


def _docs(
    scores: dict[str, pairing.DocScores], task: str, metric: str, filter_name: str
) -> dict[pairing.DocKey, float] | None:
    found = scores.get(task)
    return found.usable((metric, filter_name)) if found is not None else None


def parse_alpha(value: float | None) -> float:
    if value is None:
        return DEFAULT_ALPHA
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 < value < 1):
        raise InvalidRequest(f"alpha: {value!r} is not a level between 0 and 1, e.g. alpha=0.05")
    return float(value)


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


_CSV_TEST_COLUMNS = ("test", "p_value", "n_paired", "regressed", "improved")


def to_csv(comparison: dict[str, Any]) -> str:
    jobs = comparison["jobs"]
    header = ["task", "metric", "filter"]
    for i, job in enumerate(jobs):
        header += [f"value_{job}", f"stderr_{job}"]
        if i:
            header += [f"delta_{job}", f"significant_{job}"]
            header += [f"{name}_{job}" for name in _CSV_TEST_COLUMNS]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in comparison["rows"]:
        cells: list[Any] = [row["task"], row["metric"], row["filter"]]
        for i in range(len(jobs)):
            cells += [_csv_cell(row["values"][i]), _csv_cell(row["stderrs"][i])]
            if i:
                cells += [_csv_cell(row["deltas"][i]), _csv_cell(row["significant"][i])]
                counts = row["discordant"][i] or {}
                cells += [
                    _csv_cell(row["tests"][i]),
                    _csv_cell(row["p_values"][i]),
                    _csv_cell(row["n_paired"][i]),
                    _csv_cell(counts.get("regressed")),
                    _csv_cell(counts.get("improved")),
                ]
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
            header += [f"Δ {job}", f"p {job}"]
    lines = [_md_line(header), _md_line(["---"] * 3 + ["---:"] * (len(header) - 3))]
    for row in comparison["rows"]:
        cells = [row["task"], row["metric"], row["filter"]]
        for i in range(len(jobs)):
            cells.append(value_text(row["values"][i], row["stderrs"][i]))
            if i:
                cells.append(delta_text(row["deltas"][i], row["significant"][i]))
                cells.append(test_text(row, i))
        lines.append(_md_line(cells))
    lines += [
        "",
        f"Δ: difference from job {jobs[0]}; * marks p < {comparison['alpha']:g} by the row's "
        "test: McNemar's exact test on the paired documents (regressed/improved of n), a "
        "paired t-test, or (without samples) the unpaired z-test on the stderrs.",
    ]
    lines += [f"Warning: {w['message']}" for w in comparison.get("warnings", [])]
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


_TEST_NAMES = {"mcnemar": "McNemar", "paired_t": "paired t", "unpaired_z": "unpaired z"}


def test_text(row: dict[str, Any], i: int) -> str:
    """e.g. `6.1e-05 (McNemar 15/0 of 200)`, `0.031 (paired t, n=200)`, `0.12 (unpaired z)`."""
    test, p = row["tests"][i], row["p_values"][i]
    if test is None or p is None:
        return "-"
    name = _TEST_NAMES.get(test, test)
    counts = row["discordant"][i]
    if counts is not None:
        detail = f"{name} {counts['regressed']}/{counts['improved']} of {row['n_paired'][i]}"
    elif row["n_paired"][i] is not None:
        detail = f"{name}, n={row['n_paired'][i]}"
    else:
        detail = name
    return f"{p:.2g} ({detail})"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _md_line(cells: list[str]) -> str:
    # A pipe inside a cell would end it; a newline would end the table.
    escaped = [str(c).replace("|", "\\|").replace("\n", " ") for c in cells]
    return "| " + " | ".join(escaped) + " |"
