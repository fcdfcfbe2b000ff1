"""A regression gate's verdict from a comparison of its baseline and candidate. Pure.

The rules' shape is admission/gate_rules.py's; here they are plain dicts (as a request stores
them). `evaluate` takes the comparison compare.compare made of [baseline, candidate] (or of
[candidate] alone when the gate has no baseline) and the candidate's results JSON (for the
metrics' direction), and answers

    {"passed": bool, "baseline": id | None, "candidate": id, "rules": [check, ...],
     "warnings": [...], "error": None}

with one check per (rule, matching row): a rule without `task` (or `filter`) applies to every
task (and filter) reporting its metric. A rule that matches nothing fails: a gate that checks
nothing must not pass silently. `error` (with `passed` false) says why a gate could not be
evaluated at all (the baseline is gone, or did not complete).

"Worse" follows lm-eval's `higher_is_better` for the task's metric (true when not recorded):
`drop` is baseline - candidate for a metric where higher is better, candidate - baseline
otherwise. `no_significant_drop` fails when the drop is positive and the row's test (McNemar's
exact test or the paired t-test on the paired documents, else the unpaired z-test) gives
p < alpha; it fails too when significance cannot be told (no samples and no stderr).
"""

from __future__ import annotations

import math
from typing import Any

from lm_eval_server.outputs.compare import DEFAULT_ALPHA

KINDS = ("min", "max", "max_drop", "no_significant_drop")


def at_most(value: float, limit: float) -> bool:
    """value <= limit, up to float rounding: 0.675 - 0.6 is 0.07500000000000007, and a gate
    set to the drop it observed must not fail on the last bit."""
    return value <= limit or math.isclose(value, limit, rel_tol=1e-9, abs_tol=1e-12)


def evaluate(
    rules: list[dict[str, Any]],
    comparison: dict[str, Any],
    candidate_results: dict[str, Any],
    baseline_id: int | None,
    candidate_id: int,
) -> dict[str, Any]:
    with_baseline = baseline_id is not None
    checks: list[dict[str, Any]] = []
    for number, rule in enumerate(rules):
        rows = [r for r in comparison["rows"] if _matches(rule, r)]
        if not rows:
            checks.append(_unmatched(number, rule, comparison, with_baseline, candidate_id))
            continue
        for row in rows:
            checks.append(_check(number, rule, row, candidate_results, with_baseline))
    return {
        "passed": all(c["passed"] for c in checks),
        "baseline": baseline_id,
        "candidate": candidate_id,
        "rules": checks,
        "warnings": comparison.get("warnings", []),
        "error": None,
    }


def error_verdict(baseline_id: int | None, candidate_id: int, message: str) -> dict[str, Any]:
    return {
        "passed": False,
        "baseline": baseline_id,
        "candidate": candidate_id,
        "rules": [],
        "warnings": [],
        "error": message,
    }


def _kind(rule: dict[str, Any]) -> str:
    return next(k for k in KINDS if rule.get(k) is not None)


def _matches(rule: dict[str, Any], row: dict[str, Any]) -> bool:
    return (
        row["metric"] == rule["metric"]
        and rule.get("task") in (None, row["task"])
        and rule.get("filter") in (None, row["filter"])
    )


def _unmatched(
    number: int,
    rule: dict[str, Any],
    comparison: dict[str, Any],
    with_baseline: bool,
    candidate_id: int,
) -> dict[str, Any]:
    position = 1 if with_baseline else 0
    have = sorted(
        {
            f"{r['task']}/{r['metric']}"
            for r in comparison["rows"]
            if r["values"][position] is not None
        }
    )
    where = f" of task {rule['task']}" if rule.get("task") else ""
    under = f" under filter {rule['filter']}" if rule.get("filter") else ""
    shown = ", ".join(have[:20]) + (", ..." if len(have) > 20 else "") if have else "none"
    return {
        **_base(number, rule),
        "task": rule.get("task"),
        "filter": rule.get("filter"),
        "passed": False,
        "reason": f"job {candidate_id} reports no metric {rule['metric']}{where}{under}; "
        f"its metrics: {shown}",
    }


def _base(number: int, rule: dict[str, Any]) -> dict[str, Any]:
    kind = _kind(rule)
    return {
        "rule": number,
        "kind": kind,
        "metric": rule["metric"],
        "threshold": rule[kind] if kind != "no_significant_drop" else None,
        "alpha": rule.get("alpha", DEFAULT_ALPHA) if kind == "no_significant_drop" else None,
        "candidate": None,
        "baseline": None,
        "delta": None,
        "drop": None,
        "higher_is_better": None,
        "test": None,
        "p_value": None,
        "n_paired": None,
        "discordant": None,
    }


def _check(
    number: int,
    rule: dict[str, Any],
    row: dict[str, Any],
    candidate_results: dict[str, Any],
    with_baseline: bool,
) -> dict[str, Any]:
    check = {**_base(number, rule), "task": row["task"], "filter": row["filter"]}
    kind = check["kind"]
    i = 1 if with_baseline else 0
    candidate = _number(row["values"][i])
    baseline = _number(row["values"][0]) if with_baseline else None
    higher = _higher_is_better(candidate_results, row["task"], row["metric"])
    check.update(candidate=candidate, baseline=baseline, higher_is_better=higher)
    if with_baseline:
        check.update(
            test=row["tests"][1],
            p_value=row["p_values"][1],
            n_paired=row["n_paired"][1],
            discordant=row["discordant"][1],
        )
        if candidate is not None and baseline is not None:
            delta = candidate - baseline
            check.update(delta=delta, drop=-delta if higher else delta)
    name = f"{row['task']}/{row['metric']}" + (
        f" ({row['filter']})" if row["filter"] != "none" else ""
    )
    if candidate is None:
        return _verdict(check, False, f"{name}: the candidate has no numeric value")
    if kind == "min":
        ok = at_most(rule["min"], candidate)
        return _verdict(check, ok, f"{name} = {candidate:.4g} {'>=' if ok else '<'} {rule['min']}")
    if kind == "max":
        ok = at_most(candidate, rule["max"])
        return _verdict(check, ok, f"{name} = {candidate:.4g} {'<=' if ok else '>'} {rule['max']}")
    if baseline is None:
        return _verdict(check, False, f"{name}: the baseline has no numeric value")
    drop = check["drop"]
    if kind == "max_drop":
        ok = at_most(drop, rule["max_drop"])
        moved = (
            f"dropped by {drop:.4g}"
            if drop > 0
            else (f"improved by {-drop:.4g}" if drop < 0 else "did not change")
        )
        return _verdict(
            check,
            ok,
            f"{name} {moved} ({baseline:.4g} -> {candidate:.4g}), "
            f"{'within' if ok else 'more than'} max_drop {rule['max_drop']}",
        )
    p, alpha = check["p_value"], check["alpha"]
    if p is None:
        return _verdict(
            check,
            False,
            f"{name}: significance cannot be told (no paired samples and no stderr); run both "
            "jobs with log_samples=true",
        )
    significant = p < alpha
    worse = drop > 0 and significant
    how = f"{check['test']} p = {p:.3g}"
    if worse:
        text = f"{name} dropped significantly ({baseline:.4g} -> {candidate:.4g}, {how} < {alpha})"
    elif drop > 0:
        text = f"{name} dropped by {drop:.4g}, not significantly ({how} >= {alpha})"
    else:
        text = f"{name} did not drop ({baseline:.4g} -> {candidate:.4g}, {how})"
    return _verdict(check, not worse, text)


def _verdict(check: dict[str, Any], passed: bool, reason: str) -> dict[str, Any]:
    return {**check, "passed": passed, "reason": reason}


def _higher_is_better(results: dict[str, Any], task: str, metric: str) -> bool:
    table = results.get("higher_is_better")
    entry = table.get(task) if isinstance(table, dict) else None
    value = entry.get(metric) if isinstance(entry, dict) else None
    return value if isinstance(value, bool) else True


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
