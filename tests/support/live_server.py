"""A real server process on a free port, for tests that talk HTTP the way users do (CLI, browser).

`uvicorn src.main:app` from the repo root: the README's launch line, configured only through
environment variables as an operator would.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.jobs import DEFAULT_LM_EVAL, FAKE_LM_EVAL, ROOT

API_KEY = "test-key-0123456789"


@dataclass(frozen=True)
class LiveServer:
    url: str
    data_dir: Path
    log_path: Path
    task_index: bool  # False until lm_eval_server.task_index exists: tasks are then unchecked

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def task_index_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Share the session's task index when this checkout can build one."""
    if importlib.util.find_spec("lm_eval_server.task_index") is None:
        return {"TASK_INDEX": "false"}
    return {"INDEX_DIR": str(request.getfixturevalue("index_dir"))}


@contextlib.contextmanager
def live_server(
    base: Path, extra_env: dict[str, str], command: list[str] | None = None
) -> Iterator[LiveServer]:
    """`command` (default: the README's uvicorn line) gets `--port N` appended."""
    port = free_port()
    data_dir = base / "data"
    log_path = base / "server.log"
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "LM_EVAL_PATHS": f"{DEFAULT_LM_EVAL},{FAKE_LM_EVAL}",
        "MAX_CONCURRENCY": "2",
        "STOP_GRACE_S": "3",
        # Jobs must not outlive the test's server.
        "SHUTDOWN_STOPS_JOBS": "true",
        **extra_env,
    }
    command = command or [sys.executable, "-m", "uvicorn", "src.main:app", "--host", "127.0.0.1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    server = LiveServer(url, data_dir, log_path, env.get("TASK_INDEX") != "false")
    try:
        wait_ready(proc, server)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(proc: subprocess.Popen[bytes], server: LiveServer, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/ready", timeout=5).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"server not ready after {timeout_s}s:\n{server.log()}")
        time.sleep(0.2)
