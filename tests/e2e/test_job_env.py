"""A job's environment, through the HTTP API: a request sets only allowlisted variables, and a
job (cold, or forked from a warm worker) sees exactly the environment the server built for it,
nothing of the server's own. DATA_DIR and jobs.db are the owner's only."""

from __future__ import annotations

import json
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lm_eval_server.app import create_app
from lm_eval_server.config import Settings
from lm_eval_server.runtime import job_env
from lm_eval_server.runtime.executors import warm_protocol
from tests.support.jobs import DUMMY_JOB, ROOT, fake_job, submit, wait_for
from tests.support.server import ServerProcess

ENV_TASK_DIR = ROOT / "tests" / "data" / "env_task"
ENV_DUMP_JOB: dict[str, Any] = {
    "model": "dummy",
    "tasks": "env_dump",
    "include_path": str(ENV_TASK_DIR),
    "limit": 2,
}
DUMP_FILE = "job-environ.json"  # written by tests/data/env_task/_dump.py in the job's cwd
WARM_MARKER = warm_protocol.MARKER_PREFIX + warm_protocol.FORKED_MARKER
SERVER_SECRET = "server-secret-value-7f3a"
SETTING_NAMES = {name.upper() for name in Settings.model_fields}
# Variables lm-eval and its libraries set themselves (lm_eval/__init__.py on import,
# lm_eval/_cli/run.py, ...): the job's own doing, not something the server handed it.
SET_BY_LM_EVAL = {
    "HF_XET_HIGH_PERFORMANCE",
    "HF_HUB_ENABLE_HF_TRANSFER",
    "KMP_DUPLICATE_LIB_OK",
    "TOKENIZERS_PARALLELISM",
}


def refused(client: Any, env_vars: dict[str, str], *needles: str) -> str:
    response = client.post("/job", json={**DUMMY_JOB, "env_vars": env_vars})
    assert response.status_code == 422, response.text
    detail = str(response.json()["detail"])
    for needle in needles:
        assert needle in detail, detail
    return detail


def dumped(client: TestClient, job_id: int) -> dict[str, Any]:
    job = wait_for(client, job_id, timeout_s=300)
    assert job["status"] == "Completed", job["error"]
    work_dir = Path(client.app.state.server.manager.get(job_id).work_dir)  # type: ignore[attr-defined]
    seen: dict[str, Any] = json.loads((work_dir / DUMP_FILE).read_text())
    seen["work_dir"] = str(work_dir)
    return seen


def hostile_server_env(monkeypatch: pytest.MonkeyPatch, marker: Path) -> None:
    """The issue's attack, placed in the server's own environment, plus a secret: a job that
    inherited the server's environment would run the command and see the secret."""
    monkeypatch.setenv("SERVER_SECRET", SERVER_SECRET)
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::antigravity.x")
    monkeypatch.setenv("BROWSER", f"/bin/sh -c 'id > {marker}' %s")
    monkeypatch.setenv("API_KEYS", "env-key")
    monkeypatch.setenv("MY_PASSTHROUGH", "passed")


def assert_built_from_nothing(seen: dict[str, Any], settings: Settings) -> dict[str, str]:
    env: dict[str, str] = seen["environ"]
    work_dir = Path(seen["work_dir"])
    data_dir = settings.data_dir.resolve()
    assert SERVER_SECRET not in json.dumps(env)
    for name in ("SERVER_SECRET", "PYTHONWARNINGS", "BROWSER", "API_KEYS", "API_KEYS_FILE"):
        assert name not in env
    assert not SETTING_NAMES & set(env), SETTING_NAMES & set(env)
    assert env["HOME"] == str(work_dir / "home")
    assert env["TMPDIR"] == seen["tempdir"] == str(work_dir / "tmp")
    assert Path(env["HF_HOME"]).is_relative_to(data_dir / "cache")
    assert Path(env["LM_HARNESS_CACHE_PATH"]).is_relative_to(data_dir / "cache")
    assert env["PATH"] == job_env.safe_path()
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"  # default passthrough
    assert env["MY_PASSTHROUGH"] == "passed"  # the operator's passthrough
    expected = job_env.job_environment(settings, work_dir, {})
    extra = set(env) - set(expected)
    assert extra <= SET_BY_LM_EVAL | {"OPENAI_API_KEY", "MYCO_FLAG"}, extra
    for name, value in expected.items():
        assert env[name] == value, name
    return env


def test_the_issues_attack_and_other_hooks_are_refused(client: TestClient, tmp_path: Path):
    marker = tmp_path / "pwned"
    attack = {
        "PYTHONWARNINGS": "ignore::antigravity.x",
        "BROWSER": f"/bin/sh -c 'id > {marker}' %s",
    }
    refused(client, attack, "PYTHONWARNINGS", "ALLOWED_ENV_VARS")
    refused(client, {"BROWSER": attack["BROWSER"]}, "BROWSER", "ALLOWED_ENV_VARS")
    for name in (
        "LD_PRELOAD",
        "ld_preload",
        "LD_AUDIT",
        "LD_LIBRARY_PATH",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "PYTHONHOME",
        "PYTHONINSPECT",
        "PYTHONSAFEPATH",
        "BASH_ENV",
        "ENV",
        "PATH",
        "HOME",
        "TMPDIR",
        "HF_ENDPOINT",
        "HF_HOME",
        "HF_DATASETS_TRUST_REMOTE_CODE",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "OPENAI_BASE_URL",
        "AZURE_OPENAI_ENDPOINT",
        "REQUESTS_CA_BUNDLE",
        "SSL_CERT_FILE",
        "CURL_CA_BUNDLE",
        "OMP_TOOL_LIBRARIES",
        "NCCL_NET_PLUGIN",
        "CUDA_VISIBLE_DEVICES",
        "LM_HARNESS_CACHE_PATH",
        "LM_EVAL_SERVER_INDEX_DIR",
        "API_KEYS",
        "TZ",
        "hf_hub_offline",  # an allowed name in another case is another variable
        "Hf_Hub_Offline",
    ):
        refused(client, {name: str(tmp_path)}, name, "ALLOWED_ENV_VARS")
    # A refused name next to allowed ones refuses the whole request.
    refused(client, {"HF_HUB_OFFLINE": "1", "LD_PRELOAD": "/x.so"}, "LD_PRELOAD")
    time.sleep(1.0)
    assert not marker.exists()
    assert client.get("/jobs").json()["total"] == 0


def test_operator_patterns_extend_the_allowlist_case_sensitively(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = make_client(allowed_env_vars=["MYCO_*", "EXACT_NAME"])
    for name in ("MYCOFLAG", "myco_flag", "EXACT_NAME2", "exact_name", "XMYCO_A"):
        refused(client, {name: "1"}, name, "ALLOWED_ENV_VARS")
    job_id = submit(
        client, {**DUMMY_JOB, "limit": 1, "env_vars": {"MYCO_FLAG": "on", "EXACT_NAME": "x"}}
    )
    assert wait_for(client, job_id, timeout_s=300)["status"] == "Completed"


def test_a_cold_job_gets_only_what_the_server_built(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    hostile_server_env(monkeypatch, marker)
    passthrough = [*job_env.DEFAULT_JOB_ENV_PASSTHROUGH, "MY_PASSTHROUGH"]
    client = make_client(
        api_keys=["env-key"],
        job_env_passthrough=passthrough,
        allowed_env_vars=["MYCO_*", "FAKE_*"],
    )
    client.headers["Authorization"] = "Bearer env-key"
    settings: Settings = client.app.state.server.settings  # type: ignore[attr-defined]
    env_vars = {"OPENAI_API_KEY": "sk-caller", "MYCO_FLAG": "1"}
    seen = dumped(client, submit(client, {**ENV_DUMP_JOB, "env_vars": env_vars}))
    env = assert_built_from_nothing(seen, settings)
    assert env["OPENAI_API_KEY"] == "sk-caller" and env["MYCO_FLAG"] == "1"
    assert seen["cwd"] == seen["work_dir"]
    # Any program, not only lm-eval: the stand-in dumps its environment too.
    fake = submit(client, fake_job(FAKE_DUMP_ENV="fake-env.json"))
    assert wait_for(client, fake)["status"] == "Completed"
    fake_dir = Path(client.app.state.server.manager.get(fake).work_dir)  # type: ignore[attr-defined]
    fake_env = json.loads((fake_dir / "fake-env.json").read_text())
    expected = job_env.job_environment(settings, fake_dir, {"FAKE_DUMP_ENV": "fake-env.json"})
    assert fake_env == expected
    assert not marker.exists()


def test_a_warm_job_gets_exactly_the_environment_a_cold_one_gets(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    hostile_server_env(monkeypatch, marker)
    passthrough = [*job_env.DEFAULT_JOB_ENV_PASSTHROUGH, "MY_PASSTHROUGH"]
    dumps = {}
    for mode, workers in (("cold", 0), ("warm", 1)):
        settings = make_settings(
            data_dir=tmp_path / "data",
            api_keys=["env-key"],
            job_env_passthrough=passthrough,
            warm_workers=workers,
        )
        with TestClient(create_app(settings)) as client:
            client.headers["Authorization"] = "Bearer env-key"
            if workers:
                deadline = time.monotonic() + 300
                while client.get("/ready").json()["warm_workers"]["ready"] < 1:
                    assert time.monotonic() < deadline, "no warm worker ready"
                    time.sleep(0.1)
            job_id = submit(client, ENV_DUMP_JOB)
            seen = dumped(client, job_id)
            stderr = client.get(f"/job/{job_id}/logs", params={"stream": "stderr"}).text
            assert (WARM_MARKER in stderr) == bool(workers)
            assert_built_from_nothing(seen, settings)
            dumps[mode] = json.loads(json.dumps(seen).replace(seen["work_dir"], "<job>"))
    cold, warm_ = (set(dumps[m]["environ"].items()) for m in ("cold", "warm"))
    assert warm_ == cold, (warm_ - cold, cold - warm_)
    assert dumps["warm"] == dumps["cold"]
    assert not marker.exists()


def test_passthrough_of_a_server_setting_is_a_startup_error(
    tmp_path: Path, index_dir: Path
) -> None:
    for value in ("HF_TOKEN,API_KEYS", "api_keys_file", "DATA_DIR"):
        server = ServerProcess(tmp_path / "data", index_dir, JOB_ENV_PASSTHROUGH=value)
        with pytest.raises(RuntimeError, match="JOB_ENV_PASSTHROUGH") as error:
            server.start()
        assert "is a setting of this server" in str(error.value)
    server = ServerProcess(tmp_path / "data", index_dir, ALLOWED_ENV_VARS="FAKE_*,A=B")
    with pytest.raises(RuntimeError, match="ALLOWED_ENV_VARS"):
        server.start()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_data_dir_and_jobs_db_are_the_owners_only(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh" / "data"
    client = make_client(data_dir=fresh)
    job_id = submit(client, fake_job())
    assert wait_for(client, job_id)["status"] == "Completed"
    assert mode(fresh) == 0o700
    assert mode(fresh / "jobs") == 0o700
    for name in ("jobs.db", "jobs.db-wal", "jobs.db-shm"):
        assert mode(fresh / name) == 0o600, name
    work_dir = Path(client.app.state.server.manager.get(job_id).work_dir)  # type: ignore[attr-defined]
    assert mode(work_dir / "home") == mode(work_dir / "tmp") == 0o700
    assert mode(fresh / "cache") == 0o700

    # A DATA_DIR from before: its database and jobs/ are tightened at startup.
    old = tmp_path / "old"
    (old / "jobs").mkdir(parents=True, mode=0o755)
    (old / "jobs").chmod(0o755)
    sqlite3.connect(old / "jobs.db").close()
    (old / "jobs.db").chmod(0o644)
    make_client(data_dir=old)
    assert mode(old / "jobs.db") == 0o600
    assert mode(old / "jobs") == 0o700


def test_a_ray_job_gets_only_its_environment(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ray", reason="the `ray` extra is optional")
    from tests.e2e.test_ray import JOB_TIMEOUT_S, running_head

    # The head is started from this environment: the secret is in the Ray node's environment.
    monkeypatch.setenv("SERVER_SECRET", SERVER_SECRET)
    with running_head() as head:
        client = make_client(
            executor="ray",
            ray_address=head.address,
            ray_job_runtime_env={"env_vars": {"FROM_OPERATOR": "op"}},
        )
        # Ray would expand ${NAME} in runtime_env.env_vars from the node's environment.
        env_vars = {"FAKE_DUMP_ENV": "fake-env.json", "OPENAI_API_KEY": "${SERVER_SECRET}"}
        job_id = submit(client, fake_job(**env_vars))
        job = wait_for(client, job_id, timeout_s=JOB_TIMEOUT_S)
        assert job["status"] == "Completed", job
        record = client.app.state.server.manager.get(job_id)  # type: ignore[attr-defined]
        work_dir = Path(record.work_dir)
        settings: Settings = client.app.state.server.settings  # type: ignore[attr-defined]
        seen = json.loads((work_dir / "fake-env.json").read_text())
        expected = job_env.job_environment(settings, work_dir, env_vars)
        assert seen == {**expected, "FROM_OPERATOR": "op"}
        assert not (work_dir / "job-env.json").exists()
        info = head.client().get_job_info(record.executor_ref)
        assert "SERVER_SECRET" not in json.dumps(info.runtime_env)
