"""A job that plants files for the server to read back (issue 20, item 2).

Allowlisted through LM_EVAL_PATHS as `<python> <this file>`; it ignores lm-eval's arguments but
`--output_path`, and follows FAKE_PLANT_* environment variables (the job's env_vars):

* FAKE_PLANT_LINK_TO: a file the attacker wants served in its name (jobs.db, another job's
  results JSON). Under `--output_path` it writes `planted/results_<date>.json` and
  `planted/samples_fake_task_<date>.jsonl` as symlinks to it, and `linked` as a symlink to the
  directory holding it (whose results files are real ones).
* FAKE_PLANT_LOGS=1: replaces its own stdout.log with a symlink to FAKE_PLANT_LINK_TO, and
  stderr.log.cut with a symlink to /dev/zero.

Then it exits 0, as a run that "completed" would.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def option(argv: list[str], name: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
    return None


def main() -> int:
    target = os.environ["FAKE_PLANT_LINK_TO"]
    output = Path(option(sys.argv[1:], "--output_path") or "results")
    planted = output / "planted"
    planted.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%dT%H-%M-%S")
    (planted / f"results_{date}.json").symlink_to(target)
    (planted / f"samples_fake_task_{date}.jsonl").symlink_to(target)
    (output / "linked").symlink_to(Path(target).parent, target_is_directory=True)
    if os.environ.get("FAKE_PLANT_LOGS"):
        # The job's cwd is its directory: its own logs are within reach.
        tmp = Path("stdout.log.planted")
        tmp.symlink_to(target)
        os.replace(tmp, "stdout.log")
        Path("stderr.log.cut").symlink_to("/dev/zero")
    print("planted", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
