"""Runs each job as a Ray Job, through the Jobs API of a Ray cluster (EXECUTOR=ray, RAY_ADDRESS).

Only this module imports ray; the server imports it only when EXECUTOR=ray.

- The entrypoint is `cd WORK_DIR && exec PYTHON -I -S -c EXEC_WITH_ENV ENV_FILE ARGV...`: the
  job's whole environment (job_env, as for a local job) is written to ENV_FILE
  (`jobdir.ENV_FILE`, 0600, in the job's directory, removed once read) and the program is exec'd
  with exactly that environment, plus the names of RAY_JOB_RUNTIME_ENV's own env_vars. Nothing
  else of the Ray node's environment reaches the job, and the request's values never pass
  through a shell or through `runtime_env.env_vars` (Ray expands `${NAME}` there from the
  node's environment, and shows them on its dashboard). WORK_DIR (and lm-eval's `--output_path`
  under it) are the server's absolute paths, so the cluster's nodes must see DATA_DIR at the
  same path: trivially for a head on this machine, else shared storage.
- Sandbox: with the job sandbox on (runtime.sandbox), the program exec'd is bwrap (found
  on the node's PATH) around the job's command, with the view the server built for the job: the
  same confinement as a local job, on the node. Every node then needs bubblewrap and the server's
  paths (venv, DATA_DIR); RAY_JOB_PYTHON's installation is bound read-only beside them. bwrap
  reports a command killed by signal N as 128+N; the handle reports -N, as a local job does.
- Logs: Ray keeps one combined stdout+stderr log per job. It is copied into `stderr.log`
  (`stdout.log` stays empty), while the job runs from Ray's log websocket and, when the job has
  ended, completed from the full log. Ray's log stream always starts at the beginning, so the
  copy skips the bytes the file already holds (counted from the file, including rotated bytes):
  every byte lands once, across reconnects and server restarts. Ray reads the log in text mode,
  so the `\\r` of tqdm redraws arrives as `\\n`.
- Status: `wait` polls the job's status every `poll_interval_s`. Ray unreachable: the job keeps
  its state and polling backs off; contact regained, nothing is lost. After RAY_LOST_AFTER_S
  without contact (or once a stop's grace has passed), `wait` gives up and returns None, and a
  note saying so ends `stderr.log`. A job Ray does not know (cluster restarted) ends the same way.
- Restart: `adopt` re-attaches by submission id (the persisted `executor_ref`) without a network
  call; the handle then catches up on the log and reports the outcome, even for a job that ended
  while the server was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import requests
from ray.job_submission import JobDetails, JobSubmissionClient
from ray.job_submission import JobStatus as RayJobStatus

from lm_eval_server.runtime import jobdir, sandbox
from lm_eval_server.runtime.executors.base import JobHandle, LaunchSpec
from lm_eval_server.runtime.supervise import RotatingLog, sandbox_exit_status

log = logging.getLogger(__name__)

# Run by the entrypoint with `python -I -S -c` (stdlib only, nothing of the node's environment
# can hook it): reads and removes the env file, then execs ARGV with exactly that environment. A
# bare program name is looked up on the node's PATH (a runtime_env may have put it there).
EXEC_WITH_ENV = """\
import json, os, shutil, sys
path, argv = sys.argv[1], sys.argv[2:]
with open(path) as f:
    spec = json.load(f)
os.unlink(path)
env = {k: os.environ[k] for k in spec["keep"] if k in os.environ}
env.update(spec["env"])
os.execve(shutil.which(argv[0]) or argv[0], argv, env)
"""
NOTE_PREFIX = "[lm-eval-server] "
_MAX_NOTE_CHARS = 4000
# After a stop's grace, how long more to wait for Ray to report the end (Ray itself sends
# SIGKILL RAY_JOB_STOP_WAIT_TIME_S, 3 s by default, after SIGTERM).
STOP_GIVE_UP_S = 60.0
# How long a submission is retried while Ray answers with a transient error.
SUBMIT_RETRY_S = 30.0


class _Client(JobSubmissionClient):
    """A JobSubmissionClient whose HTTP requests time out (the SDK's own wait forever)."""

    timeout_s: tuple[float, float] = (5.0, 30.0)  # connect, read

    def __init__(self, address: str) -> None:
        super().__init__(address)
        if self._ssl_context is None:
            # The SDK hands aiohttp ssl=None for verify=True, which aiohttp >= 3.10 deprecates
            # (a DeprecationWarning on every log websocket); True means the same.
            self._ssl_context = True

    def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self.timeout_s)
        return super()._do_request(method, endpoint, **kwargs)


def _not_found(exc: BaseException) -> bool:
    # The SDK raises RuntimeError("Request failed with status code 404: Job ... does not exist.")
    return isinstance(exc, RuntimeError) and "status code 404" in str(exc)


def _transient(exc: BaseException) -> bool:
    """Errors worth retrying: no connection, a timeout, or a 5xx answer (e.g. "No available
    agent to submit job, please try again later" from a cluster that is starting)."""
    if isinstance(exc, ConnectionError | requests.RequestException):
        return True
    return isinstance(exc, RuntimeError) and "status code 5" in str(exc)


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancels `task` and waits for it to end; a cancellation of the caller still propagates."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())


def _written_bytes(path: Path) -> int:
    """Bytes appended to the log so far: dropped by rotation, in `.1`, in the current file."""
    return jobdir.log_written_bytes(path)


class RayJobHandle:
    def __init__(self, executor: RayExecutor, submission_id: str, work_dir: Path) -> None:
        self.pid: int | None = None
        self.ref: str | None = submission_id
        self.submission_id = submission_id
        self._executor = executor
        self._client = executor.client
        self._work_dir = work_dir
        self._log: RotatingLog | None = None
        self._written = 0  # bytes of Ray's log stream already in stderr.log
        self._ends_with_newline = True
        self._stop_requested_at: float | None = None
        self._stop_grace_s = 0.0

    # ------------------------------------------------------------------ protocol
    async def wait(self) -> int | None:
        self._open_log()
        tailer = asyncio.create_task(self._tail(), name=f"ray-log-{self.submission_id}")
        try:
            info, note = await self._poll_until_terminal()
            await _cancel(tailer)
            if info is not None:
                await self._catch_up()
            code, ray_note = self._outcome(info)
            note = note or ray_note
            if note:
                self._note(note)
            return code
        finally:
            await _cancel(tailer)
            self._close_log()
            # The job's entrypoint removes it once read; a job that never ran (stopped while
            # PENDING, lost) must not leave its environment, secrets included, on disk.
            Path(self._work_dir, jobdir.ENV_FILE).unlink(missing_ok=True)

    async def stop(self, grace_s: float) -> None:
        """Asks Ray to stop the job and waits up to `grace_s` for it to end.

        Ray sends SIGTERM to the entrypoint and SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (a setting
        of the cluster, 3 s by default); `wait` keeps polling until Ray reports the end.
        """
        self._stop_requested_at = time.monotonic()
        self._stop_grace_s = grace_s
        deadline = self._stop_requested_at + grace_s
        asked = failed = False
        while True:
            try:
                if not asked:
                    await asyncio.to_thread(self._client.stop_job, self.submission_id)
                    asked = True
                status = await asyncio.to_thread(self._client.get_job_status, self.submission_id)
                if status.is_terminal():
                    return
            except Exception as exc:
                if _not_found(exc):
                    return
                log.log(
                    logging.DEBUG if failed else logging.WARNING,
                    "stopping Ray job %s: %s",
                    self.submission_id,
                    exc,
                )
                failed = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.info(
                    "Ray job %s has not ended %.1f s after the stop request",
                    self.submission_id,
                    grace_s,
                )
                return
            await asyncio.sleep(min(self._executor.poll_interval_s, remaining))

    # ------------------------------------------------------------------ status
    async def _poll_until_terminal(self) -> tuple[JobDetails | None, str | None]:
        """Ray's final word on the job, or (None, why it is unknown)."""
        executor = self._executor
        lost_since: float | None = None
        delay = executor.poll_interval_s
        while True:
            try:
                info = await asyncio.to_thread(self._client.get_job_info, self.submission_id)
            except Exception as exc:
                if _not_found(exc):
                    return None, (
                        f"the Ray cluster at {executor.address} has no job {self.submission_id} "
                        "(was the cluster restarted, or the job deleted?); its outcome is unknown"
                    )
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    log.warning(
                        "lost contact with Ray at %s while watching job %s (%s); retrying",
                        executor.address,
                        self.submission_id,
                        exc,
                    )
                stop_at = self._stop_requested_at
                if stop_at is not None and now - stop_at >= self._stop_grace_s:
                    return None, (
                        f"stop requested, but the Ray cluster at {executor.address} cannot be "
                        f"reached ({exc}); the job may still be running there: "
                        f"`ray job stop {self.submission_id}`"
                    )
                if now - lost_since >= executor.lost_after_s:
                    return None, (
                        f"lost contact with the Ray cluster at {executor.address} for "
                        f"{executor.lost_after_s:.0f} s ({exc}); the job's outcome is unknown and "
                        f"it may still be running there: `ray job status {self.submission_id}`"
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if lost_since is not None:
                log.info("Ray at %s is reachable again", executor.address)
                lost_since = None
                delay = executor.poll_interval_s
            if info.status.is_terminal():
                return info, None
            note = self._stop_overdue(info.status)
            if note:
                return None, note
            await asyncio.sleep(executor.poll_interval_s)

    def _stop_overdue(self, status: RayJobStatus) -> str | None:
        """Why to stop waiting for a job that was asked to stop and has not, if it is time."""
        if self._stop_requested_at is None:
            return None
        waited_s = time.monotonic() - self._stop_requested_at
        if status == RayJobStatus.PENDING and waited_s >= self._stop_grace_s:
            # Ray queues the stop on the job's supervisor actor, which does not exist until
            # the job gets its resources: the job stays PENDING (up to the cluster's
            # RAY_JOB_START_TIMEOUT_SECONDS) instead of becoming STOPPED.
            return (
                f"stopped while Ray job {self.submission_id} was still PENDING (waiting for "
                "resources or its runtime_env); Ray cannot cancel a job that has not started, "
                f"so check it on the cluster: `ray job status {self.submission_id}`"
            )
        if waited_s >= self._stop_grace_s + STOP_GIVE_UP_S:
            return (
                f"Ray job {self.submission_id} was still {status.value} {waited_s:.0f} s after "
                f"the stop request; it may still be running: `ray job stop {self.submission_id}`"
            )
        return None

    def _outcome(self, info: JobDetails | None) -> tuple[int | None, str | None]:
        """The exit code for the manager, and a note for the log when Ray's status says more."""
        if info is None:
            return None, None
        code = info.driver_exit_code
        if info.status == RayJobStatus.SUCCEEDED:
            return 0, None
        if code is not None and self._executor.sandboxed:
            code = sandbox_exit_status(code)
        if info.status == RayJobStatus.FAILED:
            if code:
                return code, None  # the entrypoint failed; its own log says why
            return None, (
                f"Ray job {self.submission_id} FAILED ({info.error_type or 'no error type'}): "
                f"{(info.message or '').strip()[:_MAX_NOTE_CHARS]}"
            )
        # STOPPED
        if self._stop_requested_at is None:
            return code, (
                f"Ray job {self.submission_id} was stopped outside this server: "
                f"{(info.message or '').strip()[:_MAX_NOTE_CHARS]}"
            )
        return code, None

    # ------------------------------------------------------------------ logs
    def _open_log(self) -> None:
        path = Path(jobdir.stderr_log(self._work_dir))
        self._work_dir.mkdir(parents=True, exist_ok=True)
        Path(jobdir.stdout_log(self._work_dir)).touch()
        self._log = RotatingLog(path, max(1024, self._executor.max_log_bytes // 2))
        self._written = _written_bytes(path)
        if self._log.size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                self._ends_with_newline = f.read(1) == b"\n"

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _append(self, data: bytes) -> None:
        if not data or self._log is None:
            return
        self._log.write(data)
        self._written += len(data)
        self._ends_with_newline = data.endswith(b"\n")

    def _take(self, text: str, received: int) -> int:
        """Appends what of `text` (Ray's stream from byte `received` on) is new; returns the
        stream position after it."""
        data = text.encode()
        skip = self._written - received
        if skip < len(data):
            self._append(data[max(skip, 0) :])
        return received + len(data)

    async def _tail(self) -> None:
        """Follows Ray's log websocket while the job runs; reconnects when it drops."""
        delay = self._executor.poll_interval_s
        failures = 0
        while True:
            received = 0
            try:
                async for chunk in self._client.tail_job_logs(self.submission_id):
                    received = self._take(chunk, received)
                    delay = self._executor.poll_interval_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "log stream of Ray job %s failed (%r); reconnecting",
                    self.submission_id,
                    exc,
                )
            # The stream also ends when the job does; `wait` cancels this task then.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _catch_up(self) -> None:
        """Appends whatever of the ended job's full log the websocket did not deliver."""
        try:
            text = await asyncio.to_thread(self._client.get_job_logs, self.submission_id)
        except Exception as exc:
            log.warning("could not fetch the full log of Ray job %s: %s", self.submission_id, exc)
            return
        self._take(text, 0)

    def _note(self, text: str) -> None:
        log.warning("job in %s: %s", self._work_dir, text)
        if self._log is None:
            return
        lead = "" if self._ends_with_newline else "\n"
        data = f"{lead}{NOTE_PREFIX}{text}\n".encode()
        self._log.write(data)  # not Ray's stream: `_written` does not count it
        self._ends_with_newline = True


class RaySettings(Protocol):
    """What this executor reads of the server's settings (config.Settings has it)."""

    ray_address: str | None
    max_log_bytes: int
    ray_lost_after_s: float
    ray_job_runtime_env: dict[str, Any] | None
    ray_job_python: str | None


class RayExecutor:
    def __init__(
        self,
        settings: RaySettings,
        *,
        poll_interval_s: float = 0.5,
        sandboxed: bool = False,
    ) -> None:
        if not settings.ray_address:
            raise RuntimeError("EXECUTOR=ray needs RAY_ADDRESS (e.g. http://head:8265)")
        self.address = settings.ray_address
        self.max_log_bytes = settings.max_log_bytes
        self.poll_interval_s = poll_interval_s
        self.lost_after_s = settings.ray_lost_after_s
        self._runtime_env = dict(settings.ray_job_runtime_env or {})
        self._python = settings.ray_job_python
        self.sandboxed = sandboxed  # jobs run under bwrap on their nodes
        try:
            # Checks the connection and the cluster's Ray version (one short HTTP request).
            self.client = _Client(self.address)
        except Exception as exc:
            raise RuntimeError(
                f"EXECUTOR=ray: cannot reach the Ray Jobs API at RAY_ADDRESS={self.address} "
                f"({exc}). RAY_ADDRESS is the dashboard address of a running Ray cluster, "
                "e.g. http://127.0.0.1:8265 after `ray start --head`."
            ) from exc

    async def start(self, spec: LaunchSpec) -> JobHandle:
        spec.work_dir.mkdir(parents=True, exist_ok=True)
        for stream in jobdir.STREAMS:
            Path(jobdir.log_path(spec.work_dir, stream)).touch()
        submission_id = f"lm-eval-server-{spec.job_id}-{secrets.token_hex(4)}"
        kwargs: dict[str, Any] = {}
        if spec.num_gpus is not None:
            kwargs["entrypoint_num_gpus"] = spec.num_gpus
        if spec.num_cpus is not None:
            kwargs["entrypoint_num_cpus"] = spec.num_cpus
        if spec.memory is not None:
            kwargs["entrypoint_memory"] = spec.memory
        env_file = self.write_env_file(spec)
        submit = functools.partial(
            self.client.submit_job,
            entrypoint=self.entrypoint(spec, env_file),
            submission_id=submission_id,
            runtime_env=self.runtime_env(spec),
            metadata={
                "lm_eval_server_job_id": str(spec.job_id),
                "lm_eval_server_work_dir": str(spec.work_dir),
            },
            **kwargs,
        )
        deadline = time.monotonic() + SUBMIT_RETRY_S
        attempt = 0
        while True:
            attempt += 1
            try:
                await asyncio.to_thread(submit)
                break
            except Exception as exc:
                if attempt > 1 and "already exists" in str(exc):
                    break  # an earlier attempt reached Ray after all
                if not _transient(exc) or time.monotonic() >= deadline:
                    # A request that timed out may still have created the job.
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(self.client.stop_job, submission_id)
                    env_file.unlink(missing_ok=True)
                    raise
                log.info("submitting job %d to Ray: %s; retrying", spec.job_id, exc)
            await asyncio.sleep(min(2.0 * attempt, 5.0))
        log.info("job %d submitted to Ray as %s", spec.job_id, submission_id)
        return RayJobHandle(self, submission_id, spec.work_dir)

    def write_env_file(self, spec: LaunchSpec) -> Path:
        path = spec.work_dir / jobdir.ENV_FILE
        keep = sorted(self._runtime_env.get("env_vars") or {})
        data = json.dumps({"env": spec.env, "keep": keep}).encode()
        path.unlink(missing_ok=True)  # created afresh, so 0600 holds
        with open(path, "xb", opener=lambda p, flags: os.open(p, flags, 0o600)) as out:
            out.write(data)
        return path

    def entrypoint(self, spec: LaunchSpec, env_file: Path) -> str:
        python = self._python or sys.executable
        argv = list(spec.argv)
        if self._python and argv and argv[0] == sys.executable:
            argv[0] = self._python
        if spec.view is not None:
            view = spec.view
            if self._python:
                installation = Path(self._python).resolve().parent.parent
                view = replace(view, read_only=(*view.read_only, str(installation)))
            argv = sandbox.command(view, argv, "bwrap")
        start = [python, "-I", "-S", "-c", EXEC_WITH_ENV, str(env_file), *argv]
        return f"cd {shlex.quote(str(spec.work_dir))} && exec {shlex.join(start)}"

    def runtime_env(self, spec: LaunchSpec) -> dict[str, Any]:
        # The operator's runtime_env as is; the job's own variables go through the env file.
        return dict(self._runtime_env)

    def adopt(
        self, job_id: int, work_dir: Path, pid: int | None, ref: str | None
    ) -> JobHandle | None:
        if ref is None:
            return None
        # No network call: the handle's `wait` catches up on the log and learns the outcome,
        # also of a job that ended (or that Ray lost) while the server was down.
        return RayJobHandle(self, ref, work_dir)

    def recorded_exit_code(self, work_dir: Path, ref: str | None) -> int | None:
        if ref is None:
            return None
        try:
            info = self.client.get_job_info(ref)
        except Exception as exc:
            log.warning("could not ask Ray at %s about job %s: %s", self.address, ref, exc)
            return None
        if info.status == RayJobStatus.SUCCEEDED:
            return 0
        if info.status.is_terminal():
            return info.driver_exit_code
        return None

    async def close(self) -> None:
        return None
