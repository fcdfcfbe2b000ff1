"""create_app(settings): the request schema, the job manager, routers and error handlers."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lm_eval_server.admission import lm_eval_cli
from lm_eval_server.admission.catalog import Catalog, TaskLimits
from lm_eval_server.admission.validation import RequestValidator, json_safe
from lm_eval_server.api import compare, dashboard, files, gates, health, hosts, tasks, team
from lm_eval_server.api.deps import FollowerSlots, NotStarted, ServerState
from lm_eval_server.api.jobs import jobs_router
from lm_eval_server.api.metrics import AppMetrics
from lm_eval_server.api.reproduce import reproduce_router
from lm_eval_server.api.security import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    HttpGuardMiddleware,
    is_loopback,
    listen_host,
    require_api_key,
)
from lm_eval_server.config import ExecutorKind, Settings, StoreKind, load_settings
from lm_eval_server.errors import DomainError
from lm_eval_server.jobs import gpus
from lm_eval_server.jobs.jobfiles import JobFiles
from lm_eval_server.jobs.manager import JobManager
from lm_eval_server.jobs.store import JobStore, MemoryJobStore, SqliteJobStore
from lm_eval_server.runtime import job_env, sandbox
from lm_eval_server.runtime.executors.base import Executor
from lm_eval_server.tasks.uploads import TaskUploads
from lm_eval_server.team.audit import Audit, MemoryAudit, SqliteAudit
from lm_eval_server.team.principals import DEFAULT_PRINCIPAL
from lm_eval_server.team.redact import MIN_LEARNED_CHARS, Redactor
from lm_eval_server.webhooks.sender import WebhookSender

if TYPE_CHECKING:
    from lm_eval_server.runtime.executors.warm_sandboxed import AnyWarmPool

log = logging.getLogger(__name__)

EXAMPLE_REQUEST: dict[str, Any] = {
    "model": "dummy",
    "tasks": "demo_mc",
    "include_path": "examples/tasks",
    "limit": 10,
}


def _make_store(settings: Settings) -> JobStore:
    if settings.store is StoreKind.memory:
        return MemoryJobStore()
    return SqliteJobStore(settings.db_path)


def _make_audit(settings: Settings) -> Audit:
    """Beside the job store, after it: the store's migrations create the audit table."""
    if settings.store is StoreKind.memory:
        return MemoryAudit(retention_days=settings.audit_retention_days)
    return SqliteAudit(settings.db_path, retention_days=settings.audit_retention_days)


def _gpu_devices(settings: Settings) -> list[str] | None:
    """The GPU ids local jobs are given; None with Ray, which places jobs on GPUs itself."""
    if settings.executor is not ExecutorKind.local:
        return None
    found = gpus.detect(settings.gpus, os.environ)
    if found.ids:
        log.info("GPU slots: %s (from %s)", ",".join(found.ids), found.source)
    return found.ids


def _make_warm_pool(
    settings: Settings, gpu_devices: list[str] | None, job_sandbox: sandbox.Sandbox = sandbox.OFF
) -> AnyWarmPool | None:
    if settings.executor is not ExecutorKind.local or settings.warm_workers == 0:
        return None
    from lm_eval_server.runtime.executors import warm_pool, warm_sandboxed

    run_dir = settings.warm_dir
    # With GPU slots the workers see no device, like the jobs they may run (given none).
    env = job_env.worker_environment(settings, run_dir, gpus=[] if gpu_devices else None)
    if job_sandbox.enabled:
        # Each worker in its owner's job sandbox, one job each (warm_sandboxed's docstring).
        views = sandbox.Views(settings, network=settings.job_network.value == "host")
        names = {p.name for p in settings.key_table().values()} or {DEFAULT_PRINCIPAL}
        first = DEFAULT_PRINCIPAL if DEFAULT_PRINCIPAL in names else None
        if first is None and len(names) == 1:
            [first] = names
        sandboxing = warm_sandboxed.WorkerSandbox(
            views, job_sandbox.bwrap or "bwrap", settings.jobs_dir.resolve(), first
        )
        return warm_sandboxed.SandboxedWarmPool(settings.warm_workers, env, run_dir, sandboxing)
    return warm_pool.WarmPool(settings.warm_workers, env, run_dir)


def _make_executor(
    settings: Settings, warm_pool: AnyWarmPool | None = None, sandboxed: bool = False
) -> Executor:
    if settings.executor is ExecutorKind.ray:
        from lm_eval_server.runtime.executors.ray import RayExecutor  # optional dependency

        return RayExecutor(settings, sandboxed=sandboxed)  # type: ignore[return-value]
    from lm_eval_server.runtime.executors.local import LocalExecutor

    return LocalExecutor(settings.max_log_bytes, warm_pool)


def _setup_logging(level: str) -> None:
    # The server's own logger prints beside uvicorn's, unless the host app configured logging.
    logger = logging.getLogger("lm_eval_server")
    logger.setLevel(level.upper())
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    _setup_logging(settings.log_level)
    parser = lm_eval_cli.make_raising(lm_eval_cli.load_parser())
    specs = lm_eval_cli.describe_options(parser)
    request_model = lm_eval_cli.build_request_model(specs)
    catalog = Catalog(
        settings.task_index_dir,
        build_index=settings.task_index,
        limits=TaskLimits.from_settings(settings),
    )
    metrics = AppMetrics()
    gpu_devices = _gpu_devices(settings)
    # The values the server injects into jobs, masked in everything it serves (redact.py).
    redactor = Redactor()
    job_sandbox = _resolve_sandbox(settings)
    uploads = TaskUploads(settings, job_sandbox)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Job records and directories hold requests' env_vars (API keys), logs and results:
        # owner only. An existing DATA_DIR keeps its mode; jobs/ and jobs.db are tightened.
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        settings.jobs_dir.mkdir(mode=0o700, exist_ok=True)
        settings.jobs_dir.chmod(0o700)
        host = listen_host(settings.host_hint, sys.argv, dict(os.environ))
        if not settings.auth_enabled and not is_loopback(host):
            log.warning(
                "No API_KEYS set and listening on %s: anyone who can reach this port can run "
                "jobs. Set API_KEYS or API_KEYS_FILE.",
                host,
            )
        # The executor first: an unreachable Ray cluster stops startup before anything is open.
        warm_pool = _make_warm_pool(settings, gpu_devices, job_sandbox)
        executor = _make_executor(settings, warm_pool, job_sandbox.enabled)
        store = _make_store(settings)
        state.audit = _make_audit(settings)
        state.audit.prune()
        _learn_secrets(settings, redactor)
        manager = JobManager(
            settings,
            store,
            executor,
            gpu_devices=gpu_devices,
            redactor=redactor,
            job_sandbox=job_sandbox,
        )
        webhooks = WebhookSender(settings, store, redactor)
        manager.on_finish.append(webhooks.job_ended)
        metrics.watch(manager)
        state.warm_pool = warm_pool
        state.manager = manager
        state.files = JobFiles(manager)
        state.webhooks = webhooks
        state.store_open = True
        catalog.start()
        # Before the manager: jobs that ended while the server was down report through it.
        await webhooks.start()
        await asyncio.to_thread(uploads.clean_staging)
        await manager.start()
        if warm_pool is not None:
            await warm_pool.start()  # returns at once; workers warm up in their own processes
        # What startup built (lm-eval's parser and schema, the task names, the modules) lives as
        # long as the server: out of the cyclic collector's way, a full collection walks only
        # what requests allocate. Without it every full collection walked about 85,000 objects,
        # 60-80 ms with every thread stopped, and a flood of requests that each build a few
        # thousand objects (a parsed literal, a YAML) set one off every few requests.
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # collectable again (several apps may share a process, e.g. tests)
            await manager.shutdown()
            await webhooks.close()
            await catalog.close()
            await executor.close()
            if warm_pool is not None:
                await warm_pool.close()
            state.audit.close()
            store.close()
            state.store_open = False

    app = FastAPI(
        title="lm-eval-server",
        version="0.1.0",
        description="Run lm-evaluation-harness evaluations as jobs over HTTP.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,  # api/dashboard.py serves /docs from a local Swagger UI copy
    )
    state = ServerState(
        settings=settings,
        catalog=catalog,
        metrics=metrics,
        validator=RequestValidator(settings, parser, specs, catalog, gpu_devices, uploads),
        keys=settings.key_table(),
        log_followers=FollowerSlots(settings.max_log_followers),
        redactor=redactor,
        uploads=uploads,
        sandbox_status=job_sandbox.describe(),
    )
    app.state.server = state

    secured = [Depends(require_api_key)]
    health.add_liveness(app)
    app.include_router(health.secured_router, dependencies=secured)
    app.include_router(jobs_router(request_model, EXAMPLE_REQUEST), dependencies=secured)
    app.include_router(reproduce_router(request_model), dependencies=secured)
    app.include_router(files.router, dependencies=secured)
    app.include_router(compare.router, dependencies=secured)
    app.include_router(gates.router, dependencies=secured)
    app.include_router(tasks.router, dependencies=secured)
    app.include_router(team.router, dependencies=secured)
    app.include_router(dashboard.router)
    _add_error_handlers(app)
    _add_http_metrics(app, metrics)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_read_timeout_s,
        # Task uploads carry data files: their own cap, in place of MAX_BODY_BYTES.
        routes={("POST", "/tasks"): (settings.max_upload_bytes, "MAX_UPLOAD_BYTES")},
    )
    app.add_middleware(ApiKeyMiddleware, keys=lambda: state.keys)
    # Outermost: a request for a foreign Host or from a foreign site touches nothing else.
    app.add_middleware(HttpGuardMiddleware, rules=_host_rules(settings))
    return app


def _resolve_sandbox(settings: Settings) -> sandbox.Sandbox:
    """The job sandbox in force: probed once, here, so that a server that needs it and cannot
    have it never starts (sandbox.SandboxUnavailable names the reason)."""
    principals = {p.name for p in settings.key_table().values()}
    with tempfile.TemporaryDirectory(prefix="lm-eval-server-probe-") as probe_dir:
        found = sandbox.resolve(settings.sandbox, len(principals), probe_dir)
    if found.enabled:
        log.info("job sandbox: bubblewrap (%s); job network: %s", found.bwrap, settings.job_network)
    else:
        log.warning("job sandbox off (%s): jobs run as the server's user", found.reason)
    return found


def _learn_secrets(settings: Settings, redactor: Redactor) -> None:
    values = settings.secret_policy().read_all()
    redactor.add_secrets(values)
    if short := sum(1 for v in values if len(v) < MIN_LEARNED_CHARS):
        log.warning(
            "SECRETS_DIR: %d secret(s) shorter than %d characters; they are masked wherever "
            "they appear in served text, ordinary words included",
            short,
            MIN_LEARNED_CHARS,
        )


def _host_rules(settings: Settings) -> list[hosts.HostRule] | None:
    """Loopback names and the bound address always (no DNS rebinding can forge them), plus
    ALLOWED_HOSTS; `*` turns the check off."""
    bound = listen_host(settings.host_hint, sys.argv, dict(os.environ))
    if not settings.allowed_hosts and bound.strip("[]") in hosts.WILDCARD_BINDS:
        log.warning(
            "Listening on %s with the default ALLOWED_HOSTS (%s): requests that name this "
            "machine any other way get 400. Set ALLOWED_HOSTS to the names clients use.",
            bound,
            ", ".join(hosts.LOOPBACK_NAMES),
        )
    return hosts.parse_rules([*hosts.default_entries(bound), *settings.allowed_hosts])


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status_code, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def redactor(request: Request) -> Redactor:
        redactor: Redactor = request.app.state.server.redactor
        if not redactor.ready:
            await run_in_threadpool(redactor.prepare)
        return redactor

    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DomainError)
        # Known values only: our messages quote `key=value` syntax that rule 2 would mask.
        return _error(exc.status_code, (await redactor(request)).values_only(str(exc)), exc.headers)

    async def not_started(_: Request, exc: Exception) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "5"})

    app.add_exception_handler(DomainError, domain_error)
    app.add_exception_handler(NotStarted, not_started)

    async def request_invalid(request: Request, exc: Exception) -> JSONResponse:
        # FastAPI's own handler echoes each input; a NaN or a lone surrogate in it made that
        # response itself fail with a 500. The echo is redacted like any served text.
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        detail = (await redactor(request)).json(json_safe(jsonable_encoder(errors)))
        return JSONResponse({"detail": detail}, status_code=422)

    app.add_exception_handler(RequestValidationError, request_invalid)


def _add_http_metrics(app: FastAPI, metrics: AppMetrics) -> None:
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)


class HttpMetricsMiddleware:
    """Counts and times requests by route template (pure ASGI: streaming stays untouched)."""

    def __init__(self, app: ASGIApp, metrics: AppMetrics) -> None:
        self.app = app
        self.tally = metrics.http

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.tally.observe(scope["method"], path, status_code, time.perf_counter() - started)
