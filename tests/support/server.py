"""A real server process, started the way users start it (uvicorn src.main:app)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from lm_eval_server.team.principals import parse_entry
from tests.support.jobs import DEFAULT_LM_EVAL, FAKE_LM_EVAL, ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(self, data_dir: Path, index_dir: Path, **env: str) -> None:
        self.data_dir = data_dir
        # Files a test hands its jobs while they run (tests/support/fake_lm_eval.py's
        # FAKE_WAIT_FILE): an allowed path, so a sandboxed job can see them appear.
        self.signals = data_dir.parent / "signals"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DATA_DIR": str(data_dir),
            "INDEX_DIR": str(index_dir),
            "LM_EVAL_PATHS": f"{DEFAULT_LM_EVAL},{FAKE_LM_EVAL}",
            "ALLOWED_PATHS": f"{data_dir},{ROOT / 'examples'},{ROOT / 'tests' / 'data'},"
            f"{self.signals}",
            "STOP_GRACE_S": "3",
            "ALLOWED_ENV_VARS": "FAKE_*",  # what tests/support/fake_lm_eval.py follows
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"server-{self.port}.log"

    def start(self) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.signals.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "src.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.1)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 60) -> bool:
        """SIGTERM; True when the app shut down cleanly (uvicorn then re-raises the signal, so
        the exit status alone does not tell)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout_s)
        clean = "Application shutdown complete." in self.log_path.read_text()
        return clean and code in (0, -signal.SIGTERM)

    def stop_jobs_and_terminate(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # A key stops only its own principal's jobs (an admin's: all), so ask with every key.
        for headers in self._auths():
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{self.url}/jobs/stop", timeout=60, headers=headers)
        self.terminate()

    def _auths(self) -> list[dict[str, Any]]:
        entries = [
            entry
            for setting in ("ADMIN_KEYS", "API_KEYS")
            for entry in self.env.get(setting, "").split(",")
            if entry.strip()
        ]
        key_file = self.env.get("API_KEYS_FILE")
        if key_file and Path(key_file).is_file():
            lines = (line.strip() for line in Path(key_file).read_text().splitlines())
            entries += [line for line in lines if line and not line.startswith("#")]
        keys = []
        for entry in entries:
            with contextlib.suppress(ValueError):
                keys.append(parse_entry(entry, "")[1])
        return [{"Authorization": f"Bearer {key}"} for key in dict.fromkeys(keys)] or [{}]
