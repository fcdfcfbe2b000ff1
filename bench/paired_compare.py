"""What a paired comparison costs: prints the time to read two runs' per-document scores from
their samples files (streamed, once per request), to pair and test them (McNemar's exact test),
and the peak memory of the process against the files' sizes.

    uv run python bench/paired_compare.py [--lines 200000] [--doc-bytes 500]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from lm_eval_server.outputs import compare, pairing


def write_file(path: Path, lines: int, doc_bytes: int, wrong_every: int) -> None:
    filler = "x" * doc_bytes
    with path.open("w", encoding="utf-8") as f:
        for i in range(lines):
            sample = {
                "doc_id": i,
                "doc": {"text": filler, "answer": str(i)},
                "target": str(i),
                "arguments": {"gen_args_0": {"arg_0": f"Q{i}: {filler[:200]}", "arg_1": {}}},
                "resps": [[str(i)]],
                "filtered_resps": [str(i)],
                "filter": "none",
                "metrics": ["exact_match"],
                "doc_hash": f"{i:064x}",
                "prompt_hash": "p" * 64,
                "target_hash": "t" * 64,
                "exact_match": float(i % wrong_every != 0),
            }
            f.write(json.dumps(sample) + "\n")


def timed(label: str, fn: Any, *args: Any) -> Any:
    started = time.perf_counter()
    result = fn(*args)
    print(f"{label:<40} {1000 * (time.perf_counter() - started):9.1f} ms")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--doc-bytes", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "samples_a.jsonl", Path(tmp) / "samples_b.jsonl"
        write_file(a, args.lines, args.doc_bytes, 3)
        write_file(b, args.lines, args.doc_bytes, 4)
        size_mb = (a.stat().st_size + b.stat().st_size) / 1e6
        print(f"files: 2 x {args.lines} lines, {size_mb:.0f} MB")
        before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        budget = pairing.LineBudget(left=2 * args.lines)
        scores_a = timed("read scores, run A", pairing.read_doc_scores, a, budget)
        scores_b = timed("read scores, run B", pairing.read_doc_scores, b, budget)
        runs = [
            (1, {"results": {"t": {"exact_match,none": 0.6, "exact_match_stderr,none": 0.01}}}),
            (2, {"results": {"t": {"exact_match,none": 0.7, "exact_match_stderr,none": 0.01}}}),
        ]
        data = timed(
            "pair and test (McNemar)", compare.compare, runs, [{"t": scores_a}, {"t": scores_b}]
        )
        row = data["rows"][0]
        print(f"n_paired {row['n_paired'][1]}, discordant {row['discordant'][1]}")
        after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"peak memory growth: {(after_kb - before_kb) / 1024:.0f} MB")


if __name__ == "__main__":
    main()
