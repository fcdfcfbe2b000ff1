"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lm_eval_server.admission.catalog import IndexState
from lm_eval_server.api.deps import Manager, State

# Readiness and metrics describe the server's jobs: they sit behind the API key like the rest.
secured_router = APIRouter(tags=["operations"])


async def health() -> dict[str, str]:
    return {"status": "ok"}


def add_liveness(app: FastAPI) -> None:
    """GET /health on the app itself, first: FastAPI matches an included router's routes
    through a wrapper of its own (a second match and scope bookkeeping per request), which
    the route that probes poll most often should not pay."""
    app.add_api_route(
        "/health",
        health,
        methods=["GET"],
        tags=["operations"],
        summary="Liveness: the process answers",
    )


@secured_router.get(
    "/ready",
    summary="Readiness: store open, task index loaded (or TASK_INDEX=false), accepting jobs",
)
async def ready(state: State, manager: Manager) -> JSONResponse:
    catalog = state.catalog
    checks = {
        "store": state.store_open,
        "task_index": catalog.state in (IndexState.ready, IndexState.disabled),
        "accepting_jobs": not manager.shutting_down,
    }
    ok = all(checks.values())
    # state: building, ready, failed (with the error and when the build is tried again) or
    # disabled; submissions get 503 with the same reason until it is ready.
    body: dict[str, object] = {"ready": ok, "checks": checks, "task_index": catalog.status()}
    # Informational: which sandbox holds the jobs (docs/security.md).
    body["sandbox"] = state.sandbox_status
    pool = state.warm_pool
    if pool is not None:
        # Informational: without a ready warm worker, jobs simply start cold.
        body["warm_workers"] = {"configured": pool.size, "ready": pool.ready_count}
    return JSONResponse(body, status_code=200 if ok else 503)


@secured_router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
