"""What a warm worker and the server's WarmPool say to each other, and what a warm job prints.

A worker is ``python -m lm_eval_server.executors.warm_worker --control-fd FD``; FD is one end of
a socket pair whose other end the pool holds. One JSON object per line:

    worker -> server   {"ready": true, "pid": ..., "rss_kb": ..., "warmup_s": ..., ...}
    server -> worker   a Request: {"job_id": 7, "args": [lm-eval argv], "env": {...},
                                   "work_dir": "...", "max_log_bytes": N}
    worker -> server   {"pid": LEADER}  or  {"error": "..."}   (the server then starts it cold)

Stdlib only: both sides import it, and the worker's imports are paid by its warm-up.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKER_MODULE = "lm_eval_server.executors.warm_worker"
# The first stderr line of every job forked from a worker: `MARKER_PREFIX + FORKED_MARKER pid`.
MARKER_PREFIX = "lm_eval_server.warm: "
FORKED_MARKER = "forked from warm worker"
# Longest line either side reads (a request carries the job's whole environment).
LINE_LIMIT = 1 << 20


def worker_command(control_fd: int) -> list[str]:
    return [sys.executable, "-m", WORKER_MODULE, "--control-fd", str(control_fd)]


@dataclass(frozen=True)
class Request:
    """Fork this job: run lm-eval with `args` in `work_dir`, with exactly `env`."""

    job_id: int
    args: list[str]
    env: dict[str, str]
    work_dir: Path
    max_log_bytes: int

    def encode(self) -> bytes:
        return encode(
            {
                "job_id": self.job_id,
                "args": self.args,
                "env": self.env,
                "work_dir": str(self.work_dir),
                "max_log_bytes": self.max_log_bytes,
            }
        )

    @classmethod
    def decode(cls, line: bytes) -> Request:
        data = json.loads(line)
        return cls(
            job_id=int(data["job_id"]),
            args=[str(a) for a in data["args"]],
            env={str(k): str(v) for k, v in data["env"].items()},
            work_dir=Path(data["work_dir"]),
            max_log_bytes=int(data["max_log_bytes"]),
        )


def encode(message: dict[str, Any]) -> bytes:
    """One protocol line."""
    return json.dumps(message).encode() + b"\n"
