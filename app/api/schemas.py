"""Request and response bodies (msgspec), used to decode and validate in one
C-speed pass and to generate the OpenAPI document.

Ranges are those of DESIGN.md §2 (and of the CHECK constraints in the
schema). `model_input` and `metadata` are kept as raw JSON (msgspec.Raw):
validated as JSON but never turned into Python objects, then passed through
to PostgreSQL as they came.

Unknown fields are refused (400 naming the field): a typo such as
`"priorty": 0` must not silently fall back to the default.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Raw, Struct

Priority = Annotated[int, Meta(ge=0, le=2, description="0 is the most urgent; FIFO within a level.")]
QueueSeconds = Annotated[int, Meta(ge=10, le=259_200, description="Not started by then: EXPIRED.")]
MaxAttempts = Annotated[int, Meta(ge=1, le=10)]
InitialDelayMs = Annotated[int, Meta(ge=0, le=10_000)]
MaxDelayMs = Annotated[int, Meta(ge=0, le=60_000)]
Url = Annotated[str, Meta(min_length=1, max_length=2048)]
IdempotencyKey = Annotated[str, Meta(min_length=1, max_length=256)]
NULL = Raw(b"null")
AnyJson = Annotated[Raw, Meta(description="any JSON value except null")]
JsonObject = Annotated[Raw, Meta(description="a JSON object", extra_json_schema={"type": ["object", "null"]})]

# Rule text per field (the leaf name in a msgspec error path).
RULES: dict[str, str] = {
    "model_input": "is required: any JSON value except null",
    "priority": "must be an integer between 0 and 2",
    "max_time_in_queue_seconds": "must be an integer between 10 and 259200",
    "inference_retry_config": "must be an object {max_attempts, initial_delay_ms, max_delay_ms}",
    "max_attempts": "must be an integer between 1 and 10",
    "initial_delay_ms": "must be an integer between 0 and 10000",
    "max_delay_ms": "must be an integer between 0 and 60000",
    "webhook_endpoint": "must be an http(s) URL of at most 2048 characters",
    "output_url": "must be an s3:// or file:// URL of at most 2048 characters",
    "idempotency_key": "must be a string of 1 to 256 characters",
    "metadata": "must be a JSON object",
    "requests": "must be an array of async_predict bodies",
    "capacity": "must be an integer >= 0",
    "paused": "must be true or false",
    "max_queue_depth": "must be an integer >= 0, or null for no limit",
    "defaults": "must be an object",
    "name": "must be a string of 1 to 200 characters",
    "is_admin": "must be true or false",
    "rate_limit_per_second": "must be a number > 0, or null for no limit",
    "steps": "must be an array of 1 to 32 steps {model, input?, fan_out?}",
    "model": "must be a model name",
    "input": "must be a JSON template",
    "fan_out": "must be a JSON path such as \"$\" or \"$.chunks\"",
}


class RetryConfig(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Doubling backoff between attempts: initial_delay_ms, 2x, 4x ... capped at max_delay_ms."""

    max_attempts: MaxAttempts | None = None
    initial_delay_ms: InitialDelayMs | None = None
    max_delay_ms: MaxDelayMs | None = None


class AsyncPredictBody(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One asynchronous request. Omitted fields take the model's default, then the service's."""

    model_input: AnyJson
    webhook_endpoint: Url | None = None
    priority: Priority | None = None
    max_time_in_queue_seconds: QueueSeconds | None = None
    inference_retry_config: RetryConfig | None = None
    output_url: Url | None = None
    idempotency_key: IdempotencyKey | None = None
    metadata: JsonObject | msgspec.UnsetType = msgspec.UNSET


class BatchBody(Struct, forbid_unknown_fields=True):
    """Up to ASYNCINFER_MAX_BATCH_ITEMS requests, accepted all together or not at all."""

    requests: list[AsyncPredictBody]


class PipelineStepBody(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One step: a request of `model`. `input` is a JSON template: a string starting with
    "$" is a JSON path into the previous step's output ("$": all of it), "$input..." a path
    into the pipeline's input, "$$..." the literal "$...". Without `input` the step gets the
    previous output as is. `fan_out` (a JSON path to a list in the previous output) makes
    one request per element (the template applies to each, "$" being the element); their
    outputs are gathered, in list order, as this step's output."""

    model: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    input: Raw | msgspec.UnsetType = msgspec.UNSET
    fan_out: Annotated[str, Meta(pattern=r"^\$", max_length=1000)] | msgspec.UnsetType = msgspec.UNSET


Steps = Annotated[list[PipelineStepBody], Meta(min_length=1, max_length=32)]


class PipelineBody(Struct, forbid_unknown_fields=True):
    """A pipeline's declaration (PUT /v1/pipelines/{name})."""

    steps: Steps


class PipelinePredictBody(AsyncPredictBody, forbid_unknown_fields=True, omit_defaults=True):
    """One pipeline run: the async_predict options apply to the run (its webhook, output
    location and idempotency key) and to every step (priority, retries, queue deadline).
    With `steps`, the pipeline is given inline and {name} is only its label."""

    steps: Steps | msgspec.UnsetType = msgspec.UNSET


class PipelineBatchBody(Struct, forbid_unknown_fields=True):
    """Up to ASYNCINFER_MAX_BATCH_ITEMS runs of one pipeline, accepted all together or not at all;
    `steps` gives the pipeline inline for all of them."""

    requests: list[AsyncPredictBody]
    steps: Steps | msgspec.UnsetType = msgspec.UNSET


class RealtimeItem(Struct, omit_defaults=True):
    """What a real-time predict submits (priority -1 is reserved for it)."""

    model_input: Raw
    priority: int
    max_time_in_queue_seconds: int


class ModelDefaults(Struct, forbid_unknown_fields=True, omit_defaults=True):
    priority: Priority | None = None
    max_time_in_queue_seconds: QueueSeconds | None = None
    inference_retry_config: RetryConfig | None = None
    output_url: Url | None = None


class ModelUpdateBody(Struct, forbid_unknown_fields=True):
    """Fields left out keep their value; null clears an optional one."""

    capacity: Annotated[int, Meta(ge=0, le=1_000_000)] | msgspec.UnsetType = msgspec.UNSET
    paused: bool | msgspec.UnsetType = msgspec.UNSET
    max_queue_depth: Annotated[int, Meta(ge=0)] | None | msgspec.UnsetType = msgspec.UNSET
    defaults: ModelDefaults | msgspec.UnsetType = msgspec.UNSET


class ApiKeyCreateBody(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    is_admin: bool = False
    rate_limit_per_second: Annotated[float, Meta(gt=0)] | None = None


# -- responses (documentation; handlers encode these shapes directly) ----------


class SubmitResponse(Struct):
    request_id: str


class BatchResponse(Struct):
    request_ids: list[str]


class RequestStatusResponse(Struct, omit_defaults=True):
    request_id: str
    model: str
    status: str  # QUEUED IN_PROGRESS SUCCEEDED FAILED CANCELED EXPIRED WEBHOOK_FAILED
    webhook_status: str  # PENDING SUCCEEDED FAILED CANCELED NO_WEBHOOK_PROVIDED
    priority: int  # -1: a real-time request
    attempts: int
    created_at: datetime
    time_in_queue_ms: int
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_position: int | None = None  # while QUEUED: requests a claim takes before this one
    error: Any = None  # when FAILED
    output_url: str | None = None  # when written to object storage
    cancel_requested: bool = False


class PipelineStepStatus(Struct, omit_defaults=True):
    step: int
    model: str
    # PENDING (not reached) QUEUED IN_PROGRESS SUCCEEDED FAILED CANCELED EXPIRED,
    # SKIPPED (an empty fan-out), NOT_RUN (the run ended before it)
    status: str
    num_requests: int
    fan_out: bool = False
    request_id: str | None = None  # when the step is one request
    requests_by_status: dict[str, int] | None = None  # fan-out steps
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    time_in_queue_ms: int | None = None
    run_time_ms: int | None = None


class PipelineRunStatus(Struct):
    name: str
    current_step: int
    steps: list[PipelineStepStatus]


class PipelineRequestStatusResponse(RequestStatusResponse, omit_defaults=True):
    """A pipeline run's status: the request fields plus its steps."""

    pipeline: PipelineRunStatus | None = None


class PipelineResponse(Struct):
    name: str
    steps: list[PipelineStepBody]
    created_at: datetime
    updated_at: datetime


class PipelinesResponse(Struct):
    pipelines: list[PipelineResponse]


class DeletedResponse(Struct):
    name: str
    deleted: bool


class OutputResponse(Struct, omit_defaults=True):
    request_id: str
    status: str
    output: Any = None
    error: Any = None
    output_url: str | None = None


class Event(Struct, omit_defaults=True):
    id: int
    at: datetime
    kind: str  # submitted claimed succeeded retried failed canceled expired lease_lost requeued log ...
    state: str | None = None
    attempt: int | None = None
    worker_id: int | None = None
    detail: Any = None
    request_id: str | None = None  # in a pipeline run's log: the step request the event is of
    step: int | None = None
    item: int | None = None


class EventsResponse(Struct):
    request_id: str
    events: list[Event]


class CancelResponse(Struct):
    request_id: str
    status: str
    canceled: bool
    cancel_requested: bool


class QueueStatusResponse(Struct):
    model: str
    num_queued_requests: int
    num_in_progress_requests: int
    capacity: int
    paused: bool
    max_queue_depth: int | None
    oldest_queued_age_seconds: float | None
    queued_by_priority: dict[str, int]  # "-1" (real-time), "0", "1", "2"


class ModelResponse(Struct):
    name: str
    capacity: int
    in_flight: int
    paused: bool
    max_queue_depth: int | None
    defaults: ModelDefaults
    created_at: datetime
    updated_at: datetime


class ModelsResponse(Struct):
    models: list[ModelResponse]


class ApiKeyResponse(Struct, omit_defaults=True):
    id: int
    name: str
    prefix: str
    is_admin: bool
    created_at: datetime
    rate_limit_per_second: float | None = None
    revoked_at: datetime | None = None
    key: str | None = None  # only in the answer to a create, never again


class ApiKeysResponse(Struct):
    api_keys: list[ApiKeyResponse]


class RedeliverResponse(Struct):
    request_id: str
    requeued_deliveries: int


class RedeliverFailedResponse(Struct):
    model: str
    requeued_deliveries: int


class WebhookSecretCreated(Struct):
    id: int
    secret: str  # shown only here


class WebhookSecretInfo(Struct):
    id: int
    hint: str
    created_at: datetime
    revoked_at: datetime | None


class WebhookSecretsResponse(Struct):
    webhook_secrets: list[WebhookSecretInfo]


class WebhookSecretRevoked(Struct):
    id: int
    revoked: bool


class HealthResponse(Struct, omit_defaults=True):
    status: str
    schema_revision: str | None = None
    head_revision: str | None = None
