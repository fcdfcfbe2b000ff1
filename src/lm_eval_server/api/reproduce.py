"""GET /job/{id}/receipt and POST /job/{id}/reproduce: what a finished job ran with, and the
same request run again as a new job (its diff shows in the new job's `reproduction`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ValidationError

from lm_eval_server.api.deps import AuditTrail, Caller, Manager, State, Validator
from lm_eval_server.api.jobs import validate_job
from lm_eval_server.errors import FileNotAvailable, InvalidRequest, JobNotCompleted
from lm_eval_server.jobs.models import JobAction, JobRecord
from lm_eval_server.jobs.receipt_models import Receipt

REPRODUCE_ACTION = "reproduce"  # in the audit trail


def _must_be_finished(record: JobRecord, what: str) -> None:
    if not record.status.is_terminal():
        raise JobNotCompleted(
            f"Job {record.job_id} is {record.status.value}; {what} once it has ended "
            "(Completed, Failed or Stopped)"
        )


def _first_error(exc: ValidationError) -> str:
    error: dict[str, Any] = exc.errors()[0]
    where = ".".join(str(p) for p in error.get("loc", ()))
    return f"{where}: {error.get('msg')}" if where else str(error.get("msg"))


def reproduce_router(request_model: type[BaseModel]) -> APIRouter:
    router = APIRouter(tags=["jobs"])

    @router.get(
        "/job/{job_id}/receipt",
        response_model=Receipt,
        responses={
            404: {"description": "No job has this id, or it has no receipt."},
            409: {"description": "The job has not ended yet."},
        },
        summary="What a finished job ran with: argv, environment names, versions, hashes",
    )
    async def get_receipt(manager: Manager, caller: Caller, job_id: int) -> dict[str, Any]:
        record = manager.get(job_id, caller)
        _must_be_finished(record, "its receipt is recorded")
        receipt = await manager.receipts.receipt(record)
        if receipt is None:
            raise FileNotAvailable(
                f"Job {job_id} has no receipt: it ended before this server recorded receipts, "
                "or recording it failed (the server's log says why)"
            )
        return receipt

    @router.post(
        "/job/{job_id}/reproduce",
        response_model=JobAction,
        responses={
            404: {"description": "No job has this id."},
            409: {"description": "The job has not ended yet."},
            422: {"description": "The job's request no longer passes this server's rules."},
        },
        summary="Run a finished job's request again as a new job, response cache bypassed",
    )
    async def reproduce(
        state: State,
        validator: Validator,
        manager: Manager,
        caller: Caller,
        trail: AuditTrail,
        job_id: int,
    ) -> JobAction:
        record = manager.get(job_id, caller)
        _must_be_finished(record, "it can be reproduced")
        body = await manager.receipts.reproduce_body(record, state.settings.lm_eval_path_allowlist)
        if body is None:
            raise FileNotAvailable(f"Job {job_id}'s request is no longer stored")
        try:
            request = request_model.model_validate(body)
        except ValidationError as exc:
            raise InvalidRequest(
                f"Job {job_id}'s request no longer validates ({_first_error(exc)}); submit "
                "it again with POST /job"
            ) from None
        # Judged, and owned, as the original: secret references are the owner's to use.
        job = await validate_job(
            validator, state.catalog, request, state.settings.index_wait_s, record.owner
        )
        new = manager.submit(job, owner=record.owner, reproduction_of=job_id)
        message = f"Job {new.job_id} queued: a reproduction of job {job_id}."
        trail.record(caller, REPRODUCE_ACTION, [job_id, new.job_id], message)
        return JobAction(message=message, job_id=new.job_id)

    return router
