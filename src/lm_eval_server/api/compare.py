"""GET /compare: the metrics of finished runs side by side, as JSON, CSV or Markdown."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from lm_eval_server.api import accept
from lm_eval_server.api.deps import Caller, Files
from lm_eval_server.jobs.models import Comparison
from lm_eval_server.outputs import compare

router = APIRouter(tags=["results and logs"])

JSON, CSV, MARKDOWN = "application/json", "text/csv", "text/markdown"


class CompareFormat(StrEnum):
    json = "json"
    csv = "csv"
    markdown = "markdown"


_MEDIA = {CompareFormat.json: JSON, CompareFormat.csv: CSV, CompareFormat.markdown: MARKDOWN}


@router.get(
    "/compare",
    response_model=None,
    responses={
        200: {
            "model": Comparison,
            "description": "JSON by default; `Accept: text/csv` or `text/markdown` (or "
            "format=csv|markdown) for a table to paste into a report.",
            "content": {CSV: {}, MARKDOWN: {}},
        },
        404: {"description": "A job does not exist (or belongs to someone else)."},
        409: {"description": "A job is not Completed."},
        422: {"description": "jobs is not 2 to 20 distinct ids, or alpha not in (0, 1)."},
    },
    summary="Compare Completed jobs' metrics: values, stderrs, deltas from the first job, "
    "paired significance tests",
)
async def get_compare(
    request: Request,
    files: Files,
    caller: Caller,
    jobs: Annotated[
        list[str],
        Query(
            max_length=1000,
            description=f"2 to {compare.MAX_JOBS} comma-separated job ids (or the parameter "
            "repeated); the first is the base the deltas are taken from",
            examples=["1,2,3"],
        ),
    ],
    format: CompareFormat | None = None,
    alpha: Annotated[
        float,
        Query(
            gt=0,
            lt=1,
            description="The significance level: a row's difference is significant when its "
            "test's p-value is below it",
        ),
    ] = compare.DEFAULT_ALPHA,
) -> Response:
    ids = compare.parse_job_ids(",".join(jobs))
    comparison = await files.compare(ids, caller, alpha)
    media = (
        _MEDIA[format]
        if format is not None
        else accept.preferred(request.headers.get("accept"), [JSON, CSV, MARKDOWN]) or JSON
    )
    if media == CSV:
        return Response(compare.to_csv(comparison), media_type="text/csv; charset=utf-8")
    if media == MARKDOWN:
        return Response(compare.to_markdown(comparison), media_type="text/markdown; charset=utf-8")
    return JSONResponse(Comparison(**comparison).model_dump())
