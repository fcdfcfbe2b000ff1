"""A stand-in for the lm_eval command, for tests of what the server does with any process.

Allowlisted through LM_EVAL_PATHS as `<python> <this file>`; it ignores lm-eval's arguments
and follows FAKE_* environment variables (sent as the job's env_vars):
FAKE_STDERR_BYTES (write that many deterministic bytes to stderr), FAKE_SLEEP_S,
FAKE_EXIT (exit code), FAKE_IGNORE_TERM (ignore SIGTERM), FAKE_CHILD (spawn a sleeping child),
FAKE_DUMP_ENV (write os.environ as JSON to that file, relative to the job's directory),
FAKE_PRINT_ENV (comma-separated names: print `env NAME=<repr of its value or None>` to stdout),
FAKE_WAIT_FILE (wait until that file exists, up to 120 s, then go on; exit 3 if it never does),
FAKE_HASH_ENV (print `sha256(NAME)=<hex>` of that variable's value to stdout: proof that the job
received a value without printing it), FAKE_ECHO_ENV (print that variable's value to stdout and
stderr as is, JSON-quoted and as a Python repr, and once in two halves FAKE_ECHO_PAUSE_S apart),
FAKE_RESULTS (write a results JSON and a samples JSONL for task `fake_task` under the
`--output_path` lm-eval would get, with the echoed value and the `--model_args` in them, as
lm-eval copies model_args into its results).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def pattern(total: int) -> bytes:
    """The exact bytes FAKE_STDERR_BYTES produces: numbered lines, some with tqdm-style \\r."""
    out = bytearray()
    line = 0
    while len(out) < total:
        out += f"line {line:08d} {'x' * 60}{chr(13) if line % 7 == 0 else chr(10)}".encode()
        line += 1
    return bytes(out[:total])


def echo(name: str, value: str, pause_s: float) -> None:
    for stream in (sys.stdout, sys.stderr):
        print(f"{name}={value} json={json.dumps(value)} repr={value!r}", file=stream, flush=True)
    half = len(value) // 2
    sys.stderr.write(f"split: {value[:half]}")
    sys.stderr.flush()
    time.sleep(pause_s)
    sys.stderr.write(f"{value[half:]} end\n")
    sys.stderr.flush()


def _option(argv: list[str], name: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def write_results(argv: list[str], value: str) -> None:
    output = Path(_option(argv, "--output_path") or ".") / "fake"
    output.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%dT%H-%M-%S")
    model_args = _option(argv, "--model_args") or ""
    results = {
        "results": {"fake_task": {"alias": "fake_task", "acc,none": 1.0, "echo": value}},
        "config": {"model": "fake", "model_args": model_args},
    }
    (output / f"results_{date}.json").write_text(json.dumps(results))
    sample = {"doc_id": 0, "arguments": [value], "resps": [[f"answer {value}"]]}
    (output / f"samples_fake_task_{date}.jsonl").write_text(json.dumps(sample) + "\n")


def main() -> int:
    dump = os.environ.get("FAKE_DUMP_ENV")
    if dump:
        with open(dump, "w") as out:
            json.dump(dict(os.environ), out)
    hashed = os.environ.get("FAKE_HASH_ENV")
    if hashed:
        digest = hashlib.sha256(os.environ.get(hashed, "").encode()).hexdigest()
        print(f"sha256({hashed})={digest}", flush=True)
    echoed = os.environ.get("FAKE_ECHO_ENV")
    value = os.environ.get(echoed, "") if echoed else ""
    if echoed:
        echo(echoed, value, float(os.environ.get("FAKE_ECHO_PAUSE_S", "0")))
    if os.environ.get("FAKE_RESULTS"):
        write_results(sys.argv[1:], value)
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
