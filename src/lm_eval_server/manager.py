"""JobManager: the one owner of the job state machine, the queue and the execution slots.

Routes call its methods; nothing else changes a job. Jobs start the moment a slot is free (an
event, not a polling loop); each running job has one runner task that waits for the process to
exit or for a stop, and whose final status write cannot be skipped by a cancellation.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import importlib.util
import json
import logging
import shlex
import shutil
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from lm_eval_server import joblogs, results
from lm_eval_server.config import Settings
from lm_eval_server.executors.base import Executor, JobHandle, LaunchSpec, stderr_path
from lm_eval_server.idempotency import IdempotencyClaim
from lm_eval_server.models import JobRecord, JobStatus, utcnow
from lm_eval_server.progress import Progress, ProgressTracker
from lm_eval_server.store import JobStore, TerminalStateError
from lm_eval_server.validation import ValidatedJob, job_lm_args

log = logging.getLogger(__name__)

PROGRESS_TICK_S = 0.5
RETRY_AFTER_S = 5
LAUNCHER_MODULE = "lm_eval_server.launcher"
# Above this much new stderr per tick, only the end is parsed for bars (markers are still
# found in all of it), so a chatty job cannot make the server spend its CPU on regexes.
_FULL_PARSE_BYTES = 64 * 1024
# Beyond this much unread stderr, the reader jumps ahead instead of parsing everything.
_MAX_BACKLOG_BYTES = 8 * 1024 * 1024


def _parse_new_output(
    follower: joblogs.LogFollower,
    tracker: ProgressTracker,
    decoder: codecs.IncrementalDecoder,
) -> Progress:
    """Feeds what the job wrote since the last call to its progress tracker (in a thread)."""
    if follower.backlog() > _MAX_BACKLOG_BYTES:
        # A flood of output: only its end can hold the current bar; don't re-read the rest.
        follower.skip_to_end(keep=_FULL_PARSE_BYTES * 4)
        decoder.reset()
        tracker.lost_output()
    while data := follower.read_new():
        text = decoder.decode(data)
        if len(text) > _FULL_PARSE_BYTES:
            tracker.skip(text[:-_FULL_PARSE_BYTES])
            text = text[-_FULL_PARSE_BYTES:]
        tracker.feed(text)
    return tracker.progress


def base_job_env(settings: Settings) -> dict[str, str]:
    """What every job gets on top of the server's environment (before its own env_vars)."""
    return {
        # stdout reaches the logs as it is written, not when the job ends.
        "PYTHONUNBUFFERED": "1",
        "LM_EVAL_SERVER_INDEX_DIR": str(settings.task_index_dir),
    }


class JobNotFound(LookupError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"Job {job_id} not found.")
        self.job_id = job_id


class JobNotCompleted(RuntimeError):
    pass


class QueueFull(RuntimeError):
    retry_after_s = RETRY_AFTER_S


class ShuttingDown(RuntimeError):
    pass


class IdempotencyConflict(ValueError):
    pass


@dataclass
class _Live:
    """Per-running-job state that lives only in this process."""

    stop_event: asyncio.Event
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None  # "stop" | "timeout" | "shutdown"


class JobManager:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        executor: Executor,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._settings = settings
        self._store = store
        self._executor = executor
        self._clock = clock
        self._jobs: dict[int, JobRecord] = {}
        self._queue: deque[int] = deque()
        self._live: dict[int, _Live] = {}
        self._idempotency: dict[str, int] = {}
        self._shutting_down = False
        self._sweeper: asyncio.Task[None] | None = None
        self._launcher = settings.use_launcher and (
            importlib.util.find_spec("lm_eval_server.launcher") is not None
        )
        self.on_finish: list[Callable[[JobRecord], None]] = []
        self._default_program = shlex.split(settings.default_lm_eval_path)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        for record in self._store.load_all():
            self._jobs[record.job_id] = record
            if record.idempotency_key:
                self._idempotency[record.idempotency_key] = record.job_id
        for record in list(self._jobs.values()):
            if record.status is JobStatus.queued:
                self._queue.append(record.job_id)
            elif record.status is JobStatus.running:
                self._recover(record)
        self._prune()
        self._schedule()
        self._sweeper = asyncio.create_task(self._sweep(), name="queue-sweeper")

    async def shutdown(self) -> None:
        """New submissions are refused; running jobs are left to be re-adopted, or stopped."""
        self._shutting_down = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        live = list(self._live.items())
        for _, state in live:
            state.stop_reason = "shutdown"
            if self._settings.shutdown_stops_jobs:
                state.stop_event.set()
            elif state.task is not None:
                state.task.cancel()
        tasks = [s.task for _, s in live if s.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._sweeper is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    # ------------------------------------------------------------------ queries
    def get(self, job_id: int) -> JobRecord:
        record = self._jobs.get(job_id)
        if record is None:
            raise JobNotFound(job_id)
        return record

    def list(
        self, statuses: set[JobStatus] | None, limit: int | None, offset: int
    ) -> tuple[list[JobRecord], int]:
        """Jobs in id order (oldest first), filtered, then sliced."""
        if statuses is None:
            selected = list(self._jobs.values())
        else:
            selected = [r for r in self._jobs.values() if r.status in statuses]
        end = None if limit is None else offset + limit
        return selected[offset:end], len(selected)

    def counts(self) -> dict[JobStatus, int]:
        counts = dict.fromkeys(JobStatus, 0)
        for record in self._jobs.values():
            counts[record.status] += 1
        return counts

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running_count(self) -> int:
        return len(self._live)

    def progress_pct(self, record: JobRecord) -> int | None:
        """The whole job's share of requests answered (the tracker keeps it from going down)."""
        if record.status is JobStatus.completed:
            return 100
        progress: Progress | None = record.progress
        return progress.pct if progress is not None else 0

    # ------------------------------------------------------------------ commands
    def submit(self, job: ValidatedJob, idempotency: IdempotencyClaim | None = None) -> JobRecord:
        if self._shutting_down:
            raise ShuttingDown("the server is shutting down; submit the job again shortly")
        if idempotency is not None:
            existing = self._idempotency.get(idempotency.scope)
            if existing is not None and existing in self._jobs:
                first = self._jobs[existing]
                if first.idempotency_body != idempotency.body_sha256:
                    raise IdempotencyConflict(
                        f"Idempotency-Key {idempotency.key!r} was already used for job "
                        f"{existing} with a different request body; send the same body to "
                        "retry that job, or use a new key for a new job"
                    )
                return first
        if len(self._queue) >= self._settings.max_queued_jobs:
            raise QueueFull(
                f"the queue is full ({self._settings.max_queued_jobs} jobs, MAX_QUEUED_JOBS); "
                f"retry in {RETRY_AFTER_S} s"
            )
        job_id = self._store.next_id()
        work_dir = (self._settings.jobs_dir / str(job_id)).resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        # The job reads the validated snapshot of its config file, never the file itself.
        lm_args = job_lm_args(job, work_dir)
        output_path = job.user_output_path
        if output_path is None:
            output_path = str(work_dir / "results")
            lm_args += ["--output_path", output_path]
        argument = shlex.join([*job.program, *lm_args])
        record = JobRecord(
            job_id=job_id,
            request={**job.values, **self._server_fields(job)},
            argv=self._argv(job.program, lm_args),
            argument=argument,
            env_vars=job.env_vars,
            work_dir=str(work_dir),
            output_path=output_path,
            created_at=self._clock(),
            idempotency_key=idempotency.scope if idempotency else None,
            idempotency_body=idempotency.body_sha256 if idempotency else None,
        )
        work_dir.mkdir(parents=True, exist_ok=True)
        self._store.insert(record)
        self._jobs[job_id] = record
        if idempotency is not None:
            self._idempotency[idempotency.scope] = job_id
        self._queue.append(job_id)
        self._schedule()
        return record

    async def stop(self, job_id: int) -> str:
        """Stop a job at whatever point it is: waiting in the queue, handed to a runner but not
        started, starting, running or finishing. Returns once the job is terminal and its
        process is gone."""
        record = self.get(job_id)
        if self._dequeue(record):
            return f"Job {job_id} dequeued."
        runner = self._signal_stop(record)
        if runner is None:
            return f"Job {job_id} already {record.status.value}; nothing to stop."
        # wait, not await: the runner's outcome (even a cancellation at shutdown) is not this
        # request's error, and a client that goes away cancels only its own wait.
        await asyncio.wait({runner})
        return f"Job {job_id} stopped."

    def _dequeue(self, record: JobRecord) -> bool:
        """Stopped at once when it is still waiting in the queue (no await: atomic)."""
        if record.status is not JobStatus.queued or record.job_id not in self._queue:
            return False
        self._queue.remove(record.job_id)
        self._finish(record, JobStatus.stopped, None, None)
        return True

    def _signal_stop(self, record: JobRecord) -> asyncio.Task[None] | None:
        """From the moment _schedule hands a job to its runner, only the runner finishes it:
        it checks this event before launching and watches it while running."""
        live = self._live.get(record.job_id)
        if live is None or live.task is None or record.status.is_terminal():
            return None
        live.stop_reason = live.stop_reason or "stop"
        live.stop_event.set()
        return live.task

    async def stop_all(self) -> list[int]:
        targets = [r for r in self._jobs.values() if not r.status.is_terminal()]
        # Every job is dequeued or signalled before the first await, so no job stopped here
        # frees a slot that starts another of them.
        runners = [
            runner
            for record in targets
            if not self._dequeue(record) and (runner := self._signal_stop(record)) is not None
        ]
        if runners:
            await asyncio.wait(runners)
        return [r.job_id for r in targets]

    async def delete(self, job_id: int) -> None:
        record = self.get(job_id)
        if not record.status.is_terminal():
            await self.stop(job_id)
        if record.job_id in self._jobs:  # a concurrent delete may have removed it already
            self._forget([record])

    async def delete_all(self) -> list[int]:
        await self.stop_all()
        records = [r for r in self._jobs.values() if r.status.is_terminal()]
        self._forget(records)
        return [r.job_id for r in records]

    # ------------------------------------------------------------------ files
    def results(self, job_id: int) -> tuple[dict[str, Any], Path]:
        record = self.get(job_id)
        if record.status is not JobStatus.completed:
            raise JobNotCompleted(
                f"Job {job_id} is {record.status.value}; results exist only for Completed jobs"
                + (" (see its error and logs)" if record.status is JobStatus.failed else "")
            )
        path = Path(record.results_file) if record.results_file else None
        if path is None or not path.exists():
            raise JobNotCompleted(
                f"Job {job_id} completed but lm-eval wrote no results file under "
                f"{record.output_path} (e.g. --predict_only, or the file was removed)"
            )
        return json.loads(path.read_text()), path

    def log_path(self, job_id: int, stream: str) -> Path:
        record = self.get(job_id)
        return Path(record.work_dir) / f"{stream}.log"

    def samples_path(self, job_id: int, task: str) -> Path:
        _, results_file = self.results(job_id)
        files = results.samples_files(results_file)
        path = files.get(task)
        if path is None:
            have = ", ".join(files) if files else "none (run the job with log_samples=true)"
            raise FileNotFoundError(
                f"Job {job_id} has no samples for task {task[:200]!r}; tasks with samples: {have}"
            )
        return path

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _server_fields(job: ValidatedJob) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if job.timeout_s is not None:
            fields["timeout_s"] = job.timeout_s
        if job.resources:
            fields["resources"] = job.resources
        return fields

    def _argv(self, program: list[str], lm_args: list[str]) -> list[str]:
        if self._launcher and program == self._default_program:
            return [sys.executable, "-m", LAUNCHER_MODULE, *lm_args]
        return [*program, *lm_args]

    def _job_env(self, record: JobRecord) -> dict[str, str]:
        return {**base_job_env(self._settings), **record.env_vars}

    @staticmethod
    def _warm_eligible(record: JobRecord) -> bool:
        # A warm worker has imported lm-eval under the server's environment, and some
        # variables are read at import time: only launcher jobs without env_vars qualify.
        launcher = [sys.executable, "-m", LAUNCHER_MODULE]
        return not record.env_vars and record.argv[: len(launcher)] == launcher

    def _schedule(self) -> None:
        while (
            self._queue
            and len(self._live) < self._settings.max_concurrency
            and not self._shutting_down
        ):
            job_id = self._queue.popleft()
            record = self._jobs.get(job_id)
            if record is None or record.status is not JobStatus.queued:
                continue  # removed or finished while it waited
            live = _Live(stop_event=asyncio.Event())
            self._live[job_id] = live
            live.task = asyncio.create_task(self._run(record, live, None), name=f"job-{job_id}")

    async def _sweep(self) -> None:
        # Jobs start on events; this only guards against a missed wake-up.
        while True:
            await asyncio.sleep(self._settings.queue_process_interval)
            self._schedule()

    def _recover(self, record: JobRecord) -> None:
        work_dir = Path(record.work_dir)
        handle = self._executor.adopt(record.job_id, work_dir, record.pid, record.executor_ref)
        if handle is None:
            code = self._executor.recorded_exit_code(work_dir, record.executor_ref)
            reason = None
            if code is None:
                reason = "the job's process ended while the server was down and left no exit code"
            self._finish(record, self._status_for(code), code, reason)
            return
        log.info("re-adopted running job %d (pid %s)", record.job_id, handle.pid)
        live = _Live(stop_event=asyncio.Event())
        self._live[record.job_id] = live
        live.task = asyncio.create_task(
            self._run(record, live, handle), name=f"job-{record.job_id}"
        )

    async def _run(self, record: JobRecord, live: _Live, handle: JobHandle | None) -> None:
        try:
            if handle is None:
                if live.stop_event.is_set():
                    # Stopped between dispatch and launch: nothing was started.
                    self._finish(record, JobStatus.stopped, None, None)
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
            self._finish(
                record, JobStatus.failed, None, f"the server lost track of the job: {exc!r}"
            )
        finally:
            self._live.pop(record.job_id, None)
            self._schedule()

    async def _launch(self, record: JobRecord) -> JobHandle | None:
        record.started_at = self._clock()
        self._transition(record, JobStatus.running)
        resources = record.request.get("resources") or {}
        spec = LaunchSpec(
            job_id=record.job_id,
            argv=record.argv,
            env=self._job_env(record),
            work_dir=Path(record.work_dir),
            num_gpus=resources.get("num_gpus"),
            num_cpus=resources.get("num_cpus"),
            memory=resources.get("memory"),
            warm_eligible=self._warm_eligible(record),
        )
        try:
            handle = await self._executor.start(spec)
        except Exception as exc:
            log.exception("job %d could not start", record.job_id)
            self._finish(record, JobStatus.failed, None, f"the job could not start: {exc}")
            return None
        record.pid = handle.pid
        record.executor_ref = handle.ref
        self._persist(record, JobStatus.running)
        return handle

    async def _watch(self, record: JobRecord, live: _Live, handle: JobHandle) -> None:
        follower = joblogs.LogFollower(stderr_path(Path(record.work_dir)))
        tracker = ProgressTracker()
        # Running from now on: "starting" until lm-eval prints its first marker.
        record.progress = tracker.progress
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        waiter = asyncio.create_task(handle.wait())
        stopper = asyncio.create_task(live.stop_event.wait())
        timeout_s = record.request.get("timeout_s")
        deadline = (
            record.started_at + timedelta(seconds=timeout_s)
            if timeout_s and record.started_at
            else None
        )
        try:
            while True:
                done, _ = await asyncio.wait(
                    {waiter, stopper}, timeout=PROGRESS_TICK_S, return_when=asyncio.FIRST_COMPLETED
                )
                await self._read_progress(record, follower, tracker, decoder)
                if waiter in done:
                    break
                if deadline is not None and self._clock() >= deadline:
                    live.stop_reason = "timeout"
                if stopper in done or live.stop_reason == "timeout":
                    await handle.stop(self._settings.stop_grace_s)
                    await waiter
                    break
        except asyncio.CancelledError:
            waiter.cancel()
            stopper.cancel()
            if live.stop_reason == "shutdown" and not self._settings.shutdown_stops_jobs:
                raise  # left running, to be re-adopted by the next server process
            await asyncio.shield(self._stop_and_finish(record, live, handle))
            raise
        finally:
            stopper.cancel()
        await self._read_progress(record, follower, tracker, decoder)
        self._conclude(record, live, waiter.result())

    async def _stop_and_finish(self, record: JobRecord, live: _Live, handle: JobHandle) -> None:
        await handle.stop(self._settings.stop_grace_s)
        # May ask a remote cluster (Ray): off the event loop.
        code = await asyncio.to_thread(
            self._executor.recorded_exit_code, Path(record.work_dir), record.executor_ref
        )
        self._conclude(record, live, code)

    def _conclude(self, record: JobRecord, live: _Live, code: int | None) -> None:
        reason = live.stop_reason
        if reason == "timeout":
            timeout_s = record.request.get("timeout_s")
            self._finish(
                record,
                JobStatus.failed,
                code,
                f"timeout: the job ran longer than timeout_s={timeout_s} and was stopped",
            )
        elif reason in ("stop", "shutdown"):
            self._finish(record, JobStatus.stopped, code, None)
        else:
            status = self._status_for(code)
            error = None
            if status is JobStatus.failed:
                error = self._failure_reason(record, code)
            self._finish(record, status, code, error)

    @staticmethod
    def _status_for(code: int | None) -> JobStatus:
        return JobStatus.completed if code == 0 else JobStatus.failed

    def _failure_reason(self, record: JobRecord, code: int | None) -> str:
        """The exit code and the lines of stderr that explain it: the last Python traceback
        (its head and its end, if long), or else the last lines."""
        lines = [
            line.rstrip("\n")
            for line in joblogs.tail_lines(stderr_path(Path(record.work_dir)), 400).lines
        ]
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
        if starts:
            block = lines[starts[-1] :]
            if len(block) > 40:
                block = [block[0], "  ...", *block[-30:]]
        else:
            block = lines[-15:]
        head = f"exit code {code}" if code is not None else "no exit code was recorded"
        return "\n".join([head, *block]).strip()

    async def _read_progress(
        self,
        record: JobRecord,
        follower: joblogs.LogFollower,
        tracker: ProgressTracker,
        decoder: codecs.IncrementalDecoder,
    ) -> None:
        record.progress = await asyncio.to_thread(_parse_new_output, follower, tracker, decoder)

    def _finish(
        self, record: JobRecord, status: JobStatus, code: int | None, error: str | None
    ) -> None:
        previous = record.status
        if previous.is_terminal():
            return
        record.status = status
        record.exit_code = code
        record.error = error
        record.finished_at = self._clock()
        if status is JobStatus.completed:
            found = results.find_results_file(Path(record.output_path), record.started_at)
            record.results_file = str(found) if found else None
        self._persist(record, previous)
        for callback in self.on_finish:
            callback(record)
        self._prune()

    def _transition(self, record: JobRecord, status: JobStatus) -> None:
        previous = record.status
        record.status = status
        self._persist(record, previous)

    def _persist(self, record: JobRecord, previous: JobStatus) -> None:
        if record.job_id not in self._jobs:
            return  # deleted while it was finishing
        try:
            self._store.update(record, previous)
        except TerminalStateError:
            log.exception("refused write for job %d", record.job_id)
            raise

    def _prune(self) -> None:
        settings = self._settings
        if settings.job_retention_days is None and settings.max_finished_jobs is None:
            return
        finished = [r for r in self._jobs.values() if r.status.is_terminal()]
        finished.sort(key=lambda r: (r.finished_at or r.created_at, r.job_id))
        victims: list[JobRecord] = []
        if settings.job_retention_days is not None:
            cutoff = self._clock() - timedelta(days=settings.job_retention_days)
            victims = [r for r in finished if (r.finished_at or r.created_at) < cutoff]
        if settings.max_finished_jobs is not None:
            keep = (
                finished[len(finished) - settings.max_finished_jobs :]
                if (settings.max_finished_jobs)
                else []
            )
            kept = {r.job_id for r in keep}
            victims += [r for r in finished if r.job_id not in kept and r not in victims]
        if victims:
            log.info("retention: removing %d finished jobs", len(victims))
            self._forget(victims)

    def _forget(self, records: list[JobRecord]) -> None:
        ids = [r.job_id for r in records]
        self._store.delete(ids)
        for record in records:
            self._jobs.pop(record.job_id, None)
            if record.idempotency_key:
                self._idempotency.pop(record.idempotency_key, None)
            shutil.rmtree(record.work_dir, ignore_errors=True)
