"""HTTP handlers. Thin on purpose: authenticate, validate and shape here;
state changes through app.queue.operations.Queue (the SQL functions), reads
through app.queue.reads.Reads.

Status codes: 201 created (200 when an idempotency key matched an existing
request), 400 invalid input, 401 no/unknown key, 403 not an admin, 404
unknown model or request (another key's request reads as unknown), 409
wrong state, 413 body too large, 415 not JSON, 429 queue full or key over
its rate limit (Retry-After), 502 the model failed a real-time call, 503
database unavailable (Retry-After), 504 real-time call timed out.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from litestar import Request, Response, delete, get, post, put
from litestar.types import ASGIApp

from app.api.auth import FORBIDDEN, Principal
from app.api.errors import ApiError, invalid
from app.api.keys import create_key, list_keys, revoke_key
from app.api.metrics import render_metrics
from app.api.realtime import TERMINAL
from app.api.schemas import (
    ApiKeyCreateBody,
    AsyncPredictBody,
    BatchBody,
    ModelUpdateBody,
    PipelineBatchBody,
    PipelineBody,
    PipelinePredictBody,
    RealtimeItem,
)
from app.api.state import ApiState
from app.api.validation import (
    check_item,
    check_numbers,
    check_json_content_type,
    decode,
    decode_any_json,
    query_float,
    query_int,
)
from app.queue.errors import UnknownModel

JSON = "application/json"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_encode = msgspec.json.encode


def _api(request: Request[Any, Any, Any]) -> ApiState:
    return request.app.state.api  # type: ignore[no-any-return]


def _header(request: Request[Any, Any, Any], name: bytes) -> str | None:
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class RawJson:
    """A finished JSON answer, sent as is: the handlers build their bodies
    with msgspec (or splice stored JSON text), so Litestar's Response
    machinery (headers object, serialization) is skipped on the hot path."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(self.body))]
        if self.headers:
            headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> RawJson:
    return RawJson(status, body, headers)


async def _principal(request: Request[Any, Any, Any], api: ApiState, admin: bool = False) -> Principal:
    principal = await api.keys.authenticate(_header(request, b"authorization"))
    if admin and not principal.is_admin:
        raise FORBIDDEN
    return principal


def _rate_limit(principal: Principal) -> None:
    wait = principal.take()
    if wait:
        raise ApiError(429, "Authorization: this key is over its rate limit",
                       [("Authorization", "over the key's rate_limit_per_second")],
                       headers={"Retry-After": str(max(1, math.ceil(wait)))})


def _model(model: str) -> str:
    if not MODEL_NAME.fullmatch(model):
        raise UnknownModel(f"model {model!r}: unknown model")
    return model


def _new_name(value: str, field: str) -> str:
    """A name a client creates (a model, a pipeline): 400 naming the field when it breaks the rule."""
    if not MODEL_NAME.fullmatch(value):
        raise invalid(field, "must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}")
    return value


def _request_id(value: str) -> str:
    try:
        return str(UUID(value))
    except ValueError:
        raise invalid("request_id", "must be a UUID") from None


async def _json_body(request: Request[Any, Any, Any], limit: int | None = None) -> bytes:
    check_json_content_type(_header(request, b"content-type"))
    return await _read_body(request, limit or _api(request).settings.max_body_bytes)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"body: must be at most {limit} bytes", [("body", f"must be at most {limit} bytes")])


async def _read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    """The body, refused with 413 beyond `limit` (announced or streamed)."""
    announced = _header(request, b"content-length")
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise _too_large(limit)
    receive = request.receive
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False) and message["type"] == "http.request":
        if len(body) > limit:
            raise _too_large(limit)
        return body  # the common case: one message
    chunks = [body]
    size = len(body)
    if size > limit:
        raise _too_large(limit)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] != "http.request":
            raise ApiError(400, "body: the client went away before sending it all", [("body", "incomplete")])
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    if message["type"] != "http.request":
        raise ApiError(400, "body: the client went away before sending it all", [("body", "incomplete")])
    return b"".join(chunks)


def _not_found(request_id: str) -> ApiError:
    return ApiError(404, f"request {request_id}: not found", [("request_id", "no such request for this key")])


# -- async requests -------------------------------------------------------------


@post("/v1/models/{model:str}/async_predict", status_code=201, tags=["requests"])
async def async_predict(request: Request[Any, Any, Any], model: str) -> ASGIApp:
    """Queue one request; answers at once with its id. Concurrent calls share one insert."""
    api = _api(request)
    principal = await _principal(request, api)
    _rate_limit(principal)
    body = await _json_body(request)
    _model(model)
    item = decode(body, AsyncPredictBody)
    await check_item(item, api.urls, api.settings.max_metadata_bytes)
    result = await api.batcher.submit(model, principal.key_id, _encode(item))
    api.submitted[model] += 1
    return _json(201 if result.created else 200, b'{"request_id":"%s"}' % str(result.request_id).encode())


@post("/v1/models/{model:str}/async_predict_batch", status_code=201, tags=["requests"], request_max_body_size=None)
async def async_predict_batch(request: Request[Any, Any, Any], model: str) -> ASGIApp:
    """Queue many requests in one transaction: all are accepted or none. Ids in input order."""
    api = _api(request)
    principal = await _principal(request, api)
    _rate_limit(principal)
    body = await _json_body(request, api.settings.max_batch_body_bytes)
    _model(model)
    items = decode(body, BatchBody).requests
    await _check_batch(api, items)
    results = await api.queue.submit(model, _encode(items), principal.key_id)
    api.submitted[model] += len(results)
    ids = b'","'.join(str(r.request_id).encode() for r in results)
    status = 201 if any(r.created for r in results) else 200
    return _json(status, b'{"request_ids":["%s"]}' % ids)


async def _check_batch(api: ApiState, items: list[Any]) -> None:
    """The rules msgspec cannot express, for every item of a bulk submit (400 naming requests[i].field)."""
    limit = api.settings.max_batch_items
    if not items:
        raise invalid("requests", "must hold at least one request")
    if len(items) > limit:
        raise invalid("requests", f"must hold at most {limit} requests (got {len(items)})")
    max_meta = api.settings.max_metadata_bytes
    for index, item in enumerate(items):
        check_numbers(bytes(item.model_input), f"requests[{index}].model_input")
        if item.metadata is not msgspec.UNSET or item.webhook_endpoint is not None or item.output_url is not None \
                or bytes(item.model_input) == b"null":
            await check_item(item, api.urls, max_meta, prefix=f"requests[{index}].")


def _status_body(s: Any) -> dict[str, Any]:
    status = s.state
    if status in TERMINAL and s.webhook_status == "FAILED":
        status = "WEBHOOK_FAILED"
    body: dict[str, Any] = {
        "request_id": str(s.request_id),
        "model": s.model,
        "status": status,
        "webhook_status": s.webhook_status,
        "priority": s.priority,
        "attempts": s.attempts,
        "created_at": s.created_at,
        "started_at": s.started_at,
        "finished_at": s.finished_at,
        "time_in_queue_ms": s.time_in_queue_ms,
    }
    if s.queue_position is not None:
        body["queue_position"] = s.queue_position
    if s.state == "FAILED" and s.error is not None:
        body["error"] = s.error
    if s.stored_url:
        body["output_url"] = s.stored_url
    if s.cancel_requested and s.state == "IN_PROGRESS":
        body["cancel_requested"] = True
    return body


def _ms(start: datetime | None, end: datetime | None) -> int | None:
    return None if start is None or end is None else int((end - start).total_seconds() * 1000)


STEP_STATES = ("QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "CANCELED", "EXPIRED")


def _pipeline_body(steps: list[Any], run_state: str) -> dict[str, Any]:
    """The `pipeline` part of a run's status: each step's status and timings."""
    out = []
    for st in steps:
        counts = dict(zip(STEP_STATES, (st.queued, st.in_progress, st.succeeded, st.failed, st.canceled, st.expired)))
        if st.requests == 0:
            status = "SKIPPED" if st.step < st.current_step else "PENDING" if run_state == "IN_PROGRESS" else "NOT_RUN"
        else:
            # the most telling state among the step's requests
            status = next(s for s in ("IN_PROGRESS", "QUEUED", "FAILED", "EXPIRED", "CANCELED", "SUCCEEDED")
                          if counts[s])
        item: dict[str, Any] = {"step": st.step, "model": st.model, "status": status, "num_requests": st.requests}
        if st.fan_out:
            item["fan_out"] = True
            item["requests_by_status"] = {k: v for k, v in counts.items() if v}
        if st.request_id is not None:
            item["request_id"] = str(st.request_id)
        if st.created_at is not None:
            item.update(created_at=st.created_at, started_at=st.started_at, finished_at=st.finished_at,
                        time_in_queue_ms=_ms(st.created_at, st.started_at), run_time_ms=_ms(st.started_at, st.finished_at))
        out.append(item)
    return {"name": steps[0].pipeline if steps else "", "current_step": steps[0].current_step if steps else 0,
            "steps": out}


@get("/v1/async_request/{request_id:str}", tags=["requests"])
async def request_status(request: Request[Any, Any, Any], request_id: str) -> ASGIApp:
    """A request's status; `queue_position` while it waits (0: next to run)."""
    api = _api(request)
    principal = await _principal(request, api)
    rid = _request_id(request_id)
    status = await api.reads.request_status(rid, principal.scope)
    if status is None:
        raise _not_found(rid)
    body = _status_body(status)
    if status.model.startswith("pipeline:"):
        body["pipeline"] = _pipeline_body(await api.reads.pipeline_status(rid), status.state)
    return _json(200, _encode(body))


@get("/v1/async_request/{request_id:str}/output", tags=["requests"])
async def request_output(request: Request[Any, Any, Any], request_id: str) -> ASGIApp:
    """The output (or final error) of a finished request while retained; 409 while it is not finished."""
    api = _api(request)
    principal = await _principal(request, api)
    rid = _request_id(request_id)
    out = await api.reads.request_output(rid, principal.scope)
    if out is None:
        raise _not_found(rid)
    if out.state not in TERMINAL:
        raise ApiError(409, f"request {rid}: is {out.state}; the output exists once it finishes",
                       [("request_id", "must be finished")], extra={"request_status": out.state})
    if out.state in ("CANCELED", "EXPIRED"):
        raise ApiError(404, f"request {rid}: ended {out.state} and has no output",
                       [("request_id", f"ended {out.state}; no output")], extra={"request_status": out.state})
    if not out.has_output_row or (out.output_json is None and out.error_json is None and not out.stored_url):
        raise ApiError(404, f"request {rid}: its output is no longer retained",
                       [("request_id", "output past its retention")], extra={"request_status": out.state})
    parts = [b'{"request_id":"', rid.encode(), b'","status":"', out.state.encode(), b'"']
    if out.output_json is not None:
        parts += [b',"output":', out.output_json.encode()]
    if out.error_json is not None:
        parts += [b',"error":', out.error_json.encode()]
    if out.stored_url:
        parts += [b',"output_url":', _encode(out.stored_url)]
    parts.append(b"}")
    return _json(200, b"".join(parts))


@get("/v1/async_request/{request_id:str}/events", tags=["requests"])
async def request_events(request: Request[Any, Any, Any], request_id: str) -> ASGIApp:
    """The request's event log, oldest first, with captured model log lines (`kind: log`).
    Page with `?after=<last event id>&limit=<n>`."""
    api = _api(request)
    principal = await _principal(request, api)
    rid = _request_id(request_id)
    query = request.query_params
    after = query_int(query.get("after", 0), "after", 0, 2**62)
    limit = query_int(query.get("limit", 1000), "limit", 1, 10_000)
    events = await api.reads.request_events(rid, principal.scope, after, limit)
    if events is None:
        raise _not_found(rid)
    out = []
    for e in events:
        item: dict[str, Any] = {"id": e.id, "at": e.at, "kind": e.kind}
        if e.state is not None:
            item["state"] = e.state
        if e.attempt is not None:
            item["attempt"] = e.attempt
        if e.worker_id is not None:
            item["worker_id"] = e.worker_id
        if e.detail_json is not None:
            item["detail"] = msgspec.Raw(e.detail_json.encode())
        if e.step_request_id is not None:  # a pipeline run's log: an event of one of its steps
            item["request_id"] = str(e.step_request_id)
            item["step"] = e.step
            item["item"] = e.item
        out.append(item)
    return _json(200, _encode({"request_id": rid, "events": out}))


@delete("/v1/async_request/{request_id:str}", status_code=200, tags=["requests"])
async def cancel_request(request: Request[Any, Any, Any], request_id: str) -> ASGIApp:
    """Cancel: a queued request ends CANCELED at once (200); a running one is asked to stop (202);
    a finished one answers 409 with its status."""
    api = _api(request)
    principal = await _principal(request, api)
    rid = _request_id(request_id)
    result = await api.queue.cancel(rid, principal.scope)
    if result is None:
        raise _not_found(rid)
    body = {"request_id": rid, "status": result.state, "canceled": result.state == "CANCELED",
            "cancel_requested": result.cancel_requested}
    if result.state == "IN_PROGRESS":
        return _json(202, _encode(body))
    if result.state == "CANCELED" and result.changed:
        return _json(200, _encode(body))
    raise ApiError(409, f"request {rid}: is already {result.state}", [("request_id", "must be QUEUED or IN_PROGRESS")],
                   extra={"request_status": result.state})


@get("/v1/models/{model:str}/async_queue_status", tags=["requests"])
async def queue_status(request: Request[Any, Any, Any], model: str) -> ASGIApp:
    """How many requests of a model wait and run, against its capacity."""
    api = _api(request)
    await _principal(request, api)
    status = await api.reads.queue_status(_model(model))
    if status is None:
        raise UnknownModel(f"model {model!r}: unknown model")
    return _json(200, _encode({
        "model": status.model,
        "num_queued_requests": status.queued,
        "num_in_progress_requests": status.in_progress,
        "capacity": status.capacity,
        "paused": status.paused,
        "max_queue_depth": status.max_queue_depth,
        "oldest_queued_age_seconds": status.oldest_queued_age_seconds,
        "queued_by_priority": {"-1": status.queued_realtime, "0": status.queued_p0, "1": status.queued_p1,
                               "2": status.queued_p2},
    }))


# -- pipelines ----------------------------------------------------------------------


@post("/v1/pipelines/{name:str}/async_predict", status_code=201, tags=["pipelines"])
async def pipeline_async_predict(request: Request[Any, Any, Any], name: str) -> ASGIApp:
    """Start a pipeline run; answers at once with one request_id for the whole run. Each step
    is queued on its own model (its capacity, priority order, retries, leases); the webhook
    and the output location receive the final output once. With `steps` in the body the
    pipeline is given inline and {name} is only its label."""
    api = _api(request)
    principal = await _principal(request, api)
    _rate_limit(principal)
    body = await _json_body(request)
    _new_name(name, "name")
    item = decode(body, PipelinePredictBody)
    await check_item(item, api.urls, api.settings.max_metadata_bytes)
    inline = None if item.steps is msgspec.UNSET else _encode(item.steps).decode()
    [result] = await api.queue.submit_pipeline(name, _encode(item), principal.key_id, inline)
    api.submitted[f"pipeline:{name}"] += 1
    return _json(201 if result.created else 200, b'{"request_id":"%s"}' % str(result.request_id).encode())


@post("/v1/pipelines/{name:str}/async_predict_batch", status_code=201, tags=["pipelines"],
      request_max_body_size=None)
async def pipeline_async_predict_batch(request: Request[Any, Any, Any], name: str) -> ASGIApp:
    """Start many runs of a pipeline in one transaction: all are accepted or none. Ids in input order."""
    api = _api(request)
    principal = await _principal(request, api)
    _rate_limit(principal)
    body = await _json_body(request, api.settings.max_batch_body_bytes)
    _new_name(name, "name")
    batch = decode(body, PipelineBatchBody)
    await _check_batch(api, batch.requests)
    inline = None if batch.steps is msgspec.UNSET else _encode(batch.steps).decode()
    results = await api.queue.submit_pipeline(name, _encode(batch.requests), principal.key_id, inline)
    api.submitted[f"pipeline:{name}"] += len(results)
    ids = b'","'.join(str(r.request_id).encode() for r in results)
    return _json(201 if any(r.created for r in results) else 200, b'{"request_ids":["%s"]}' % ids)


def _pipeline_decl(row: tuple[Any, ...]) -> dict[str, Any]:
    name, steps, created_at, updated_at = row
    return {"name": name, "steps": steps, "created_at": created_at, "updated_at": updated_at}


@get("/v1/pipelines", tags=["pipelines"])
async def list_pipelines(request: Request[Any, Any, Any]) -> ASGIApp:
    """Every declared pipeline with its steps."""
    api = _api(request)
    await _principal(request, api)
    return _json(200, _encode({"pipelines": [_pipeline_decl(r) for r in await api.reads.pipelines()]}))


@get("/v1/pipelines/{name:str}", tags=["pipelines"])
async def get_pipeline(request: Request[Any, Any, Any], name: str) -> ASGIApp:
    """One declared pipeline."""
    api = _api(request)
    await _principal(request, api)
    found = await api.reads.pipelines(name)
    if not found:
        raise ApiError(404, f"pipeline {name}: unknown pipeline", [("name", "must name a declared pipeline")])
    return _json(200, _encode(_pipeline_decl(found[0])))


@put("/v1/pipelines/{name:str}", status_code=200, tags=["pipelines"])
async def put_pipeline(request: Request[Any, Any, Any], name: str) -> ASGIApp:
    """Declare a pipeline or replace its steps; runs already started keep the steps they began with (admin)."""
    api = _api(request)
    await _principal(request, api, admin=True)
    body = await _json_body(request)
    _new_name(name, "name")
    declaration = decode(body, PipelineBody)
    existed = bool(await api.reads.pipelines(name))
    row = await api.queue.upsert_pipeline(name, _encode(declaration.steps).decode())
    return _json(200 if existed else 201, _encode({**row, "created_at": _timestamp(row["created_at"]),
                                                   "updated_at": _timestamp(row["updated_at"])}))


@delete("/v1/pipelines/{name:str}", status_code=200, tags=["pipelines"])
async def delete_pipeline(request: Request[Any, Any, Any], name: str) -> ASGIApp:
    """Remove a declaration; runs in flight finish with their own copy of the steps (admin)."""
    api = _api(request)
    await _principal(request, api, admin=True)
    if not await api.queue.delete_pipeline(name):
        raise ApiError(404, f"pipeline {name}: unknown pipeline", [("name", "must name a declared pipeline")])
    return _json(200, _encode({"name": name, "deleted": True}))


# -- real time --------------------------------------------------------------------


@post("/v1/models/{model:str}/predict", status_code=200, tags=["requests"])
async def predict(request: Request[Any, Any, Any], model: str) -> ASGIApp:
    """Real-time call: the body is the model input; the answer is the model output.
    Queued ahead of every async priority on the same capacity; waits (woken by NOTIFY)
    up to `?timeout_seconds=` (default ASYNCINFER_PREDICT_TIMEOUT_SECONDS), then 504 and
    the request is canceled. Header X-Request-Id names the request."""
    api = _api(request)
    principal = await _principal(request, api)
    _rate_limit(principal)
    s = api.settings
    raw_timeout = request.query_params.get("timeout_seconds")
    timeout = s.predict_timeout_seconds if raw_timeout is None else \
        query_float(raw_timeout, "timeout_seconds", 0.01, s.predict_max_timeout_seconds)
    body = await _json_body(request)
    _model(model)
    model_input = decode_any_json(body)
    check_numbers(bytes(model_input), "body")
    if not api.hub.running:
        raise ApiError(503, "real-time calls are unavailable until the listen connection is up",
                       headers={"Retry-After": str(s.retry_after_seconds)})
    deadline = time.monotonic() + timeout
    item = RealtimeItem(model_input=model_input, priority=-1,
                        max_time_in_queue_seconds=min(max(10, math.ceil(timeout)), 259_200))
    submitted = await api.batcher.submit(model, principal.key_id, _encode(item))
    rid = str(submitted.request_id)
    headers = {"X-Request-Id": rid}
    future = api.hub.register(rid)
    try:
        state = await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
    except asyncio.CancelledError:  # the server is stopping or the call was dropped: nobody will read it
        api.spawn(api.queue.cancel(rid, principal.key_id))
        raise
    except TimeoutError:
        result = await api.queue.cancel(rid, principal.key_id)
        state = result.state if result is not None else "CANCELED"
        if state not in ("SUCCEEDED", "FAILED"):  # else it finished just now: answer it
            api.realtime["timeout"] += 1
            raise ApiError(504, f"request {rid}: no result within {timeout:g} s; canceled",
                           [("timeout_seconds", f"no result within {timeout:g} s")], headers=headers,
                           extra={"request_id": rid}) from None
    finally:
        api.hub.unregister(rid)
    api.realtime[state.lower()] += 1
    return _realtime_answer(await api.reads.request_output(rid, None), rid, state, headers)


def _realtime_answer(out: Any, rid: str, state: str, headers: dict[str, str]) -> RawJson:
    if out is not None:
        state = out.state
    extra = {"request_id": rid, "request_status": state}
    if state == "SUCCEEDED" and out is not None:
        if out.output_json is not None:
            return _json(200, out.output_json.encode(), headers)
        if out.stored_url:
            return _json(200, b'{"output_url":%s}' % _encode(out.stored_url), headers)
        return _json(200, b"null", headers)
    if state == "FAILED":
        error = msgspec.Raw(out.error_json.encode()) if out is not None and out.error_json else None
        raise ApiError(502, f"request {rid}: the model failed", headers=headers, extra={**extra, "error": error})
    if state == "EXPIRED":
        raise ApiError(504, f"request {rid}: expired before a worker took it", headers=headers, extra=extra)
    raise ApiError(409, f"request {rid}: ended {state}", [("request_id", f"ended {state}")], headers=headers,
                   extra=extra)


# -- admin: models ----------------------------------------------------------------------


def _model_body(m: dict[str, Any]) -> dict[str, Any]:
    retry = {k: v for k, v in (("max_attempts", m.get("default_max_attempts")),
                               ("initial_delay_ms", m.get("default_initial_delay_ms")),
                               ("max_delay_ms", m.get("default_max_delay_ms"))) if v is not None}
    defaults = {k: v for k, v in (("priority", m.get("default_priority")),
                                  ("max_time_in_queue_seconds", m.get("default_max_time_in_queue_s")),
                                  ("output_url", m.get("default_output_url"))) if v is not None}
    if retry:
        defaults["inference_retry_config"] = retry
    return {"name": m["name"], "capacity": m["capacity"], "in_flight": m["in_flight"], "paused": m["paused"],
            "max_queue_depth": m.get("max_queue_depth"), "defaults": defaults,
            "created_at": _timestamp(m["created_at"]), "updated_at": _timestamp(m["updated_at"])}


def _timestamp(value: Any) -> Any:
    """to_jsonb's timestamp text as a datetime, so every answer spells time the same way."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


@get("/v1/models", tags=["admin"])
async def list_models(request: Request[Any, Any, Any]) -> ASGIApp:
    """Every model with its capacity, in-flight count, pause flag, queue limit and defaults (admin)."""
    api = _api(request)
    await _principal(request, api, admin=True)
    return _json(200, _encode({"models": [_model_body(m) for m in await api.reads.models()]}))


@get("/v1/models/{model:str}", tags=["admin"])
async def get_model(request: Request[Any, Any, Any], model: str) -> ASGIApp:
    """One model's settings (admin)."""
    api = _api(request)
    await _principal(request, api, admin=True)
    found = await api.reads.models(_model(model))
    if not found:
        raise UnknownModel(f"model {model!r}: unknown model")
    return _json(200, _encode(_model_body(found[0])))


@put("/v1/models/{model:str}", status_code=200, tags=["admin"])
async def put_model(request: Request[Any, Any, Any], model: str) -> ASGIApp:
    """Create a model (201) or change it (200): fields left out keep their value,
    null clears an optional one (admin)."""
    api = _api(request)
    await _principal(request, api, admin=True)
    body = await _json_body(request)
    _new_name(model, "model")
    update = decode(body, ModelUpdateBody)
    changes: dict[str, Any] = {}
    if update.capacity is not msgspec.UNSET:
        changes["capacity"] = update.capacity
    if update.paused is not msgspec.UNSET:
        changes["paused"] = update.paused
    if update.max_queue_depth is not msgspec.UNSET:
        changes["max_queue_depth"] = update.max_queue_depth
    if update.defaults is not msgspec.UNSET:
        raw = msgspec.json.decode(body).get("defaults") or {}  # to tell null from absent
        d = update.defaults
        if "priority" in raw:
            changes["default_priority"] = d.priority
        if "max_time_in_queue_seconds" in raw:
            changes["default_max_time_in_queue_s"] = d.max_time_in_queue_seconds
        if "output_url" in raw:
            if d.output_url is not None:
                api.urls.storage(d.output_url, "defaults.output_url")
            changes["default_output_url"] = d.output_url
        if "inference_retry_config" in raw:
            retry_raw = raw.get("inference_retry_config") or {}
            retry = d.inference_retry_config
            for name in ("max_attempts", "initial_delay_ms", "max_delay_ms"):
                if retry is None or name in retry_raw:
                    changes[f"default_{name}"] = getattr(retry, name) if retry is not None else None
    created, row = await api.queue.update_model(model, changes)
    return _json(201 if created else 200, _encode(_model_body(row)))


# -- admin: API keys -------------------------------------------------------------------


@post("/v1/api_keys", status_code=201, tags=["admin"])
async def create_api_key(request: Request[Any, Any, Any]) -> ASGIApp:
    """Create an API key. The key is in this answer only; it is stored hashed (admin)."""
    api = _api(request)
    await _principal(request, api, admin=True)
    body = decode(await _json_body(request), ApiKeyCreateBody)
    if not body.name.strip():
        raise invalid("name", "must not be blank")
    assert api.pool is not None
    key = await create_key(api.pool, body.name.strip(), body.is_admin, body.rate_limit_per_second)
    return _json(201, _encode(key.to_json()))


@get("/v1/api_keys", tags=["admin"])
async def get_api_keys(request: Request[Any, Any, Any]) -> ASGIApp:
    """All API keys (never their secrets) (admin)."""
    api = _api(request)
    await _principal(request, api, admin=True)
    assert api.pool is not None
    return _json(200, _encode({"api_keys": [k.to_json() for k in await list_keys(api.pool)]}))


@delete("/v1/api_keys/{key_id:str}", status_code=200, tags=["admin"])
async def delete_api_key(request: Request[Any, Any, Any], key_id: str) -> ASGIApp:
    """Revoke a key; every API process stops accepting it at once (admin)."""
    api = _api(request)
    await _principal(request, api, admin=True)
    number = query_int(key_id, "key_id", 1, 2**63 - 1)
    assert api.pool is not None
    key = await revoke_key(api.pool, number)
    if key is None:
        raise ApiError(404, f"API key {number}: not found", [("key_id", "no such API key")])
    api.keys.invalidate(number)
    return _json(200, _encode(key.to_json()))


# -- admin: delivery ----------------------------------------------------------------------


@post("/v1/async_request/{request_id:str}/redeliver", status_code=200, tags=["admin"])
async def redeliver_request(request: Request[Any, Any, Any], request_id: str) -> ASGIApp:
    """Deliver a finished request's webhook and/or storage write again (?kind=webhook|storage) (admin)."""
    api = _api(request)
    await _principal(request, api, admin=True)
    rid = _request_id(request_id)
    kind = request.query_params.get("kind")
    if kind not in (None, "webhook", "storage"):
        raise invalid("kind", "must be webhook or storage")
    count = await api.queue.redeliver_request(rid, kind)
    return _json(200, _encode({"request_id": rid, "requeued_deliveries": count}))


@post("/v1/models/{model:str}/redeliver_failed", status_code=200, tags=["admin"])
async def redeliver_failed(request: Request[Any, Any, Any], model: str) -> ASGIApp:
    """Deliver again every FAILED webhook or storage write of a model's requests (admin)."""
    api = _api(request)
    await _principal(request, api, admin=True)
    count = await api.queue.redeliver_failed(model)
    return _json(200, _encode({"model": model, "requeued_deliveries": count}))


@post("/v1/webhook_secrets", status_code=201, tags=["admin"])
async def create_webhook_secret(request: Request[Any, Any, Any]) -> ASGIApp:
    """Create a webhook signing secret; it is in this answer only. Every active secret signs (admin)."""
    from app.delivery.signing import new_secret

    api = _api(request)
    await _principal(request, api, admin=True)
    secret = new_secret()
    secret_id = await api.queue.add_webhook_secret(secret)
    return _json(201, _encode({"id": secret_id, "secret": secret}))


@get("/v1/webhook_secrets", tags=["admin"])
async def list_webhook_secrets(request: Request[Any, Any, Any]) -> ASGIApp:
    """Webhook secrets: ids, dates and a hint, never the secrets (admin)."""
    api = _api(request)
    await _principal(request, api, admin=True)
    return _json(200, _encode({"webhook_secrets": await api.queue.list_webhook_secrets()}))


@delete("/v1/webhook_secrets/{secret_id:str}", status_code=200, tags=["admin"])
async def revoke_webhook_secret(request: Request[Any, Any, Any], secret_id: str) -> ASGIApp:
    """Stop signing with a secret (admin)."""
    api = _api(request)
    await _principal(request, api, admin=True)
    number = query_int(secret_id, "secret_id", 1, 2**63 - 1)
    if not await api.queue.revoke_webhook_secret(number):
        raise ApiError(404, f"webhook secret {number}: not found or already revoked",
                       [("secret_id", "no such active secret")])
    return _json(200, _encode({"id": number, "revoked": True}))


# -- operations -------------------------------------------------------------------------


@get("/healthz", tags=["operations"], security=[])
async def healthz() -> ASGIApp:
    """The process is up (does not touch the database)."""
    return _json(200, b'{"status":"ok"}')


@get("/readyz", tags=["operations"], security=[])
async def readyz(request: Request[Any, Any, Any]) -> ASGIApp:
    """Ready to serve: the database answers and is migrated to this build's head revision."""
    api = _api(request)
    try:
        revision = await api.reads.schema_revision()
    except Exception as error:  # noqa: BLE001 - any failure to read means not ready
        raise ApiError(503, f"database unavailable: {type(error).__name__}",
                       headers={"Retry-After": str(api.settings.retry_after_seconds)}) from None
    body = {"schema_revision": revision, "head_revision": api.head_revision}
    if revision != api.head_revision:
        raise ApiError(503, f"database is at revision {revision}, this build needs {api.head_revision}",
                       [("database", "must be migrated to the head revision")], extra=body,
                       headers={"Retry-After": str(api.settings.retry_after_seconds)})
    return _json(200, _encode({"status": "ready", **body}))


@get("/metrics", tags=["operations"], security=[], media_type="text/plain")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prometheus text format: queue depth by model/priority/state, in-flight against capacity,
    pending deliveries, workers, and this process's counters."""
    api = _api(request)
    text = render_metrics(await api.reads.metrics(), api)
    return Response(content=text, status_code=200, media_type="text/plain; version=0.0.4; charset=utf-8")


ROUTES = [
    async_predict, async_predict_batch, request_status, request_output, request_events, cancel_request,
    queue_status, pipeline_async_predict, pipeline_async_predict_batch, list_pipelines, get_pipeline,
    put_pipeline, delete_pipeline, predict, list_models, get_model, put_model, create_api_key, get_api_keys, delete_api_key,
    redeliver_request, redeliver_failed, create_webhook_secret, list_webhook_secrets, revoke_webhook_secret,
    healthz, readyz, metrics,
]
