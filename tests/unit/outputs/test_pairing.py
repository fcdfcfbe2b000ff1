"""pairing.py and compare.py's paired rows: documents paired by doc_id and doc_hash, what can
be tested, the line budget, comparability warnings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lm_eval_server.outputs import compare, pairing


def sample(doc_id: int, value: Any, *, doc_hash: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "doc_id": doc_id,
        "doc": {"q": f"question {doc_id}"},
        "target": "x",
        "arguments": {"gen_args_0": {"arg_0": "prompt", "arg_1": {}}},
        "resps": [["x"]],
        "filtered_resps": ["x"],
        "filter": extra.pop("filter", "none"),
        "metrics": list(extra.pop("metrics", ["acc"])),
        "doc_hash": doc_hash or f"h{doc_id}",
        "prompt_hash": "p",
        "target_hash": "t",
        "acc": value,
        **extra,
    }


def write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def scores(path: Path) -> pairing.DocScores:
    return pairing.read_doc_scores(path, pairing.LineBudget())


def results(acc: float, stderr: float = 0.03, **top: Any) -> dict[str, Any]:
    return {"results": {"t": {"acc,none": acc, "acc_stderr,none": stderr}}, **top}


def test_pairs_only_documents_with_the_same_id_and_hash(tmp_path: Path) -> None:
    base = scores(write(tmp_path / "a.jsonl", [sample(i, 1.0) for i in range(10)]))
    other_lines = [sample(i, 0.0 if i < 3 else 1.0) for i in range(12)]  # two extra documents
    other_lines[5]["doc_hash"] = "changed"  # the same id, another document: not paired
    other = scores(write(tmp_path / "b.jsonl", other_lines))
    xs, ys = pairing.pair(base.scores[("acc", "none")], other.scores[("acc", "none")])
    assert len(xs) == len(ys) == 9
    data = compare.compare([(1, results(1.0)), (2, results(0.75))], [{"t": base}, {"t": other}])
    [row] = data["rows"]
    assert row["tests"] == [None, "mcnemar"] and row["n_paired"] == [None, 9]
    assert row["discordant"] == [None, {"regressed": 3, "improved": 0}]
    assert row["p_values"][1] == 2 / 2**3


def test_non_numeric_scores_fall_back_to_the_unpaired_test(tmp_path: Path) -> None:
    lines = [sample(i, 1.0, metrics=["acc", "bleu"], bleu=["ref", "pred"]) for i in range(5)]
    lines[2]["acc"] = "N/A"
    found = scores(write(tmp_path / "a.jsonl", lines))
    assert found.usable(("acc", "none")) is None and found.usable(("bleu", "none")) is None
    data = compare.compare([(1, results(1.0)), (2, results(0.5))], [{"t": found}, {"t": found}])
    [row] = data["rows"]
    assert row["tests"] == [None, "unpaired_z"] and row["n_paired"] == [None, None]


def test_partial_credit_uses_the_paired_t_test(tmp_path: Path) -> None:
    a = scores(write(tmp_path / "a.jsonl", [sample(i, 0.5) for i in range(20)]))
    b = scores(write(tmp_path / "b.jsonl", [sample(i, 0.5 + (i % 3) / 10) for i in range(20)]))
    data = compare.compare([(1, results(0.5)), (2, results(0.6))], [{"t": a}, {"t": b}])
    [row] = data["rows"]
    assert row["tests"] == [None, "paired_t"] and row["discordant"] == [None, None]
    assert row["significant"] == [False, True]


def test_filters_are_paired_separately_and_doc_id_comes_from_the_line_start(
    tmp_path: Path,
) -> None:
    lines = [sample(i, 1.0, filter=f) for i in range(3) for f in ("strict", "flex")]
    found = scores(write(tmp_path / "a.jsonl", lines))
    assert set(found.scores) == {("acc", "strict"), ("acc", "flex")}
    assert list(found.scores[("acc", "flex")]) == [(0, "h0"), (1, "h1"), (2, "h2")]


def test_the_line_budget_bounds_a_comparison(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", [sample(i, 1.0) for i in range(5)])
    with pytest.raises(pairing.TooManyLines):
        pairing.read_doc_scores(path, pairing.LineBudget(left=4))


def test_comparability_warnings() -> None:
    def run(limit: Any, shots: int, version: float, task_hash: str, chat: Any) -> dict[str, Any]:
        return {
            **results(0.5),
            "config": {"limit": limit},
            "n-shot": {"t": shots},
            "versions": {"t": version},
            "task_hashes": {"t": task_hash},
            "chat_template_sha": chat,
        }

    same = run(None, 0, 1.0, "h", None)
    assert pairing.comparability_warnings(1, same, 2, dict(same)) == []
    found = pairing.comparability_warnings(1, same, 2, run(100.0, 5, 2.0, "g", "abc"))
    assert [(w["field"], w["task"], w["values"]) for w in found] == [
        ("limit", None, [None, 100.0]),
        ("chat template", None, [None, "abc"]),
        ("num_fewshot", "t", [0, 5]),
        ("task version", "t", [1.0, 2.0]),
        ("task hash", "t", ["h", "g"]),
    ]
    assert found[0]["message"] == (
        "limit differs (job 1: none, job 2: 100.0); the scores may not be comparable"
    )
    data = compare.compare([(1, same), (2, run(100.0, 0, 1.0, "h", None))])
    assert [w["field"] for w in data["warnings"]] == ["limit"]
    # A run without log_samples has no task hash: not a different one, so no warning.
    unsampled = run(None, 0, 1.0, "h", None)
    del unsampled["task_hashes"]
    assert pairing.comparability_warnings(1, same, 2, unsampled) == []
    assert pairing.comparability_warnings(2, unsampled, 1, same) == []
