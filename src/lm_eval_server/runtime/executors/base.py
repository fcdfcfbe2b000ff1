"""What the manager needs from whatever runs a job's process: start, wait, stop, adopt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lm_eval_server.runtime.sandbox import View


@dataclass(frozen=True)
class LaunchSpec:
    job_id: int
    argv: list[str]
    # The job's whole environment (runtime.job_env.job_environment), to be used as is:
    # an executor adds nothing of its own process's environment.
    env: dict[str, str]
    work_dir: Path
    num_gpus: float | None = None
    num_cpus: float | None = None
    memory: int | None = None
    # The lm-eval arguments a warm worker (executors.warm_pool) may run for this job, when the
    # launch policy (lm_eval_server.jobs.launch.warm_args) says it may; executors without one ignore
    # this.
    warm_args: list[str] | None = None
    # The job's sandbox (runtime.sandbox): what its process tree may see, and the bwrap
    # that makes it so. None: the job runs unconfined (SANDBOX=off).
    view: View | None = None
    bwrap: str = "bwrap"
    # Who submitted the job, and the view of a job of that owner whose request names no path
    # of its own (launch.LaunchPolicy.owner_view): with the sandbox, warm workers are per owner
    # and are given that view.
    owner: str | None = None
    owner_view: View | None = None


class JobHandle(Protocol):
    """One running job. `wait` returns its exit code, or None when it cannot be known."""

    pid: int | None
    ref: str | None

    async def wait(self) -> int | None: ...

    async def stop(self, grace_s: float) -> None: ...


class Executor(Protocol):
    async def start(self, spec: LaunchSpec) -> JobHandle: ...

    def adopt(
        self, job_id: int, work_dir: Path, pid: int | None, ref: str | None
    ) -> JobHandle | None:
        """Re-attach to a job that a previous server process started; None if it is gone."""
        ...

    def recorded_exit_code(self, work_dir: Path, ref: str | None) -> int | None:
        """The exit code a job that ended while nobody watched left behind, if any."""
        ...

    async def close(self) -> None: ...
