"""Helpers for tests that drive jobs through the HTTP API."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_TASKS = ROOT / "examples" / "tasks"
TEST_TASKS = ROOT / "tests" / "data" / "tasks"
FAKE_LM_EVAL = f"{sys.executable} {ROOT / 'tests' / 'support' / 'fake_lm_eval.py'}"
DEFAULT_LM_EVAL = f"{sys.executable} -m lm_eval"
TERMINAL = {"Completed", "Failed", "Stopped"}

DUMMY_JOB: dict[str, Any] = {
    "model": "dummy",
    "tasks": "demo_mc",
    "include_path": str(EXAMPLES_TASKS),
    "limit": 8,
}


def submit(client: Any, body: dict[str, Any], **kwargs: Any) -> int:
    response = client.post("/job", json=body, **kwargs)
    assert response.status_code == 200, response.text
    return int(response.json()["job_id"])


def wait_for(
    client: Any,
    job_id: int,
    statuses: set[str] = TERMINAL,
    timeout_s: float = 120.0,
    interval_s: float = 0.1,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/job/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s}s: {job}")
        time.sleep(interval_s)


def fake_job(**env: str) -> dict[str, Any]:
    return {**DUMMY_JOB, "lm_eval_path": FAKE_LM_EVAL, "env_vars": env}


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _members(field: int, value: int) -> list[int]:
    """Live processes whose /proc stat field (after the command name) equals `value`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[field]) == value and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def group_members(pgid: int) -> list[int]:
    return _members(2, pgid)


def session_members(sid: int) -> list[int]:
    return _members(3, sid)


def stub_job(base_url: str, tasks: str, **extra: Any) -> dict[str, Any]:
    """A local-completions job against the test stub server, on the tests' own tasks."""
    from tests.support.completions_server import model_args_for

    return {
        "model": "local-completions",
        "model_args": model_args_for(base_url),
        "tasks": tasks,
        "include_path": str(TEST_TASKS),
        **extra,
    }
