"""The stderr parser: real lm-eval logs captured from jobs (tests/data/progress/), and properties.

Fixtures (lm-eval 0.4.13, tasks demo_mc (20 docs x 4 choices) and arith_gen_tiny (20 docs)):
- dummy_mc_gen.stderr: `lm_eval --model dummy --tasks demo_mc,arith_gen_tiny`.
- dummy_gen_mc_debug.stderr: the same tasks the other way round, LMEVAL_LOG_LEVEL=DEBUG
  (which logs each task's request count); generate_until runs first.
- local_completions_mc_gen.stderr: through lm_eval_server.runtime.launcher, `local-completions`
  against tests/support/logprob_stub.py (`Tokenizing inputs` and `Requesting API` bars).
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_eval_server.outputs import progress as progress_module
from lm_eval_server.outputs.progress import (
    BUILDING_REQUESTS,
    LOADING_MODEL,
    STARTING,
    WRITING_RESULTS,
    PhaseCount,
    Progress,
    ProgressTracker,
    parse_bar,
    terminal_lines,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "progress"
API_BAR = "Requesting API:  37%|███▋      | 84/228 [00:39<01:05,  2.21it/s]"
CONTEXT = "2026-11-21:23:21:54 INFO     [api.task:312] Building contexts for demo_mc on rank 0...\n"
RUN_LL = "2026-11-21:23:21:54 INFO     [evaluator:589] Running loglikelihood requests\n"
MC_FIRST = [STARTING, LOADING_MODEL, BUILDING_REQUESTS, "loglikelihood", "generate_until"]
GEN_FIRST = [STARTING, LOADING_MODEL, BUILDING_REQUESTS, "generate_until", "loglikelihood"]


def bar(done: int, total: int, desc: str = "") -> str:
    pct = 100 * done // total
    prefix = f"{desc}: " if desc else ""
    return f"{prefix}{pct:3d}%|{'#' * (pct // 10):10s}| {done}/{total} [00:01<00:02, 3.50it/s]"


def log(name: str, *, ray: bool = False, debug: bool = True) -> str:
    text = (DATA / name).read_text(encoding="utf-8")
    if not debug:
        # The same run as lm-eval logs it at its default level (INFO).
        text = "".join(line for line in text.splitlines(True) if " DEBUG    [" not in line)
    # Ray reads job logs in text mode: each tqdm redraw arrives as a line of its own.
    return text.replace("\r", "\n") if ray else text


def snapshots(text: str, cuts: list[int]) -> list[Progress]:
    """The tracker's progress after each chunk, cutting `text` at `cuts`."""
    tracker = ProgressTracker()
    seen = []
    bounds = [0, *sorted(set(cuts)), len(text)]
    for start, stop in itertools.pairwise(bounds):
        tracker.feed(text[start:stop])
        seen.append(tracker.progress)
    return seen


def phase_order(seen: list[Progress]) -> list[str]:
    order: list[str] = []
    for progress in seen:
        if not order or order[-1] != progress.phase:
            order.append(progress.phase)
    return order


def counts(progress: Progress) -> dict[str, tuple[int, int | None]]:
    return {p.phase: (p.done, p.total) for p in progress.phases}


# ---------------------------------------------------------------- real logs


@pytest.mark.parametrize("ray", [False, True])
@pytest.mark.parametrize(
    "name", ["dummy_mc_gen.stderr", "local_completions_mc_gen.stderr"], ids=["dummy", "api"]
)
@pytest.mark.parametrize("chunk", [1, 7, 64, 4096, 10**6])
def test_mixed_job_whole_progress(name: str, chunk: int, ray: bool) -> None:
    text = log(name, ray=ray)
    seen = snapshots(text, list(range(chunk, len(text), chunk)))
    pcts = [p.pct for p in seen]
    assert pcts == sorted(pcts)
    final = seen[-1]
    assert (final.phase, final.done, final.total, final.pct) == (WRITING_RESULTS, 100, 100, 100)
    assert [p.phase for p in final.phases] == [*MC_FIRST, WRITING_RESULTS]
    assert counts(final) == {
        STARTING: (0, None),
        LOADING_MODEL: (0, None),
        BUILDING_REQUESTS: (40, 40),  # documents, 20 per task
        "loglikelihood": (80, 80),
        "generate_until": (20, 20),
        WRITING_RESULTS: (0, None),
    }
    if chunk < 100:
        assert phase_order(seen) == [*MC_FIRST, WRITING_RESULTS]
        # The whole-job total: 40 docs estimated while building, then 80 + 20 requests.
        assert {p.total for p in seen} == {0, 20, 40, 100}
        # While generate_until runs, loglikelihood's 80 are done out of the job's 100.
        assert min(p.pct for p in seen if p.phase == "generate_until") == 80


def test_api_job_counts_requesting_api_not_tokenizing() -> None:
    text = log("local_completions_mc_gen.stderr")
    at = text.index("Requesting API")  # after the whole "Tokenizing inputs" bar (80/80)
    tracker = ProgressTracker()
    tracker.feed(text[:at])
    assert tracker.progress.phase == "loglikelihood"
    assert (tracker.progress.done, tracker.progress.pct) == (0, 0)
    tracker.feed(text[at:])
    assert counts(tracker.progress)["loglikelihood"] == (80, 80)


def test_phase_boundaries_in_the_real_log() -> None:
    text = log("local_completions_mc_gen.stderr")
    tracker = ProgressTracker()
    assert tracker.progress.phase == STARTING
    tracker.feed(text[: text.index("Initializing")])
    assert tracker.progress.phase == STARTING  # the launcher's and CLI's own lines
    tracker.feed(text[text.index("Initializing") : text.index("Building contexts")])
    assert tracker.progress.phase == LOADING_MODEL
    rest = text[text.index("Building contexts") :]
    tracker.feed(rest[: rest.index("Running loglikelihood")])
    assert (tracker.progress.phase, tracker.progress.total) == (BUILDING_REQUESTS, 40)
    assert tracker.progress.pct == 0


def test_generation_first_at_info_level_estimates_then_counts() -> None:
    """Without the DEBUG line, loglikelihood's total is unknown until its bar: the 20
    multiple-choice docs stand for at least 20 requests, then the bar says 80. The
    percentage holds at 50 instead of dropping to 20."""
    text = log("dummy_gen_mc_debug.stderr", debug=False)
    seen = snapshots(text, list(range(16, len(text), 16)))
    assert phase_order(seen) == [*GEN_FIRST, WRITING_RESULTS]
    pcts = [p.pct for p in seen]
    assert pcts == sorted(pcts)
    after_gen = [p for p in seen if p.phase == "loglikelihood"]
    assert (after_gen[0].done, after_gen[0].total, after_gen[0].pct) == (20, 40, 50)
    counted = next(p for p in after_gen if p.total == 100)
    assert (counted.done, counted.pct) == (20, 50)
    assert (seen[-1].done, seen[-1].total, seen[-1].pct) == (100, 100, 100)


def test_debug_request_counts_give_the_exact_total_before_inference() -> None:
    text = log("dummy_gen_mc_debug.stderr")
    tracker = ProgressTracker()
    tracker.feed(text[: text.index("Running generate_until")])
    assert (tracker.progress.phase, tracker.progress.total) == (BUILDING_REQUESTS, 100)
    tracker.feed(text[text.index("Running generate_until") :])
    assert counts(tracker.progress)["generate_until"] == (20, 20)
    assert counts(tracker.progress)["loglikelihood"] == (80, 80)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_cuts_give_the_same_counts_and_a_monotonic_pct(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(["dummy_mc_gen.stderr", "local_completions_mc_gen.stderr"]))
    text = log(name, ray=data.draw(st.booleans()))
    cuts = data.draw(st.lists(st.integers(1, len(text) - 1), max_size=60))
    seen = snapshots(text, cuts)
    assert [p.pct for p in seen] == sorted(p.pct for p in seen)
    assert seen[-1] == snapshots(text, [])[-1]


def test_skip_over_a_flood_keeps_counts_and_markers() -> None:
    text = log("local_completions_mc_gen.stderr")
    at = text.index("Running generate_until")
    # Near-misses of the marker lines too: they must not move the phase.
    noise = "".join(
        f"warning {i}: Running {i} shards, Initializing cache, 50% done\n" for i in range(20000)
    )
    flooded = text[:at] + noise + text[at:]
    cut = len(flooded) - 300  # the end of the log goes through feed, as in the manager
    tracker = ProgressTracker()
    tracker.skip(flooded[:cut])
    tracker.feed(flooded[cut:])
    assert counts(tracker.progress) == counts(snapshots(text, [])[-1])
    # Cut in the middle of a marker line: skip keeps the unterminated record for feed.
    line = text.index("Running loglikelihood requests") + 10
    tracker = ProgressTracker()
    tracker.skip(text[:line])
    tracker.feed(text[line:])
    assert counts(tracker.progress) == counts(snapshots(text, [])[-1])


def test_lost_output_drops_the_cut_record() -> None:
    """After output was dropped unread, the cut record's start must not be joined with
    whatever comes next (here into a bogus 5/100)."""
    tracker = ProgressTracker()
    tracker.feed(RUN_LL + bar(1, 10) + "\r 50%|#####     | 5/1")
    tracker.lost_output()
    tracker.feed("00 [00:01<00:02, 3.50it/s]")
    assert (tracker.progress.done, tracker.progress.total) == (1, 10)


def test_progress_module_imports_nothing_of_ours() -> None:
    """The layering rule: the parser is pure and stands alone."""
    tree = ast.parse(Path(progress_module.__file__).read_text())
    imported = {
        name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [a.name for a in node.names]
        )
    }
    assert imported == {"__future__", "re", "dataclasses"}


# ---------------------------------------------------------------- rules, small inputs


def test_parse_api_bar() -> None:
    match = parse_bar(API_BAR)
    assert match is not None
    assert (match.desc, match.done, match.total) == ("Requesting API", 84, 228)
    assert match.rate_per_s == 2.21
    assert match.eta_s == 65


def test_seconds_per_item_rate_and_unknown_eta() -> None:
    match = parse_bar("  0%|          | 0/80 [00:00<?, ?it/s]")
    assert match is not None and match.eta_s is None and match.rate_per_s is None
    slow = parse_bar(" 50%|#####     | 5/10 [00:10<00:10,  2.00s/it]")
    assert slow is not None and slow.rate_per_s == 0.5


def test_a_new_tracker_is_starting() -> None:
    progress = ProgressTracker().progress
    assert (progress.phase, progress.done, progress.total, progress.pct) == (STARTING, 0, 0, 0)
    assert progress.phases == (PhaseCount(STARTING),)


def test_context_bars_are_not_inference() -> None:
    tracker = ProgressTracker()
    tracker.feed(CONTEXT + "\r" + bar(10, 20) + "\r" + bar(20, 20) + "\n")
    assert tracker.progress.phase == BUILDING_REQUESTS
    assert (tracker.progress.done, tracker.progress.pct) == (0, 0)
    assert counts(tracker.progress)[BUILDING_REQUESTS] == (20, 20)
    tracker.feed(RUN_LL + "\r" + bar(40, 80))
    assert (tracker.progress.phase, tracker.progress.done, tracker.progress.pct) == (
        "loglikelihood",
        40,
        50,
    )
    assert tracker.progress.rate_per_s == 3.5
    assert tracker.progress.eta_s == round(40 / 3.5, 1)


def test_api_bar_redraws_with_carriage_returns() -> None:
    tracker = ProgressTracker()
    seen = []
    for done in range(0, 229, 12):
        tracker.feed("\r" + bar(done, 228, "Requesting API"))
        seen.append(tracker.progress.pct)
    assert seen == sorted(seen) and seen[0] == 0 and 0 < seen[5] < 100
    assert tracker.progress.phase == "api requests"


def test_generate_until_and_rolling_phases() -> None:
    tracker = ProgressTracker()
    tracker.feed("x INFO Running generate_until requests\n" + bar(3, 4) + "\n")
    assert tracker.progress.phase == "generate_until"
    tracker.feed("x INFO Running loglikelihood_rolling requests\n" + bar(1, 4))
    assert tracker.progress.phase == "loglikelihood_rolling"
    tracker.feed("\r" + bar(2, 5, "Running generate_until requests"))
    assert tracker.progress.phase == "generate_until"
    assert counts(tracker.progress)["generate_until"] == (2, 5)
    assert (tracker.progress.done, tracker.progress.total) == (3, 9)


def test_nested_api_bars_do_not_replace_the_phase_bar() -> None:
    """API models' loglikelihood_rolling: a bar over documents, `Requesting API` per window."""
    tracker = ProgressTracker()
    tracker.feed("x INFO Running loglikelihood_rolling requests\n")
    for doc in range(3):
        tracker.feed("\r" + bar(doc, 3) + "\n")
        tracker.feed("\r" + bar(0, 1, "Requesting API") + "\r" + bar(1, 1, "Requesting API") + "\n")
    tracker.feed("\r" + bar(3, 3) + "\n")
    assert counts(tracker.progress)["loglikelihood_rolling"] == (3, 3)


def test_other_described_bars_are_ignored() -> None:
    tracker = ProgressTracker()
    tracker.feed(RUN_LL + "Generating train split: 20 examples [00:00, 1.0 examples/s]\n")
    tracker.feed("Map: 50%|#####     | 5/10 [00:00<00:00, 9.00 examples/s]\n")
    assert tracker.progress.phase == "loglikelihood"
    assert counts(tracker.progress)["loglikelihood"] == (0, None)


def test_phases_only_move_forward() -> None:
    tracker = ProgressTracker()
    tracker.feed(RUN_LL + bar(4, 4) + "\nx INFO Saving results aggregated\n")
    tracker.feed(CONTEXT + "x INFO Initializing dummy model, with arguments: {}\n")
    tracker.feed("x INFO Running generate_until requests\n")
    assert tracker.progress.phase == WRITING_RESULTS
    assert [p.phase for p in tracker.progress.phases] == [
        STARTING,
        "loglikelihood",
        WRITING_RESULTS,
    ]


def test_skip_keeps_phase_markers() -> None:
    tracker = ProgressTracker()
    tracker.skip("noise\n" * 1000 + RUN_LL + "more noise\n")
    tracker.feed(bar(5, 10) + "\n")
    assert tracker.progress.phase == "loglikelihood"
    assert (tracker.progress.done, tracker.progress.total) == (5, 10)


def test_terminal_lines_keep_the_last_redraw() -> None:
    text = "a\n" + "".join("\r" + bar(i, 100) for i in range(101)) + "\nb\n" + "\r" + bar(7, 9)
    lines = terminal_lines(text)
    assert lines == ["a\n", bar(100, 100) + "\n", "b\n", bar(7, 9)]


@given(
    st.lists(st.integers(min_value=0, max_value=500), min_size=1, max_size=30),
    st.integers(min_value=1, max_value=40),
)
def test_chunking_does_not_change_the_counts(dones: list[int], cut: int) -> None:
    total = 500
    stream = RUN_LL + "".join("\r" + bar(d, total) for d in dones) + "\n"
    whole = ProgressTracker()
    whole.feed(stream)
    pieces = ProgressTracker()
    for start in range(0, len(stream), cut):
        pieces.feed(stream[start : start + cut])
    # The percentage is the highest seen, and pieces are seen more often than the whole.
    assert dataclasses.replace(whole.progress, pct=0) == dataclasses.replace(pieces.progress, pct=0)
    assert pieces.progress.pct >= whole.progress.pct
    assert whole.progress.done == dones[-1]
    if dones == sorted(dones):  # as tqdm counts: then nothing differs
        assert whole.progress == pieces.progress


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=1, max_value=10**6))
def test_pct_is_bounded(done: int, total: int) -> None:
    tracker = ProgressTracker()
    tracker.feed("\r" + bar(min(done, total), total, "Requesting API"))
    assert 0 <= tracker.progress.pct <= 100


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_arbitrary_text_never_crashes(text: str) -> None:
    tracker = ProgressTracker()
    tracker.feed(text)
    tracker.skip(text)
    assert 0 <= tracker.progress.pct <= 100
    lines = terminal_lines(text)
    assert all("\r" not in line for line in lines)
    assert all("\n" not in line[:-1] for line in lines)


RUN_GEN = "2026-11-21:23:21:54 INFO     [evaluator:589] Running generate_until requests\n"


def cached_line(hits: int, of: int) -> str:
    return (
        f"lm_eval_server.response_cache: generate_until: {hits} of {of} requests answered "
        "from the response cache\n"
    )


def test_requests_answered_from_the_response_cache_count_as_done() -> None:
    tracker = ProgressTracker()
    tracker.feed(RUN_GEN + cached_line(20, 200))
    assert (tracker.progress.done, tracker.progress.total) == (20, 20)
    tracker.feed("Requesting API:  50%|█████     | 90/180 [00:09<00:09, 10.0it/s]\r")
    assert (tracker.progress.done, tracker.progress.total) == (110, 200)
    tracker.feed("Requesting API: 100%|██████████| 180/180 [00:18<00:00, 10.0it/s]\n")
    assert (tracker.progress.done, tracker.progress.total, tracker.progress.pct) == (200, 200, 100)
    # A repeat: every request from the cache, the model never called (no bar at all).
    repeat = ProgressTracker()
    repeat.feed(RUN_GEN + cached_line(200, 200))
    assert (repeat.progress.done, repeat.progress.total, repeat.progress.pct) == (200, 200, 100)
    # The cheap path for floods reads the line too.
    skipped = ProgressTracker()
    skipped.skip(RUN_GEN + "noise\n" * 100 + cached_line(200, 200))
    assert (skipped.progress.done, skipped.progress.total) == (200, 200)
