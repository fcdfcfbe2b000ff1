"""Regenerates arith_gen.jsonl (committed; rerun only if the format must change).

python tests/data/tasks/make_arith_gen.py
"""

import json
import random
from pathlib import Path

N_DOCS = 200
# Fixed seed: the committed file, and thus the stub's known score, must never drift.
SEED = 20240613


def main() -> None:
    rng = random.Random(SEED)
    out = Path(__file__).with_name("arith_gen.jsonl")
    with out.open("w", encoding="utf-8", newline="\n") as f:
        for qid in range(N_DOCS):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            # answer is a string: exact_match compares the generation to the target verbatim.
            f.write(json.dumps({"id": qid, "a": a, "b": b, "answer": str(a + b)}) + "\n")


if __name__ == "__main__":
    main()
