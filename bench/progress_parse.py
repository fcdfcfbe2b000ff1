"""How fast the progress tracker reads lm-eval's stderr: prints MB/s for `feed` (every record
parsed) and `skip` (the flood path: markers and the last bars only).

    uv run python bench/progress_parse.py
"""

from __future__ import annotations

import time
from pathlib import Path

from lm_eval_server.outputs.progress import ProgressTracker

LOG = Path(__file__).resolve().parents[1] / "tests" / "data" / "progress"


def flood() -> str:
    """A real mixed-job log with 8 MB of chatty lines and fast bar redraws in the middle."""
    text = (LOG / "local_completions_mc_gen.stderr").read_text(encoding="utf-8")
    at = text.index("Running generate_until")
    noise = "".join(f"warning {i}: something chatty about request {i}\n" for i in range(80_000))
    bars = "".join(
        f"\rRequesting API:  50%|#####     | {i}/80 [00:01<00:01, 9.9it/s]" for i in range(40_000)
    )
    return text[:at] + noise + bars + "\n" + text[at:]


def rate(label: str, text: str, method: str, chunk: int) -> None:
    tracker = ProgressTracker()
    step = getattr(tracker, method)
    start = time.perf_counter()
    for i in range(0, len(text), chunk):
        step(text[i : i + chunk])
    tracker.feed("")
    elapsed = time.perf_counter() - start
    mb = len(text.encode()) / 1e6
    print(f"{label:<34} {mb:6.1f} MB  {elapsed * 1000:8.1f} ms  {mb / elapsed:8.1f} MB/s")
    assert tracker.progress.done == 100, tracker.progress


def main() -> None:
    text = flood()
    rate("feed, 64 kB chunks", text, "feed", 64 * 1024)
    rate("skip, 1 MB chunks", text, "skip", 1024 * 1024)


if __name__ == "__main__":
    main()
