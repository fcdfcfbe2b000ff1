"""The launch policy: what command a validated job runs, with what environment, and whether a
warm worker may run it. The manager asks this module; executors receive its `LaunchSpec`."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_server.admission import paths
from lm_eval_server.admission.validation import ValidatedJob, job_lm_args
from lm_eval_server.config import Settings
from lm_eval_server.errors import InvalidRequest
from lm_eval_server.jobs import cache_policy
from lm_eval_server.jobs.models import JobRecord
from lm_eval_server.runtime import job_env, jobdir, sandbox
from lm_eval_server.runtime.executors.base import LaunchSpec
from lm_eval_server.team import redact
from lm_eval_server.team.job_secrets import reference_name
from lm_eval_server.team.redact import Redactor

LAUNCHER_MODULE = "lm_eval_server.runtime.launcher"


def launcher_command() -> list[str]:
    return [sys.executable, "-m", LAUNCHER_MODULE]


def warm_args(argv: list[str], env_vars: dict[str, Any]) -> list[str] | None:
    """The lm-eval arguments a warm worker would run for this job, or None if it may not.

    A warm worker has imported lm-eval under the base job environment, and some variables are
    read at import time: only launcher jobs that add no variables of their own qualify (so a
    job with a secret always runs cold: its value goes to its own process only).
    """
    prefix = launcher_command()
    if env_vars or argv[: len(prefix)] != prefix:
        return None
    return argv[len(prefix) :]


def injected_values(argv: list[str], env_vars: dict[str, Any]) -> list[str]:
    """What a request makes its job receive that names a credential: values of credential-named
    keys in its arguments (model_args' api_key=..., JSON "token": ...) and plain values of
    credential-named env_vars (OPENAI_API_KEY). Secret references are not values."""
    values = [v for arg in argv for v in redact.assignment_values(arg)]
    values += [
        v for name, v in env_vars.items() if isinstance(v, str) and redact.is_sensitive_key(name)
    ]
    return values


@dataclass(frozen=True)
class Command:
    argv: list[str]  # what runs (maybe through the launcher)
    argument: str  # the lm_eval command the user asked for, shell-quoted
    output_path: str


class LaunchPolicy:
    def __init__(
        self,
        settings: Settings,
        redactor: Redactor | None = None,
        job_sandbox: sandbox.Sandbox = sandbox.OFF,
    ) -> None:
        self._settings = settings
        self.sandbox = job_sandbox
        self._views = sandbox.Views(settings, network=settings.job_network.value == "host")
        self.write_owners = WriteOwners()
        self._secrets = settings.secret_policy()
        self.redactor = redactor if redactor is not None else Redactor()
        self._default_program = shlex.split(settings.default_lm_eval_path)
        # Resolved once (realpath per root): settings do not change while the server runs.
        self._roots = settings.allowed_roots
        self._launcher = settings.use_launcher and (
            importlib.util.find_spec(LAUNCHER_MODULE) is not None
        )

    def command(self, job: ValidatedJob, work_dir: Path) -> Command:
        """The job's command; writes the snapshot of its config file into `work_dir`."""
        lm_args = job_lm_args(job, work_dir)
        output_path = job.user_output_path
        if output_path is None:
            output_path = jobdir.path(work_dir, jobdir.RESULTS)
            lm_args += ["--output_path", output_path]
        if self._launcher and job.program == self._default_program:
            argv = [*launcher_command(), *lm_args]
        else:
            argv = [*job.program, *lm_args]
        self.learn(argv, job.env_vars)
        # `argument` is for display only (argv is what runs): stored with credentials masked.
        argument = self.redactor.text(shlex.join([*job.program, *lm_args])) or ""
        return Command(argv, argument, output_path)

    def learn(self, argv: list[str], env_vars: dict[str, Any]) -> None:
        """Teach the redactor the credentials this job will receive (at submission, and for
        every stored job when the server starts)."""
        self.redactor.learn(injected_values(argv, env_vars))

    def cache_for(self, record: JobRecord) -> cache_policy.CacheFile | None:
        """The job's response cache file; None when the job runs without the cache."""
        if record.cache_fingerprint is None or self._settings.response_cache.value == "off":
            return None
        return cache_policy.cache_file(
            self._settings, record.owner, record.cache_fingerprint, self.sandbox.enabled
        )

    def keep_cache_bound(self, cache: cache_policy.CacheFile) -> None:
        """RESPONSE_CACHE_MAX_BYTES, this job's file kept (file work: off the event loop).
        A failure is made good at the next launch: the cache never costs a job."""
        with contextlib.suppress(OSError):
            cache_policy.evict(self._settings, cache.host)

    def spec(self, record: JobRecord, cache: cache_policy.CacheFile | None = None) -> LaunchSpec:
        """The job's launch. Reads its secrets now (SecretUnavailable if one is gone: the job
        must not run with an empty value) and tells the redactor every secret's value."""
        work_dir = Path(record.work_dir)
        resources = record.request.get("resources") or {}
        env_vars = self._secrets.resolve(record.env_vars)
        # Every secret, not just this job's: a secret rotated since startup is known from now on.
        self.redactor.add_secrets(
            [env_vars[n] for n, v in record.env_vars.items() if reference_name(v) is not None]
        )
        self.redactor.add_secrets(self._secrets.read_all())
        return LaunchSpec(
            job_id=record.job_id,
            argv=record.argv,
            # Built from nothing at each start: never the server's own environment.
            env={
                **job_env.job_environment(self._settings, work_dir, env_vars, gpus=record.gpus),
                **cache_policy.job_env(cache, work_dir),
            },
            work_dir=work_dir,
            num_gpus=resources.get("num_gpus"),
            num_cpus=resources.get("num_cpus"),
            memory=resources.get("memory"),
            # A warm worker's environment is fixed and sees no GPU: a job given devices runs
            # cold, with its own CUDA_VISIBLE_DEVICES.
            warm_args=None if record.gpus else warm_args(record.argv, record.env_vars),
            view=self.view(record),
            bwrap=self.sandbox.bwrap or "bwrap",
            owner=record.owner,
            # Only the sandboxed warm pool reads it: a second mount table per job otherwise.
            owner_view=self.owner_view(record) if self._settings.warm_workers else None,
        )

    def owner_view(self, record: JobRecord) -> sandbox.View | None:
        """The view of a job of this owner whose request names no path of its own (no
        output_path outside its directory, nothing to show it read-only): what a warm worker
        for the owner is given (executors.warm_pool), with its own directory in place of
        this job's."""
        return self.view(dataclasses.replace(record, argv=[], output_path=record.work_dir))

    def view(self, record: JobRecord) -> sandbox.View | None:
        """The job's sandbox view; None when jobs run unconfined."""
        if not self.sandbox.enabled:
            return None
        work_dir = Path(record.work_dir)
        writable = self.write_targets(record)
        for target in writable:
            target.mkdir(parents=True, exist_ok=True)
        return self._views.job(
            record.owner,
            work_dir,
            writable=writable,
            named=named_paths(record.argv),
            others=self.write_owners.others(record.owner),
        )

    def write_targets(self, record: JobRecord) -> list[Path]:
        return write_targets(record.argv, record.output_path, Path(record.work_dir), self._roots)

    def claim_write_targets(self, record: JobRecord) -> None:
        """Records where this job writes outside its directory; InvalidRequest when another
        owner's jobs write there (or inside, or around it): owners never share a directory that
        their jobs write, so no job sees or changes another owner's output."""
        targets = self.write_targets(record)
        taken = self.write_owners.conflict(record.owner, targets)
        if taken is not None:
            raise InvalidRequest(
                f"{taken} is where another owner's jobs write (output_path or use_cache); "
                "choose a directory of your own, or leave output_path out (GET "
                "/job/{id}/results serves the results)"
            )
        self.write_owners.add(record.owner, targets)


class WriteOwners:
    """Which owner's jobs write each directory outside their own job directories."""

    def __init__(self) -> None:
        self._owners: dict[Path, str] = {}

    def add(self, owner: str, directories: list[Path]) -> None:
        for directory in directories:
            self._owners.setdefault(directory, owner)

    def conflict(self, owner: str, directories: list[Path]) -> Path | None:
        for directory in directories:
            for taken, other in self._owners.items():
                if other != owner and (
                    paths.inside(directory, taken) or paths.inside(taken, directory)
                ):
                    return taken
        return None

    def others(self, owner: str) -> list[Path]:
        return [d for d, o in self._owners.items() if o != owner]


def named_paths(argv: list[str]) -> list[str]:
    """The absolute paths a job's arguments name, in options and inside key=value lists
    (include_path, task files and globs, model_args' pretrained=/x), that exist: what its
    sandbox should show it (`sandbox.Views.named` decides which it may see)."""
    found: dict[str, None] = {}
    for arg in argv[1:]:
        if arg.startswith("-"):
            continue
        for piece in re.split(r"[,=]", arg):
            piece = piece.strip()
            if not piece.startswith("/"):
                continue
            if glob.has_magic(piece):
                piece = os.path.dirname(re.split(r"[*?\[]", piece, maxsplit=1)[0])
            if piece and os.path.lexists(piece):
                found.setdefault(os.path.normpath(piece), None)
    return list(found)


def write_targets(
    argv: list[str], output_path: str, work_dir: Path, roots: list[Path]
) -> list[Path]:
    """The directories outside its own that a job writes because its request names them: its
    output_path and its use_cache prefix, each already confined by the path rule at submission.
    Only directories inside ALLOWED_PATHS qualify (a use_cache prefix names files beside it)."""
    candidates = [Path(output_path)]
    for i, arg in enumerate(argv[:-1]):
        if arg == "--use_cache":
            candidates.append(Path(argv[i + 1]).parent)
    found: list[Path] = []
    work_real: Path | None = None
    for path in candidates:
        directory = path.parent if path.suffix == ".json" else path
        if ".." not in directory.parts and paths.inside(directory, work_dir):
            # Named inside the job's own directory (the default output_path): never a target
            # of its own, whatever a link in there points to, so nothing a job links from its
            # directory is ever mounted writable. No realpath either.
            continue
        directory = directory.resolve()
        if work_real is None:
            work_real = work_dir.resolve()
        if paths.inside(directory, work_real):
            continue
        if any(paths.inside(directory, root) for root in roots) and directory not in found:
            found.append(directory)
    return found
