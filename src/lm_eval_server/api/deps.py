"""The server's state as the routes see it, and the dependencies that hand it to them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Protocol

from fastapi import Depends, Request

from lm_eval_server.admission.catalog import Catalog
from lm_eval_server.admission.validation import RequestValidator
from lm_eval_server.api.metrics import AppMetrics
from lm_eval_server.api.security import Admin, Caller
from lm_eval_server.config import Settings
from lm_eval_server.jobs.jobfiles import JobFiles
from lm_eval_server.jobs.manager import JobManager
from lm_eval_server.tasks.uploads import TaskUploads
from lm_eval_server.team.audit import Audit
from lm_eval_server.team.principals import Principal
from lm_eval_server.team.redact import Redactor
from lm_eval_server.webhooks.sender import WebhookSender


class WarmPoolStatus(Protocol):
    """What /ready reports of the warm pool (the pool itself belongs to the executor)."""

    size: int

    @property
    def ready_count(self) -> int: ...


class FollowerSlots:
    """How many follow streams are open; the cap keeps idle followers from piling up."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def acquire(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


@dataclass
class ServerState:
    """Everything the routes use, typed, in `app.state.server`. The manager and the job files
    exist from startup (the lifespan) to shutdown."""

    settings: Settings
    catalog: Catalog
    metrics: AppMetrics
    validator: RequestValidator
    keys: dict[bytes, Principal]  # each API key to its principal; empty: an open server
    log_followers: FollowerSlots
    uploads: TaskUploads
    manager: JobManager | None = None
    files: JobFiles | None = None
    webhooks: WebhookSender | None = None
    warm_pool: WarmPoolStatus | None = None
    store_open: bool = False
    audit: Audit | None = None
    # Masks injected secrets in served text; the same object as the manager's (app.py).
    redactor: Redactor = field(default_factory=Redactor)
    # The job sandbox in force (sandbox.Sandbox.describe): {"mode": "bwrap"|"off", "reason"}.
    sandbox_status: dict[str, object] = field(default_factory=lambda: {"mode": "off"})


class NotStarted(RuntimeError):
    """A route ran outside the app's lifespan (a test without `with TestClient(app)`)."""


# async dependencies: FastAPI would run a plain function in its thread pool, once per request.
async def get_state(request: Request) -> ServerState:
    return request.app.state.server  # type: ignore[no-any-return]


State = Annotated[ServerState, Depends(get_state)]


async def get_manager(state: State) -> JobManager:
    if state.manager is None:
        raise NotStarted("the server has not started (lifespan not run)")
    return state.manager


async def get_files(state: State) -> JobFiles:
    if state.files is None:
        raise NotStarted("the server has not started (lifespan not run)")
    return state.files


async def get_audit(state: State) -> Audit:
    if state.audit is None:
        raise NotStarted("the server has not started (lifespan not run)")
    return state.audit


async def get_validator(state: State) -> RequestValidator:
    return state.validator


async def get_settings(state: State) -> Settings:
    return state.settings


async def get_uploads(state: State) -> TaskUploads:
    return state.uploads


Uploads = Annotated[TaskUploads, Depends(get_uploads)]
Manager = Annotated[JobManager, Depends(get_manager)]
Files = Annotated[JobFiles, Depends(get_files)]
Validator = Annotated[RequestValidator, Depends(get_validator)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
AuditTrail = Annotated[Audit, Depends(get_audit)]

__all__ = [
    "Admin",
    "AuditTrail",
    "Caller",
    "Files",
    "Manager",
    "SettingsDep",
    "State",
    "Uploads",
    "Validator",
]
