"""What jobs leave behind: results, samples and logs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from lm_eval_server import joblogs, results
from lm_eval_server.api.deps import Manager
from lm_eval_server.manager import JobManager
from lm_eval_server.models import JobResults, Metric

router = APIRouter(tags=["results and logs"])
FOLLOW_POLL_S = 0.25


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
async def get_results(manager: Manager, job_id: int) -> JobResults:
    data, path = await run_in_threadpool(manager.results, job_id)
    metrics = [Metric(**row) for row in results.flatten_metrics(data)]
    return JobResults(job_id=job_id, results=data, metrics=metrics, results_file=str(path))


@router.get(
    "/job/{job_id}/samples",
    response_class=FileResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
async def get_samples(
    manager: Manager, job_id: int, task: Annotated[str, Query(min_length=1, max_length=500)]
) -> FileResponse:
    try:
        path = manager.samples_path(job_id, task)
    except FileNotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    return FileResponse(path, media_type="application/x-ndjson", filename=path.name)


@router.get(
    "/job/{job_id}/logs",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/plain": {}}}},
    summary="A job's stdout or stderr as text; follow=true streams until the job ends",
)
async def get_logs(
    manager: Manager,
    job_id: int,
    stream: Stream = Stream.stderr,
    tail: Annotated[int | None, Query(ge=0, le=1_000_000)] = None,
    follow: bool = False,
) -> StreamingResponse:
    path = manager.log_path(job_id, stream.value)
    inode, size = joblogs.current_size(path)
    body = _follow(manager, job_id, path, tail, inode, size) if follow else _read(path, tail, size)
    return StreamingResponse(body, media_type="text/plain; charset=utf-8")


async def _read(path, tail: int | None, end: int) -> AsyncIterator[bytes]:  # type: ignore[no-untyped-def]
    chunks = joblogs.tail_text(path, tail, end)
    while True:
        chunk = await run_in_threadpool(next, chunks, None)
        if chunk is None:
            return
        yield chunk


async def _follow(  # type: ignore[no-untyped-def]
    manager: JobManager, job_id: int, path, tail: int | None, inode: int | None, size: int
) -> AsyncIterator[bytes]:
    async for chunk in _read(path, tail, size):
        yield chunk
    follower = joblogs.LogFollower(path, inode, size)
    while True:
        data = await run_in_threadpool(follower.read_new)
        if data:
            yield data
            continue
        try:
            finished = manager.get(job_id).status.is_terminal()
        except LookupError:
            return
        if finished:
            # The supervisor writes its last bytes before the job is marked finished.
            if last := await run_in_threadpool(follower.read_new):
                yield last
            return
        await asyncio.sleep(FOLLOW_POLL_S)
