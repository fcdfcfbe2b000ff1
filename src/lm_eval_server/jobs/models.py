"""The job state machine's vocabulary, the internal job record, and the API schemas."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from lm_eval_server.admission.lm_eval_cli import task_list
from lm_eval_server.jobs.receipt_models import Reproduction


class JobStatus(StrEnum):
    queued = "Queued"
    running = "Running"
    completed = "Completed"
    failed = "Failed"
    stopped = "Stopped"

    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.completed, JobStatus.failed, JobStatus.stopped})


def utcnow() -> datetime:
    return datetime.now(UTC)


_CACHE_FIELDS = frozenset({"summary_json", "summary_redaction"})
_UNSET = object()

# What summaries and the state machine read from a request after the job has launched.
SUMMARY_REQUEST_KEYS = ("model", "tasks", "timeout_s", "callback_url", "gate")


@dataclass
class JobRecord:
    """The server's own view of a job; API schemas are built from it, never the reverse."""

    job_id: int
    request: dict[str, Any]
    argv: list[str]  # what runs (may go through the launcher)
    argument: str  # the lm_eval command the user asked for, shell-quoted
    env_vars: dict[str, str]
    work_dir: str
    output_path: str
    status: JobStatus = JobStatus.queued
    created_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    error: str | None = None
    pid: int | None = None
    results_file: str | None = None
    idempotency_key: str | None = None  # hash of (caller, Idempotency-Key); see idempotency.py
    idempotency_body: str | None = None  # SHA-256 of the canonical body sent with that key
    executor_ref: str | None = None  # e.g. the Ray submission id
    owner: str = "default"  # the principal whose key submitted the job (principals.py)
    # GPU device ids the job was given (GPU slots, scheduler.GpuPool); None when the server
    # does not hand out devices (no GPUs, or EXECUTOR=ray) or the job has not started.
    gpus: list[str] | None = None
    # The regression gate's verdict (outputs/gates.py), evaluated once when the job ends.
    verdict: dict[str, Any] | None = None
    # A reproduction (POST /job/{id}/reproduce): the job it repeats and its diff (receipts.py).
    reproduction_of: int | None = None
    reproduction: dict[str, Any] | None = None
    # Resume and reuse (jobs/attempts.py): this run's number, how many automatic runs the
    # request allows, when a retry waiting in its backoff is due, the response cache file's
    # fingerprint (None: no cache) and the last attempt's cache hits and misses.
    attempt: int = 1
    max_attempts: int = 1
    retry_at: datetime | None = None
    cache_fingerprint: str | None = None
    cache_hits: int | None = None
    cache_misses: int | None = None
    # Live state, not persisted: re-derived from the log after a restart.
    progress: Any = None
    # The API's JSON for this job (api/views.py), kept until any other field is assigned
    # (__setattr__): GET /jobs copies these bytes instead of serialising every job each time.
    summary_json: bytes | None = field(default=None, compare=False, repr=False)
    # The Redactor generation summary_json was redacted with (redact.py): a value learned since
    # (a secret added to SECRETS_DIR) makes the cached JSON stale.
    summary_redaction: int = field(default=-1, compare=False, repr=False)

    def __setattr__(self, name: str, value: Any) -> None:
        # Any field, including ones added later, makes the cached summary stale: the rule is
        # "assigned", not a list of the fields the summary happens to show. Assigning the
        # same object (the progress watcher's unchanged Progress) changes nothing.
        state = self.__dict__
        if (
            state.get("summary_json") is not None  # first: nothing to drop while __init__ runs
            and name not in _CACHE_FIELDS
            and state.get(name, _UNSET) is not value
        ):
            state["summary_json"] = None
        object.__setattr__(self, name, value)

    def release_launch_inputs(self) -> None:
        """Forget what only the launch needed (the request body and the job's environment): up
        to a megabyte each, for as many jobs as the server keeps. The store keeps them."""
        self.request = {k: self.request[k] for k in SUMMARY_REQUEST_KEYS if k in self.request}
        self.env_vars = {}

    @property
    def model(self) -> str | None:
        value = self.request.get("model")
        return str(value) if value is not None else None

    @property
    def tasks(self) -> list[str]:
        return task_list(self.request)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or utcnow()
        return round((end - self.started_at).total_seconds(), 3)


_PHASES_DOC = (
    "starting, loading model, building requests, then each request type in the order lm-eval "
    "runs them (loglikelihood, generate_until, loglikelihood_rolling; api requests for API "
    "bars without a request type), then writing results"
)


class PhaseInfo(BaseModel):
    phase: str
    done: int
    total: int | None = Field(
        description="Requests for a request type, documents for building requests, "
        "null for phases that are not counted (or before the type's first bar)."
    )


class ProgressInfo(BaseModel):
    phase: str = Field(description=f"What the job is doing: {_PHASES_DOC}.")
    done: int = Field(description="Requests answered, all request types.")
    total: int = Field(
        description="Requests of all request types: counted for the types that have started, "
        "estimated from their tasks' documents for the others (so it can grow)."
    )
    rate_per_s: float | None = Field(None, description="Requests per second, current type.")
    eta_s: float | None = Field(None, description="Remaining requests / rate_per_s.")
    phases: list[PhaseInfo] = Field(
        [], description="Every phase entered so far, in order, with its count."
    )


class CacheCounts(BaseModel):
    hits: int = Field(description="Requests of the last attempt answered from the cache.")
    misses: int = Field(description="Requests of the last attempt the model computed.")


class JobAttempts(BaseModel):
    """Fields of resume and reuse (docs/resume-and-cache.md), on every job summary."""

    attempt: int = Field(1, description="This run's number: 1, then +1 per resume or retry.")
    max_attempts: int = Field(
        1, description="Runs the job may make by itself (automatic retries after a failure)."
    )
    retry_at: datetime | None = Field(
        None, description="When a Queued job waiting to be retried goes back into the queue."
    )
    cache: CacheCounts | None = Field(
        None,
        description="The server's response cache for the last attempt; null without one "
        "(RESPONSE_CACHE=off, response_cache: false) or before the attempt has counted.",
    )


class JobSummary(JobAttempts):
    job_id: int
    owner: str = Field(description="The principal (named API key) that submitted the job.")
    argument: str = Field(description="The lm_eval command line, shell-quoted.")
    status: JobStatus
    timestamp: datetime | None = Field(description="When the job started (README field).")
    exit_code: int | None
    inference_progress_pct: int | None = Field(
        description="0-100: requests answered out of the whole job's requests (all request "
        "types), from lm-eval's log; never decreases; 100 when Completed."
    )
    progress: ProgressInfo | None = None
    model: str | None = None
    tasks: list[str] = []
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    error: str | None = Field(None, description="Why a Failed job failed (tail of stderr).")
    gpus: list[str] | None = Field(
        None,
        description="GPU device ids the job was given (its CUDA_VISIBLE_DEVICES); [] when it "
        "asked for none on a server with GPU slots; null when the server does not hand out "
        "devices (no GPUS, EXECUTOR=ray) or the job has not started.",
    )


class DeliveryState(StrEnum):
    waiting = "waiting"  # the job has not ended yet (never stored)
    pending = "pending"  # due, or waiting for its next attempt
    delivered = "delivered"
    failed = "failed"  # every attempt failed, or the URL is no longer allowed

    def is_final(self) -> bool:
        return self in (DeliveryState.delivered, DeliveryState.failed)


@dataclass
class WebhookDelivery:
    """One job's webhook, from the moment the job ended (persisted; see webhook_sender)."""

    job_id: int
    delivery_id: str  # the same for every attempt: receivers deduplicate on it
    url: str
    status: str  # the job's terminal status
    exit_code: int | None
    results_file: str | None
    created_at: datetime
    owner: str = "default"  # the principal whose job it reports, named in the signed body
    state: DeliveryState = DeliveryState.pending
    # The flattened metrics as JSON text ("null" for none); None until read from results_file.
    metrics_json: str | None = None
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    # The job's gate verdict as JSON text, or None when it had no gate.
    verdict_json: str | None = None


class WebhookInfo(BaseModel):
    url: str = Field(description="Where the webhook goes (the job's callback_url).")
    state: DeliveryState = Field(
        description="waiting (the job has not ended), pending (being delivered or waiting for "
        "a retry), delivered (a 2xx answer), failed (attempts exhausted, or the URL is no "
        "longer under WEBHOOK_URL_PREFIXES)."
    )
    attempts: int = Field(description="Attempts made so far.")
    last_status: int | None = Field(None, description="HTTP status of the last attempt.")
    last_error: str | None = Field(None, description="Why the last attempt failed.")
    next_attempt_at: datetime | None = Field(None, description="When a pending one retries.")
    delivered_at: datetime | None = None
    delivery_id: str | None = Field(
        None, description="Sent in the body and X-Webhook-Id; the same on every attempt."
    )


class GateCheck(BaseModel):
    rule: int = Field(description="The rule's position in the gate's rules.")
    kind: str = Field(description="min, max, max_drop or no_significant_drop.")
    task: str | None
    metric: str
    filter: str | None
    passed: bool
    reason: str = Field(description="The check in words, with its numbers.")
    threshold: float | None = Field(None, description="The rule's min, max or max_drop.")
    alpha: float | None = Field(None, description="no_significant_drop's level.")
    candidate: float | None = None
    baseline: float | None = None
    delta: float | None = Field(None, description="candidate - baseline.")
    drop: float | None = Field(
        None, description="How much worse the candidate is, by the metric's direction."
    )
    higher_is_better: bool | None = None
    test: str | None = Field(None, description="mcnemar, paired_t or unpaired_z.")
    p_value: float | None = None
    n_paired: int | None = None
    discordant: dict[str, int] | None = Field(None, description="McNemar: regressed, improved.")


class Verdict(BaseModel):
    passed: bool = Field(description="Every check passed (false too when error is set).")
    baseline: int | None
    candidate: int
    rules: list[GateCheck] = Field(description="One check per rule and task it matched.")
    warnings: list[CompareWarning] = Field(
        [], description="Why baseline and candidate may not be comparable (as in GET /compare)."
    )
    error: str | None = Field(
        None, description="Why the gate could not be evaluated at all (e.g. baseline deleted)."
    )


class JobDetail(JobSummary):
    stdout: list[str] = Field(
        description="Last LOG_TAIL_LINES lines of stdout, as a terminal shows them."
    )
    stderr: list[str] = Field(description="Last LOG_TAIL_LINES lines of stderr.")
    stdout_truncated: bool = Field(description="True when earlier stdout lines were cut.")
    stderr_truncated: bool = Field(description="True when earlier stderr lines were cut.")
    webhook: WebhookInfo | None = Field(
        None, description="The job's webhook delivery; null without a callback_url."
    )
    verdict: Verdict | None = Field(
        None,
        description="The regression gate's verdict, evaluated when the job completed; null "
        "without a gate (or before the job completes).",
    )
    reproduction: Reproduction | None = Field(
        None,
        description="For a reproduction (POST /job/{id}/reproduce): its diff against the "
        "original; null for other jobs.",
    )


class JobList(BaseModel):
    jobs: list[JobSummary]
    total: int = Field(description="Jobs matching the filter, before limit/offset.")


class JobAction(BaseModel):
    status: str = "success"
    message: str
    job_id: int | None = None


class BulkAction(BaseModel):
    status: str = "success"
    message: str
    job_ids: list[int]


class Metric(BaseModel):
    task: str
    metric: str
    filter: str
    value: float | str | None
    stderr: float | str | None = None


class JobResults(BaseModel):
    job_id: int
    results: dict[str, Any] = Field(description="The results JSON exactly as lm-eval wrote it.")
    metrics: list[Metric]
    results_file: str | None = None


# Principals and the audit trail (principals.py, audit.py)
class Me(BaseModel):
    name: str = Field(
        description="The principal the API key belongs to ('default' for a bare key)."
    )
    admin: bool = Field(
        description="True for ADMIN_KEYS (and on a server without keys): sees and acts on every "
        "owner's jobs, reads GET /audit."
    )


class AuditEntry(BaseModel):
    id: int = Field(description="Increases with every entry; newer entries have larger ids.")
    at: datetime = Field(description="When the action took effect (UTC).")
    principal: str = Field(description="Who acted: the name of the API key used.")
    admin: bool = Field(description="Whether that key is an admin key.")
    action: str = Field(
        description="submit, stop, delete, stop_all, delete_all, or another part's action name."
    )
    job_ids: list[int] = Field(description="The jobs acted on (at most 1000 are listed).")
    job_count: int = Field(description="How many jobs were acted on.")
    target: str | None = Field(None, description="What was acted on when it is not a job.")
    outcome: str = Field(description="What happened, in the server's words.")


class AuditPage(BaseModel):
    entries: list[AuditEntry] = Field(description="Newest first.")
    total: int = Field(description="Entries matching the filters, before limit/offset.")


# ---- samples you can read, and comparing runs (issue 16)


class Choice(BaseModel):
    text: str = Field(description="The continuation lm-eval scored (the choice text).")
    loglikelihood: float
    greedy: bool | None = Field(None, description="Whether greedy decoding gives this choice.")


class MultipleChoice(BaseModel):
    choices: list[Choice]
    pick: int = Field(description="The model's pick: the highest log-likelihood (acc).")
    pick_norm: int | None = Field(None, description="The pick by log-likelihood per character.")
    target: int | None = Field(None, description="The right choice; null if it cannot be told.")


class SampleView(BaseModel):
    doc_id: int | None
    filter: str | None = Field(description="lm-eval's filter this line was scored under.")
    doc: Any = None
    target: Any = None
    prompt: str | None = Field(None, description="The first request's first argument.")
    arguments: Any = Field(None, description="Every request's arguments, as lm-eval logged them.")
    responses: Any = Field(None, description="The model's response(s) after filters.")
    raw_responses: Any = Field(None, description="The model's response(s) before filters.")
    metrics: dict[str, Any]
    primary_metric: str | None = Field(
        None, description="The metric `correct` is judged by (first correctness metric)."
    )
    correct: bool | None = Field(
        None, description="Primary metric true/1: true; false/0: false; else null."
    )
    multiple_choice: MultipleChoice | None = Field(
        None, description="A loglikelihood multiple-choice sample, read per choice."
    )
    error: str | None = Field(None, description="Why this line cannot be shown as JSON.")


class SamplesPage(BaseModel):
    job_id: int
    task: str
    filters: list[str] = Field(description="The filters present in the file.")
    total: int = Field(description="Samples that pass `incorrect` and `filter`.")
    offset: int
    limit: int
    next_offset: int | None = Field(description="Where the next page starts; null at the end.")
    samples: list[SampleView]


class SampleTasks(BaseModel):
    job_id: int
    tasks: list[str] = Field(description="Tasks with a samples file (run with log_samples).")


class CompareRow(BaseModel):
    task: str
    metric: str
    filter: str
    values: list[float | str | None]
    stderrs: list[float | str | None]
    deltas: list[float | None] = Field(description="value minus the first job's value.")
    significant: list[bool | None] = Field(
        description="p_value < alpha by the row's test; null when it cannot be told."
    )
    tests: list[str | None] = Field(
        description="Per job after the first: mcnemar (0/1 scores, paired documents), paired_t "
        "(other per-document scores), unpaired_z (no samples: |delta| against "
        "sqrt(se_first^2 + se^2)); null for the first job and when nothing can be told."
    )
    p_values: list[float | None] = Field(description="The test's two-sided p-value.")
    n_paired: list[int | None] = Field(
        description="Documents present in both runs (same doc_id and doc_hash) that were paired."
    )
    discordant: list[dict[str, int] | None] = Field(
        description="McNemar only: regressed (right in the first job, wrong here) and improved."
    )
    unpaired_significant: list[bool | None] = Field(
        description="What the unpaired z-test alone would say, for comparison."
    )


class CompareWarning(BaseModel):
    jobs: list[int] = Field(description="The two jobs that differ (the first job and another).")
    task: str | None = Field(description="The task concerned; null for the whole run.")
    field: str | None = Field(
        description="limit, num_fewshot, task version, task hash, chat template, system "
        "instruction, fewshot_as_multiturn; null for a note about the comparison itself."
    )
    values: list[Any] | None = None
    message: str


class Comparison(BaseModel):
    jobs: list[int]
    alpha: float = Field(description="The significance level the flags use.")
    rows: list[CompareRow]
    warnings: list[CompareWarning] = Field(
        description="Why runs may not be comparable (a warning, never a refusal)."
    )
