"""Dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from lm_eval_server.manager import JobManager


async def get_manager(request: Request) -> JobManager:
    # async: FastAPI would run a plain function in its thread pool, once per request.
    return request.app.state.manager  # type: ignore[no-any-return]


Manager = Annotated[JobManager, Depends(get_manager)]
