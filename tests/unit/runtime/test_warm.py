"""Warm workers end to end, through the HTTP API with the real lm-eval: same results as cold
and launcher jobs, stop/logs/progress, cold fallback, worker replacement, hook fallback; with the
job sandbox (single-use workers per owner, executors.warm_sandboxed.SandboxedWarmPool) and without
(one shared worker, SANDBOX=off). What a sandboxed warm job cannot reach: test_warm_sandbox.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lm_eval_server.app import create_app
from lm_eval_server.config import Settings
from lm_eval_server.jobs import launch
from lm_eval_server.runtime import job_env, launcher
from lm_eval_server.runtime.executors import warm_pool, warm_protocol, warm_sandboxed
from lm_eval_server.runtime.executors.base import LaunchSpec
from tests.support.completions_server import running_stub_server
from tests.support.jobs import (
    DUMMY_JOB,
    group_members,
    process_alive,
    stub_job,
    submit,
    wait_for,
)
from tests.unit.runtime.test_launcher import VOLATILE_RESULT_FIELDS

WARM_MARKER = warm_protocol.MARKER_PREFIX + warm_protocol.FORKED_MARKER
READY_TIMEOUT_S = 300.0
ALL_DOCS_DUMMY_JOB = {k: v for k, v in DUMMY_JOB.items() if k != "limit"}


def wait_warm(client: TestClient, exclude: frozenset[int] = frozenset()) -> int:
    """Waits until a warm worker (not one of `exclude`) is ready; returns its pid."""
    pool = client.app.state.server.warm_pool  # type: ignore[attr-defined]
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        ready = client.get("/ready").json().get("warm_workers", {})
        pids = set(pool.worker_pids) - exclude
        if ready.get("ready") == ready.get("configured") and pids:
            return pids.pop()
        assert time.monotonic() < deadline, f"no warm worker ready after {READY_TIMEOUT_S}s"
        time.sleep(0.1)


def sandboxed(client: TestClient) -> bool:
    """Whether the server's warm workers run in their owners' sandboxes (one job each)."""
    pool = client.app.state.server.warm_pool  # type: ignore[attr-defined]
    return isinstance(pool, warm_sandboxed.SandboxedWarmPool)


def stderr_text(client: TestClient, job_id: int) -> str:
    return client.get(f"/job/{job_id}/logs", params={"stream": "stderr"}).text


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def eventually(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def comparable(client: TestClient, job_id: int, task: str) -> dict[str, Any]:
    """What must be identical between cold, launcher and warm runs of one job."""
    job = wait_for(client, job_id, timeout_s=300)
    assert job["status"] == "Completed", job["error"]
    results = client.get(f"/job/{job_id}/results").json()["results"]
    for name in VOLATILE_RESULT_FIELDS:
        results.pop(name, None)
    samples = client.get(f"/job/{job_id}/samples", params={"task": task}).text
    stdout = client.get(f"/job/{job_id}/logs", params={"stream": "stdout"}).text
    return {
        "results": results,
        "samples": [json.loads(line) for line in samples.splitlines()],
        "stdout": stdout,
    }


@pytest.mark.e2e
def test_cold_launcher_and_warm_write_identical_results(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    servers = {
        "cold": make_client(data_dir=tmp_path / "cold", use_launcher=False),
        "launcher": make_client(data_dir=tmp_path / "launcher"),
        # Sandboxed workers serve one job each: one ready per job submitted at once.
        "warm": make_client(data_dir=tmp_path / "warm", warm_workers=2),
        # One shared worker forks both.
        "warm-unsandboxed": make_client(
            data_dir=tmp_path / "warm-unsandboxed", warm_workers=1, sandbox="off"
        ),
    }
    assert sandboxed(servers["warm"]) and not sandboxed(servers["warm-unsandboxed"])
    wait_warm(servers["warm"])
    wait_warm(servers["warm-unsandboxed"])
    with running_stub_server() as stub:
        jobs = {
            "demo_mc": {**ALL_DOCS_DUMMY_JOB, "log_samples": True},
            "arith_gen_tiny": stub_job(stub.base_url, "arith_gen_tiny", log_samples=True),
        }
        ids = {
            (mode, task): submit(client, body)
            for mode, client in servers.items()
            for task, body in jobs.items()
        }
        got = {key: comparable(servers[key[0]], job_id, key[1]) for key, job_id in ids.items()}

    for (mode, _), job_id in ids.items():
        argv = servers[mode].app.state.server.manager.get(job_id).argv  # type: ignore[attr-defined]
        assert (argv[1:3] == ["-m", "lm_eval_server.runtime.launcher"]) == (mode != "cold")
        assert (WARM_MARKER in stderr_text(servers[mode], job_id)) == mode.startswith("warm")
    for task in jobs:
        cold = got["cold", task]
        assert got["launcher", task] == cold
        assert got["warm", task] == cold
        assert got["warm-unsandboxed", task] == cold
    assert got["cold", "demo_mc"]["results"]["results"]["demo_mc"]["sample_len"] == 20
    arith = got["cold", "arith_gen_tiny"]["results"]["results"]["arith_gen_tiny"]
    assert arith["exact_match,none"] == 13 / 20  # the stub's known answers


@pytest.mark.e2e
@pytest.mark.parametrize("sandbox", ["bwrap", "off"])
def test_warm_jobs_stop_logs_progress_fallback_and_replacement(
    make_client: Callable[..., TestClient], sandbox: str
) -> None:
    client = make_client(warm_workers=1, sandbox=sandbox)
    assert sandboxed(client) == (sandbox == "bwrap")
    worker = wait_warm(client)
    db = str(client.app.state.server.settings.db_path.resolve())  # type: ignore[attr-defined]
    fds = [os.readlink(f"/proc/{worker}/fd/{fd}") for fd in os.listdir(f"/proc/{worker}/fd")]
    assert db not in fds  # started with close_fds, not forked from the server

    # 200 requests of 0.5 s: the job outlives everything below until it is stopped.
    with running_stub_server(delay_s=0.5) as stub:
        slow = submit(client, stub_job(stub.base_url, "arith_gen"))
        # env_vars may be read at import time: such a job starts cold.
        cold = submit(client, {**DUMMY_JOB, "limit": 2, "env_vars": {"LMEVAL_LOG_LEVEL": "INFO"}})

        deadline = time.monotonic() + 120
        while not (job := client.get(f"/job/{slow}").json())["inference_progress_pct"]:
            assert job["status"] == "Running", job
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert job["progress"]["phase"] == "generate_until"  # counted by Requesting API bars
        assert 0 < job["inference_progress_pct"] < 100
        log = stderr_text(client, slow)
        assert f"{WARM_MARKER} {worker}\n" in log
        assert "Requesting API" in log

        done = wait_for(client, cold)
        assert done["status"] == "Completed", done["error"]
        assert WARM_MARKER not in stderr_text(client, cold)

        # A worker that dies is replaced; the jobs it forked run on in their own sessions.
        leader = client.app.state.server.manager.get(slow).pid  # type: ignore[attr-defined]
        assert leader in children_of(worker)  # the host pid, also of a sandboxed leader
        if sandbox == "bwrap":
            # The worker that took `slow` is its sandbox's PID 1: it stays with its job. Its
            # slot has started another worker; that one dies and is replaced.
            spare = wait_warm(client, exclude=frozenset({worker}))
            os.kill(spare, signal.SIGKILL)
            replacement = wait_warm(client, exclude=frozenset({worker, spare}))
            assert process_alive(worker)
        else:
            os.kill(worker, signal.SIGKILL)
            replacement = wait_warm(client, exclude=frozenset({worker}))
        assert process_alive(leader)
        assert client.get(f"/job/{slow}").json()["status"] == "Running"

        stopped = client.post(f"/job/{slow}/stop")
        assert stopped.status_code == 200, stopped.text
        job = client.get(f"/job/{slow}").json()
        assert job["status"] == "Stopped"
        assert job["exit_code"] == -signal.SIGTERM  # as exit.json recorded it
        assert group_members(leader) == []
        assert not process_alive(leader)
        if sandbox == "bwrap":
            eventually(lambda: not process_alive(worker))  # its sandbox ended with the job

    after = submit(client, {**DUMMY_JOB, "limit": 2})
    job = wait_for(client, after)
    assert job["status"] == "Completed", job["error"]
    assert f"{WARM_MARKER} {replacement}\n" in stderr_text(client, after)
    assert job["progress"]["done"] == job["progress"]["total"] == 8
    assert any("|demo_mc|" in line for line in job["stdout"])
    if sandbox == "bwrap":
        eventually(lambda: not process_alive(replacement))  # one job each
    else:
        # The worker reaps the session leaders it forked: no zombies left behind.
        eventually(lambda: children_of(replacement) == [])


@pytest.mark.e2e
def test_warm_worker_honours_disabled_hook_and_its_jobs_outlive_the_server(
    make_settings: Callable[..., Settings],
    make_client: Callable[..., TestClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Workers get the operator's JOB_ENV_PASSTHROUGH names from the server's environment, as
    # cold jobs do.
    monkeypatch.setenv(launcher.ENV_DISABLE_HOOK, "1")
    passthrough = [*job_env.DEFAULT_JOB_ENV_PASSTHROUGH, launcher.ENV_DISABLE_HOOK]
    settings = make_settings(warm_workers=1, job_env_passthrough=passthrough)
    with running_stub_server(delay_s=0.5) as stub:
        with TestClient(create_app(settings)) as first:
            worker = wait_warm(first)
            [info] = first.app.state.server.warm_pool.ready_info()  # type: ignore[attr-defined]
            assert info["hook"] == "LM_EVAL_SERVER_DISABLE_HOOK=1"
            job_id = submit(first, {**DUMMY_JOB, "limit": 2})
            job = wait_for(first, job_id)
            assert job["status"] == "Completed", job["error"]
            log = stderr_text(first, job_id)
            assert f"{WARM_MARKER} {worker}\n" in log
            assert "running plain lm-eval: LM_EVAL_SERVER_DISABLE_HOOK=1" in log

            if sandboxed(first):
                wait_warm(first, exclude=frozenset({worker}))  # one job per worker
            slow = submit(first, stub_job(stub.base_url, "arith_gen"))
            # Plain lm-eval indexes every task itself first: 15-50 s on a busy machine.
            eventually(lambda: "Requesting API" in stderr_text(first, slow), timeout_s=180)
            assert WARM_MARKER in stderr_text(first, slow)
            leader = first.app.state.server.manager.get(slow).pid  # type: ignore[attr-defined]
            holder = parent_of(leader)  # the worker that forked it
            # Leaving the block shuts the server and its worker down; the job runs on...
        assert process_alive(leader)
        assert not process_alive(worker)
        # ...and the next server re-adopts it like a cold job, by its supervisor.
        second = make_client()
        assert second.app.state.server.manager.get(slow).pid == leader  # type: ignore[attr-defined]
        assert second.get(f"/job/{slow}").json()["status"] == "Running"
        assert second.post(f"/job/{slow}/stop").status_code == 200
        assert second.get(f"/job/{slow}").json()["status"] == "Stopped"
        assert group_members(leader) == []
        # A sandboxed worker stays with its job (its sandbox's PID 1), then ends with it.
        eventually(lambda: not process_alive(holder))


# ----------------------------------------------------------------- cheap pieces, no lm-eval run

ATTACHED = """
import os, sys
out_r, out_w = os.pipe()
err_r, err_w = os.pipe()
child = os.fork()
if child == 0:
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.write(1, b"to stdout\\n")
    os.write(2, b"to stderr\\n")
    os._exit(3)
os.close(out_w)
os.close(err_w)
os.set_inheritable(out_r, True)
os.set_inheritable(err_r, True)
work_dir, supervise = sys.argv[1:]
os.execv(sys.executable, [sys.executable, "-I", "-S", supervise, work_dir, "4096", "--attach",
                          str(child), str(out_r), str(err_r)])
"""


def test_supervise_attach_mode_records_like_run(tmp_path: Path) -> None:
    from lm_eval_server.runtime import supervise

    done = subprocess.run(
        [sys.executable, "-c", ATTACHED, str(tmp_path), supervise.__file__], timeout=60
    )
    assert done.returncode == 3
    assert (tmp_path / "stdout.log").read_text() == "to stdout\n"
    assert (tmp_path / "stderr.log").read_text() == "to stderr\n"
    assert json.loads((tmp_path / "exit.json").read_text())["exit_code"] == 3
    assert (tmp_path / "child.pid").read_text().isdigit()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"executor": "ray", "ray_address": "http://x:8265"}, "EXECUTOR=local only"),
        ({"use_launcher": False}, "needs USE_LAUNCHER=true"),
    ],
)
def test_warm_workers_settings_conflicts_are_startup_errors(
    make_settings: Callable[..., Settings], overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_settings(warm_workers=1, **overrides)


def test_pool_declines_what_it_cannot_run_warm(tmp_path: Path) -> None:
    env = {"PYTHONUNBUFFERED": "1"}
    pool = warm_pool.WarmPool(1, env, tmp_path)  # not started: no worker is ever ready
    argv = [sys.executable, "-m", "lm_eval_server.runtime.launcher", "--model", "dummy"]

    def spec(**changes: Any) -> LaunchSpec:
        values: dict[str, Any] = {
            "job_id": 1,
            "argv": argv,
            "env": env,
            "work_dir": tmp_path,
            "warm_args": launch.warm_args(argv, {}),
        }
        return LaunchSpec(**{**values, **changes})

    # The launch policy alone decides: launcher jobs without env_vars of their own.
    assert launch.warm_args(argv, {}) == ["--model", "dummy"]
    assert launch.warm_args(argv, {"LMEVAL_LOG_LEVEL": "DEBUG"}) is None
    assert launch.warm_args([sys.executable, "-m", "lm_eval", "--model", "dummy"], {}) is None
    for declined in (
        spec(warm_args=None),
        spec(),  # eligible, but no worker is ready
    ):
        assert asyncio.run(pool.run(declined, 1024)) is None
