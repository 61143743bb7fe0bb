"""HTTP handlers of the dashboard.

* `GET /dashboard`: the page (a static shell: no data, no auth). It asks for
  an API key, keeps it in sessionStorage, and polls the summary below.
* `GET /dashboard/static/{name}`: its script, stylesheet and the vendored
  uPlot chart library (MIT), shipped in the package; no build step.
* `GET /v1/dashboard/summary`: the numbers, for an admin key only (a
  non-admin key gets 403: the summary covers every key's requests).

A request's detail view on the page uses the ordinary request endpoints
(`/v1/async_request/{id}`, `/events`, `/output`) with the same key.
"""

from __future__ import annotations

import math
from functools import cache
from importlib import resources
from typing import Any

from litestar import Request, Response, get
from litestar.openapi.datastructures import ResponseSpec

from app.api.auth import FORBIDDEN
from app.api.errors import ApiError, ErrorBody
from app.dashboard.queries import DashboardSummary, dashboard_summary

STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}

# The page loads only its own files and talks only to this server.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _static_files() -> dict[str, tuple[bytes, str]]:
    """{name: (content, media type)}: the files under app/dashboard/static, read once."""
    folder = resources.files("app.dashboard").joinpath("static")
    files: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in STATIC_TYPES:
            files[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    return files


def _static(name: str) -> Response[bytes]:
    found = _static_files().get(name)
    if found is None:
        raise ApiError(404, f"dashboard file {name!r}: not found", [("name", "no such dashboard file")])
    content, media_type = found
    return Response(content=content, media_type=media_type, headers=PAGE_HEADERS)


@get(["/dashboard", "/dashboard/"], include_in_schema=False, security=[])
async def dashboard_page() -> Response[bytes]:
    """The dashboard page (static; the data comes from /v1/dashboard/summary)."""
    return _static("index.html")


@get("/dashboard/static/{name:str}", include_in_schema=False, security=[])
async def dashboard_static(name: str) -> Response[bytes]:
    return _static(name)


@get(
    "/v1/dashboard/summary",
    tags=["operations"],
    responses={
        401: ResponseSpec(ErrorBody, description="missing, unknown or revoked API key", generate_examples=False),
        403: ResponseSpec(ErrorBody, description="the key is not an admin key", generate_examples=False),
        429: ResponseSpec(ErrorBody, description="the key is over its rate limit (Retry-After)", generate_examples=False),
        503: ResponseSpec(ErrorBody, description="database unavailable (Retry-After)", generate_examples=False),
    },
)
async def dashboard_summary_route(request: Request[Any, Any, Any]) -> Response[DashboardSummary]:
    """What the dashboard shows (admin): per model, queued by priority, in progress against
    capacity, finished per minute and time in queue p50/p95 per 5 minutes over the last hour,
    failed/expired counts and the oldest queued age; workers with heartbeats and held leases;
    the latest failed and expired requests; running requests that look stuck."""
    api = request.app.state.api
    header = None
    for key, value in request.scope["headers"]:
        if key == b"authorization":
            header = value.decode("latin-1")
            break
    principal = await api.keys.authenticate(header)
    if not principal.is_admin:
        raise FORBIDDEN
    wait = principal.take()  # an admin key with a rate limit keeps it here too
    if wait:
        raise ApiError(429, "Authorization: this key is over its rate limit",
                       [("Authorization", "over the key's rate_limit_per_second")],
                       headers={"Retry-After": str(max(1, math.ceil(wait)))})
    assert api.pool is not None
    summary = await dashboard_summary(api.pool)
    return Response(content=summary, headers={"Cache-Control": "no-store"})


DASHBOARD_ROUTES = [dashboard_page, dashboard_static, dashboard_summary_route]
