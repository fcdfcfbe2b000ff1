"""A stand-in for the lm_eval command, for tests of what the server does with any process.

Allowlisted through LM_EVAL_PATHS as `<python> <this file>`; it ignores lm-eval's arguments
and follows FAKE_* environment variables (sent as the job's env_vars):
FAKE_STDERR_BYTES (write that many deterministic bytes to stderr), FAKE_SLEEP_S,
FAKE_EXIT (exit code), FAKE_IGNORE_TERM (ignore SIGTERM), FAKE_CHILD (spawn a sleeping child),
FAKE_DUMP_ENV (write os.environ as JSON to that file, relative to the job's directory),
FAKE_PRINT_ENV (comma-separated names: print `env NAME=<repr of its value or None>` to stdout),
FAKE_WAIT_FILE (wait until that file exists, up to 120 s, then go on; exit 3 if it never does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def pattern(total: int) -> bytes:
    """The exact bytes FAKE_STDERR_BYTES produces: numbered lines, some with tqdm-style \\r."""
    out = bytearray()
    line = 0
    while len(out) < total:
        out += f"line {line:08d} {'x' * 60}{chr(13) if line % 7 == 0 else chr(10)}".encode()
        line += 1
    return bytes(out[:total])


def main() -> int:
    dump = os.environ.get("FAKE_DUMP_ENV")
    if dump:
        with open(dump, "w") as out:
            json.dump(dict(os.environ), out)
    total = int(os.environ.get("FAKE_STDERR_BYTES", "0"))
    if total:
        data = pattern(total)
        for start in range(0, total, 1 << 16):
            sys.stderr.buffer.write(data[start : start + (1 << 16)])
        sys.stderr.flush()
    print("fake lm_eval started", flush=True)
    for name in filter(None, os.environ.get("FAKE_PRINT_ENV", "").split(",")):
        print(f"env {name}={os.environ.get(name)!r}", flush=True)
    wait_file = os.environ.get("FAKE_WAIT_FILE")
    if wait_file:
        deadline = time.monotonic() + 120
        while not os.path.exists(wait_file):
            if time.monotonic() > deadline:
                return 3
            time.sleep(0.05)
    if os.environ.get("FAKE_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("FAKE_CHILD"):
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    sleep_s = float(os.environ.get("FAKE_SLEEP_S", "0"))
    if sleep_s:
        print(f"sleeping {sleep_s}", file=sys.stderr, flush=True)
        time.sleep(sleep_s)
    print("fake lm_eval done", flush=True)
    return int(os.environ.get("FAKE_EXIT", "0"))


if __name__ == "__main__":
    sys.exit(main())
