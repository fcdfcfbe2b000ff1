"""Tasks and models: discovery (GET /tasks, /tasks/{name}, /models) and uploads (POST, DELETE)."""

from __future__ import annotations

import bisect
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from lm_eval_server.admission import backends
from lm_eval_server.admission.catalog import IndexState
from lm_eval_server.api.deps import AuditTrail, Caller, State, Uploads
from lm_eval_server.tasks import task_rules
from lm_eval_server.tasks.uploads import UploadedTask, UploadedTaskNotFound
from lm_eval_server.team.principals import NAME_PATTERN

MAX_LIMIT = 500
# Audit trail actions (GET /audit?action=task_upload).
TASK_UPLOAD = "task_upload"
TASK_DELETE = "task_delete"
Kind = Literal["task", "group", "tag"]
Source = Literal["lm-eval", "upload"]


class TaskEntry(BaseModel):
    name: str
    kind: Kind
    output_type: str | None
    source: Source
    owner: str | None = None  # uploads only


class TaskList(BaseModel):
    tasks: list[TaskEntry]
    total: int


class TaskDetail(TaskEntry):
    config: dict[str, Any]  # the YAML's main fields
    files: list[dict[str, Any]] | None = None  # uploads: the stored files and their sizes
    docs: int | None = None  # uploads: documents lm-eval read when it checked the upload
    created_at: datetime | None = None  # uploads: ISO 8601 in UTC, as jobs' times are


class TaskCreated(TaskDetail):
    replaced: bool


class TaskDeleted(BaseModel):
    message: str
    name: str
    owner: str


class ModelEntry(BaseModel):
    name: str
    backend: str
    requires: list[str]
    extra: str | None
    installed: bool | None
    install: str | None


class ModelList(BaseModel):
    models: list[ModelEntry]


def _upload_entry(task: UploadedTask) -> TaskEntry:
    return TaskEntry(
        name=task.name,
        kind="task",
        output_type=task.output_type,
        source="upload",
        owner=task.owner,
    )


def _upload_detail(task: UploadedTask, config: dict[str, Any]) -> dict[str, Any]:
    return {
        **_upload_entry(task).model_dump(),
        "config": task_rules.summary(config),
        "files": task.files,
        "docs": task.docs,
        "created_at": _utc(task.created_at),
    }


def _utc(epoch_s: float | None) -> datetime | None:
    # Stored as epoch seconds in the upload's meta file; served as jobs serve their times.
    if not isinstance(epoch_s, int | float) or isinstance(epoch_s, bool):
        return None
    return datetime.fromtimestamp(epoch_s, UTC)


Entry = tuple[str, str, str | None, str, str | None]


def _order(entry: Entry) -> tuple[str, int, str]:
    return entry[0], entry[3] == "upload", entry[4] or ""


_RETRY = {503: {"description": "The task index is still building; see Retry-After."}}
_OWNER = Query(
    max_length=64,
    pattern=f"^{NAME_PATTERN.pattern}$",
    description="Admins: the owner whose upload is meant (default: your own, else any).",
)

router = APIRouter(tags=["tasks"])


@router.get("/tasks", response_model=TaskList, responses=_RETRY, summary="List and search tasks")
async def list_tasks(
    state: State,
    uploads: Uploads,
    caller: Caller,
    search: Annotated[
        str | None, Query(max_length=200, description="Case-insensitive substring of the name.")
    ] = None,
    kind: Kind | None = None,
    source: Source | None = None,
    limit: Annotated[int, Query(ge=0, le=MAX_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> TaskList:
    needle = (search or "").lower()
    # (name, kind, output_type, source, owner), in name order. The built-in list is cached
    # in name order, so a request filters ~15k names once and sorts only the uploads.
    entries: list[Entry] = []
    if source != "upload":
        builtin = await state.catalog.listing()
        entries = [
            (name, k, output_type, "lm-eval", None)
            for name, k, output_type, lower in builtin
            if needle in lower and (kind is None or k == kind)
        ]
    if source != "lm-eval" and kind in (None, "task"):
        own = await run_in_threadpool(uploads.list, caller)
        for task in own:
            if needle in task.name.lower():
                # lm-eval's before an upload of the same name, then by owner.
                entry: Entry = (task.name, "task", task.output_type, "upload", task.owner)
                bisect.insort(entries, entry, key=_order)
    if needle:
        # Names that start with the search first (what a person typing wants); each part
        # keeps name order, so the same query pages through the same list.
        entries = [e for e in entries if e[0].lower().startswith(needle)] + [
            e for e in entries if not e[0].lower().startswith(needle)
        ]
    page = entries[offset : offset + limit]
    return TaskList(
        tasks=[
            TaskEntry(name=n, kind=k, output_type=o, source=s, owner=w)  # type: ignore[arg-type]
            for n, k, o, s, w in page
        ],
        total=len(entries),
    )


@router.get(
    "/tasks/{name}",
    response_model=TaskDetail,
    response_model_exclude_none=True,
    responses={404: {"description": "No such task (or not yours)."}, **_RETRY},
    summary="One task's config summary",
)
async def get_task(
    name: str,
    state: State,
    uploads: Uploads,
    caller: Caller,
    owner: Annotated[str | None, _OWNER] = None,
) -> dict[str, Any]:
    # The caller's own upload first: it is what their jobs run under that name.
    try:
        task = await run_in_threadpool(uploads.get, name, caller, owner)
    except UploadedTaskNotFound:
        if owner is not None:
            raise
    else:
        config = await run_in_threadpool(uploads.config, task)
        return _upload_detail(task, config)
    found = await state.catalog.builtin_config(name)
    if found is None:
        raise UploadedTaskNotFound(
            name,
            f"No task named {name[:200]!r}: neither one of lm-eval's tasks, groups and tags "
            "nor one of your uploads (GET /tasks?search= finds names).",
        )
    kind, output_type, config = found
    return {
        "name": name,
        "kind": kind,
        "output_type": output_type,
        "source": "lm-eval",
        "config": task_rules.summary(config),
    }


@router.post(
    "/tasks",
    response_model=TaskCreated,
    response_model_exclude_none=True,
    status_code=201,
    responses={
        409: {"description": "The name is one of lm-eval's own tasks."},
        413: {"description": "The upload is larger than MAX_UPLOAD_BYTES."},
        415: {"description": "A file of a type an upload may not hold."},
        422: {"description": "The files break the rule, or lm-eval cannot load the task."},
        429: {"description": "Other uploads are being checked; see Retry-After."},
        **_RETRY,
    },
    summary="Upload a task: one task YAML and its data files",
)
async def upload_task(
    state: State,
    uploads: Uploads,
    caller: Caller,
    trail: AuditTrail,
    files: Annotated[
        list[UploadFile],
        File(
            description="One task YAML (.yaml) and the data files it names in "
            "dataset_kwargs.data_files (.jsonl, .json, .csv), one `files` field each."
        ),
    ],
) -> dict[str, Any]:
    catalog = state.catalog
    if catalog.state is IndexState.disabled:
        builtin: frozenset[str] = frozenset()
    elif catalog.task_names is None:
        raise catalog.unavailable()
    else:
        builtin = catalog.task_names
    # The whole body is already bounded by MAX_UPLOAD_BYTES (BodyLimitMiddleware).
    sent = [(f.filename or "", await f.read()) for f in files]
    task, replaced = await uploads.add(caller.name, sent, builtin)
    trail.record(
        caller,
        TASK_UPLOAD,
        outcome=f"{'replaced' if replaced else 'stored'}: {task.docs} documents",
        target=f"{task.owner}/{task.name}",
    )
    config = await run_in_threadpool(uploads.config, task)
    return {**_upload_detail(task, config), "replaced": replaced}


@router.delete(
    "/tasks/{name}",
    response_model=TaskDeleted,
    responses={404: {"description": "No upload of yours has this name."}},
    summary="Delete an uploaded task",
)
async def delete_task(
    name: str,
    uploads: Uploads,
    caller: Caller,
    trail: AuditTrail,
    owner: Annotated[str | None, _OWNER] = None,
) -> TaskDeleted:
    task = await uploads.delete(name, caller, owner)
    trail.record(caller, TASK_DELETE, outcome="deleted", target=f"{task.owner}/{task.name}")
    return TaskDeleted(message=f"Uploaded task {name} deleted.", name=task.name, owner=task.owner)


@router.get("/models", response_model=ModelList, summary="The models lm-eval accepts here")
async def list_models() -> dict[str, Any]:
    return {"models": await run_in_threadpool(backends.describe_models)}
