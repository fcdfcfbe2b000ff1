"""Another owner's job, for tests/e2e/test_sandbox.py: it keeps something private in its
directory (from the env var SANDBOX_TEST_VICTIM_TOKEN) and runs until the test says so.

`<python> victim.py [lm-eval args]`, allowlisted through LM_EVAL_PATHS. What it keeps is
`secret_of(token)`, a value the server has never seen (it masks the values of a request's
env_vars wherever it shows them, which would hide a leak of the token itself). It writes
`victim-secret.txt`, a results JSON and a samples file under `<--output_path>/victim/`,
then `ready`. With SANDBOX_TEST_RESULTS_ON=go it writes the results only once a
file `go` appears in its directory. It then waits for a file `release` (at most 300 s), checks
that its files still hold what it wrote, prints `victim: intact` or `victim: tampered: ...`
and exits 0 or 3.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path


def secret_of(token: str) -> str:
    return "victim-secret-" + hashlib.sha256(token.encode()).hexdigest()[:32]


def wait_for(path: Path, timeout_s: float = 300) -> bool:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def main() -> int:
    secret = secret_of(os.environ["SANDBOX_TEST_VICTIM_TOKEN"])
    work = Path.cwd()
    files = {work / "victim-secret.txt": f"victim secret {secret}\n"}
    (work / "victim-secret.txt").write_text(files[work / "victim-secret.txt"])
    output = sys.argv[sys.argv.index("--output_path") + 1] if "--output_path" in sys.argv else None
    results = Path(output or work / "results") / "victim"
    if os.environ.get("SANDBOX_TEST_RESULTS_ON") == "go" and not wait_for(work / "go"):
        return 4
    results.mkdir(parents=True, exist_ok=True)
    body = json.dumps(
        {"results": {"victim_task": {"alias": "victim_task", "acc,none": 0.5, "secret": secret}}}
    )
    files[results / "results_victim.json"] = body
    files[results / "samples_victim_task_victim.jsonl"] = json.dumps({"secret": secret}) + "\n"
    for path, text in files.items():
        path.write_text(text)
    (work / "ready").write_text(str(os.getpid()))
    print(f"victim: ready, pid {os.getpid()} in its namespace", flush=True)
    if not wait_for(work / "release"):
        print("victim: never released", flush=True)
        return 5
    problems = [str(p) for p, text in files.items() if not p.is_file() or p.read_text() != text]
    if problems:
        print(f"victim: tampered: {problems}", flush=True)
        return 3
    print("victim: intact", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
