"""Code inside a warm job, for tests/unit/runtime/test_warm_sandbox.py: the `custom_dataset` of
the tasks
warm_probe (role "attacker") and warm_victim (role "victim"). Stdlib only, but for the dataset.

A warm job has no env_vars of its own (else it would start cold), so the plan comes from
`plan.json` beside this file, which the test writes:

    {"token": "...",
     "reads": {name: path}, "lists": {name: path},
     "environ": {name: host pid}, "kill": {name: host pid}, "killpg": {name: host pgid}}

The victim writes `victim-secret.txt` (the token) and `ready` into its directory, starts a
sleeper and waits for a file `release` (the test stops it instead). The attacker tries every
read, list and signal of the plan, starts a sleeper, writes `probe-report.json` into its
directory and prints `warm-probe: done`. Each sleeper is a double-forked process in a new
session that ignores the stop signals and beats `heartbeat-<role>` in the job's directory
every 0.1 s: it must end with its job.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPORT = "probe-report.json"
SLEEPER = """
import os, signal, sys, time
for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(s, signal.SIG_IGN)
path = sys.argv[2]
n = 0
while True:
    n += 1
    try:
        with open(path + ".tmp", "w") as f:
            f.write(f"{n} {time.time()}")
        os.replace(path + ".tmp", path)
    except OSError:
        pass
    time.sleep(0.1)
"""


def _error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{type(exc).__name__}: {exc}"


def _own_process(pid: int) -> str | None:
    """The command line of the process numbered `pid` in this sandbox, if there is one."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None


def sleeper(role: str, token: str) -> str:
    beat = os.path.join(os.getcwd(), f"heartbeat-{role}")
    marker = f"warm-sleeper-{token}-{role}"
    if os.fork() == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                os.closerange(3, 1024)
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                os.execv(sys.executable, [sys.executable, "-c", SLEEPER, marker, beat])
        finally:
            os._exit(0)
    os.wait()
    deadline = time.monotonic() + 10
    while not os.path.exists(beat) and time.monotonic() < deadline:
        time.sleep(0.05)
    return beat


def identity() -> dict[str, Any]:
    status = Path("/proc/self/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "cwd": os.getcwd(),
        "real_cwd": os.readlink("/proc/self/cwd"),
        "CapEff": fields.get("CapEff", "").strip(),
        "processes": {
            entry: _own_process(int(entry)) for entry in os.listdir("/proc") if entry.isdigit()
        },
    }


def attack(plan: dict[str, Any]) -> dict[str, Any]:
    attempts: dict[str, Any] = {}
    for name, path in plan.get("reads", {}).items():
        try:
            with open(path, "rb") as f:
                attempts[f"read {name}"] = {"ok": True, "got": f.read(4096).decode("latin-1")}
        except OSError as exc:
            attempts[f"read {name}"] = {"ok": False, "error": _error(exc)}
    for name, path in plan.get("lists", {}).items():
        try:
            attempts[f"list {name}"] = {"ok": True, "got": sorted(os.listdir(path))}
        except OSError as exc:
            attempts[f"list {name}"] = {"ok": False, "error": _error(exc)}
    for name, pid in plan.get("environ", {}).items():
        try:
            got = Path(f"/proc/{pid}/environ").read_bytes()[:4096].decode("latin-1")
            attempts[f"environ {name}"] = {"ok": True, "got": got}
        except OSError as exc:
            attempts[f"environ {name}"] = {"ok": False, "error": _error(exc)}
    for kind, group in (("kill", False), ("killpg", True)):
        for name, pid in plan.get(kind, {}).items():
            own = _own_process(pid)
            if own is not None:  # a host pid that happens to number one of ours
                attempts[f"{kind} {name}"] = {"ok": False, "error": f"own process: {own}"}
                continue
            try:
                (os.killpg if group else os.kill)(pid, signal.SIGKILL)
                attempts[f"{kind} {name}"] = {"ok": True}
            except OSError as exc:
                attempts[f"{kind} {name}"] = {"ok": False, "error": _error(exc)}
    return attempts


def load(**kwargs: Any) -> Any:
    import datasets

    role = kwargs["role"]
    plan = json.loads((HERE / "plan.json").read_text())
    work = Path.cwd()
    if role == "victim":
        (work / "victim-secret.txt").write_text(f"victim secret {plan['token']}\n")
        beat = sleeper(role, plan["token"])
        (work / "ready").write_text(json.dumps({"pid": os.getpid(), "heartbeat": beat}))
        print("warm-victim: ready", flush=True)
        deadline = time.monotonic() + 600
        while not (work / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        report = {"identity": identity(), "attempts": attack(plan)}
        report["heartbeat"] = sleeper(role, plan["token"])
        (work / REPORT).write_text(json.dumps(report, sort_keys=True))
        print("warm-probe: done", flush=True)
    docs = [
        {"question": f"Question {i}?", "choices": ["yes", "no"], "answer": i % 2} for i in range(4)
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
