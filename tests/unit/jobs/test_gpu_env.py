"""GPU slots in a job's environment and launch (job_env, launch): exactly its devices, never a
request's own device variables, and never a warm worker for a job given devices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lm_eval_server.config import Settings
from lm_eval_server.jobs.launch import LaunchPolicy, launcher_command
from lm_eval_server.jobs.models import JobRecord
from lm_eval_server.runtime import job_env


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", task_index=False, **overrides)


SERVER_ENV = {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "HF_HUB_OFFLINE": "1"}


def test_the_allocation_replaces_the_servers_devices(tmp_path: Path) -> None:
    config = settings(tmp_path)
    work = tmp_path / "j"
    env = job_env.job_environment(config, work, {}, SERVER_ENV, gpus=["2", "3"])
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]) == ("2,3", "PCI_BUS_ID")
    none = job_env.job_environment(config, work, {}, SERVER_ENV, gpus=[])
    assert none["CUDA_VISIBLE_DEVICES"] == ""  # sees no device, not every device
    # Without GPU slots the job gets what JOB_ENV_PASSTHROUGH copies, as before.
    plain = job_env.job_environment(config, work, {}, SERVER_ENV)
    assert plain["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and "CUDA_DEVICE_ORDER" not in plain


def test_an_operators_device_order_is_kept(tmp_path: Path) -> None:
    config = settings(tmp_path, job_env_passthrough=["CUDA_DEVICE_ORDER"])
    environ = {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    env = job_env.job_environment(config, tmp_path / "j", {}, environ, gpus=["1"])
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]) == ("1", "FASTEST_FIRST")


@pytest.mark.parametrize("name", sorted(job_env.DEVICE_VARS))
def test_device_variables_are_refused_in_env_vars_even_when_allowed(
    tmp_path: Path, name: str
) -> None:
    config = settings(tmp_path, allowed_env_vars=["*"])
    with pytest.raises(job_env.EnvVarsRefused, match=f"{name} is set by the server") as refused:
        job_env.check_env_vars({name: "0"}, config)
    assert "num_gpus" in str(refused.value)
    # Not allowed at all: the allowlist's own message, naming ALLOWED_ENV_VARS.
    with pytest.raises(job_env.EnvVarsRefused, match="ALLOWED_ENV_VARS"):
        job_env.check_env_vars({name: "0"}, settings(tmp_path))


def test_a_warm_worker_with_gpu_slots_sees_no_device(tmp_path: Path) -> None:
    config = settings(tmp_path)
    worker = job_env.worker_environment(config, tmp_path / "warm", SERVER_ENV, gpus=[])
    job = job_env.job_environment(config, tmp_path / "j", {}, SERVER_ENV, gpus=[])
    assert job_env.shared_part(worker) == job_env.shared_part(job)


def test_a_job_given_devices_runs_cold(tmp_path: Path) -> None:
    policy = LaunchPolicy(settings(tmp_path, use_launcher=True))

    def record(gpus: list[str] | None) -> JobRecord:
        work = tmp_path / "jobs" / str(len(gpus or []))
        work.mkdir(parents=True, exist_ok=True)
        return JobRecord(
            job_id=1,
            request={"resources": {"num_gpus": len(gpus or [])}},
            argv=[*launcher_command(), "--model", "dummy", "--tasks", "t"],
            argument="lm_eval --model dummy --tasks t",
            env_vars={},
            work_dir=str(work),
            output_path=str(work / "results"),
            gpus=gpus,
        )

    assert policy.spec(record(["0"])).warm_args is None
    assert policy.spec(record([])).warm_args == ["--model", "dummy", "--tasks", "t"]
    assert policy.spec(record(None)).warm_args == ["--model", "dummy", "--tasks", "t"]
    assert policy.spec(record(["0", "1"])).env["CUDA_VISIBLE_DEVICES"] == "0,1"
