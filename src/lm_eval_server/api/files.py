"""What jobs leave behind: results, samples and logs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from lm_eval_server.api import accept
from lm_eval_server.api.deps import Caller, Files, Manager, State
from lm_eval_server.errors import InvalidRequest
from lm_eval_server.jobs.manager import JobManager
from lm_eval_server.jobs.models import JobResults, Metric, SamplesPage, SampleTasks
from lm_eval_server.outputs import joblogs, results, samples
from lm_eval_server.team.redact import StreamRedactor

log = logging.getLogger(__name__)
router = APIRouter(tags=["results and logs"])
FOLLOW_POLL_S = 0.25
FOLLOW_RETRY_AFTER_S = 5
# Beyond LOG_FOLLOW_MAX_S, how long a client that stopped reading may hold a stream.
FOLLOW_SEND_GRACE_S = 30.0


class Stream(StrEnum):
    stdout = "stdout"
    stderr = "stderr"


@router.get(
    "/job/{job_id}/results",
    response_model=JobResults,
    responses={
        404: {"description": "No job has this id."},
        409: {"description": "The job is not Completed."},
    },
)
async def get_results(files: Files, caller: Caller, job_id: int) -> JobResults:
    data, path = await files.results(job_id, caller)
    metrics = [Metric(**row) for row in results.flatten_metrics(data)]
    return JobResults(job_id=job_id, results=data, metrics=metrics, results_file=str(path))


class SamplesFormat(StrEnum):
    json = "json"
    jsonl = "jsonl"


RAW_SAMPLES = "application/x-ndjson"
JSON = "application/json"


@router.get(
    "/job/{job_id}/samples",
    response_model=None,
    responses={
        200: {
            "model": SamplesPage,
            "description": "A page of samples as JSON, the raw JSONL file, or (without `task`) "
            "the tasks that have samples.",
            "content": {RAW_SAMPLES: {}},
        },
        404: {"description": "No job has this id, or it has no samples for this task."},
        409: {"description": "The job is not Completed."},
    },
    summary="A task's samples: the raw JSONL, or paginated JSON with a wrong-answers filter",
)
async def get_samples(
    request: Request,
    state: State,
    files: Files,
    caller: Caller,
    job_id: int,
    task: Annotated[str | None, Query(min_length=1, max_length=500)] = None,
    offset: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    limit: Annotated[int | None, Query(ge=1, le=samples.PAGE_LIMIT_MAX)] = None,
    incorrect: Annotated[
        bool | None, Query(description="true: only samples judged wrong (correct=false)")
    ] = None,
    filter_name: Annotated[
        str | None,
        Query(alias="filter", min_length=1, max_length=200, description="lm-eval filter name"),
    ] = None,
    format: SamplesFormat | None = None,
) -> Response:
    paged = offset is not None or limit is not None or incorrect is not None or filter_name
    if format is SamplesFormat.jsonl and paged:
        raise InvalidRequest(
            "format=jsonl returns the whole file; offset, limit, incorrect and filter page the "
            "JSON view: drop them or use format=json"
        )
    if task is None:
        if format is SamplesFormat.jsonl:
            raise InvalidRequest("format=jsonl needs task=NAME (one file per task)")
        tasks = await files.samples_tasks(job_id, caller)
        return JSONResponse(SampleTasks(job_id=job_id, tasks=tasks).model_dump())
    as_json = format is SamplesFormat.json or (
        format is None
        and (paged or accept.preferred(request.headers.get("accept"), [RAW_SAMPLES, JSON]) == JSON)
    )
    if not as_json:
        path = await files.samples_path(job_id, task, caller)
        if not state.redactor:
            return FileResponse(path, media_type=RAW_SAMPLES, filename=path.name)
        # Samples hold the model_args and whatever the model answered: known values masked.
        return StreamingResponse(
            _chunks(state.redactor.stream().wrap(_file_chunks(path))),
            media_type=RAW_SAMPLES,
            headers={"Content-Disposition": f'attachment; filename="{path.name}"'},
        )
    page = await files.samples_page(
        job_id,
        task,
        caller,
        offset=offset or 0,
        limit=limit or samples.PAGE_LIMIT_DEFAULT,
        incorrect=bool(incorrect),
        filter_name=filter_name,
    )
    return JSONResponse(SamplesPage(**page).model_dump())


def _file_chunks(path) -> Iterator[bytes]:  # type: ignore[no-untyped-def]
    with open(path, "rb") as f:
        while chunk := f.read(joblogs.CHUNK):
            yield chunk


@router.get(
    "/job/{job_id}/logs",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/plain": {}}},
        429: {"description": "MAX_LOG_FOLLOWERS streams are open already."},
    },
    summary="A job's stdout or stderr as text; follow=true streams until the job ends",
)
async def get_logs(
    state: State,
    manager: Manager,
    files: Files,
    caller: Caller,
    job_id: int,
    stream: Stream = Stream.stderr,
    tail: Annotated[int | None, Query(ge=0, le=1_000_000)] = None,
    follow: bool = False,
    attempt: Annotated[
        int | None,
        Query(ge=1, description="An earlier attempt's log (default: the current attempt)."),
    ] = None,
) -> StreamingResponse:
    path = files.log_path(job_id, stream.value, caller, attempt)
    if attempt is not None:
        follow = False  # an earlier attempt's log is complete
    inode, size = joblogs.current_size(path)
    # What a job printed, with the secrets the server injected masked (also across chunks).
    redactor = state.redactor.stream()
    if not follow:
        return StreamingResponse(
            _read(path, tail, size, redactor), media_type="text/plain; charset=utf-8"
        )
    settings, slots = state.settings, state.log_followers
    if not slots.acquire():
        raise HTTPException(
            429,
            f"{slots.limit} log streams are being followed already (MAX_LOG_FOLLOWERS); "
            "retry later, or read the log without follow=true",
            headers={"Retry-After": str(FOLLOW_RETRY_AFTER_S)},
        )
    limits = _FollowLimits(settings.log_follow_idle_s, settings.log_follow_max_s)
    return _FollowResponse(
        _follow(manager, job_id, path, tail, inode, size, limits, redactor),
        release=slots.release,
        hard_limit_s=limits.total_s + FOLLOW_SEND_GRACE_S,
    )


@dataclass(frozen=True)
class _FollowLimits:
    idle_s: float
    total_s: float


class _FollowResponse(StreamingResponse):
    """Frees its follower slot however the stream ends (done, client gone, or never started),
    and gives up on a client that stops reading: a blocked send has no end of its own."""

    def __init__(
        self, body: AsyncIterator[bytes], release: Callable[[], None], hard_limit_s: float
    ) -> None:
        super().__init__(body, media_type="text/plain; charset=utf-8")
        self._release = release
        self._hard_limit_s = hard_limit_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with asyncio.timeout(self._hard_limit_s):
                await super().__call__(scope, receive, send)
        except TimeoutError:
            log.info("dropped a log follower that stopped reading")
        finally:
            self._release()


async def _read(  # type: ignore[no-untyped-def]
    path, tail: int | None, end: int, redactor: StreamRedactor, flush: bool = True
) -> AsyncIterator[bytes]:
    async for chunk in _chunks(redactor.wrap(joblogs.tail_text(path, tail, end), flush)):
        yield chunk


async def _chunks(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Each chunk read (and redacted) in a worker thread."""
    while True:
        chunk = await run_in_threadpool(next, chunks, None)
        if chunk is None:
            return
        yield chunk


def _ended(why: str) -> bytes:
    return (
        f"\n[lm-eval-server: stopped following: {why}; request the log again to go on]\n".encode()
    )


async def _follow(  # type: ignore[no-untyped-def]
    manager: JobManager,
    job_id: int,
    path,
    tail: int | None,
    inode: int | None,
    size: int,
    limits: _FollowLimits,
    redactor: StreamRedactor,
) -> AsyncIterator[bytes]:
    started = last_output = time.monotonic()
    async for chunk in _read(path, tail, size, redactor, flush=False):
        yield chunk
    follower = joblogs.LogFollower(path, inode, size)

    def read_new() -> tuple[bool, bytes]:
        # A value cut in two by the read is held back (redactor) until its end arrives.
        raw = follower.read_new()
        return bool(raw), redactor.feed(raw)

    while True:
        got, data = await run_in_threadpool(read_new)
        now = time.monotonic()
        if now - started >= limits.total_s:
            ended = _ended(f"open for {limits.total_s:g} s (LOG_FOLLOW_MAX_S)")
            yield data + redactor.flush() + ended
            return
        if got:
            last_output = now
            if data:
                yield data
            continue
        if now - last_output >= limits.idle_s:
            yield redactor.flush() + _ended(
                f"no new output for {limits.idle_s:g} s (LOG_FOLLOW_IDLE_S)"
            )
            return
        try:
            finished = manager.get(job_id).status.is_terminal()
        except LookupError:
            return
        if finished:
            # The supervisor writes its last bytes before the job is marked finished.
            _, last = await run_in_threadpool(read_new)
            if last := last + redactor.flush():
                yield last
            return
        await asyncio.sleep(FOLLOW_POLL_S)
