"""The tqdm / log-line parser: examples from real lm-eval output, and properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lm_eval_server.progress import ProgressTracker, parse_bar, terminal_lines

API_BAR = "Requesting API:  37%|███▋      | 84/228 [00:39<01:05,  2.21it/s]"
CONTEXT = "2026-11-21:23:21:54 INFO     [api.task:312] Building contexts for demo_mc on rank 0...\n"
RUN_LL = "2026-11-21:23:21:54 INFO     [evaluator:589] Running loglikelihood requests\n"


def bar(done: int, total: int, desc: str = "") -> str:
    pct = 100 * done // total
    prefix = f"{desc}: " if desc else ""
    return f"{prefix}{pct:3d}%|{'#' * (pct // 10):10s}| {done}/{total} [00:01<00:02, 3.50it/s]"


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


def test_context_bars_are_not_inference() -> None:
    tracker = ProgressTracker()
    tracker.feed(CONTEXT + "\r" + bar(10, 20) + "\r" + bar(20, 20) + "\n")
    assert tracker.progress is None
    tracker.feed(RUN_LL + "\r" + bar(40, 80))
    assert tracker.progress is not None
    assert (tracker.progress.phase, tracker.progress.done, tracker.progress.pct) == (
        "loglikelihood",
        40,
        50,
    )


def test_api_bar_redraws_with_carriage_returns() -> None:
    tracker = ProgressTracker()
    seen = []
    for done in range(0, 229, 12):
        tracker.feed("\r" + bar(done, 228, "Requesting API"))
        assert tracker.progress is not None
        seen.append(tracker.progress.pct)
    assert seen == sorted(seen) and seen[0] == 0 and 0 < seen[5] < 100
    assert tracker.progress.phase == "api requests"


def test_generate_until_and_rolling_phases() -> None:
    tracker = ProgressTracker()
    tracker.feed("x INFO Running generate_until requests\n" + bar(3, 4) + "\n")
    assert tracker.progress is not None and tracker.progress.phase == "generate_until"
    tracker.feed("x INFO Running loglikelihood_rolling requests\n" + bar(1, 4))
    assert tracker.progress.phase == "loglikelihood_rolling"
    tracker.feed("\r" + bar(2, 5, "Running generate_until requests"))
    assert tracker.progress.phase == "generate_until" and tracker.progress.done == 2


def test_other_described_bars_are_ignored() -> None:
    tracker = ProgressTracker()
    tracker.feed(RUN_LL + "Generating train split: 20 examples [00:00, 1.0 examples/s]\n")
    tracker.feed("Map: 50%|#####     | 5/10 [00:00<00:00, 9.00 examples/s]\n")
    assert tracker.progress is None


def test_skip_keeps_phase_markers() -> None:
    tracker = ProgressTracker()
    tracker.skip("noise\n" * 1000 + RUN_LL + "more noise\n")
    tracker.feed(bar(5, 10) + "\n")
    assert tracker.progress is not None and tracker.progress.phase == "loglikelihood"


def test_terminal_lines_keep_the_last_redraw() -> None:
    text = "a\n" + "".join("\r" + bar(i, 100) for i in range(101)) + "\nb\n" + "\r" + bar(7, 9)
    lines = terminal_lines(text)
    assert lines == ["a\n", bar(100, 100) + "\n", "b\n", bar(7, 9)]


@given(
    st.lists(st.integers(min_value=0, max_value=500), min_size=1, max_size=30),
    st.integers(min_value=1, max_value=40),
)
def test_chunking_does_not_change_the_result(dones: list[int], cut: int) -> None:
    total = 500
    stream = RUN_LL + "".join("\r" + bar(d, total) for d in dones) + "\n"
    whole = ProgressTracker()
    whole.feed(stream)
    pieces = ProgressTracker()
    for start in range(0, len(stream), cut):
        pieces.feed(stream[start : start + cut])
    assert whole.progress == pieces.progress
    assert whole.progress is not None and whole.progress.done == dones[-1]


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=1, max_value=10**6))
def test_pct_is_bounded(done: int, total: int) -> None:
    tracker = ProgressTracker()
    tracker.feed("\r" + bar(min(done, total), total, "Requesting API"))
    assert tracker.progress is not None
    assert 0 <= tracker.progress.pct <= 100


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_arbitrary_text_never_crashes(text: str) -> None:
    tracker = ProgressTracker()
    tracker.feed(text)
    lines = terminal_lines(text)
    assert all("\r" not in line for line in lines)
    assert all("\n" not in line[:-1] for line in lines)
