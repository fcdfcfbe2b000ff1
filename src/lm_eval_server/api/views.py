"""Internal JobRecord -> API schemas."""

from __future__ import annotations

from pathlib import Path

from lm_eval_server.jobs.models import (
    CacheCounts,
    JobDetail,
    JobRecord,
    JobStatus,
    JobSummary,
    PhaseInfo,
    ProgressInfo,
    WebhookInfo,
)
from lm_eval_server.outputs import joblogs
from lm_eval_server.outputs.progress import STARTING_PROGRESS, Progress
from lm_eval_server.team.redact import Redactor


def progress_pct(record: JobRecord) -> int:
    """The whole job's share of requests answered (the tracker keeps it from going down)."""
    if record.status is JobStatus.completed:
        return 100
    progress: Progress | None = record.progress
    return progress.pct if progress is not None else 0


def progress_info(record: JobRecord) -> ProgressInfo | None:
    progress: Progress | None = record.progress
    if progress is None and record.status is JobStatus.running:
        progress = STARTING_PROGRESS  # launched, its log not read yet
    if progress is None:
        return None
    return ProgressInfo(
        phase=progress.phase,
        done=progress.done,
        total=progress.total,
        rate_per_s=progress.rate_per_s,
        eta_s=progress.eta_s,
        phases=[PhaseInfo(phase=p.phase, done=p.done, total=p.total) for p in progress.phases],
    )


def summary(record: JobRecord, redactor: Redactor) -> JobSummary:
    """The record as the API shows it: `argument` and `error` with credentials masked."""
    return JobSummary(
        job_id=record.job_id,
        owner=record.owner,
        argument=redactor.text(record.argument) or "",
        status=record.status,
        timestamp=record.started_at,
        exit_code=record.exit_code,
        inference_progress_pct=progress_pct(record),
        progress=progress_info(record),
        model=record.model,
        tasks=record.tasks,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        duration_s=record.duration_s,
        error=redactor.text(record.error),
        gpus=record.gpus,
        **attempt_fields(record),
    )


def attempt_fields(record: JobRecord) -> dict[str, object]:
    cache = None
    if record.cache_hits is not None and record.cache_misses is not None:
        cache = CacheCounts(hits=record.cache_hits, misses=record.cache_misses)
    return {
        "attempt": record.attempt,
        "max_attempts": record.max_attempts,
        "retry_at": record.retry_at,
        "cache": cache,
    }


def summary_json(record: JobRecord, redactor: Redactor) -> bytes:
    """The summary as JSON, serialised once per change of the record: JobRecord drops the
    cached bytes when any field is assigned. A running job's summary also changes with the
    clock (duration_s), so it is serialised per request; there are at most MAX_CONCURRENCY."""
    generation = redactor.generation
    if record.summary_json is not None and record.summary_redaction == generation:
        return record.summary_json
    data = summary(record, redactor).model_dump_json().encode()
    if record.started_at is None or record.finished_at is not None:
        record.summary_json = data
        record.summary_redaction = generation
    return data


def job_list_json(records: list[JobRecord], total: int, redactor: Redactor) -> bytes:
    """Mostly a join of cached bytes: 10,000 jobs cost little more than copying them."""
    generation = redactor.generation
    parts = [
        cached
        if (cached := r.summary_json) is not None and r.summary_redaction == generation
        else summary_json(r, redactor)
        for r in records
    ]
    head, tail = b'{"jobs":[', b'],"total":' + str(total).encode() + b"}"
    if not parts:
        return head + tail
    # One join, the ends glued to the first and last parts: concatenating the joined
    # megabytes with the ends again cost 20 times the join itself (two more large copies,
    # each a fresh mapping to fault in).
    parts[0] = head + parts[0]
    parts[-1] = parts[-1] + tail
    return b",".join(parts)


def detail(
    record: JobRecord, tail_lines: int, redactor: Redactor, webhook: WebhookInfo | None = None
) -> JobDetail:
    work_dir = Path(record.work_dir)
    out = joblogs.stream_tail(work_dir, "stdout", tail_lines)
    err = joblogs.stream_tail(work_dir, "stderr", tail_lines)
    # Line by line: a multi-line secret is known by each of its lines too (redact.value_forms).
    return JobDetail(
        **summary(record, redactor).model_dump(),
        stdout=[redactor.values_only(line) for line in out.lines],
        stderr=[redactor.values_only(line) for line in err.lines],
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
        webhook=webhook,
        verdict=record.verdict,
        reproduction=record.reproduction,
    )
