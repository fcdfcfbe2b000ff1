"""The web dashboard at `/`, its static assets, and Swagger UI at `/docs` served without a CDN.

Nothing here needs an API key: the pages hold no data. The dashboard's JavaScript sends the key
(kept in the browser) with each API call, and the API checks it as for any other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# The dashboard renders job arguments and logs that any submitter controls; a strict policy keeps
# a stray `<script>` in a log line inert even if an escaping bug slipped through.
DASHBOARD_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Revalidate on every load (a cheap 304), so a server upgrade never pairs new HTML with old JS.
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)
_static = StaticFiles(directory=STATIC_DIR)


@router.get("/")
async def index() -> FileResponse:
    headers = {**NO_CACHE, "Content-Security-Policy": DASHBOARD_CSP}
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=headers)


@router.get("/static/{path:path}")
async def static(path: str, request: Request) -> Response:
    # StaticFiles refuses paths that escape STATIC_DIR and answers If-None-Match with 304.
    response = await _static.get_response(path, request.scope)
    response.headers.update(NO_CACHE)
    return response


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    # Served from static/swagger/ (a vendored swagger-ui-dist): FastAPI's default page loads
    # Swagger UI from a CDN and stays blank on machines without internet access.
    root = request.scope.get("root_path", "").rstrip("/")
    app = request.app
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - API docs",
        swagger_js_url=f"{root}/static/swagger/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/static/swagger/swagger-ui.css",
        swagger_favicon_url=f"{root}/static/swagger/favicon-32x32.png",
        swagger_ui_parameters={"persistAuthorization": True},
    )
