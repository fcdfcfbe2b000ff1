"""Each security rule, through the HTTP API: nothing hostile runs, writes or gets queued."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_lm_eval import pattern
from tests.support.jobs import DUMMY_JOB, fake_job, submit, wait_for
from tests.support.server import ServerProcess


def assert_refused(client: Any, body: dict[str, Any], *needles: str) -> str:
    response = client.post("/job", json=body)
    assert response.status_code == 422, response.text
    detail = str(response.json()["detail"])
    for needle in needles:
        assert needle in detail, detail
    return detail


def test_api_keys_guard_every_endpoint_but_health(make_client: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# operators\nfile-key\n")
    client = make_client(api_keys=["env-key"], api_keys_file=key_file)
    assert client.get("/health").status_code == 200
    for method, path in (
        ("get", "/jobs"),
        ("get", "/job/1"),
        ("post", "/job"),
        ("get", "/jobs/stop"),
        ("delete", "/jobs"),
        ("get", "/metrics"),
        ("get", "/job/1/logs"),
        ("get", "/job/1/results"),
        ("get", "/tasks"),
        ("get", "/tasks/arc_easy"),
        ("post", "/tasks"),
        ("delete", "/tasks/x"),
        ("get", "/models"),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            response = getattr(client, method)(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert "API key" in response.json()["detail"]
    for key in ("env-key", "file-key"):
        ok = client.get("/jobs", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
    client.headers["Authorization"] = "Bearer env-key"  # for the fixture's clean-up


def test_hostile_lm_eval_path_never_runs(client: Any, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for path in (
        f"sh -c 'touch {marker}'",
        f"touch {marker}",
        f"{sys.executable} -m lm_eval; touch {marker}",
        "/bin/sh",
    ):
        assert_refused(client, {**DUMMY_JOB, "lm_eval_path": path}, "LM_EVAL_PATHS")
    time.sleep(0.5)
    assert not marker.exists()
    assert client.get("/jobs").json()["total"] == 0


def test_env_vars_rules(make_client: Any, tmp_path: Path) -> None:
    client = make_client(allowed_env_vars=["PYTHONPATH"], max_env_vars=3)
    for name in (
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "PYTHONSTARTUP",
        "PATH",
        "PYTHONHOME",
        "ld_preload",
    ):
        assert_refused(client, {**DUMMY_JOB, "env_vars": {name: str(tmp_path)}}, name)
    for name in ("1ABC", "A-B", "A B", "A=B", ""):
        assert_refused(client, {**DUMMY_JOB, "env_vars": {name: "1"}}, "not a valid")
    assert_refused(
        client, {**DUMMY_JOB, "env_vars": {f"V{i}": "1" for i in range(4)}}, "MAX_ENV_VARS"
    )
    assert_refused(client, {**DUMMY_JOB, "env_vars": {"BIG": "x" * 40_000}}, "BIG")
    # The operator's allowlist lets PYTHONPATH through, and it reaches the job.
    job_id = submit(client, fake_job(PYTHONPATH=str(tmp_path)))
    assert wait_for(client, job_id)["status"] == "Completed"


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("outside")
    yield path
    assert list(path.iterdir()) == [], "a refused request wrote outside ALLOWED_PATHS"


def test_paths_are_confined(client: Any, tmp_path: Path, outside: Path) -> None:
    inside = tmp_path / "data"
    link = inside / "escape"
    inside.mkdir(exist_ok=True)
    link.symlink_to(outside)
    for field, value in (
        ("output_path", str(outside / "results")),
        ("output_path", str(inside / ".." / ".." / outside.name / "x")),
        ("output_path", str(link / "results")),
        ("output_path", "/etc/lm-eval-results"),
        ("include_path", str(outside)),
        ("use_cache", str(outside / "cache")),
        ("config", str(outside / "cfg.yaml")),
    ):
        assert_refused(client, {**DUMMY_JOB, field: value}, field, "ALLOWED_PATHS")
    assert_refused(client, {**DUMMY_JOB, "tasks": str(outside / "task.yaml")}, "ALLOWED_PATHS")
    # Inside is fine, and lm-eval writes its results there.
    job_id = submit(client, {**DUMMY_JOB, "limit": 2, "output_path": str(inside / "mine")})
    assert wait_for(client, job_id)["status"] == "Completed"
    assert list((inside / "mine").glob("*/results_*.json"))
    assert client.get(f"/job/{job_id}/results").status_code == 200


def test_remote_code_needs_the_operator(make_client: Any) -> None:
    client = make_client()
    assert_refused(client, {**DUMMY_JOB, "trust_remote_code": True}, "ALLOW_REMOTE_CODE")
    assert_refused(client, {**DUMMY_JOB, "confirm_run_unsafe_code": True}, "ALLOW_REMOTE_CODE")
    assert_refused(
        client,
        {**DUMMY_JOB, "model_args": "pretrained=x,trust_remote_code=True"},
        "ALLOW_REMOTE_CODE",
    )
    assert_refused(
        client, {**DUMMY_JOB, "model_args": {"trust_remote_code": True}}, "ALLOW_REMOTE_CODE"
    )
    allowed = make_client(allow_remote_code=True)
    assert allowed.post("/job", json={**fake_job(), "trust_remote_code": True}).status_code == 200


def test_body_limit_queue_limit_and_timeout(make_client: Any) -> None:
    client = make_client(max_body_bytes=4096, max_queued_jobs=2, max_concurrency=1)
    big = {**DUMMY_JOB, "system_instruction": "x" * 5000}
    response = client.post("/job", json=big)
    assert response.status_code == 413 and "MAX_BODY_BYTES" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "dummy", "system_instruction": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    streamed = client.post("/job", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413

    running = submit(
        client,
        fake_job(FAKE_SLEEP_S="60"),
    )
    wait_for(client, running, {"Running"})
    queued = [submit(client, fake_job()) for _ in range(2)]
    full = client.post("/job", json=fake_job())
    assert full.status_code == 429
    assert full.headers["retry-after"].isdigit() and "MAX_QUEUED_JOBS" in full.json()["detail"]
    client.get("/jobs/stop")
    assert {client.get(f"/job/{j}").json()["status"] for j in queued} == {"Stopped"}

    timed = submit(client, {**fake_job(FAKE_SLEEP_S="60"), "timeout_s": 1})
    job = wait_for(client, timed, timeout_s=60)
    assert job["status"] == "Failed" and job["error"].startswith("timeout")
    assert_refused(client, {**fake_job(), "timeout_s": -1}, "timeout_s")


def test_log_cap_keeps_the_tail(make_client: Any) -> None:
    client = make_client(max_log_bytes=1024 * 1024)
    size = 5 * 1024 * 1024
    job_id = submit(client, fake_job(FAKE_STDERR_BYTES=str(size)))
    job = wait_for(client, job_id)
    assert job["status"] == "Completed" and job["stderr_truncated"]
    work_dir = Path(client.app.state.server.manager.get(job_id).work_dir)
    on_disk = sum(p.stat().st_size for p in work_dir.glob("stderr.log*") if p.suffix != ".cut")
    assert on_disk <= 1024 * 1024
    text = client.get(f"/job/{job_id}/logs").content
    header, _, body = text.partition(b"\n")
    assert b"dropped to keep it under MAX_LOG_BYTES" in header
    assert body == pattern(size)[-len(body) :] and len(body) >= 512 * 1024


def test_open_server_on_public_address_warns(tmp_path: Path, index_dir: Path) -> None:
    server = ServerProcess(tmp_path / "data", index_dir)
    server.proc = None
    # uvicorn's --host decides the address; the app reads it from the command line.
    import subprocess

    env = {**server.env}
    log = tmp_path / "public.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "src.main:app",
                "--host",
                "0.0.0.0",
                "--port",
                str(server.port),
            ],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "Application startup complete" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert "No API_KEYS set and listening on 0.0.0.0" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    keyed = ServerProcess(tmp_path / "data2", index_dir, API_KEYS="s3cret-key").start()
    try:
        import httpx

        assert (
            httpx.get(
                f"{keyed.url}/jobs", headers={"Authorization": "Bearer s3cret-key"}
            ).status_code
            == 200
        )
        assert httpx.get(f"{keyed.url}/jobs").status_code == 401
    finally:
        keyed.terminate()
    assert "s3cret-key" not in keyed.log_path.read_text()
    assert os.environ.get("API_KEYS") is None
