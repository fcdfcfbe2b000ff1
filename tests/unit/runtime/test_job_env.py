"""lm_eval_server.runtime.job_env: the env_vars allowlist, the settings checks and the environment a
job is built from (no server environment in it); the Ray entrypoint's exec-with-environment
program and the warm fork's environment, run for real."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from lm_eval_server.config import Settings
from lm_eval_server.runtime import job_env
from lm_eval_server.runtime.executors import warm_worker

RAY_EXEC_WITH_ENV: str | None = None
# Only a missing `ray` (the optional extra) skips the Ray test: an ImportError of our own
# executor module is a failure.
if importlib.util.find_spec("ray") is not None:
    from lm_eval_server.runtime.executors.ray import EXEC_WITH_ENV as RAY_EXEC_WITH_ENV


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", **overrides)


@pytest.mark.parametrize(
    "name",
    [
        "PYTHONWARNINGS",
        "BROWSER",
        "LD_PRELOAD",
        "ld_preload",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "BASH_ENV",
        "PATH",
        "HOME",
        "TMPDIR",
        "HF_ENDPOINT",
        "HF_HOME",
        "HTTPS_PROXY",
        "http_proxy",
        "NO_PROXY",
        "OPENAI_BASE_URL",
        "REQUESTS_CA_BUNDLE",
        "SSL_CERT_DIR",
        "HF_DATASETS_TRUST_REMOTE_CODE",
        "LM_EVAL_SERVER_INDEX_DIR",
        "LM_EVAL_SERVER_DISABLE_HOOK",
        "API_KEYS",
        "OMP_TOOL_LIBRARIES",
        "NCCL_DEBUG_FILE",
        "Hf_Hub_Offline",
    ],
)
def test_names_outside_the_allowlist_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(job_env.EnvVarsRefused) as error:
        job_env.check_env_vars({name: "x"}, settings(tmp_path))
    message = str(error.value)
    assert name in message and "ALLOWED_ENV_VARS" in message


def test_default_names_pass_and_none_is_a_hook(tmp_path: Path) -> None:
    values = {name: "1" for name in job_env.DEFAULT_ALLOWED_ENV_VARS}
    assert job_env.check_env_vars(values, settings(tmp_path)) == values
    for name in job_env.DEFAULT_ALLOWED_ENV_VARS:
        assert job_env.ENV_NAME.match(name)  # names, never patterns
        assert not name.startswith(("PYTHON", "LD_", "LM_EVAL_SERVER_"))
        assert not name.endswith(("_PATH", "_DIR", "_HOME", "_URL", "_ENDPOINT", "_PROXY"))
        assert name not in job_env.PER_JOB_NAMES
        assert name.lower() not in Settings.model_fields


def test_operator_patterns_are_case_sensitive_globs(tmp_path: Path) -> None:
    extended = settings(tmp_path, allowed_env_vars=["MYCO_*", "ONE_?", "PYTHONPATH"])
    good = {"MYCO_": "", "MYCO_A_B": "1", "ONE_X": "1", "PYTHONPATH": "/opt/x"}
    assert job_env.check_env_vars(good, extended) == good
    for name in ("myco_a", "MYCOA", "ONE_XY", "pythonpath", "XMYCO_A"):
        with pytest.raises(job_env.EnvVarsRefused, match="ALLOWED_ENV_VARS"):
            job_env.check_env_vars({name: "1"}, extended)


@pytest.mark.parametrize(
    ("env_vars", "needle"),
    [
        ({f"V{i}": "1" for i in range(65)}, "MAX_ENV_VARS"),
        ({"1ABC": "1"}, "not a valid variable name"),
        ({"A=B": "1"}, "not a valid variable name"),
        ({"": "1"}, "not a valid variable name"),
        ({"HF_HUB_OFFLINE": "1\0"}, "NUL"),
        ({"OPENAI_API_KEY": "x" * (32 * 1024 + 1)}, "MAX_ENV_VALUE_BYTES"),
        ({"OPENAI_API_KEY": "\ud800"}, "lone surrogate"),
        ({"HF_HUB_OFFLINE": 1}, "must be a string"),
    ],
)
def test_bounds(tmp_path: Path, env_vars: dict[str, Any], needle: str) -> None:
    with pytest.raises(job_env.EnvVarsRefused, match=needle):
        job_env.check_env_vars(env_vars, settings(tmp_path))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"job_env_passthrough": ["HF_TOKEN", "API_KEYS"]}, "API_KEYS is a setting"),
        ({"job_env_passthrough": ["api_keys_file"]}, "api_keys_file is a setting"),
        ({"job_env_passthrough": ["Data_Dir"]}, "Data_Dir is a setting"),
        ({"job_env_passthrough": ["ALLOWED_ENV_VARS"]}, "is a setting"),
        ({"job_env_passthrough": ["A-B"]}, "not a variable name"),
        ({"allowed_env_vars": ["FAKE_*", "A=B"]}, "ALLOWED_ENV_VARS"),
        ({"allowed_env_vars": ["A B"]}, "ALLOWED_ENV_VARS"),
    ],
)
def test_settings_are_checked_at_startup(
    tmp_path: Path, overrides: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ValidationError, match=needle):
        settings(tmp_path, **overrides)


def test_settings_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOB_ENV_PASSTHROUGH", "HF_TOKEN, CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("ALLOWED_ENV_VARS", "FAKE_*,MY_FLAG")
    loaded = Settings(data_dir=tmp_path)
    assert loaded.job_env_passthrough == ["HF_TOKEN", "CUDA_VISIBLE_DEVICES"]
    assert loaded.allowed_env_vars == ["FAKE_*", "MY_FLAG"]
    assert loaded.max_log_bytes == 100 * 1024 * 1024
    monkeypatch.setenv("JOB_ENV_PASSTHROUGH", "API_KEYS")
    with pytest.raises(ValidationError, match="JOB_ENV_PASSTHROUGH"):
        Settings(data_dir=tmp_path)


def test_job_environment_is_built_from_nothing(tmp_path: Path) -> None:
    config = settings(tmp_path, job_env_passthrough=["HF_HUB_OFFLINE", "HF_TOKEN", "ABSENT"])
    server_env = {
        "API_KEYS": "secret",
        "SERVER_SECRET": "x",
        "PYTHONWARNINGS": "ignore::antigravity.x",
        "PATH": "/attacker/bin",
        "HOME": "/root",
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": "hf_operator",
    }
    work_dir = tmp_path / "data" / "jobs" / "7"
    env = job_env.job_environment(config, work_dir, {"HF_TOKEN": "hf_caller"}, server_env)
    data_dir = (tmp_path / "data").resolve()
    assert env == {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": str(work_dir / "home"),
        "TMPDIR": str(work_dir / "tmp"),
        "XDG_CACHE_HOME": str(data_dir / "cache"),
        "HF_HOME": str(data_dir / "cache" / "huggingface"),
        "LM_HARNESS_CACHE_PATH": str(data_dir / "cache" / "lm_eval"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONNOUSERSITE": "1",
        "LM_EVAL_SERVER_INDEX_DIR": str(config.task_index_dir),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",  # JOBS_OFFLINE, on by default
        "HF_TOKEN": "hf_caller",  # the request's own token wins over the operator's
    }
    for path in (work_dir / "home", work_dir / "tmp", data_dir / "cache" / "huggingface"):
        assert path.is_dir() and stat.S_IMODE(path.stat().st_mode) == 0o700
    for name in ("XDG_CACHE_HOME", "HF_HOME", "LM_HARNESS_CACHE_PATH"):
        assert not Path(env[name]).is_relative_to(sys.prefix)  # never the virtualenv


def test_jobs_are_offline_unless_the_request_or_the_operator_says_otherwise(tmp_path: Path) -> None:
    online = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    config = settings(tmp_path)
    env = job_env.job_environment(config, tmp_path / "j", {}, online)
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    # A request that needs the Hub says so (the original README's example.json does).
    env = job_env.job_environment(config, tmp_path / "j", {"HF_DATASETS_OFFLINE": "0"}, online)
    assert env["HF_DATASETS_OFFLINE"] == "0" and env["HF_HUB_OFFLINE"] == "1"

    allowed = settings(tmp_path, jobs_offline=False)
    env = job_env.job_environment(allowed, tmp_path / "j", {}, online)
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "0"  # the passthrough
    assert "HF_HUB_OFFLINE" not in job_env.job_environment(allowed, tmp_path / "k", {}, {})


def test_passthrough_may_replace_a_default_cache(tmp_path: Path) -> None:
    config = settings(tmp_path, job_env_passthrough=["HF_HOME"])
    env = job_env.job_environment(config, tmp_path / "j", {}, {"HF_HOME": "/models/hf"})
    assert env["HF_HOME"] == "/models/hf"


def test_a_worker_and_its_jobs_share_all_but_home_and_tmpdir(tmp_path: Path) -> None:
    config = settings(tmp_path)
    server_env = {"HF_HUB_OFFLINE": "1"}
    worker = job_env.worker_environment(config, tmp_path / "data" / "warm", server_env)
    job = job_env.job_environment(config, tmp_path / "data" / "jobs" / "1", {}, server_env)
    assert worker != job
    assert job_env.shared_part(worker) == job_env.shared_part(job)
    other = job_env.job_environment(config, tmp_path / "j2", {"LMEVAL_LOG_LEVEL": "DEBUG"}, {})
    assert job_env.shared_part(other) != job_env.shared_part(worker)


def test_fork_environ_is_the_jobs_own_as_its_imports_leave_it() -> None:
    before = {"HOME": "/w/home", "PATH": "/bin", "GONE": "1", "SAME": "s"}
    after = {"HOME": "/w/home", "PATH": "/bin", "SAME": "s", "ADDED": "yes"}
    changes = warm_worker.environ_changes(before, after)
    assert changes == {"ADDED": "yes", "GONE": None}
    job = {"HOME": "/j/home", "TMPDIR": "/j/tmp", "PATH": "/bin", "GONE": "1", "SAME": "s"}
    assert warm_worker.job_environ(job, changes) == {
        "HOME": "/j/home",
        "TMPDIR": "/j/tmp",
        "PATH": "/bin",
        "SAME": "s",
        "ADDED": "yes",
    }


@pytest.mark.skipif(RAY_EXEC_WITH_ENV is None, reason="ray is not installed")
def test_ray_entrypoint_program_execs_with_exactly_the_jobs_environment(tmp_path: Path) -> None:
    assert RAY_EXEC_WITH_ENV is not None
    env_file = tmp_path / "job-env.json"
    job = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VALUE": "$SECRET ${SECRET} `id`"}
    env_file.write_text(json.dumps({"env": job, "keep": ["FROM_RUNTIME_ENV"]}))
    node_env = {
        "PATH": os.environ["PATH"],
        "SECRET": "node-secret",
        "FROM_RUNTIME_ENV": "operator",
        "RAY_ADDRESS": "x",
    }
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", RAY_EXEC_WITH_ENV, str(env_file), "env", "-0"],
        env=node_env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    seen = dict(line.split("=", 1) for line in done.stdout.decode().split("\0") if line)
    assert seen == {**job, "FROM_RUNTIME_ENV": "operator"}
    assert not env_file.exists()  # the job's secrets do not stay on disk
