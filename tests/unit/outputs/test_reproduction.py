"""The reproduction diff (outputs/reproduction.py): pairing, counting, examples, and the two
jobs' files read as lm-eval writes them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lm_eval_server.outputs import reproduction
from lm_eval_server.outputs.reproduction import Sample, diff_task, metric_deltas, sample_of


def line(doc_id: int, answer: str, right: bool, **extra: Any) -> dict[str, Any]:
    return {
        "doc_id": doc_id,
        "doc_hash": f"h{doc_id}",
        "filter": "none",
        "filtered_resps": [answer],
        "resps": [[answer]],
        "metrics": ["exact_match"],
        "exact_match": 1.0 if right else 0.0,
        **extra,
    }


def samples(lines: list[dict[str, Any]]) -> list[Sample]:
    return [s for i, x in enumerate(lines) if (s := sample_of(x, i)) is not None]


def test_identical_runs_pair_every_document_in_any_order() -> None:
    lines = [line(i, str(i), i % 3 == 0) for i in range(30)]
    diff = diff_task("t", samples(lines), samples(list(reversed(lines))))
    assert (diff.identical, diff.differing, diff.only_original, diff.only_reproduction) == (
        30,
        0,
        0,
        0,
    )
    assert diff.examples == [] and diff.metric_changes == {}


def test_a_changed_answer_or_metric_differs_with_a_bounded_example_list() -> None:
    first = [line(i, str(i), False) for i in range(20)]
    second = [line(i, str(i + 1) if i < 8 else str(i), i < 8) for i in range(20)]
    # A response that changes and a metric that does not (the answer is still wrong).
    second[10] = line(10, "other", False)
    originals = samples(first)
    diff = diff_task("t", originals, samples(second), lambda ref: originals[ref], max_examples=3)
    assert (diff.identical, diff.differing) == (11, 9)
    assert diff.metric_changes == {("exact_match", "none"): 8}
    assert len(diff.examples) == 3
    assert diff.examples[0] == {
        "task": "t",
        "doc_id": 0,
        "doc_hash": "h0",
        "filter": "none",
        "original": {"responses": ["0"], "metrics": {"exact_match": 0.0}},
        "reproduction": {"responses": ["1"], "metrics": {"exact_match": 1.0}},
    }


def test_documents_are_paired_by_doc_id_doc_hash_and_filter() -> None:
    first = [line(0, "a", True), line(1, "b", True), line(2, "c", True, filter="strict")]
    # doc 1's document changed (another hash), doc 2 scored under another filter, doc 3 new.
    second = [
        line(0, "a", True),
        line(1, "b", True, doc_hash="changed"),
        line(2, "c", True),
        line(3, "d", True),
    ]
    diff = diff_task("t", samples(first), samples(second))
    assert (diff.identical, diff.differing) == (1, 0)
    assert (diff.only_original, diff.only_reproduction) == (2, 3)


def test_nan_equals_nan_and_lines_without_a_doc_id_are_skipped() -> None:
    nan = line(0, "x", True, exact_match=math.nan)
    assert sample_of({"doc_hash": "h"}) is None
    diff = diff_task("t", samples([nan]), samples([dict(nan)]))
    assert (diff.identical, diff.differing) == (1, 0)


def test_the_held_side_is_bounded() -> None:
    lines = [line(i, "x", True) for i in range(10)]
    diff = diff_task("t", samples(lines), samples(lines), max_samples=4)
    assert diff.truncated and diff.identical == 4 and diff.only_reproduction == 6


def test_examples_clip_long_responses() -> None:
    long = "y" * (reproduction.EXAMPLE_TEXT + 50)
    clipped = reproduction.clip([long] * 20)
    assert len(clipped) == 10 and clipped[0] == "y" * reproduction.EXAMPLE_TEXT + "…"


def test_metric_deltas_join_both_results_and_count_changed_samples() -> None:
    first = [
        {"task": "t", "metric": "exact_match", "filter": "none", "value": 0.5},
        {"task": "t", "metric": "bleu", "filter": "none", "value": "n/a"},
    ]
    second = [{"task": "t", "metric": "exact_match", "filter": "none", "value": 0.75}]
    diff = reproduction.TaskDiff("t", metric_changes={("exact_match", "none"): 5})
    rows = metric_deltas(first, second, [diff])
    paired = reproduction.TaskDiff("t", identical=3)
    assert metric_deltas(first, first, [paired])[0]["samples_differing"] == 0
    assert rows == [
        {
            "task": "t",
            "metric": "exact_match",
            "filter": "none",
            "original": 0.5,
            "reproduction": 0.75,
            "delta": 0.25,
            "samples_differing": 5,
        },
        {
            "task": "t",
            "metric": "bleu",
            "filter": "none",
            "original": "n/a",
            "reproduction": None,
            "delta": None,
            "samples_differing": None,
        },
    ]


def write_run(root: Path, lines: list[dict[str, Any]], value: float) -> reproduction.RunFiles:
    """A results directory as lm-eval writes one: results_<date>.json and samples beside it."""
    out = root / "stub"
    out.mkdir(parents=True)
    date = "2026-01-01T00-00-00.000001"
    results_file = out / f"results_{date}.json"
    results_file.write_text(json.dumps({"results": {"t": {"exact_match,none": value}}}))
    (out / f"samples_t_{date}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return reproduction.RunFiles(root, results_file)


def test_the_report_reads_both_jobs_files(tmp_path: Path) -> None:
    first = [line(i, str(i), i < 5) for i in range(10)]
    second = [line(i, str(i), i < 6) for i in range(10)]
    second[5]["filtered_resps"] = ["fixed"]
    a = write_run(tmp_path / "a", first, 0.5)
    b = write_run(tmp_path / "b", second, 0.6)
    report = reproduction.reproduction_report(7, a, b)
    assert report["of"] == 7 and report["state"] == "done"
    assert (report["identical"], report["differing"]) == (9, 1)
    [example] = report["examples"]
    assert example["doc_id"] == 5
    assert example["original"]["responses"] == ["5"]
    assert example["reproduction"]["responses"] == ["fixed"]
    [delta] = report["metric_deltas"]
    assert delta["samples_differing"] == 1
    assert math.isclose(delta["delta"], 0.1)


def test_the_report_says_why_there_is_nothing_to_compare(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", [line(0, "0", True)], 1.0)
    missing = reproduction.RunFiles(tmp_path / "b", None)
    report = reproduction.reproduction_report(3, a, missing)
    assert report["state"] == "unavailable" and report["identical"] is None
    assert "reproduction has no results file" in report["note"]
    # Results but no samples (no log_samples): metrics only, said so.
    for run in (a,):
        for path in run.results_file.parent.glob("samples_*"):
            path.unlink()
    report = reproduction.reproduction_report(3, a, a)
    assert report["state"] == "done" and (report["identical"], report["differing"]) == (0, 0)
    assert "without log_samples" in report["note"]
    assert report["metric_deltas"][0]["delta"] == 0.0


def test_a_symlink_in_place_of_a_samples_file_is_not_followed(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", [line(0, "0", True)], 1.0)
    b = write_run(tmp_path / "b", [line(0, "0", True)], 1.0)
    [samples_b] = b.results_file.parent.glob("samples_*")
    secret = tmp_path / "elsewhere.jsonl"
    secret.write_text(json.dumps(line(0, "planted", True)) + "\n")
    samples_b.unlink()
    samples_b.symlink_to(secret)
    report = reproduction.reproduction_report(1, a, b)
    # The link is not a samples file: the original's document is unpaired, nothing planted read.
    assert "planted" not in json.dumps(report)
    assert report["only_original"] == 1 and report["identical"] == 0
