"""Jobs: submit, list, inspect, stop and delete (the original server's README endpoints)."""

import json
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.types import Message

from lm_eval_server.admission import idempotency
from lm_eval_server.admission.catalog import Catalog, IndexState, TaskIndexUnavailable
from lm_eval_server.admission.offload import OffloadRequired
from lm_eval_server.admission.validation import (
    InvalidRequest,
    RequestValidator,
    UnknownTaskNames,
    ValidatedJob,
)
from lm_eval_server.api import views
from lm_eval_server.api.deps import AuditTrail, Caller, Manager, ServerState, State, Validator
from lm_eval_server.api.request_body import BodyLimits, BodyRefused, screen_job_body
from lm_eval_server.api.security import caller_of, principal_in
from lm_eval_server.config import Settings
from lm_eval_server.jobs import verdicts
from lm_eval_server.jobs.manager import JobManager
from lm_eval_server.jobs.models import (
    BulkAction,
    JobAction,
    JobDetail,
    JobList,
    JobRecord,
    JobStatus,
)
from lm_eval_server.jobs.receipts import DETAIL_WAIT_S
from lm_eval_server.team.audit import Action, Audit, Entry, SqlWrite
from lm_eval_server.team.principals import NAME_PATTERN, Principal

_NOT_FOUND = {404: {"description": "No job has this id."}}


def _queued(job_id: int) -> str:
    return f"Job {job_id} successfully queued."


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


# Bodies above this size are screened in a worker thread (the screen is pure Python, so the
# event loop gets the GIL back every few milliseconds); smaller ones take microseconds.
THREAD_SCREEN_BYTES = 64 * 1024
_REFUSED = "body_refused"


def body_limits(settings: Settings) -> BodyLimits:
    return BodyLimits(
        max_depth=settings.max_body_depth,
        max_values=settings.max_body_values,
        max_tasks=settings.max_tasks_per_request,
    )


def _with_body(request: Request, body: bytes) -> Request:
    """The same request carrying `body` as JSON instead of what the client sent."""
    headers = [
        (name, value)
        for name, value in request.scope["headers"]
        if name not in (b"content-type", b"content-length")
    ]
    headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({**request.scope, "headers": headers}, receive)


# A route's direct path: its answer, or None to leave the request to FastAPI's handler.
DirectPath = Callable[[Request, bytes], Awaitable[Response | None]]


def screened_body_route(
    fields: Collection[str], direct: DirectPath | None = None
) -> type[APIRoute]:
    """A route class that screens the raw body (`request_body`) before FastAPI parses it.

    FastAPI would json.loads the whole body and build pydantic's error list for every unknown
    field before the endpoint could refuse anything; the screen stops at the first bound. The
    route's schema (/openapi.json, the dashboard's form, the docs) stays FastAPI's own.

    `direct(request, raw)`, when given, answers a screened request without FastAPI's
    dependency solving (most of the framework's cost per submission), or returns None to
    leave it to FastAPI's handler: every refusal and every unusual request goes that way, so
    their answers stay FastAPI's own.
    """
    known = frozenset(fields)

    class ScreenedBodyRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            handler = super().get_route_handler()

            async def screened(request: Request) -> Response:
                raw = await request.body()
                args = (
                    raw,
                    request.headers.get("content-type"),
                    known,
                    body_limits(request.app.state.server.settings),
                )
                try:
                    if len(raw) > THREAD_SCREEN_BYTES:
                        await run_in_threadpool(screen_job_body, *args)
                    else:
                        screen_job_body(*args)
                except BodyRefused as exc:
                    # Refused after the route's dependencies (API key, ...) have run, like any
                    # other bad body: FastAPI parses an empty object instead, and the endpoint
                    # raises the refusal.
                    request = _with_body(request, b"{}")
                    setattr(request.state, _REFUSED, exc)
                else:
                    if direct is not None and (answer := await direct(request, raw)) is not None:
                        return answer
                return await handler(request)

            return screened

    return ScreenedBodyRoute


async def _validate_once(
    validator: RequestValidator, body: BaseModel, principal: str
) -> ValidatedJob:
    try:
        try:
            return validator.validate(body, principal)  # usually a fraction of a millisecond
        except OffloadRequired:
            return await run_in_threadpool(validator.validate, body, principal)
    except UnknownTaskNames as exc:
        # The close-match search is the slow part: off the event loop.
        raise InvalidRequest(await run_in_threadpool(exc.describe)) from None


async def validate_job(
    validator: RequestValidator, catalog: Catalog, body: BaseModel, wait_s: float, principal: str
) -> ValidatedJob:
    """Validate for the caller `principal` (secret references are judged by who asks); while
    the task index builds, wait for it (up to `wait_s`) and validate again.

    A request that is refused for another reason is refused at once, without waiting.
    """
    try:
        return await _validate_once(validator, body, principal)
    except TaskIndexUnavailable:
        if catalog.state is not IndexState.building or wait_s <= 0:
            raise
    started = time.monotonic()
    await catalog.wait_for_index(wait_s)
    try:
        return await _validate_once(validator, body, principal)
    except TaskIndexUnavailable:
        if catalog.state is IndexState.building:
            raise catalog.unavailable(waited_s=round(time.monotonic() - started, 1)) from None
        raise


_ACTION_JSON = TypeAdapter(JobAction)
IDEMPOTENCY_HEADER = "idempotency-key"


async def submit(
    request: Request,
    state: ServerState,
    validator: RequestValidator,
    manager: JobManager,
    caller: Principal,
    trail: Audit,
    body: BaseModel,
    idempotency_key: str | None,
) -> JobAction:
    """POST /job once the caller and the body are known: validate, queue, audit."""
    job = await validate_job(
        validator, state.catalog, body, state.settings.index_wait_s, caller.name
    )
    verdicts.check_baseline(job.gate, lambda job_id: manager.get(job_id, caller))
    claim = None
    if idempotency_key is not None:
        # Bound to who asks (the key and its principal) and what they send (idempotency.py):
        # a key later given to another principal never reaches the first one's jobs.
        raw = await request.body()  # already read and cached
        claim = idempotency.claim(idempotency_key, f"{caller.name}\0{caller_of(request)}", raw)
    entry: Entry | None = None

    def audit_row(new: JobRecord) -> list[SqlWrite]:
        # Committed with the job's row: one transaction per submission.
        nonlocal entry
        entry = trail.entry(caller, Action.submit, [new.job_id], _queued(new.job_id))
        write = trail.joined_write(entry)
        return [write] if write is not None else []

    record = manager.submit(job, claim, owner=caller.name, joined=audit_row)
    if entry is not None:
        trail.joined(entry)
    else:  # an Idempotency-Key retry: the first job, nothing stored
        outcome = "Idempotency-Key retry: no new job."
        trail.record(caller, Action.submit, [record.job_id], outcome)
    return JobAction(message=_queued(record.job_id), job_id=record.job_id)


def jobs_router(request_model: type[BaseModel], example: dict[str, Any]) -> APIRouter:
    router = APIRouter(tags=["jobs"])

    async def submit_job(
        request: Request,
        state: State,
        validator: Validator,
        manager: Manager,
        caller: Caller,
        trail: AuditTrail,
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
        refused: BodyRefused | None = getattr(request.state, _REFUSED, None)
        if refused is not None:
            raise HTTPException(refused.status_code, str(refused))
        return await submit(
            request, state, validator, manager, caller, trail, body, idempotency_key
        )

    async def direct(request: Request, raw: bytes) -> Response | None:
        """The submission of a caller with a valid key, a plain JSON body that the request
        model accepts and no Idempotency-Key, which FastAPI's handler would pass to
        `submit_job` unchanged: passed to `submit` directly."""
        state: ServerState = request.app.state.server
        caller = principal_in(request.scope)
        if (
            caller is None
            or state.manager is None
            or state.audit is None
            or request.headers.get("content-type") != "application/json"
            or IDEMPOTENCY_HEADER in request.headers
        ):
            return None
        try:
            # As FastAPI parses and validates a JSON body (`request.json()`, then the body
            # field's TypeAdapter in Python mode).
            body = request_model.model_validate(json.loads(raw), from_attributes=True)
        except (ValueError, ValidationError):
            return None
        action = await submit(
            request, state, state.validator, state.manager, caller, state.audit, body, None
        )
        return Response(_ACTION_JSON.dump_json(action), media_type="application/json")

    router.add_api_route(
        "/job",
        submit_job,
        methods=["POST"],
        response_model=JobAction,
        responses={
            415: {"description": "The body is not sent as application/json."},
            422: {"description": "The request cannot run; `detail` says why."},
            429: {
                "description": "The queue is full (MAX_QUEUED_JOBS), or the caller's key has "
                "MAX_QUEUED_PER_KEY jobs queued; see Retry-After."
            },
            503: {
                "description": "The server is shutting down, or task names cannot be checked "
                "yet (the task index is building or its build failed); see Retry-After."
            },
        },
        summary="Queue an lm-eval job",
        route_class_override=screened_body_route(request_model.model_fields, direct),
    )

    # The route answers with pre-serialised JSON (finished jobs' summaries are cached), so
    # JobList documents the body rather than validating it.
    @router.get(
        "/jobs",
        response_model=None,
        responses={200: {"model": JobList, "description": "The jobs, oldest first."}},
        summary="List jobs, oldest first",
    )
    async def list_jobs(
        manager: Manager,
        state: State,
        caller: Caller,
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
        owner: Annotated[
            str | None,
            Query(
                pattern=f"^{NAME_PATTERN.pattern}$",
                description="Only this owner's jobs. An admin sees every owner's jobs; for "
                "anyone else this can only narrow their own list.",
            ),
        ] = None,
    ) -> Response:
        statuses = parse_statuses(status_filter)
        include = include_completed if include_completed is not None else include_finished
        if include is False:
            active = {JobStatus.queued, JobStatus.running}
            statuses = active if statuses is None else statuses & active
        records, total = manager.list(statuses, limit, offset, viewer=caller, owner=owner)
        if not state.redactor.ready:
            await run_in_threadpool(state.redactor.prepare)  # off the event loop, once
        body = views.job_list_json(records, total, state.redactor)
        return Response(body, media_type="application/json")

    @router.get("/job/{job_id}", response_model=JobDetail, responses=_NOT_FOUND)
    async def get_job(manager: Manager, state: State, caller: Caller, job_id: int) -> JobDetail:
        record = manager.get(job_id, caller)
        await manager.receipts.reproduction_ready(record, DETAIL_WAIT_S)
        webhook = state.webhooks.info(record) if state.webhooks is not None else None
        return await run_in_threadpool(
            views.detail, record, state.settings.log_tail_lines, state.redactor, webhook
        )

    async def stop_job(
        manager: Manager, caller: Caller, trail: AuditTrail, job_id: int
    ) -> JobAction:
        message = await manager.stop(job_id, caller)
        trail.record(caller, Action.stop, [job_id], message)
        return JobAction(message=message, job_id=job_id)

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

    async def stop_all(manager: Manager, caller: Caller, trail: AuditTrail) -> BulkAction:
        ids = await manager.stop_all(caller)
        message = f"Stopped {len(ids)} job(s)."
        trail.record(caller, Action.stop_all, ids, message)
        return BulkAction(message=message, job_ids=ids)

    for path, name in (("/jobs/stop", "stop"), ("/jobs/dequeue", "dequeue")):
        for method in ("GET", "POST"):
            router.add_api_route(
                path,
                stop_all,
                methods=[method],
                response_model=BulkAction,
                summary="Stop every queued and running job of the caller (an admin: of all)",
                operation_id=f"{name}_all_jobs_{method.lower()}",
                deprecated=name == "dequeue",
            )

    @router.post(
        "/job/{job_id}/resume",
        response_model=JobAction,
        responses={**_NOT_FOUND, 409: {"description": "The job is queued, running or completed."}},
        summary="Run a Failed or Stopped job again as its next attempt (same id and request); "
        "answers already in the response cache are not computed again",
    )
    async def resume_job(
        manager: Manager, caller: Caller, trail: AuditTrail, job_id: int
    ) -> JobAction:
        record = manager.resume(job_id, caller)
        message = f"Job {job_id} queued again as attempt {record.attempt}."
        trail.record(caller, Action.resume, [job_id], message)
        return JobAction(message=message, job_id=job_id)

    @router.delete("/job/{job_id}", response_model=JobAction, responses=_NOT_FOUND)
    async def delete_job(
        manager: Manager, caller: Caller, trail: AuditTrail, job_id: int
    ) -> JobAction:
        await manager.delete(job_id, caller)
        message = f"Job {job_id} deleted."
        trail.record(caller, Action.delete, [job_id], message)
        return JobAction(message=message, job_id=job_id)

    @router.delete("/jobs", response_model=BulkAction)
    async def delete_jobs(manager: Manager, caller: Caller, trail: AuditTrail) -> BulkAction:
        ids = await manager.delete_all(caller)
        message = f"Deleted {len(ids)} job(s)."
        trail.record(caller, Action.delete_all, ids, message)
        return BulkAction(message=message, job_ids=ids)

    return router
