"""Who the caller is (GET /me) and what the team did (GET /audit, admins only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from lm_eval_server.api.deps import Admin, AuditTrail, Caller
from lm_eval_server.jobs.models import AuditEntry, AuditPage, Me
from lm_eval_server.team import audit
from lm_eval_server.team.principals import NAME_PATTERN

router = APIRouter(tags=["principals"])


@router.get("/me", response_model=Me, summary="The principal of the API key sent")
async def me(caller: Caller) -> Me:
    return Me(name=caller.name, admin=caller.admin)


@router.get(
    "/audit",
    response_model=AuditPage,
    responses={403: {"description": "The key is not an admin key (ADMIN_KEYS)."}},
    summary="Who submitted, stopped or deleted which jobs, newest first (admins only)",
)
async def get_audit(
    _: Admin,
    trail: AuditTrail,
    limit: Annotated[int, Query(ge=0, le=audit.MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    principal: Annotated[
        str | None,
        Query(pattern=f"^{NAME_PATTERN.pattern}$", description="Only this principal's actions."),
    ] = None,
    action: Annotated[
        str | None,
        Query(
            pattern=f"^{audit.ACTION_PATTERN.pattern}$",
            description="Only this action: submit, stop, delete, stop_all, delete_all, ...",
        ),
    ] = None,
    job_id: Annotated[int | None, Query(ge=1, description="Only entries naming this job.")] = None,
) -> AuditPage:
    entries, total = trail.query(audit.Query(limit, offset, principal, action, job_id))
    return AuditPage(
        entries=[
            AuditEntry(
                id=e.entry_id,
                at=e.at,
                principal=e.principal,
                admin=e.admin,
                action=e.action,
                job_ids=list(e.job_ids),
                job_count=e.job_count,
                target=e.target,
                outcome=e.outcome,
            )
            for e in entries
        ],
        total=total,
    )
