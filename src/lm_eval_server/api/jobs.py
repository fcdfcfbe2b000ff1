"""Jobs: submit, list, inspect, stop and delete (the original server's README endpoints)."""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from lm_eval_server import idempotency
from lm_eval_server.api import views
from lm_eval_server.api.deps import Manager
from lm_eval_server.models import BulkAction, JobAction, JobDetail, JobList, JobStatus
from lm_eval_server.security import caller_of
from lm_eval_server.validation import InvalidRequest, RequestValidator, UnknownTaskNames

_NOT_FOUND = {404: {"description": "No job has this id."}}


def parse_statuses(text: str | None) -> set[JobStatus] | None:
    if text is None:
        return None
    statuses: set[JobStatus] = set()
    for part in text.split(","):
        name = part.strip()
        if not name:
            continue
        match = next((s for s in JobStatus if s.value.lower() == name.lower()), None)
        if match is None:
            allowed = ", ".join(s.value for s in JobStatus)
            raise HTTPException(422, f"Unknown status {name!r}; use one of: {allowed}")
        statuses.add(match)
    return statuses


def jobs_router(request_model: type[BaseModel], example: dict[str, Any]) -> APIRouter:
    router = APIRouter(tags=["jobs"])

    @router.post(
        "/job",
        response_model=JobAction,
        responses={
            422: {"description": "The request cannot run; `detail` says why."},
            429: {"description": "The queue is full (MAX_QUEUED_JOBS); see Retry-After."},
            503: {"description": "The server is shutting down."},
        },
        summary="Queue an lm-eval job",
    )
    async def submit_job(
        request: Request,
        manager: Manager,
        body: Annotated[request_model, Body(openapi_examples={"dummy": {"value": example}})],  # type: ignore[valid-type]
        idempotency_key: Annotated[
            str | None,
            Header(
                max_length=200,
                description="Retries with the same key and body from the same caller (API "
                "key) return the first job instead of queuing another; the same key with "
                "another body gets 422.",
            ),
        ] = None,
    ) -> JobAction:
        validator: RequestValidator = request.app.state.validator
        try:
            job = validator.validate(body)  # a fraction of a millisecond: no thread hop
        except UnknownTaskNames as exc:
            # The close-match search is the slow part: off the event loop.
            raise InvalidRequest(await run_in_threadpool(exc.describe)) from None
        claim = None
        if idempotency_key is not None:
            # Bound to who asks and what they send (idempotency.py).
            raw = await request.body()  # already read and cached by FastAPI
            claim = idempotency.claim(idempotency_key, caller_of(request), raw)
        record = manager.submit(job, claim)
        return JobAction(message=f"Job {record.job_id} successfully queued.", job_id=record.job_id)

    @router.get("/jobs", response_model=JobList, summary="List jobs, oldest first")
    async def list_jobs(
        manager: Manager,
        include_completed: Annotated[
            bool | None, Query(description="false: only Queued and Running jobs.")
        ] = None,
        include_finished: Annotated[
            bool | None, Query(description="Synonym of include_completed.")
        ] = None,
        status_filter: Annotated[
            str | None,
            Query(alias="status", description="Comma-separated statuses, e.g. Running,Queued."),
        ] = None,
        limit: Annotated[int | None, Query(ge=0, le=1_000_000)] = None,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    ) -> Response:
        statuses = parse_statuses(status_filter)
        include = include_completed if include_completed is not None else include_finished
        if include is False:
            active = {JobStatus.queued, JobStatus.running}
            statuses = active if statuses is None else statuses & active
        records, total = manager.list(statuses, limit, offset)
        # Pre-serialised JSON (finished jobs are cached): the schema is JobList, as declared.
        return Response(views.job_list_json(records, total), media_type="application/json")

    @router.get("/job/{job_id}", response_model=JobDetail, responses=_NOT_FOUND)
    async def get_job(request: Request, manager: Manager, job_id: int) -> JobDetail:
        record = manager.get(job_id)
        tail = request.app.state.settings.log_tail_lines
        return await run_in_threadpool(views.detail, record, tail)

    async def stop_job(manager: Manager, job_id: int) -> JobAction:
        return JobAction(message=await manager.stop(job_id), job_id=job_id)

    # GET as in the original README, POST because stopping is a side effect; `dequeue` is the
    # original code's name for the same thing.
    for path, name in (("/job/{job_id}/stop", "stop"), ("/job/{job_id}/dequeue", "dequeue")):
        for method in ("GET", "POST"):
            router.add_api_route(
                path,
                stop_job,
                methods=[method],
                response_model=JobAction,
                responses=_NOT_FOUND,
                summary="Stop a job (dequeue it if it is queued)",
                operation_id=f"{name}_job_{method.lower()}",
                deprecated=name == "dequeue",
            )

    async def stop_all(manager: Manager) -> BulkAction:
        ids = await manager.stop_all()
        return BulkAction(message=f"Stopped {len(ids)} job(s).", job_ids=ids)

    for path, name in (("/jobs/stop", "stop"), ("/jobs/dequeue", "dequeue")):
        for method in ("GET", "POST"):
            router.add_api_route(
                path,
                stop_all,
                methods=[method],
                response_model=BulkAction,
                summary="Stop every queued and running job",
                operation_id=f"{name}_all_jobs_{method.lower()}",
                deprecated=name == "dequeue",
            )

    @router.delete("/job/{job_id}", response_model=JobAction, responses=_NOT_FOUND)
    async def delete_job(manager: Manager, job_id: int) -> JobAction:
        await manager.delete(job_id)
        return JobAction(message=f"Job {job_id} deleted.", job_id=job_id)

    @router.delete("/jobs", response_model=BulkAction)
    async def delete_jobs(manager: Manager) -> BulkAction:
        ids = await manager.delete_all()
        return BulkAction(message=f"Deleted {len(ids)} job(s).", job_ids=ids)

    return router
