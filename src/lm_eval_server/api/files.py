"""What jobs leave behind: results, samples and logs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from lm_eval_server import joblogs, results
from lm_eval_server.api.deps import Caller, Files, Manager, State
from lm_eval_server.manager import JobManager
from lm_eval_server.models import JobResults, Metric
from lm_eval_server.redact import StreamRedactor

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


@router.get(
    "/job/{job_id}/samples",
    response_class=FileResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
async def get_samples(
    state: State,
    files: Files,
    caller: Caller,
    job_id: int,
    task: Annotated[str, Query(min_length=1, max_length=500)],
) -> Response:
    path = await files.samples_path(job_id, task, caller)
    if not state.redactor:
        return FileResponse(path, media_type="application/x-ndjson", filename=path.name)
    # Samples hold the model_args and whatever the model answered: known values masked.
    return StreamingResponse(
        _chunks(state.redactor.stream().wrap(_file_chunks(path))),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{path.name}"'},
    )


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
) -> StreamingResponse:
    path = files.log_path(job_id, stream.value, caller)
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
