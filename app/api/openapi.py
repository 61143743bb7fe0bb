"""Completing the OpenAPI document (/schema, /schema/openapi.json).

Handlers read their bodies as bytes (one msgspec decode, no intermediate
dicts), so Litestar cannot see the body and response types. They are
declared here instead, from the same msgspec Structs that validate the
bodies (msgspec's JSON Schema carries every range and required field), and
patched into the generated document at startup: request bodies, query
parameters and every response with its status code, error shape included,
enough for a client generator or a fuzzer (e.g. schemathesis).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Parameter, RequestBody

from app.api import schemas as s
from app.api.errors import ErrorBody

JSON = "application/json"
ERR = ErrorBody

# (method, path) -> (request body type or "any" or None, query parameters, {status: (description, type)})
Doc = tuple[Any, list[tuple[str, dict[str, Any], str]], dict[int, tuple[str, Any]]]

_AUTH = {401: ("missing, unknown or revoked API key", ERR)}
_ADMIN = {**_AUTH, 403: ("the key is not an admin key", ERR)}
_DB = {503: ("database unavailable (Retry-After)", ERR)}
_BODY = {400: ("invalid input: the errors name field and rule", ERR), 413: ("body too large", ERR),
         415: ("content-type is not application/json", ERR)}
_SUBMIT = {**_AUTH, **_BODY, **_DB, 404: ("unknown model", ERR),
           429: ("queue full or key over its rate limit (Retry-After)", ERR)}
_BY_ID = {**_AUTH, **_DB, 400: ("request_id is not a UUID", ERR), 404: ("no such request for this key", ERR)}

DOCS: dict[tuple[str, str], Doc] = {
    ("post", "/v1/models/{model}/async_predict"): (s.AsyncPredictBody, [], {
        201: ("queued", s.SubmitResponse), 200: ("idempotency_key matched an existing request", s.SubmitResponse),
        **_SUBMIT}),
    ("post", "/v1/models/{model}/async_predict_batch"): (s.BatchBody, [], {
        201: ("all queued, ids in input order", s.BatchResponse),
        200: ("every idempotency_key matched an existing request", s.BatchResponse), **_SUBMIT}),
    ("get", "/v1/async_request/{request_id}"): (None, [], {
        200: ("status; a pipeline run also carries `pipeline` (its steps)", s.PipelineRequestStatusResponse),
        **_BY_ID}),
    ("post", "/v1/pipelines/{name}/async_predict"): (s.PipelinePredictBody, [], {
        201: ("the run started (step 0 queued)", s.SubmitResponse),
        200: ("idempotency_key matched an existing run", s.SubmitResponse),
        **{**_SUBMIT, 404: ("unknown pipeline, or a step names an unknown model", ERR)}}),
    ("post", "/v1/pipelines/{name}/async_predict_batch"): (s.PipelineBatchBody, [], {
        201: ("all runs started, ids in input order", s.BatchResponse),
        200: ("every idempotency_key matched an existing run", s.BatchResponse),
        **{**_SUBMIT, 404: ("unknown pipeline, or a step names an unknown model", ERR)}}),
    ("get", "/v1/pipelines"): (None, [], {200: ("declared pipelines", s.PipelinesResponse), **_AUTH, **_DB}),
    ("get", "/v1/pipelines/{name}"): (None, [], {
        200: ("the pipeline", s.PipelineResponse), 404: ("unknown pipeline", ERR), **_AUTH, **_DB}),
    ("put", "/v1/pipelines/{name}"): (s.PipelineBody, [], {
        200: ("replaced", s.PipelineResponse), 201: ("declared", s.PipelineResponse), **_ADMIN, **_BODY, **_DB}),
    ("delete", "/v1/pipelines/{name}"): (None, [], {
        200: ("removed", s.DeletedResponse), 404: ("unknown pipeline", ERR), **_ADMIN, **_DB}),
    ("get", "/v1/async_request/{request_id}/output"): (None, [], {
        200: ("the output, or the final error of a FAILED request", s.OutputResponse),
        409: ("not finished yet", ERR), **_BY_ID}),
    ("get", "/v1/async_request/{request_id}/events"): (None, [
        ("after", {"type": "integer", "minimum": 0, "default": 0}, "only events with a larger id"),
        ("limit", {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}, "at most this many"),
    ], {200: ("the event log, oldest first", s.EventsResponse), **_BY_ID}),
    ("delete", "/v1/async_request/{request_id}"): (None, [], {
        200: ("canceled", s.CancelResponse), 202: ("running: its worker was asked to stop", s.CancelResponse),
        409: ("already finished (its status is in request_status)", ERR), **_BY_ID}),
    ("get", "/v1/models/{model}/async_queue_status"): (None, [], {
        200: ("queue status", s.QueueStatusResponse), 404: ("unknown model", ERR), **_AUTH, **_DB}),
    ("post", "/v1/models/{model}/predict"): ("any", [
        ("timeout_seconds", {"type": "number", "exclusiveMinimum": 0}, "wait at most this long (then 504)"),
    ], {200: ("the model output (header X-Request-Id)", "any"), 502: ("the model failed", ERR),
        504: ("no result in time; the request was canceled", ERR), 409: ("canceled meanwhile", ERR), **_SUBMIT}),
    ("get", "/v1/models"): (None, [], {200: ("all models", s.ModelsResponse), **_ADMIN, **_DB}),
    ("get", "/v1/models/{model}"): (None, [], {200: ("the model", s.ModelResponse), 404: ("unknown model", ERR),
                                               **_ADMIN, **_DB}),
    ("put", "/v1/models/{model}"): (s.ModelUpdateBody, [], {
        200: ("changed", s.ModelResponse), 201: ("created", s.ModelResponse), **_ADMIN, **_BODY, **_DB}),
    ("post", "/v1/api_keys"): (s.ApiKeyCreateBody, [], {
        201: ("created; `key` is shown only here", s.ApiKeyResponse), **_ADMIN, **_BODY, **_DB}),
    ("get", "/v1/api_keys"): (None, [], {200: ("all keys, without secrets", s.ApiKeysResponse), **_ADMIN, **_DB}),
    ("delete", "/v1/api_keys/{key_id}"): (None, [], {
        200: ("revoked", s.ApiKeyResponse), 404: ("no such key", ERR), 400: ("key_id is not an integer", ERR),
        **_ADMIN, **_DB}),
    ("post", "/v1/async_request/{request_id}/redeliver"): (None, [
        ("kind", {"type": "string", "enum": ["webhook", "storage"]}, "only this kind of delivery (default: both)"),
    ], {200: ("deliveries queued again (0: none finished yet, or no such request)", s.RedeliverResponse),
        400: ("request_id is not a UUID, or kind is not webhook or storage", ERR), **_ADMIN, **_DB}),
    ("post", "/v1/models/{model}/redeliver_failed"): (None, [], {
        200: ("FAILED deliveries of the model's requests queued again", s.RedeliverFailedResponse), **_ADMIN, **_DB}),
    ("post", "/v1/webhook_secrets"): (None, [], {
        201: ("created; `secret` is shown only here", s.WebhookSecretCreated), **_ADMIN, **_DB}),
    ("get", "/v1/webhook_secrets"): (None, [], {
        200: ("secrets as hints, never the secrets", s.WebhookSecretsResponse), **_ADMIN, **_DB}),
    ("delete", "/v1/webhook_secrets/{secret_id}"): (None, [], {
        200: ("revoked", s.WebhookSecretRevoked), 404: ("no such active secret", ERR),
        400: ("secret_id is not an integer", ERR), **_ADMIN, **_DB}),
    ("get", "/healthz"): (None, [], {200: ("the process is up", s.HealthResponse)}),
    ("get", "/readyz"): (None, [], {200: ("ready", s.HealthResponse), 503: ("not ready", ERR)}),
}


def _schemas() -> tuple[dict[Any, dict[str, Any]], dict[str, Any]]:
    types = sorted({t for doc in DOCS.values() for t in [doc[0], *(r[1] for r in doc[2].values())]
                    if isinstance(t, type)}, key=lambda t: t.__name__)
    refs, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    return dict(zip(types, refs)), components


def _content(t: Any, refs: dict[Any, dict[str, Any]]) -> dict[str, OpenAPIMediaType]:
    schema = {"description": "any JSON value"} if t == "any" else refs[t]
    return {JSON: OpenAPIMediaType(schema=schema)}  # type: ignore[arg-type]


PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "model": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
    "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
    "request_id": {"type": "string", "format": "uuid"},
    "key_id": {"type": "integer", "minimum": 1},
}


def document_operations(app: Litestar) -> None:
    spec = app.openapi_schema
    refs, components = _schemas()
    assert spec.components is not None
    schemas = dict(spec.components.schemas or {})
    schemas.update(components)
    spec.components.schemas = schemas  # type: ignore[assignment]
    for (method, path), (body, params, responses) in DOCS.items():
        item = (spec.paths or {}).get(path)
        operation = getattr(item, method, None) if item is not None else None
        if operation is None:
            continue
        for parameter in operation.parameters or []:
            if isinstance(parameter, Parameter) and parameter.param_in == "path" and parameter.name in PATH_PARAMETERS:
                parameter.schema = PATH_PARAMETERS[parameter.name]  # type: ignore[assignment]
        if body is not None:
            operation.request_body = RequestBody(content=_content(body, refs), required=True)
        if params:
            operation.parameters = [*(operation.parameters or []), *(
                Parameter(name=name, param_in="query", required=False, description=desc, schema=schema)  # type: ignore[arg-type]
                for name, schema, desc in params)]
        operation.responses = {
            str(code): OpenAPIResponse(description=desc, content=_content(t, refs) if t is not None else None)
            for code, (desc, t) in sorted(responses.items())
        }
