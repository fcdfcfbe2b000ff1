"""Job start-up latency and CPU: cold `python -m lm_eval`, the cached-index launcher, a warm worker.

    uv run python bench/warm_start.py [--runs N]

Starts four servers the way users do (`python -m uvicorn src.main:app` from the repo root,
configured by environment variables): USE_LAUNCHER=false (cold), the default (launcher),
WARM_WORKERS=1 (warm: with the job sandbox on, as SANDBOX=auto has it where bubblewrap works,
a single-use worker in the owner's sandbox) and WARM_WORKERS=1 SANDBOX=off (warm-off: one
shared, unconfined worker). Cold and launcher jobs are sandboxed as SANDBOX=auto decides. All
share one pre-built task index cache. Each waits until /ready (and, for warm, until its worker
is ready: before every job, since a sandboxed worker serves one). Then, round after round, each
server runs the same 1-sample job (dummy model, demo_mc, limit 1), one job at a time
machine-wide, so the modes see the same background load; the first round is discarded (cold
disk caches).

Per job:
* POST -> first inference: from just before the POST until lm-eval's "Running loglikelihood
  requests" line (printed right before its first request bar) appears in the job's stderr.log,
  which is polled every 5 ms.
* POST -> Completed: until the job's finished_at (the server marks it Completed then; same
  host, same clock), so the client's polling interval does not add to it.
* CPU: the kernel adds a process's CPU time, and that of its children it waited for, to its
  parent's cutime/cstime when the parent reaps it. A cold/launcher job's supervisor is reaped
  by the server; it reaped the lm-eval process, which reaped its own children (git, ...). So
  the job's whole tree is the rise of the server's cutime+cstime (/proc/PID/stat) across the
  job. A warm job's session leader is reaped by the warm worker: without the sandbox its CPU
  is the rise of the worker's cutime+cstime, plus the worker's own utime+stime (the fork and
  the request). A sandboxed worker exits after its one job and bwrap, the server's child, is
  reaped by the server: the job's CPU is the rise of the server's cutime+cstime once that
  bwrap is gone, less the worker's warm-up (its own CPU when the job was posted). The
  warm-up is reported apart: one per worker, so a sandboxed server spends one per job, in the
  background, before the job arrives. A sandboxed cold or launcher job's CPU cannot be told
  this way (bwrap's init in its sandbox is not reaped by the job's supervisor): "n/a".
  Resolution: one clock tick (10 ms).

Medians over the kept rounds, and each mode's ratio to cold from this same invocation.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
JOB = {
    "model": "dummy",
    "tasks": "demo_mc",
    "include_path": str(ROOT / "examples" / "tasks"),
    "limit": 1,
}
FIRST_INFERENCE = b"Running loglikelihood requests"
MODES = {
    "cold": {"USE_LAUNCHER": "false"},
    "launcher": {},
    "warm": {"WARM_WORKERS": "1"},
    "warm-off": {"WARM_WORKERS": "1", "SANDBOX": "off"},
}
WORKER_MODULE = b"lm_eval_server.runtime.executors.warm_worker"
UVICORN = [sys.executable, "-m", "uvicorn", "src.main:app", "--host", "127.0.0.1"]
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 600.0
JOB_TIMEOUT_S = 300.0


def bytecode_cached() -> bool:
    """Whether lm-eval's modules have .pyc files: without them (PYTHONDONTWRITEBYTECODE=1 and
    an install that did not compile) every cold or launcher job compiles its ~1,800 imports."""
    spec = importlib.util.find_spec("lm_eval.evaluator")
    return bool(
        spec and spec.origin and Path(importlib.util.cache_from_source(spec.origin)).exists()
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_s(pid: int) -> tuple[float, float]:
    """(own utime+stime, reaped children's cutime+cstime) of `pid`, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + stime) * TICK_S, (cutime + cstime) * TICK_S


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def memory_kb(pid: int) -> dict[str, int]:
    values = {}
    for name in ("status", "smaps_rollup"):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "Pss", "Private_Dirty", "Private_Clean"):
                values[key] = int(rest.split()[0])
    return values


@dataclass
class Server:
    mode: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    client: httpx.Client
    log_path: Path
    worker: int | None = None  # the ready worker's Python
    sandboxed: bool = False  # its workers run in bwrap, one job each
    sandbox_mode: str = "off"  # what /ready says of the job sandbox
    samples: list[dict[str, float]] = field(default_factory=list)
    warm_ups: list[float] = field(default_factory=list)  # CPU of each worker's warm-up

    @property
    def reaper(self) -> int:
        """The process that reaps each job's session leader, or (sandboxed) its worker."""
        if self.worker is not None and not self.sandboxed:
            return self.worker
        return self.proc.pid

    @property
    def warm(self) -> bool:
        return self.mode.startswith("warm")


def start_server(mode: str, env: dict[str, str], root: Path, index_dir: Path) -> Server:
    data_dir = root / mode
    port = free_port()
    log_path = root / f"{mode}.log"
    full_env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "INDEX_DIR": str(index_dir),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*UVICORN, "--port", str(port), "--log-level", "warning"],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    return Server(mode, data_dir, proc, client, log_path)


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.proc.poll() is not None:
            raise SystemExit(f"{server.mode} server exited; see {server.log_path}")
        with contextlib.suppress(httpx.HTTPError):
            body = server.client.get("/ready").json()
            warm = body.get("warm_workers")
            if body.get("ready") and (warm is None or warm["ready"] == warm["configured"]):
                server.sandbox_mode = str((body.get("sandbox") or {}).get("mode", "off"))
                break
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.mode} server not ready; see {server.log_path}")
        time.sleep(0.2)
    if server.warm:
        find_worker(server)


def find_worker(server: Server) -> None:
    """The ready worker: the server's child, or (sandboxed) the child of its bwrap."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        found = []
        for pid in children(server.proc.pid):
            line = cmdline(pid)
            if WORKER_MODULE not in line:
                continue
            if line.split(b"\0", 1)[0].endswith(b"bwrap"):
                server.sandboxed = True
                found += [c for c in children(pid) if WORKER_MODULE in cmdline(c)]
            else:
                found.append(pid)
        if len(found) == 1:  # a sandboxed worker that took the last job has gone
            [server.worker] = found
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.mode}: no single ready worker ({found})")
        time.sleep(0.05)


def wait_worker_ready(server: Server) -> None:
    """A sandboxed worker serves one job: wait for its replacement, as a client would."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while server.client.get("/ready").json()["warm_workers"]["ready"] < 1:
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.mode}: no warm worker ready; see {server.log_path}")
        time.sleep(0.05)
    find_worker(server)


def run_job(server: Server) -> dict[str, float]:
    if server.sandboxed:
        wait_worker_ready(server)
    warm_up = sum(cpu_s(server.worker)) if server.sandboxed and server.worker else 0.0
    outer = parent_of(server.worker) if server.sandboxed and server.worker else None
    if server.sandboxed:
        server.warm_ups.append(warm_up)
    own_before, reaped_before = cpu_s(server.reaper)
    posted = time.time()
    response = server.client.post("/job", json=JOB)
    response.raise_for_status()
    job_id = response.json()["job_id"]
    stderr_log = server.data_dir / "jobs" / str(job_id) / "stderr.log"
    first: float | None = None
    seen = 0
    deadline = time.monotonic() + JOB_TIMEOUT_S
    job: dict[str, Any] = {}
    next_status = 0.0
    while True:
        if first is None:
            with contextlib.suppress(OSError):
                with stderr_log.open("rb") as f:
                    f.seek(max(0, seen - len(FIRST_INFERENCE)))
                    chunk = f.read()
                if FIRST_INFERENCE in chunk:
                    first = time.time() - posted
                seen += len(chunk)
        if time.monotonic() >= next_status:
            job = server.client.get(f"/job/{job_id}").json()
            if job["status"] in ("Completed", "Failed", "Stopped"):
                break
            next_status = time.monotonic() + 0.1
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.mode} job {job_id} did not finish")
        time.sleep(0.005)
    if job["status"] != "Completed":
        raise SystemExit(f"{server.mode} job {job_id} {job['status']}: {job['error']}")
    finished = datetime.fromisoformat(job["finished_at"]).timestamp()
    if outer is not None:
        # The worker exits after its job; the server reaps its bwrap a moment later.
        deadline = time.monotonic() + 10
        while Path(f"/proc/{outer}").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    elif server.worker is not None:
        # The worker reaps the leader on SIGCHLD, maybe a moment after the server saw it end.
        deadline = time.monotonic() + 5
        while children(server.worker) and time.monotonic() < deadline:
            time.sleep(0.01)
    own_after, reaped_after = cpu_s(server.reaper)
    cpu = reaped_after - reaped_before
    if server.sandboxed:
        cpu -= warm_up
    elif server.worker is not None:
        cpu += own_after - own_before
    elif server.sandbox_mode != "off":
        cpu = float("nan")  # see the module docstring
    return {
        "first_s": first if first is not None else float("nan"),
        "done_s": finished - posted,
        "cpu_s": cpu,
    }


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def stop_server(server: Server) -> None:
    server.client.close()
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="kept rounds per mode (default 5)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="warm-start-bench-") as tmp:
        root = Path(tmp)
        index_dir = root / "index"
        print("building the task index cache ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lm_eval_server.runtime.task_index",
                "build",
                "--data-dir",
                index_dir,
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
            env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
        )
        servers = [start_server(mode, env, root, index_dir) for mode, env in MODES.items()]
        try:
            for server in servers:
                wait_ready(server)
            warm = next(s for s in servers if s.warm and not s.sandboxed)
            assert warm.worker is not None
            warm_up_cpu = sum(cpu_s(warm.worker))
            worker_mem = memory_kb(warm.worker)
            for round_no in range(args.runs + 1):
                for server in servers:
                    sample = run_job(server)
                    if round_no:  # round 0 warms disk caches
                        server.samples.append(sample)
                print(f"round {round_no}/{args.runs} done", flush=True)
        finally:
            for server in servers:
                stop_server(server)

    report(servers, args.runs, warm_up_cpu, worker_mem)


def report(
    servers: list[Server], runs: int, warm_up_cpu: float, worker_mem: dict[str, int]
) -> None:
    medians = {
        s.mode: {k: statistics.median(x[k] for x in s.samples) for k in s.samples[0]}
        for s in servers
    }
    cold = medians["cold"]
    print()
    print(f"1-sample dummy job (demo_mc, limit 1); medians of {runs} runs; {os.cpu_count()} CPUs")
    if not bytecode_cached():
        print(
            "note: lm-eval has no cached bytecode here, so every cold/launcher job compiles its "
            "imports; run it once without PYTHONDONTWRITEBYTECODE for installed-like figures"
        )
    header = (
        f"{'mode':<9} {'POST->1st inference':>20} {'POST->Completed':>16} {'CPU/job':>9}"
        f" {'x cold (1st inf / done / CPU)':>31}"
    )
    print(header)
    print("-" * len(header))
    for mode, m in medians.items():
        ratios = " / ".join(
            "n/a" if math.isnan(m[k] / cold[k]) else f"{m[k] / cold[k]:.2f}"
            for k in ("first_s", "done_s", "cpu_s")
        )
        cpu = "n/a" if math.isnan(m["cpu_s"]) else f"{m['cpu_s']:.2f}s"
        print(f"{mode:<9} {m['first_s']:>19.2f}s {m['done_s']:>15.2f}s {cpu:>9} {ratios:>31}")
    print()
    print(f"job sandbox: {', '.join(f'{s.mode} {s.sandbox_mode}' for s in servers)}")
    for server in servers:
        if server.sandboxed and server.warm_ups:
            print(
                f"{server.mode}: sandboxed, one worker per job; each worker's warm-up "
                f"(median) {statistics.median(server.warm_ups):.2f}s of CPU, spent before its job"
            )
    mb = {k: v / 1024 for k, v in worker_mem.items()}
    private = mb.get("Private_Dirty", 0) + mb.get("Private_Clean", 0)
    print(
        f"warm worker when ready: VmRSS {mb.get('VmRSS', 0):.0f} MB, PSS {mb.get('Pss', 0):.0f} MB,"
        f" private {private:.0f} MB; one-time warm-up CPU {warm_up_cpu:.2f}s"
    )
    for server in servers:
        spread = ", ".join(f"{x['done_s']:.2f}" for x in server.samples)
        print(f"  {server.mode:<9} POST->Completed per run: {spread}")


if __name__ == "__main__":
    main()
