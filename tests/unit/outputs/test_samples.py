"""samples.py: the verdict rule, the streamed index and page reads on odd files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lm_eval_server.outputs import samples


def line(doc_id: int, filter_name: str = "none", **metrics: Any) -> dict[str, Any]:
    return {
        "doc_id": doc_id,
        "doc": {"q": doc_id},
        "target": "t",
        "arguments": {"gen_args_0": {"arg_0": f"prompt {doc_id}", "arg_1": {}}},
        "resps": [["r"]],
        "filtered_resps": ["r"],
        "filter": filter_name,
        "metrics": list(metrics),
        **metrics,
    }


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"acc": 1.0}, True),
        ({"acc": 0.0}, False),
        ({"exact_match": 1}, True),
        ({"prompt_level_strict_acc": False, "inst_level_strict_acc": [True]}, False),
        ({"prompt_level_strict_acc": True}, True),
        # The first correctness metric in the task's order decides, not any later one.
        ({"f1": 0.0, "acc_norm": 1.0, "acc": 0.0}, True),
        ({"f1": 0.5}, None),  # not a correctness metric
        ({"bleu": ["ref", "pred"]}, None),
        ({"exact_match": 0.5}, None),  # partial credit is neither right nor wrong
        ({"acc": None}, None),
        ({"acc": "1"}, None),
        ({}, None),
    ],
)
def test_verdict_rule(metrics: dict[str, Any], expected: bool | None) -> None:
    assert samples.verdict(line(0, **metrics)) is expected


def test_view_names_the_primary_metric_and_the_prompt() -> None:
    view = samples.sample_view(line(3, f1=0.2, exact_match=0.0))
    assert view["doc_id"] == 3 and view["prompt"] == "prompt 3"
    assert view["metrics"] == {"f1": 0.2, "exact_match": 0.0}
    assert view["primary_metric"] == "exact_match" and view["correct"] is False
    assert view["responses"] == ["r"] and view["raw_responses"] == [["r"]]


def write(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(
        b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)
    )
    return path


def test_index_pages_filters_and_wrong_answers(tmp_path: Path) -> None:
    rows = []
    for i in range(10):
        rows.append(line(i, "strict", exact_match=float(i % 3 != 0)))
        rows.append(line(i, "flexible", exact_match=1.0))
    path = write(tmp_path / "s.jsonl", rows)
    index = samples.build_index(path)
    assert index.filters == ["strict", "flexible"]
    total, page = index.page(None, False, 0, 5)
    assert total == 20 and page == [0, 1, 2, 3, 4]
    total, page = index.page("strict", True, 0, 2)
    assert total == 4 and page == [0, 6]  # docs 0 and 3 under "strict"
    total, page = index.page("strict", True, 2, 10)
    assert page == [12, 18]
    got = samples.read_page(path, index, page)
    assert [(s["doc_id"], s["filter"], s["correct"]) for s in got] == [
        (6, "strict", False),
        (9, "strict", False),
    ]
    assert index.page("nope", False, 0, 10) == (0, [])


def test_odd_lines_keep_their_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samples, "MAX_LINE_BYTES", 400)
    huge = line(1, acc=0.0)
    huge["doc"] = {"text": "x" * 1000}
    path = write(
        tmp_path / "s.jsonl",
        [line(0, acc=0.0), huge, b"not json", b"", b"[1, 2]", line(5, acc=float("nan"))],
    )
    index = samples.build_index(path)
    total, page = index.page(None, False, 0, 50)
    # The blank line is no sample; the others keep their order.
    assert total == 5
    got = samples.read_page(path, index, page)
    assert got[0]["doc_id"] == 0 and got[0]["correct"] is False
    assert "more than 400" in got[1]["error"] and got[1]["doc_id"] is None
    assert "not a JSON object" in got[2]["error"]
    assert "not a JSON object" in got[3]["error"]
    assert got[4]["metrics"] == {"acc": None} and got[4]["correct"] is None
    # Only the first line counts as a wrong answer: the long one was never judged.
    assert index.page(None, True, 0, 50) == (1, [0])
    # A page stops at its byte budget, after at least one sample.
    assert len(samples.read_page(path, index, page, max_bytes=1)) == 1


def test_index_reads_the_tail_and_falls_back_to_the_whole_line(tmp_path: Path) -> None:
    tricky = line(0, acc=0.0)
    # A response that spells the key inside a string cannot fool the tail read.
    tricky["filtered_resps"] = ['x, "filter": "evil", "metrics": ["acc"], "acc": 1.0}']
    reordered = {"acc": 0.0, "metrics": ["acc"], "filter": "f2", "doc_id": 1, "doc": {}}
    path = write(tmp_path / "s.jsonl", [tricky, reordered])
    index = samples.build_index(path)
    assert index.filters == ["none", "f2"]
    assert index.page(None, True, 0, 10) == (2, [0, 1])


def test_pages_mask_known_secret_values_but_not_a_datasets_own_fields(tmp_path: Path) -> None:
    from lm_eval_server.team.redact import Redactor

    redactor = Redactor()
    redactor.add_secrets(["sk-very-secret-value"])
    sample = line(0, acc=1.0)
    sample["doc"] = {"answerKey": "B", "api_key": "plain", "text": "say sk-very-secret-value"}
    sample["filtered_resps"] = ["sk-very-secret-value"]
    path = write(tmp_path / "s.jsonl", [sample])
    index = samples.build_index(path)
    [view] = samples.read_page(path, index, [0], redact=redactor.json_values_only)
    assert view["doc"] == {"answerKey": "B", "api_key": "plain", "text": "say ***"}
    assert view["responses"] == ["***"] and view["correct"] is True


def _mc_sample(target: Any, scores: list[float], choices: list[str], **metrics: Any) -> dict:
    """A line as lm-eval 0.4.13 writes it for a multiple_choice task (numbers as text)."""
    return {
        "doc_id": 0,
        "target": target,
        "arguments": {
            f"gen_args_{i}": {"arg_0": "Question: 6 + 3?\nAnswer:", "arg_1": f" {c}"}
            for i, c in enumerate(choices)
        },
        "resps": [[[str(s), "False"]] for s in scores],
        "filtered_resps": [[str(s), "True" if s == max(scores) else "False"] for s in scores],
        "filter": "none",
        "metrics": list(metrics),
        **metrics,
    }


def test_multiple_choice_view_shows_choices_pick_and_target() -> None:
    view = samples.sample_view(
        _mc_sample("1", [-0.26, -0.8, -0.55, -0.01], ["10", "9", "8", "11"], acc=0.0)
    )
    mc = view["multiple_choice"]
    assert [c["text"] for c in mc["choices"]] == [" 10", " 9", " 8", " 11"]
    assert [c["loglikelihood"] for c in mc["choices"]] == [-0.26, -0.8, -0.55, -0.01]
    assert [c["greedy"] for c in mc["choices"]] == [False, False, False, True]
    assert (mc["pick"], mc["target"], mc["pick_norm"]) == (3, 1, None)
    # acc_norm picks by log-likelihood per character: the long choice wins here.
    normed = _mc_sample(0, [-3.0, -1.0], ["a much longer choice", "b"], acc=0.0, acc_norm=1.0)
    mc = samples.sample_view(normed)["multiple_choice"]
    assert (mc["pick"], mc["pick_norm"], mc["target"]) == (1, 0, 0)


def test_multiple_choice_target_as_text_and_ambiguous_digits() -> None:
    by_text = _mc_sample("Paris", [-2.0, -1.0], ["London", "Paris"], acc=1.0)
    assert samples.sample_view(by_text)["multiple_choice"]["target"] == 1
    # Choices that are digits themselves: "1" is index 1 or the choice "1" (index 0); acc
    # says the pick (index 0) was right, so the target is the choice "1".
    digits = _mc_sample("1", [-0.5, -2.0], ["1", "2"], acc=1.0)
    assert samples.sample_view(digits)["multiple_choice"]["target"] == 0
    digits_wrong = _mc_sample("1", [-0.5, -2.0], ["1", "2"], acc=0.0)
    assert samples.sample_view(digits_wrong)["multiple_choice"]["target"] == 1
    assert (
        samples.sample_view(_mc_sample("7", [-1.0, -2.0], ["a", "b"]))["multiple_choice"]["target"]
        is None
    )


@pytest.mark.parametrize(
    "sample",
    [
        {
            "arguments": {"gen_args_0": {"arg_0": "Q", "arg_1": {"until": ["\n"]}}},
            "filtered_resps": ["x"],
        },
        {"arguments": {"gen_args_0": {"arg_0": "text"}}, "filtered_resps": [["-1.0", "False"]]},
        {"arguments": "not a mapping", "filtered_resps": []},
        _mc_sample(0, [-1.0, -2.0], ["a", "b"]) | {"filtered_resps": [["-1.0", "False"]]},
        _mc_sample(0, [-1.0, -2.0], ["a", "b"])
        | {"filtered_resps": [["x", "False"], ["-1", "False"]]},
    ],
)
def test_other_samples_have_no_multiple_choice_view(sample: dict[str, Any]) -> None:
    assert samples.sample_view(sample)["multiple_choice"] is None
