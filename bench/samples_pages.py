"""How the samples JSON view copes with a big samples file: prints the time to index it once
(streamed), the time for a page at the start, middle and end, a wrong-answers page, and the
peak memory of the process against the file's size.

    uv run python bench/samples_pages.py [--lines 200000] [--doc-bytes 2000]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from lm_eval_server.outputs import samples


def write_file(path: Path, lines: int, doc_bytes: int) -> None:
    filler = "x" * doc_bytes
    with path.open("w", encoding="utf-8") as f:
        for i in range(lines):
            right = float(i % 3 != 0)
            sample = {
                "doc_id": i,
                "doc": {"text": filler, "answer": str(i)},
                "target": str(i),
                "arguments": {"gen_args_0": {"arg_0": f"Q{i}: {filler[:200]}", "arg_1": {}}},
                "resps": [[str(i)]],
                "filtered_resps": [str(i)],
                "filter": "none",
                "metrics": ["exact_match"],
                "exact_match": right,
            }
            f.write(json.dumps(sample) + "\n")


def timed(label: str, fn, *args):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = fn(*args)
    print(f"{label:<34} {1000 * (time.perf_counter() - started):9.1f} ms")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--doc-bytes", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples_bench_2026.jsonl"
        write_file(path, args.lines, args.doc_bytes)
        size_mb = path.stat().st_size / 1e6
        print(f"file: {args.lines} lines, {size_mb:.0f} MB")
        before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        index = timed("index (once per file)", samples.build_index, path)
        for label, offset, wrong in [
            ("page of 50 at the start", 0, False),
            ("page of 50 in the middle", args.lines // 2, False),
            ("page of 50 at the end", args.lines - 50, False),
            ("wrong answers, page in the middle", args.lines // 6, True),
        ]:
            _, lines = timed(f"{label} (select)", index.page, None, wrong, offset, 50)
            timed(f"{label} (read)", samples.read_page, path, index, lines)
        after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"peak RSS grew by {(after_kb - before_kb) / 1e3:.0f} MB for a {size_mb:.0f} MB file")


if __name__ == "__main__":
    main()
