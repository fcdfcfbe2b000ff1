"""POST /gate: a regression gate's verdict for two finished jobs, without running anything."""

from __future__ import annotations

from fastapi import APIRouter

from lm_eval_server.admission.gate_rules import GateRequest
from lm_eval_server.api.deps import Caller, Manager
from lm_eval_server.errors import JobNotCompleted
from lm_eval_server.jobs import verdicts
from lm_eval_server.jobs.models import JobStatus, Verdict

router = APIRouter(tags=["results and logs"])


@router.post(
    "/gate",
    response_model=Verdict,
    responses={
        404: {"description": "A job does not exist (or belongs to someone else)."},
        409: {"description": "The candidate or the baseline is not Completed."},
        422: {"description": "The rules are malformed; `detail` says how."},
    },
    summary="Evaluate a regression gate's rules for a candidate job against a baseline job",
)
async def post_gate(body: GateRequest, manager: Manager, caller: Caller) -> Verdict:
    candidate = manager.get(body.candidate, caller)
    baseline = manager.get(body.baseline, caller) if body.baseline is not None else None
    if candidate.status is not JobStatus.completed:
        raise JobNotCompleted(
            f"Job {candidate.job_id} is {candidate.status.value}; a gate judges a Completed job"
        )
    rules = body.model_dump(exclude_none=True)["rules"]
    verdict = await verdicts.evaluate(baseline, candidate, rules, manager.redactor)
    return Verdict(**verdict)
