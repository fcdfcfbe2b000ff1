"""JobManager: the one owner of the job state machine, the queue and the execution slots.

Routes call its methods; nothing else changes a job. Jobs start the moment a slot is free (an
event, not a polling loop); each running job has one runner task that waits for the process to
exit or for a stop (`runner`), and whose final status write cannot be skipped by a
cancellation. What a job runs is the launch policy's business (`launch`), what its output means
is the watchers' (`watch`), and which finished jobs go is retention's (`retention`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from lm_eval_server.admission.idempotency import IdempotencyClaim
from lm_eval_server.admission.validation import ValidatedJob
from lm_eval_server.config import Settings
from lm_eval_server.errors import (
    RETRY_AFTER_S,
    IdempotencyConflict,
    InvalidRequest,
    JobNotFound,
    JobNotResumable,
    QueueFull,
    QuotaExceeded,
    ShuttingDown,
)
from lm_eval_server.jobs import attempts, cache_policy, gpus, retention, scheduler, verdicts
from lm_eval_server.jobs.launch import LaunchPolicy
from lm_eval_server.jobs.models import JobRecord, JobStatus, utcnow
from lm_eval_server.jobs.receipts import Receipts, reproduction_fields
from lm_eval_server.jobs.runner import JobRunner, Live
from lm_eval_server.jobs.store import JobStore, JoinedWrites, TerminalStateError
from lm_eval_server.runtime.executors.base import Executor, JobHandle
from lm_eval_server.runtime.sandbox import OFF, Sandbox
from lm_eval_server.team.principals import DEFAULT_PRINCIPAL, Principal
from lm_eval_server.team.redact import Redactor

log = logging.getLogger(__name__)


class JobManager:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        executor: Executor,
        clock: Callable[[], datetime] = utcnow,
        gpu_devices: Sequence[str] | None = None,
        redactor: Redactor | None = None,
        job_sandbox: Sandbox = OFF,
    ) -> None:
        """`gpu_devices`: the GPU ids local jobs are given (GPU slots); None when the
        executor places jobs on devices itself (Ray)."""
        self._settings = settings
        self._store = store
        self._executor = executor
        self._clock = clock
        self._policy = LaunchPolicy(settings, redactor, job_sandbox)
        self.redactor = self._policy.redactor
        self._runner = JobRunner(settings, executor, self._policy, self, clock)
        self._jobs: dict[int, JobRecord] = {}
        self.receipts = Receipts(store, self.redactor, self._jobs.get)
        self._queue = scheduler.FairQueue()
        self._gpus = scheduler.GpuPool(gpu_devices or ())
        # Queued jobs' GPU needs count only where this server hands out the devices.
        self._gpu_slots = gpu_devices is not None
        self._usage = scheduler.UsageLedger(settings.fair_share_window_s)
        self._policy_sched = scheduler.Policy(
            max_running_per_owner=settings.max_running_per_key,
            reserve_after_s=settings.gpu_reserve_after_s,
        )
        # Resolved once: a job's directory is a plain child of it, named by the job's id.
        self._jobs_root = settings.jobs_dir.resolve()
        self._live: dict[int, Live] = {}
        self._idempotency: dict[str, int] = {}
        self._shutting_down = False
        self._sweeper: asyncio.Task[None] | None = None
        self._removals: set[asyncio.Task[None]] = set()
        self.on_finish: list[Callable[[JobRecord], None]] = []
        # Jobs waiting out a retry's backoff (Queued, not yet in the fair queue).
        self._retry_timers: dict[int, asyncio.TimerHandle] = {}
        # Requests answered from the response cache and computed, since this process started.
        self.cache_counts: Counter[str] = Counter()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        queued: list[JobRecord] = []
        records = self._store.load_all()
        for record in records:
            self._jobs[record.job_id] = record
            # Credentials stored jobs received stay masked in what they left behind.
            self._policy.learn(record.argv, record.env_vars)
            self._policy.write_owners.add(record.owner, self._policy.write_targets(record))
            if record.idempotency_key:
                self._idempotency[record.idempotency_key] = record.job_id
            if record.status is JobStatus.queued:
                queued.append(record)
            else:
                record.release_launch_inputs()
        # The fair queue's run times, in the order the jobs finished.
        finished = [r for r in records if r.started_at and r.finished_at]
        for record in sorted(finished, key=lambda r: (r.finished_at, r.job_id)):
            self._count_usage(record)
        for record in [r for r in self._jobs.values() if r.status is JobStatus.running]:
            if record.gpus and self._gpu_slots:
                # Its process still has these devices: no other job may be given them.
                self._gpus.hold(record.job_id, record.gpus)
            await self._recover(record)
        for record in queued:
            self._requeue(record)
        self._prune()
        self._schedule()
        self._sweeper = asyncio.create_task(self._sweep(), name="queue-sweeper")

    async def shutdown(self) -> None:
        """New submissions are refused; running jobs are left to be re-adopted, or stopped."""
        self._shutting_down = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for timer in self._retry_timers.values():
            timer.cancel()  # retry_at is stored: the next server process keeps the wait
        live = list(self._live.values())
        for state in live:
            # A stop (or timeout) already under way is carried out, not forgotten: its caller
            # was promised a stopped job.
            state.stop_reason = state.stop_reason or "shutdown"
            if state.stop_reason != "shutdown" or self._settings.shutdown_stops_jobs:
                state.stop_event.set()
            elif state.task is not None:
                state.task.cancel()
        tasks = [s.task for s in live if s.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._sweeper is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        await self.receipts.drain()

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    # ------------------------------------------------------------------ queries
    def get(self, job_id: int, viewer: Principal | None = None) -> JobRecord:
        """The job; JobNotFound also when `viewer` may not see it, so that another owner's
        job and a job that does not exist answer alike. `viewer=None` is the server itself."""
        record = self._jobs.get(job_id)
        if record is None or (viewer is not None and not viewer.can_see(record.owner)):
            raise JobNotFound(job_id)
        return record

    def list(
        self,
        statuses: set[JobStatus] | None,
        limit: int | None,
        offset: int,
        viewer: Principal | None = None,
        owner: str | None = None,
    ) -> tuple[list[JobRecord], int]:
        """Jobs in id order (oldest first) that `viewer` may see, filtered (by status and
        owner), then sliced."""
        if viewer is not None and not viewer.admin:
            # A user sees their own jobs only: asking for another owner's finds nothing.
            if owner is not None and owner != viewer.name:
                return [], 0
            owner = viewer.name
        # One pass per filter actually given: listing 10,000 jobs is on the event loop.
        selected = list(self._jobs.values())
        if owner is not None:
            selected = [r for r in selected if r.owner == owner]
        if statuses is not None:
            selected = [r for r in selected if r.status in statuses]
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
    def gpus_total(self) -> int:
        return self._gpus.total

    @property
    def gpus_in_use(self) -> int:
        return self._gpus.in_use

    @property
    def running_count(self) -> int:
        return len(self._live)

    # ------------------------------------------------------------------ commands
    def submit(
        self,
        job: ValidatedJob,
        idempotency: IdempotencyClaim | None = None,
        owner: str = DEFAULT_PRINCIPAL,
        reproduction_of: int | None = None,
        joined: Callable[[JobRecord], JoinedWrites] | None = None,
    ) -> JobRecord:
        """Queues the job (or returns the job an earlier request with this idempotency claim
        queued). `joined` gives the writes to commit with the new job's row, e.g. its audit
        entry; it is called only when a job is stored."""
        if self._shutting_down:
            raise ShuttingDown("the server is shutting down; submit the job again shortly")
        if idempotency is not None and (first := self._first_claimed(idempotency)) is not None:
            return first
        if len(self._queue) >= self._settings.max_queued_jobs:
            raise QueueFull(
                f"the queue is full ({self._settings.max_queued_jobs} jobs, MAX_QUEUED_JOBS); "
                f"retry in {RETRY_AFTER_S} s"
            )
        self._check_quota(owner)
        job_id = self._store.next_id()
        work_dir = self._jobs_root / str(job_id)
        work_dir.mkdir(parents=True, exist_ok=True)
        command = self._policy.command(job, work_dir)
        server_fields = {
            "timeout_s": job.timeout_s,
            "resources": job.resources or None,
            "callback_url": job.callback_url,
            "gate": job.gate,
        }
        record = JobRecord(
            job_id=job_id,
            request={**job.values, **{k: v for k, v in server_fields.items() if v is not None}},
            argv=command.argv,
            argument=command.argument,
            env_vars=job.env_vars,
            work_dir=str(work_dir),
            output_path=command.output_path,
            created_at=self._clock(),
            idempotency_key=idempotency.scope if idempotency else None,
            idempotency_body=idempotency.body_sha256 if idempotency else None,
            owner=owner,
            **reproduction_fields(reproduction_of),
            max_attempts=job.values.get("max_attempts") or 1,
            cache_fingerprint=(
                cache_policy.fingerprint(self._settings, owner, job.model, job.model_args)
                if cache_policy.wanted(self._settings, job.values, job.model)
                else None
            ),
        )
        try:
            self._policy.claim_write_targets(record)
        except InvalidRequest:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
        self._store.insert(record, joined(record) if joined is not None else ())
        self._jobs[job_id] = record
        if idempotency is not None:
            self._idempotency[idempotency.scope] = job_id
        self._queue.push(self._waiting(record))
        self._schedule()
        return record

    def _check_quota(self, owner: str) -> None:
        limit = self._settings.max_queued_per_key
        if limit is not None and self._queue.queued(owner) >= limit:
            raise QuotaExceeded(
                f"{owner} already has {self._queue.queued(owner)} queued jobs, the limit per "
                f"key (MAX_QUEUED_PER_KEY={limit}); retry in {RETRY_AFTER_S} s, once one has "
                "started, or stop a queued job. Other keys are not affected"
            )

    def claimed_job(self, claim: IdempotencyClaim) -> int | None:
        """The job an earlier request with this claim queued, while the server keeps it."""
        return self._idempotency.get(claim.scope)

    def _first_claimed(self, claim: IdempotencyClaim) -> JobRecord | None:
        existing = self._idempotency.get(claim.scope)
        first = self._jobs.get(existing) if existing is not None else None
        if first is not None and first.idempotency_body != claim.body_sha256:
            raise IdempotencyConflict(
                f"Idempotency-Key {claim.key!r} was already used for job {first.job_id} with a "
                "different request body; send the same body to retry that job, or use a new "
                "key for a new job"
            )
        return first

    async def stop(self, job_id: int, viewer: Principal | None = None) -> str:
        """Stop a job at whatever point it is: waiting in the queue, handed to a runner but not
        started, starting, running or finishing. Returns once the job is terminal and its
        process is gone."""
        record = self.get(job_id, viewer)
        if self._dequeue(record):
            return f"Job {job_id} dequeued."
        runner = self._signal_stop(record)
        if runner is None:
            return f"Job {job_id} already {record.status.value}; nothing to stop."
        # wait, not await: the runner's outcome (even a cancellation at shutdown) is not this
        # request's error, and a client that goes away cancels only its own wait.
        await asyncio.wait({runner})
        return f"Job {job_id} stopped."

    async def stop_all(self, viewer: Principal | None = None) -> list[int]:
        """Every unfinished job `viewer` may see (all of them for the server or an admin)."""
        targets = [
            r
            for r in self._jobs.values()
            if not r.status.is_terminal() and (viewer is None or viewer.can_see(r.owner))
        ]
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

    async def delete(self, job_id: int, viewer: Principal | None = None) -> None:
        record = self.get(job_id, viewer)
        if not record.status.is_terminal():
            await self.stop(job_id)
        if record.job_id in self._jobs:  # a concurrent delete may have removed it already
            await self._forget([record])

    async def delete_all(self, viewer: Principal | None = None) -> list[int]:
        await self.stop_all(viewer)
        records = [
            r
            for r in self._jobs.values()
            if r.status.is_terminal() and (viewer is None or viewer.can_see(r.owner))
        ]
        await self._forget(records)
        return [r.job_id for r in records]

    # ------------------------------------------------------------------ the queue
    def _dequeue(self, record: JobRecord) -> bool:
        """Stopped at once when it is still waiting in the queue, or for a retry (no await:
        atomic)."""
        timer = self._retry_timers.pop(record.job_id, None)
        if timer is not None:
            timer.cancel()
            # The attempt it waited for never ran: the job ends at the attempt that did (whose
            # logs a later resume files under its number), with that attempt's failure.
            record.attempt -= 1
            record.retry_at = None
            error = f"stopped while waiting to retry; attempt {record.attempt}: {record.error}"
            self.finish(record, JobStatus.stopped, None, error)
            return True
        if record.status is not JobStatus.queued or record.job_id not in self._queue:
            return False
        self._queue.remove(record.job_id)
        self.finish(record, JobStatus.stopped, None, None)
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

    def _waiting(self, record: JobRecord) -> scheduler.Waiting:
        need = gpus.need(record.request.get("resources")) if self._gpu_slots else 0
        return scheduler.Waiting(record.job_id, record.owner, need, record.created_at)

    def _requeue(self, record: JobRecord) -> None:
        """A job that was queued when the server stopped waits again, in its place (after
        what is left of its retry's backoff)."""
        record.gpus = None  # given at dispatch, never before
        if record.retry_at is not None and record.retry_at > self._clock():
            self._wait_for_retry(record)
            return
        entry = self._waiting(record)
        if entry.gpus > self._gpus.total:
            self.finish(
                record,
                JobStatus.failed,
                None,
                f"the job asks for {entry.gpus} GPUs (resources.num_gpus) and this server now "
                f"has {self._gpus.total} (GPUS); submit it again with fewer",
            )
            return
        self._queue.push(entry)

    def _count_usage(self, record: JobRecord) -> None:
        if record.started_at is not None and record.finished_at is not None:
            self._usage.add(record.owner, record.started_at, record.finished_at)

    def _schedule(self) -> None:
        """Starts queued jobs while slots are free, in the fair order (scheduler.choose)."""
        max_concurrency = self._settings.max_concurrency
        if self._shutting_down or not self._queue or len(self._live) >= max_concurrency:
            return
        now = self._clock()
        running_records = [self._jobs[i] for i in self._live if i in self._jobs]
        running = Counter(r.owner for r in running_records)
        usage: dict[str, float] | None = None
        while self._queue and len(self._live) < max_concurrency:
            heads = self._queue.heads()
            if usage is None and len({h.owner for h in heads}) > 1:
                # Only needed to rank owners (a walk over the window's finished jobs).
                spans = [(r.owner, r.started_at or now) for r in running_records]
                usage = self._usage.recent(now, spans)
            chosen = scheduler.choose(
                heads,
                free_gpus=self._gpus.free_count,
                running=running,
                usage=usage or {},
                policy=self._policy_sched,
                now=now,
            )
            if chosen is None:
                return  # what waits needs GPUs, or its owner is at MAX_RUNNING_PER_KEY
            self._queue.remove(chosen.job_id)
            record = self._jobs.get(chosen.job_id)
            if record is None or record.status is not JobStatus.queued:
                continue  # removed or finished while it waited
            if self._gpus.total:
                record.gpus = self._gpus.take(record.job_id, chosen.gpus)
            running[record.owner] += 1
            self._start_runner(record, None)

    def _start_runner(self, record: JobRecord, handle: JobHandle | None) -> None:
        live = Live()
        self._live[record.job_id] = live
        live.task = asyncio.create_task(
            self._run(record, live, handle), name=f"job-{record.job_id}"
        )

    async def _run(self, record: JobRecord, live: Live, handle: JobHandle | None) -> None:
        try:
            await self._runner.run(record, live, handle)
        finally:
            # The slot (and its GPUs) is free whatever happened, and the next job starts at
            # once; unless this job's next attempt already holds them (a retry without wait).
            if self._live.get(record.job_id) is live:
                self._live.pop(record.job_id, None)
                self._gpus.release(record.job_id)
            self._schedule()

    async def _sweep(self) -> None:
        # Jobs start on events; this only guards against a missed wake-up.
        while True:
            await asyncio.sleep(self._settings.queue_process_interval)
            self._schedule()

    # ------------------------------------------------------------------ one job's run
    async def _recover(self, record: JobRecord) -> None:
        work_dir = Path(record.work_dir)
        handle = self._executor.adopt(record.job_id, work_dir, record.pid, record.executor_ref)
        if handle is not None:
            log.info("re-adopted running job %d (pid %s)", record.job_id, handle.pid)
            self._start_runner(record, handle)
            return
        code = await asyncio.to_thread(
            self._executor.recorded_exit_code, work_dir, record.executor_ref
        )
        reason = None
        if code is None:
            reason = "the job's process ended while the server was down and left no exit code"
        await self._runner.finish_exited(record, code, reason)

    # ------------------------------------------------------------------ state and storage
    def finish(
        self,
        record: JobRecord,
        status: JobStatus,
        code: int | None,
        error: str | None,
        retry: bool = False,
    ) -> None:
        """`retry`: the run failed by itself (its process failed, was killed or was lost),
        so it is retried if the job has attempts left (attempts.py)."""
        previous = record.status
        if previous.is_terminal():
            return
        if previous is JobStatus.running:
            self._count_cache(record)
        if (
            retry
            and status is JobStatus.failed
            and attempts.may_retry(record.attempt, record.max_attempts)
        ):
            self._retry(record, previous, code, error)
            return
        record.status = status
        record.exit_code = code
        # Often the tail of the job's stderr: stored and served without the secrets it printed.
        record.error = self.redactor.text(error)
        record.finished_at = self._clock()
        self.persist(record, previous)
        record.release_launch_inputs()
        self._gpus.release(record.job_id)
        self._count_usage(record)
        self.receipts.job_finished(record)
        for callback in self.on_finish:
            callback(record)
        self._prune()

    async def judge(self, record: JobRecord) -> None:
        """A completed job's gate verdict, before its end is recorded (verdicts.py)."""
        record.verdict = await verdicts.judge(record, self._jobs.get, self.redactor)

    # ------------------------------------------------------------------ resume and retry
    def _count_cache(self, record: JobRecord) -> None:
        """The attempt's cache hits and misses, from the stats file its job wrote."""
        if record.cache_fingerprint is None:
            return
        counts = cache_policy.stats(Path(record.work_dir))
        if counts is None:
            return
        record.cache_hits, record.cache_misses = counts["hits"], counts["misses"]
        self.cache_counts["hits"] += counts["hits"]
        self.cache_counts["misses"] += counts["misses"]

    def _reload_inputs(self, record: JobRecord) -> None:
        """The stored request and env_vars, which the record dropped after its launch."""
        inputs = self._store.launch_inputs(record.job_id)
        if inputs is not None:
            record.request, record.env_vars = inputs

    def _next_attempt(self, record: JobRecord) -> None:
        record.attempt += 1
        record.status = JobStatus.queued
        record.exit_code = None
        record.pid = None
        record.executor_ref = None
        record.results_file = None
        record.progress = None
        record.summary_json = None
        record.gpus = None
        self._reload_inputs(record)

    def _retry(
        self, record: JobRecord, previous: JobStatus, code: int | None, error: str | None
    ) -> None:
        """Back to Queued for its next attempt, after its backoff."""
        log.info(
            "job %d: attempt %d of %d failed (exit code %s); retrying",
            record.job_id,
            record.attempt,
            record.max_attempts,
            code,
        )
        self._gpus.release(record.job_id)
        delay_to = attempts.retry_at(
            self._clock(), record.attempt, self._settings.retry_backoff_max_s
        )
        # What the failed attempt said stays visible while the next one waits.
        record.error = self.redactor.text(error)
        self._next_attempt(record)
        record.retry_at = delay_to
        self.persist(record, previous)
        self._wait_for_retry(record)

    def _wait_for_retry(self, record: JobRecord) -> None:
        assert record.retry_at is not None
        if self._shutting_down:
            return  # stored as Queued with its retry_at: the next server process waits for it
        delay_s = max(0.0, (record.retry_at - self._clock()).total_seconds())
        loop = asyncio.get_running_loop()
        self._retry_timers[record.job_id] = loop.call_later(delay_s, self._retry_due, record.job_id)

    def _retry_due(self, job_id: int) -> None:
        self._retry_timers.pop(job_id, None)
        record = self._jobs.get(job_id)
        if record is None or record.status is not JobStatus.queued or self._shutting_down:
            return
        record.retry_at = None
        self.persist(record, JobStatus.queued)
        self._requeue(record)
        self._schedule()

    def resume(self, job_id: int, viewer: Principal | None = None) -> JobRecord:
        """A Failed or Stopped job back in the queue as its next attempt: same id, owner and
        request; answers its earlier attempts computed come from the response cache."""
        record = self.get(job_id, viewer)
        if self._shutting_down:
            raise ShuttingDown("the server is shutting down; resume the job again shortly")
        if record.status not in (JobStatus.failed, JobStatus.stopped):
            raise JobNotResumable(
                f"job {job_id} is {record.status.value}; only a Failed or Stopped job can be "
                "resumed"
                + (
                    " (submit it again to run it anew)"
                    if record.status is JobStatus.completed
                    else ""
                )
            )
        if record.job_id in self._live:
            raise JobNotResumable(f"job {job_id} is still finishing; resume it in a moment")
        previous = record.status
        self._next_attempt(record)
        record.error = None
        record.finished_at = None
        record.retry_at = None
        self._store.reopen(record, previous)
        self._requeue(record)
        self._schedule()
        return record

    def transition(self, record: JobRecord, status: JobStatus) -> None:
        previous = record.status
        record.status = status
        self.persist(record, previous)

    def persist(self, record: JobRecord, previous: JobStatus) -> None:
        if record.job_id not in self._jobs:
            return  # deleted while it was finishing
        try:
            self._store.update(record, previous)
        except TerminalStateError:
            log.exception("refused write for job %d", record.job_id)
            raise

    def _prune(self) -> None:
        settings = self._settings
        victims = retention.expired(
            self._jobs.values(),
            self._clock(),
            settings.job_retention_days,
            settings.max_finished_jobs,
        )
        if victims:
            log.info("retention: removing %d finished jobs", len(victims))
            removal = asyncio.ensure_future(retention.remove_dirs(self._drop(victims)))
            self._removals.add(removal)
            removal.add_done_callback(self._removals.discard)

    async def _forget(self, records: list[JobRecord]) -> None:
        await retention.remove_dirs(self._drop(records))

    def _drop(self, records: list[JobRecord]) -> list[str]:
        """Removes the records from the store and from memory at once; returns their
        directories, which the caller removes off the event loop."""
        records = [r for r in records if r.job_id in self._jobs]
        self._store.delete([r.job_id for r in records])
        for record in records:
            self._jobs.pop(record.job_id, None)
            if record.idempotency_key:
                self._idempotency.pop(record.idempotency_key, None)
        return [r.work_dir for r in records]
