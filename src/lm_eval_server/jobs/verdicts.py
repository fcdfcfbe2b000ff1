"""Regression gates over jobs: the verdict a job's `gate` gets when it ends (`judge`, called
once by the manager before the job's end is recorded, so GET /job and the webhook read the
same persisted verdict), and POST /gate's verdict for two finished jobs (`evaluate`).

What the rules mean is outputs/gates.py's; this module finds the jobs' files and turns what can
go wrong (a baseline deleted or not Completed, unreadable results) into a verdict with an
`error`, never an exception that would keep the job from ending.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from lm_eval_server.errors import DomainError, JobNotCompleted, JobNotFound
from lm_eval_server.jobs.comparisons import compare_records, read_results
from lm_eval_server.jobs.models import JobRecord, JobStatus
from lm_eval_server.outputs import gates
from lm_eval_server.team.redact import Redactor

log = logging.getLogger(__name__)


class BaselineNotFound(JobNotFound):
    """A gate's baseline the caller may not see: 404, as the job itself would be."""

    def __init__(self, job_id: int) -> None:
        super().__init__(job_id)
        self.args = (f"gate.baseline: Job {job_id} not found.",)


def check_baseline(gate: dict[str, Any] | None, lookup: Callable[[int], JobRecord]) -> None:
    """At submission: the gate's baseline exists and the caller may see it. `lookup` raises
    JobNotFound for a job the caller may not see (manager.get with the caller)."""
    baseline = gate.get("baseline") if gate else None
    if baseline is None:
        return
    try:
        lookup(baseline)
    except JobNotFound:
        raise BaselineNotFound(baseline) from None


async def judge(
    record: JobRecord, lookup: Callable[[int], JobRecord | None], redactor: Redactor
) -> dict[str, Any] | None:
    """The verdict of a job that just completed (its results_file set), or None without a
    gate. `lookup`: the server's job by id (None when it is gone)."""
    gate = record.request.get("gate")
    if not isinstance(gate, dict):
        return None
    baseline_id = gate.get("baseline")
    baseline = lookup(baseline_id) if baseline_id is not None else None
    if baseline_id is not None and baseline is None:
        return gates.error_verdict(
            baseline_id, record.job_id, f"the baseline job {baseline_id} no longer exists"
        )
    try:
        return await evaluate(baseline, record, gate["rules"], redactor)
    except asyncio.CancelledError:
        raise
    except DomainError as exc:
        return gates.error_verdict(baseline_id, record.job_id, str(exc))
    except Exception as exc:
        log.exception("job %d: its gate could not be evaluated", record.job_id)
        return gates.error_verdict(
            baseline_id, record.job_id, f"the gate could not be evaluated: {exc!r}"
        )


async def evaluate(
    baseline: JobRecord | None,
    candidate: JobRecord,
    rules: list[dict[str, Any]],
    redactor: Redactor,
) -> dict[str, Any]:
    """The verdict of `rules` for `candidate` against `baseline` (None: absolute rules only).
    Raises JobNotCompleted when either has no results to judge."""
    records = [r for r in (baseline, candidate) if r is not None]
    for record in records:
        if record is not candidate and record.status is not JobStatus.completed:
            raise JobNotCompleted(
                f"the baseline job {record.job_id} is {record.status.value}; a gate compares "
                "with a Completed job"
            )
        if not record.results_file:
            raise JobNotCompleted(
                f"job {record.job_id} has no results file to judge (it must be Completed "
                "with results)"
            )
    comparison = await compare_records(records, redactor, gates.DEFAULT_ALPHA)
    candidate_results = await asyncio.to_thread(read_results, candidate, redactor)
    baseline_id = baseline.job_id if baseline is not None else None
    return gates.evaluate(rules, comparison, candidate_results, baseline_id, candidate.job_id)
