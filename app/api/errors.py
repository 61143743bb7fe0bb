"""One error shape for every 4xx/5xx the API sends:

    {"status_code": 400, "detail": "priority: must be an integer between 0 and 2",
     "errors": [{"field": "priority", "rule": "must be an integer between 0 and 2"}]}

`errors` is always present (empty when no single field is to blame, e.g. a
503). Exceptions from the queue core, from psycopg and from Litestar itself
(unknown route, wrong method, body too large) are all turned into this shape
here, so no bad input can surface as a 500.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import psycopg
from litestar import Request, Response
from litestar.exceptions import HTTPException
from psycopg_pool import PoolTimeout

from app.queue import errors as qerr

log = logging.getLogger("asyncinfer.api")


class FieldError(msgspec.Struct):
    field: str
    rule: str


class ErrorBody(msgspec.Struct):
    status_code: int
    detail: str
    errors: list[FieldError]


class ApiError(Exception):
    """An answer other than success, raised from anywhere in a handler."""

    def __init__(
        self,
        status_code: int,
        detail: str,
        errors: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.errors = errors or []
        self.headers = headers
        self.extra = extra


def invalid(field: str, rule: str, status_code: int = 400) -> ApiError:
    return ApiError(status_code, f"{field}: {rule}", [(field, rule)])


def error_response(error: ApiError) -> Response[bytes]:
    body: dict[str, Any] = {
        "status_code": error.status_code,
        "detail": error.detail,
        "errors": [{"field": f, "rule": r} for f, r in error.errors],
    }
    if error.extra:
        body.update(error.extra)
    return Response(
        content=msgspec.json.encode(body),
        status_code=error.status_code,
        media_type="application/json",
        headers=error.headers,
    )


def _split_message(message: str) -> tuple[str, str]:
    """'field: rule' (the convention of the core's messages) -> (field, rule)."""
    field, sep, rule = message.partition(": ")
    if sep and field and " " not in field.strip():
        return field.strip(), rule.strip()
    return "body", f"a value PostgreSQL cannot store: {message}"


def from_exception(exc: Exception, retry_after: int) -> ApiError:
    """The ApiError for any exception a handler let escape."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, qerr.UnknownModel):
        if str(exc).startswith("pipeline "):
            return ApiError(404, str(exc), [("pipeline", "must name a declared pipeline (or give steps inline)")])
        return ApiError(404, str(exc), [("model", "must name an existing model")])
    if isinstance(exc, qerr.NotFound):
        return ApiError(404, str(exc), [("request_id", "no such request")])
    if isinstance(exc, qerr.QueueFull):
        return ApiError(429, str(exc), [("model", "queue is at its max_queue_depth; retry later")],
                        headers={"Retry-After": str(retry_after)})
    if isinstance(exc, qerr.WrongState):
        return ApiError(409, str(exc))
    if isinstance(exc, qerr.InvalidParameter):
        field, rule = _split_message(str(exc))
        return ApiError(400, str(exc), [(field, rule)])
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        # lock_timeout: another session (an admin's open transaction, say) holds the row
        return ApiError(503, "busy: another session holds what this call changes; retry later",
                        headers={"Retry-After": str(retry_after)})
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return ApiError(503, "the database did not answer in time (statement_timeout); retry later",
                        headers={"Retry-After": str(retry_after)})
    if isinstance(exc, (PoolTimeout, psycopg.OperationalError, psycopg.InterfaceError)):
        log.warning("database unavailable: %s", exc)
        return ApiError(503, "database unavailable; retry later", headers={"Retry-After": str(retry_after)})
    if isinstance(exc, (psycopg.DataError, psycopg.errors.ProgramLimitExceeded)):
        # A value PostgreSQL cannot store (numeric overflow, NUL, bad surrogate)
        # that got past validation: still the caller's input, never a 500.
        message = getattr(getattr(exc, "diag", None), "message_primary", None) or str(exc)
        return ApiError(400, f"body: value refused by the database: {message}", [("body", message)])
    if isinstance(exc, HTTPException):
        return _from_litestar(exc)
    log.exception("unhandled error", exc_info=exc)
    return ApiError(500, "internal server error")


def _from_litestar(exc: HTTPException) -> ApiError:
    status = exc.status_code
    headers = dict(exc.headers) if exc.headers else None
    if status == 404:
        return ApiError(404, "no such route", [("path", "no such route")], headers=headers)
    if status == 405:
        return ApiError(405, exc.detail or "method not allowed", [("method", "not allowed on this route")],
                        headers=headers)
    if status == 413:
        return ApiError(413, "request body is larger than allowed", [("body", "larger than the configured limit")],
                        headers=headers)
    if status == 400:
        extra = exc.extra if isinstance(exc.extra, list) else []
        errors = [(str(e.get("key", "parameter")), str(e.get("message", "invalid"))) for e in extra
                  if isinstance(e, dict)]
        return ApiError(400, exc.detail or "bad request", errors or [("parameter", exc.detail or "invalid")],
                        headers=headers)
    return ApiError(status, exc.detail or "error", headers=headers)


def exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    api = getattr(request.app.state, "api", None)
    error = from_exception(exc, api.settings.retry_after_seconds if api is not None else 2)
    if api is not None:
        api.errors[error.status_code] += 1
    return error_response(error)
