"""One job's run, from launch to its end: start the process, watch its output and its stop
signal and deadline, and report how it ended. One runner task per running job; the job's state
changes go through the manager (`JobStates`), which alone owns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from lm_eval_server.config import Settings
from lm_eval_server.jobs import attempts, watch
from lm_eval_server.jobs.launch import LaunchPolicy
from lm_eval_server.jobs.models import JobRecord, JobStatus
from lm_eval_server.outputs import results
from lm_eval_server.runtime.executors.base import Executor, JobHandle
from lm_eval_server.team.job_secrets import SecretUnavailable

log = logging.getLogger(__name__)

PROGRESS_TICK_S = 0.5


class JobStates(Protocol):
    """The manager's state changes a runner may ask for."""

    def transition(self, record: JobRecord, status: JobStatus) -> None: ...

    def persist(self, record: JobRecord, previous: JobStatus) -> None: ...

    async def judge(self, record: JobRecord) -> None: ...

    def finish(
        self, record: JobRecord, status: JobStatus, code: int | None, error: str | None
    ) -> None: ...


@dataclass
class Live:
    """Per-running-job state that lives only in this process."""

    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None  # "stop" | "timeout" | "shutdown"
    signalled: bool = False  # the process was told to stop (it did not end by itself)


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        executor: Executor,
        policy: LaunchPolicy,
        states: JobStates,
        clock: Callable[[], datetime],
    ) -> None:
        self._settings = settings
        self._executor = executor
        self._policy = policy
        self._states = states
        self._clock = clock
        self._background: set[asyncio.Future[None]] = set()

    async def run(self, record: JobRecord, live: Live, handle: JobHandle | None) -> None:
        """Runs the job to its end; never raises but for a cancellation."""
        try:
            if handle is None:
                if live.stop_event.is_set():
                    # Stopped between dispatch and launch: nothing was started.
                    self._states.finish(record, JobStatus.stopped, None, None)
                    return
                handle = await self._launch(record)
                if handle is None:
                    return
            await self._watch(record, live, handle)
        except Exception as exc:
            # A bug or an executor failure must not leave the job "Running" forever, nor its
            # process running unwatched.
            log.exception("job %d: lost track of its process", record.job_id)
            if handle is not None:
                with contextlib.suppress(Exception):
                    await handle.stop(self._settings.stop_grace_s)
            self._states.finish(
                record,
                JobStatus.failed,
                None,
                f"the server lost track of the job: {exc!r}",
                retry=True,
            )

    async def _launch(self, record: JobRecord) -> JobHandle | None:
        try:
            cache = self._policy.cache_for(record)
            spec = self._policy.spec(record, cache)
        except SecretUnavailable as exc:
            # Never started with an empty or stale value in place of the secret.
            self._states.finish(record, JobStatus.failed, None, str(exc))
            return None
        record.started_at = self._clock()
        record.cache_hits = record.cache_misses = None  # counted anew for this attempt
        self._states.transition(record, JobStatus.running)
        try:
            if record.attempt > 1:
                # The earlier attempt's logs and exit record move to attempt-N/ (GET
                # /job/{id}/logs?attempt=N): this attempt writes its own.
                await asyncio.to_thread(attempts.archive, Path(record.work_dir), record.attempt - 1)
            handle = await self._executor.start(spec)
        except Exception as exc:
            log.exception("job %d could not start", record.job_id)
            self._states.finish(record, JobStatus.failed, None, f"the job could not start: {exc}")
            return None
        if cache is not None:
            # In the background: no job waits for a directory walk to start.
            evict = asyncio.ensure_future(asyncio.to_thread(self._policy.keep_cache_bound, cache))
            self._background.add(evict)
            evict.add_done_callback(self._background.discard)
        record.pid = handle.pid
        record.executor_ref = handle.ref
        self._states.persist(record, JobStatus.running)
        record.release_launch_inputs()
        return handle

    async def _watch(self, record: JobRecord, live: Live, handle: JobHandle) -> None:
        watcher = watch.ProgressWatcher(Path(record.work_dir))
        # Running from now on: "starting" until lm-eval prints its first marker.
        record.progress = watcher.progress
        waiter = asyncio.create_task(handle.wait())
        stopper = asyncio.create_task(live.stop_event.wait())
        deadline = self._deadline(record)
        try:
            while True:
                done, _ = await asyncio.wait(
                    {waiter, stopper}, timeout=PROGRESS_TICK_S, return_when=asyncio.FIRST_COMPLETED
                )
                record.progress = await watcher.poll()
                if waiter in done:
                    break
                if deadline is not None and self._clock() >= deadline:
                    live.stop_reason = "timeout"
                if stopper in done or live.stop_reason == "timeout":
                    live.signalled = True
                    await handle.stop(self._settings.stop_grace_s)
                    await waiter
                    break
        except asyncio.CancelledError:
            waiter.cancel()
            stopper.cancel()
            if live.stop_reason == "shutdown" and not self._settings.shutdown_stops_jobs:
                raise  # left running, to be re-adopted by the next server process
            await asyncio.shield(self._stop_and_conclude(record, live, handle))
            raise
        finally:
            stopper.cancel()
        record.progress = await watcher.poll()
        await self._conclude(record, live, waiter.result())

    def _deadline(self, record: JobRecord) -> datetime | None:
        timeout_s = record.request.get("timeout_s")
        if not timeout_s or record.started_at is None:
            return None
        return record.started_at + timedelta(seconds=timeout_s)

    async def _stop_and_conclude(self, record: JobRecord, live: Live, handle: JobHandle) -> None:
        live.signalled = True
        await handle.stop(self._settings.stop_grace_s)
        # May ask a remote cluster (Ray): off the event loop.
        code = await asyncio.to_thread(
            self._executor.recorded_exit_code, Path(record.work_dir), record.executor_ref
        )
        await self._conclude(record, live, code)

    async def _conclude(self, record: JobRecord, live: Live, code: int | None) -> None:
        if not live.signalled:
            # It ended by itself, even if a stop arrived meanwhile: its exit code tells how.
            await self.finish_exited(record, code, None)
        elif live.stop_reason == "timeout":
            timeout_s = record.request.get("timeout_s")
            error = f"timeout: the job ran longer than timeout_s={timeout_s} and was stopped"
            self._states.finish(record, JobStatus.failed, code, error)
        else:
            self._states.finish(record, JobStatus.stopped, code, None)

    async def finish_exited(self, record: JobRecord, code: int | None, reason: str | None) -> None:
        """A job whose process ended on its own: Completed on exit code 0, else Failed with
        the lines of its stderr that say why."""
        work_dir = Path(record.work_dir)
        if code == 0:
            found = await asyncio.to_thread(
                results.find_results_file, Path(record.output_path), record.started_at
            )
            record.results_file = str(found) if found else None
            await self._states.judge(record)  # its gate's verdict, if it has one
            self._states.finish(record, JobStatus.completed, code, None)
            return
        error = reason or await asyncio.to_thread(watch.failure_reason, work_dir, code)
        if not self._policy.redactor.ready:
            # The manager redacts the error it stores; compiling the matcher is thread work.
            await asyncio.to_thread(self._policy.redactor.prepare)
        self._states.finish(record, JobStatus.failed, code, error, retry=True)
