"""gates.py and gate_rules.py: a gate's shape, and its verdict from a comparison."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from lm_eval_server.admission.gate_rules import Gate, GateRequest
from lm_eval_server.outputs import compare, gates, pairing


def run(values: dict[str, float], lower_is_better: tuple[str, ...] = ()) -> dict[str, Any]:
    metrics = {f"{m},none": v for m, v in values.items()}
    metrics.update({f"{m}_stderr,none": 0.01 for m in values})
    return {
        "results": {"t": metrics},
        "higher_is_better": {"t": {m: m not in lower_is_better for m in values}},
    }


def docs(right: list[int], n: int = 40) -> dict[str, pairing.DocScores]:
    found = pairing.DocScores()
    found.scores[("acc", "none")] = {(i, f"h{i}"): float(i in right) for i in range(n)}
    return {"t": found}


def verdict(
    rules: list[dict[str, Any]],
    base: dict[str, Any],
    cand: dict[str, Any],
    scores: list[dict[str, pairing.DocScores]] | None = None,
) -> dict[str, Any]:
    comparison = compare.compare([(1, base), (2, cand)], scores)
    return gates.evaluate(rules, comparison, cand, 1, 2)


def test_no_significant_drop_is_paired_where_samples_exist() -> None:
    rule = {"metric": "acc", "no_significant_drop": True}
    base, worse = run({"acc": 0.75}), run({"acc": 0.5})
    # 10 documents right in the base, wrong in the candidate: p = 2 / 2^10.
    scores = [docs(list(range(30))), docs(list(range(20)))]
    failed = verdict([rule], base, worse, scores)
    [check] = failed["rules"]
    assert failed["passed"] is False and check["passed"] is False
    assert check["test"] == "mcnemar" and check["p_value"] == 2 / 2**10
    assert check["discordant"] == {"regressed": 10, "improved": 0}
    assert check["drop"] == 0.25 and "dropped significantly" in check["reason"]
    # The same numbers the other way round are an improvement: it passes.
    passed = verdict([rule], worse, base, scores[::-1])
    assert passed["passed"] is True and "did not drop" in passed["rules"][0]["reason"]
    # A stricter alpha lets the drop through, as "not significant".
    lenient = verdict([{**rule, "alpha": 1e-4}], base, worse, scores)
    assert lenient["passed"] is True and "not significantly" in lenient["rules"][0]["reason"]


def test_min_max_and_max_drop_follow_the_metrics_direction() -> None:
    base = run({"acc": 0.7, "perplexity": 10.0}, lower_is_better=("perplexity",))
    cand = run({"acc": 0.65, "perplexity": 12.0}, lower_is_better=("perplexity",))
    rules = [
        {"task": "t", "metric": "acc", "min": 0.6},
        {"metric": "acc", "max_drop": 0.01},
        {"metric": "perplexity", "max_drop": 2.5},
        {"metric": "perplexity", "max": 11},
    ]
    result = verdict(rules, base, cand)
    assert [c["passed"] for c in result["rules"]] == [True, False, True, False]
    assert result["passed"] is False
    assert result["rules"][2]["drop"] == 2.0 and result["rules"][2]["higher_is_better"] is False
    assert result["rules"][0]["reason"] == "t/acc = 0.65 >= 0.6"


def test_a_threshold_equal_to_the_observed_change_passes_despite_float_rounding() -> None:
    # 0.675 - 0.6 is 0.07500000000000007 in floats: a gate set to the drop it saw passes.
    base, cand = run({"acc": 0.675}), run({"acc": 0.6})
    rules = [
        {"metric": "acc", "max_drop": 0.075},
        {"metric": "acc", "max_drop": 0.0749},
        {"metric": "acc", "min": 0.6},
        {"metric": "acc", "max": 0.6},
    ]
    result = verdict(rules, base, cand)
    assert [c["passed"] for c in result["rules"]] == [True, False, True, True]
    assert "within max_drop 0.075" in result["rules"][0]["reason"]


def test_a_rule_that_matches_nothing_fails_and_names_what_exists() -> None:
    result = verdict([{"metric": "f1", "min": 0.1}], run({"acc": 0.7}), run({"acc": 0.7}))
    [check] = result["rules"]
    assert check["passed"] is False and "no metric f1" in check["reason"]
    assert "t/acc" in check["reason"]


def test_significance_that_cannot_be_told_fails() -> None:
    base = {"results": {"t": {"acc,none": 0.7}}}
    cand = {"results": {"t": {"acc,none": 0.6}}}
    [check] = verdict([{"metric": "acc", "no_significant_drop": True}], base, cand)["rules"]
    assert check["passed"] is False and "log_samples" in check["reason"]


def test_absolute_rules_need_no_baseline() -> None:
    cand = run({"acc": 0.7})
    comparison = compare.compare([(5, cand)])
    result = gates.evaluate([{"metric": "acc", "min": 0.5}], comparison, cand, None, 5)
    assert result["passed"] is True and result["baseline"] is None


@pytest.mark.parametrize(
    ("gate", "words"),
    [
        ({"baseline": 1, "rules": [{"metric": "acc"}]}, "exactly one of"),
        ({"baseline": 1, "rules": [{"metric": "acc", "min": 1, "max": 2}]}, "has min, max"),
        ({"rules": [{"metric": "acc", "max_drop": 0.1}]}, '"baseline"'),
        ({"baseline": 1, "rules": []}, "at least 1"),
        ({"baseline": 1, "rules": [{"metric": "acc", "min": 1, "alpha": 0.1}]}, "alpha applies"),
        ({"baseline": 1, "rules": [{"metric": "acc", "no_significant_drop": False}]}, "takes true"),
        ({"baseline": 1, "rules": [{"metric": "acc", "max_drop": -1}]}, "greater than or equal"),
        ({"baseline": 0, "rules": [{"metric": "acc", "min": 1}]}, "greater than or equal"),
        ({"baseline": 1, "rules": [{"metric": "acc", "min": 1, "x": 1}]}, "Extra inputs"),
        # JSON types as written: a boolean or a string is not a threshold or a job id.
        ({"baseline": True, "rules": [{"metric": "acc", "min": 1}]}, "valid integer"),
        ({"baseline": "1", "rules": [{"metric": "acc", "min": 1}]}, "valid integer"),
        ({"baseline": 1, "rules": [{"metric": "acc", "max_drop": True}]}, "valid number"),
        ({"baseline": 1, "rules": [{"metric": "acc", "min": "0.5"}]}, "valid number"),
        ({"baseline": 1, "rules": [{"metric": "acc", "no_significant_drop": 1}]}, "takes true"),
        (
            {
                "baseline": 1,
                "rules": [{"metric": "acc", "no_significant_drop": True, "alpha": True}],
            },
            "valid number",
        ),
    ],
)
def test_malformed_gates_are_refused(gate: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        Gate(**gate)


def test_well_formed_gates() -> None:
    gate = Gate(baseline=3, rules=[{"metric": "acc", "no_significant_drop": True}])
    assert gate.rules[0].kind == "no_significant_drop"
    assert Gate(rules=[{"metric": "acc", "min": 0.5}]).baseline is None
    request = GateRequest(baseline=1, candidate=2, rules=[{"metric": "acc", "max_drop": 0}])
    assert request.model_dump(exclude_none=True)["rules"] == [{"metric": "acc", "max_drop": 0.0}]
