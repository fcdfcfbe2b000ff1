"""What the launcher's task index load costs a job: the JSON cache against the old pickle.

    uv run python bench/index_load.py [--runs N] [--before REV]

Every job (and every warm worker) starts by loading lm-eval's built-in task index from the
cache. Since issue 20 that cache is JSON (`task_index.decode_index`: parsed and type-checked,
never unpickled); before, it was a pickle. This bench measures both *in the launcher*, each in
a fresh process as a job would be:

* after: this checkout's `launcher.install_hook(DIR)` then the hooked
  `TaskIndex.build([builtin])` call TaskManager makes (read the file, check the key, decode,
  rebuild ~14,700 `Entry` objects);
* before: the same two calls with `launcher.py` and `task_index.py` as they were at REV
  (default: the last commit with the pickle cache), against a cache that REV's own
  `task_index build` wrote.

It also times the bare read+decode (JSON) against the bare read+unpickle (pickle) in one
process, best of N. Prints medians and minima in milliseconds, and the file sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The last commit whose task index cache was a pickle (issue 20 replaced it).
PICKLE_REV = "9df33fd"

# Run in a fresh interpreter: prints the wall time of install_hook + the hooked build, in ms.
IN_LAUNCHER = """
import sys, time, json
from pathlib import Path
data_dir = Path(sys.argv[1])
import lm_eval.tasks, lm_eval.tasks._index as index_mod, lm_eval.tasks.manager
from lm_eval_server.runtime import launcher
builtin = Path(lm_eval.tasks.__file__).parent
t0 = time.perf_counter()
assert launcher.install_hook(data_dir) is None
t1 = time.perf_counter()
index = index_mod.TaskIndex.build([builtin])
t2 = time.perf_counter()
print(json.dumps({"hook_ms": (t1 - t0) * 1e3, "build_ms": (t2 - t1) * 1e3,
                  "total_ms": (t2 - t0) * 1e3, "entries": len(index),
                  "module": launcher.__file__}))
"""

# Bare read + parse, best of N, in one process.
BARE = """
import sys, time, json, gc, pickle
from pathlib import Path
new_dir, old_dir, runs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
import lm_eval.tasks
from lm_eval_server.runtime import task_index
builtin = Path(lm_eval.tasks.__file__).parent
key = task_index.cache_key(builtin)
old_file = old_dir / "task_index" / "builtin_index.pickle"

def json_load():
    return task_index.decode_index(task_index.read_index_payload(new_dir, key), builtin)

def pickle_load():
    with old_file.open("rb") as fh:
        pickle.load(fh)  # the header
        payload = fh.read()
    gc.disable()
    try:
        return pickle.loads(payload)
    finally:
        gc.enable()

out = {}
for name, fn in (("json", json_load), ("pickle", pickle_load)):
    times = []
    for _ in range(runs):
        t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1e3)
    out[name] = {"min_ms": min(times), "median_ms": sorted(times)[len(times) // 2]}
print(json.dumps(out))
"""


def sh(*args: str, **kwargs: object) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs).stdout  # type: ignore[call-overload]


def old_package(rev: str, root: Path) -> Path:
    """REV's launcher and task_index as an importable `lm_eval_server` package under root."""
    pkg = root / "lm_eval_server"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name in ("launcher.py", "task_index.py"):
        (pkg / name).write_text(sh("git", "show", f"{rev}:src/lm_eval_server/{name}", cwd=ROOT))
    return root


def run_in_launcher(data_dir: Path, pythonpath: Path | None) -> dict[str, float]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    else:
        env.pop("PYTHONPATH", None)
    out = sh(sys.executable, "-c", IN_LAUNCHER, str(data_dir), env=env, cwd=ROOT)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--before", default=PICKLE_REV, help="commit with the pickle cache")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="index-load-") as tmp:
        tmp_path = Path(tmp)
        new_dir, old_dir = tmp_path / "new", tmp_path / "old"
        old_pkg = old_package(args.before, tmp_path / "old-src")
        print("building both caches ...", flush=True)
        sh(
            sys.executable,
            "-m",
            "lm_eval_server.runtime.task_index",
            "build",
            "--data-dir",
            str(new_dir),
        )
        env = {**os.environ, "PYTHONPATH": str(old_pkg)}
        sh(
            sys.executable,
            *("-m", "lm_eval_server.runtime.task_index", "build", "--data-dir", str(old_dir)),
            env=env,
            cwd=tmp_path,
        )
        new_file = new_dir / "task_index" / "builtin_index.jsonl"
        old_file = old_dir / "task_index" / "builtin_index.pickle"
        print(f"json cache   {new_file.stat().st_size / 1e6:6.1f} MB")
        print(f"pickle cache {old_file.stat().st_size / 1e6:6.1f} MB  (at {args.before})")

        rows: dict[str, list[dict[str, float]]] = {"json (now)": [], "pickle (before)": []}
        run_in_launcher(new_dir, None)  # warm the disk cache for both files
        run_in_launcher(old_dir, old_pkg)
        for _ in range(args.runs):  # interleaved, so both see the same background load
            after = run_in_launcher(new_dir, None)
            before = run_in_launcher(old_dir, old_pkg)
            assert "old-src" not in after["module"] and "old-src" in before["module"]
            assert after["entries"] == before["entries"]
            rows["json (now)"].append(after)
            rows["pickle (before)"].append(before)

        print(f"\nin the launcher, fresh process each, {args.runs} runs (ms):")
        print(f"{'':16} {'hook':>8} {'build':>8} {'total':>8} {'min total':>10}")
        for name, runs in rows.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith("ms")}
            low = min(r["total_ms"] for r in runs)
            print(
                f"{name:16} {med['hook_ms']:8.1f} {med['build_ms']:8.1f} "
                f"{med['total_ms']:8.1f} {low:10.1f}"
            )
        ratio = statistics.median(r["total_ms"] for r in rows["json (now)"]) / statistics.median(
            r["total_ms"] for r in rows["pickle (before)"]
        )
        print(f"json / pickle: {ratio:.2f}x")

        bare = json.loads(sh(sys.executable, "-c", BARE, str(new_dir), str(old_dir), "9"))
        print("\nbare read + parse, one process, 9 runs (ms):")
        for name, figure in bare.items():
            print(f"{name:8} median {figure['median_ms']:7.1f}   min {figure['min_ms']:7.1f}")


if __name__ == "__main__":
    main()
