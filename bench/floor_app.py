"""The floor for bench/hot_paths.py: a bare FastAPI app, one JSON POST route and one GET route.

Started the way the server is (`python -m uvicorn floor_app:app --host 127.0.0.1 --port N`,
from bench/), it is what the same uvicorn, FastAPI and pydantic cost with no work of ours: every
figure of the hot-paths bench is printed beside this app's as a ratio. A second GET route serves
a body of a given size from memory: the floor of GET /jobs, whose answer is megabytes.
"""

from __future__ import annotations

import itertools

from fastapi import FastAPI, Response
from pydantic import BaseModel, ConfigDict

app = FastAPI()
_ids = itertools.count(1)


class Submission(BaseModel):
    """The bench's job body, parsed as a model (the server's request model does the same)."""

    model_config = ConfigDict(extra="allow")
    model: str
    tasks: str | list[str]


class Accepted(BaseModel):
    message: str
    job_id: int


@app.post("/job")
async def submit(body: Submission) -> Accepted:
    job_id = next(_ids)
    return Accepted(message=f"Job {job_id} successfully queued.", job_id=job_id)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


_bodies: dict[int, bytes] = {}


@app.get("/bytes/{size}")
async def some_bytes(size: int) -> Response:
    """`size` bytes already in memory: what serving a body of that size costs by itself (the
    floor beside GET /jobs, whose answer is as large)."""
    if size not in _bodies:
        _bodies.clear()
        _bodies[size] = b'{"pad":"' + b"x" * max(0, size - 10) + b'"}'
    return Response(_bodies[size], media_type="application/json")
