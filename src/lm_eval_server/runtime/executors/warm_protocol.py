"""What a warm worker and the server's WarmPool say to each other, and what a warm job prints.

A worker is ``python -m lm_eval_server.runtime.executors.warm_worker --control-fd FD [--slot DIR]``;
FD is one end of a socket pair whose other end the pool holds. One JSON object per line:

    worker -> server   {"ready": true, "pid": ..., "rss_kb": ..., "warmup_s": ..., ...}
    server -> worker   a Request: {"job_id": 7, "args": [lm-eval argv], "env": {...},
                                   "work_dir": "...", "max_log_bytes": N}
    worker -> server   {"pid": LEADER}  or  {"error": "..."}   (the server then starts it cold)

A sandboxed worker (``--slot DIR``: it runs in its owner's sandbox with DIR as its writable
directory, and serves one job) reports pids of its own PID namespace; its Request also names
the worker's host pid (``"worker_pid"``, for the job's marker line), and after its answer the
server says ``{"go": true}`` once it has found the session leader's host pid. The job starts
only then; with anything else, or the socket closed, it never starts. Nothing more is said.

Stdlib only: both sides import it, and the worker's imports are paid by its warm-up.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKER_MODULE = "lm_eval_server.runtime.executors.warm_worker"
# The first stderr line of every job forked from a worker: `MARKER_PREFIX + FORKED_MARKER pid`.
MARKER_PREFIX = "lm_eval_server.warm: "
FORKED_MARKER = "forked from warm worker"
# Longest line either side reads (a request carries the job's whole environment).
LINE_LIMIT = 1 << 20


GO = {"go": True}


def worker_command(control_fd: int, slot: str | None = None) -> list[str]:
    command = [sys.executable, "-m", WORKER_MODULE, "--control-fd", str(control_fd)]
    return command if slot is None else [*command, "--slot", slot]


@dataclass(frozen=True)
class Request:
    """Fork this job: run lm-eval with `args` in `work_dir`, with exactly `env`."""

    job_id: int
    args: list[str]
    env: dict[str, str]
    work_dir: Path
    max_log_bytes: int
    worker_pid: int | None = None  # the worker's pid as the server sees it (sandboxed workers)

    def encode(self) -> bytes:
        message: dict[str, Any] = {
            "job_id": self.job_id,
            "args": self.args,
            "env": self.env,
            "work_dir": str(self.work_dir),
            "max_log_bytes": self.max_log_bytes,
        }
        if self.worker_pid is not None:
            message["worker_pid"] = self.worker_pid
        return encode(message)

    @classmethod
    def decode(cls, line: bytes) -> Request:
        data = json.loads(line)
        return cls(
            job_id=int(data["job_id"]),
            args=[str(a) for a in data["args"]],
            env={str(k): str(v) for k, v in data["env"].items()},
            work_dir=Path(data["work_dir"]),
            max_log_bytes=int(data["max_log_bytes"]),
            worker_pid=None if data.get("worker_pid") is None else int(data["worker_pid"]),
        )


def encode(message: dict[str, Any]) -> bytes:
    """One protocol line."""
    return json.dumps(message).encode() + b"\n"
