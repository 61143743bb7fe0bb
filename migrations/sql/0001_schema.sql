-- asyncinfer schema, migration 0001: tables, types, indexes.
--
-- The hot table `requests` is kept narrow: one row per request, only what the
-- queue needs to order, claim, lease, fence and finish it. Inputs, outputs and
-- the event log live in their own tables so a claim or a lease renewal never
-- rewrites a payload.

CREATE SCHEMA IF NOT EXISTS asyncinfer;

CREATE TYPE asyncinfer.request_state AS ENUM (
    'QUEUED', 'IN_PROGRESS', 'SUCCEEDED', 'FAILED', 'CANCELED', 'EXPIRED'
);

-- One row per model: its capacity and the in-flight counter that enforces it
-- across every worker process. Claims lock this row, which serializes claims
-- per model (counting running rows inside a claim races: uncommitted claims
-- are invisible to each other).
CREATE TABLE asyncinfer.models (
    name                        text        PRIMARY KEY
                                            CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'),
    capacity                    integer     NOT NULL DEFAULT 1 CHECK (capacity >= 0),
    in_flight                   integer     NOT NULL DEFAULT 0 CHECK (in_flight >= 0),
    paused                      boolean     NOT NULL DEFAULT false,
    max_queue_depth             integer     CHECK (max_queue_depth IS NULL OR max_queue_depth >= 0),
    -- per-model request defaults; NULL means "use the service default"
    default_priority            smallint    CHECK (default_priority BETWEEN 0 AND 2),
    default_max_time_in_queue_s integer     CHECK (default_max_time_in_queue_s BETWEEN 10 AND 259200),
    default_max_attempts        smallint    CHECK (default_max_attempts BETWEEN 1 AND 10),
    default_initial_delay_ms    integer     CHECK (default_initial_delay_ms BETWEEN 0 AND 10000),
    default_max_delay_ms        integer     CHECK (default_max_delay_ms BETWEEN 0 AND 60000),
    -- object-storage prefix for outputs of requests that name no output_url
    default_output_url          text,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now()
);

-- Worker processes and their heartbeats. Held leases are on the requests.
CREATE TABLE asyncinfer.workers (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text        NOT NULL,
    hostname     text        NOT NULL,
    pid          integer     NOT NULL,
    models       text[]      NOT NULL DEFAULT '{}',
    state        text        NOT NULL DEFAULT 'starting'
                             CHECK (state IN ('starting', 'healthy', 'unhealthy', 'stopped')),
    detail       text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz
);

-- The hot table. Every column here is read or written by claim, lease renewal
-- or finish. No index contains lease_expires_at: renewals stay HOT updates.
CREATE TABLE asyncinfer.requests (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    public_id         uuid        NOT NULL DEFAULT gen_random_uuid(),
    model             text        NOT NULL,
    state             asyncinfer.request_state NOT NULL DEFAULT 'QUEUED',
    -- 0..2 for async requests (0 most urgent); -1 is reserved for real-time predict
    priority          smallint    NOT NULL CHECK (priority BETWEEN -1 AND 2),
    run_at            timestamptz NOT NULL DEFAULT now(),
    attempt           smallint    NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts      smallint    NOT NULL CHECK (max_attempts BETWEEN 1 AND 10),
    initial_delay_ms  integer     NOT NULL CHECK (initial_delay_ms BETWEEN 0 AND 10000),
    max_delay_ms      integer     NOT NULL CHECK (max_delay_ms BETWEEN 0 AND 60000),
    expires_at        timestamptz NOT NULL,            -- queue deadline: not started by then => EXPIRED
    lease_owner       bigint,                          -- workers.id while IN_PROGRESS
    lease_expires_at  timestamptz,
    cancel_requested  boolean     NOT NULL DEFAULT false,
    deliver           boolean     NOT NULL DEFAULT false,   -- has a webhook or an output location
    api_key_id        bigint,
    idempotency_key   text        CHECK (length(idempotency_key) BETWEEN 1 AND 256),
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    CONSTRAINT running_has_lease CHECK (
        (state = 'IN_PROGRESS') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)
    ),
    -- max_time_in_queue_seconds, 10 s to 72 h, as stored: the deadline
    CONSTRAINT queue_deadline_range CHECK (
        expires_at BETWEEN created_at + interval '10 seconds' AND created_at + interval '72 hours'
    ),
    CONSTRAINT terminal_has_finish CHECK (
        (state IN ('SUCCEEDED', 'FAILED', 'CANCELED', 'EXPIRED')) = (finished_at IS NOT NULL)
    )
) WITH (
    fillfactor = 70,                          -- room for HOT lease renewals
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

CREATE UNIQUE INDEX requests_public_id ON asyncinfer.requests (public_id);

-- The ready set only: what a claim scans, in claim order.
CREATE INDEX requests_ready ON asyncinfer.requests (model, priority, run_at, id)
    WHERE state = 'QUEUED';

-- Queue-deadline sweep of the maintenance tick.
CREATE INDEX requests_queued_deadline ON asyncinfer.requests (expires_at)
    WHERE state = 'QUEUED';

-- The reaper and the capacity reconciler look at running rows only.
CREATE INDEX requests_running ON asyncinfer.requests (model, lease_owner)
    WHERE state = 'IN_PROGRESS';

-- Idempotent submit: one request per (API key, key). The ON CONFLICT clause in
-- submit_requests repeats this predicate word for word.
CREATE UNIQUE INDEX requests_idempotency ON asyncinfer.requests ((coalesce(api_key_id, 0)), idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Retention and reports walk finished rows by time.
CREATE INDEX requests_finished_at ON asyncinfer.requests (finished_at)
    WHERE finished_at IS NOT NULL;

-- Written once at submit, read once per claim; never updated.
CREATE TABLE asyncinfer.request_inputs (
    request_id       bigint PRIMARY KEY,
    model_input      jsonb  NOT NULL,
    webhook_endpoint text,
    output_url       text,
    metadata         jsonb
);

-- Written once when a request finishes (output or final error). An output
-- larger than the inline limit is dropped from here once it is in object
-- storage (stored_url).
CREATE TABLE asyncinfer.request_outputs (
    request_id  bigint      PRIMARY KEY,
    output      jsonb,
    error       jsonb,
    stored_url  text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The outbox: one row per webhook call or storage write owed for a finished
-- request, written in the same transaction as the finish, so a result is
-- never lost between "done" and "delivered". Dispatchers claim due rows with
-- SKIP LOCKED and a lease, like workers claim requests.
CREATE TYPE asyncinfer.delivery_state AS ENUM ('PENDING', 'SUCCEEDED', 'FAILED');

CREATE TABLE asyncinfer.deliveries (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id       bigint      NOT NULL,
    kind             text        NOT NULL CHECK (kind IN ('storage', 'webhook')),
    target           text        NOT NULL,
    state            asyncinfer.delivery_state NOT NULL DEFAULT 'PENDING',
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- Due time. A claim pushes it one lease ahead, so a dispatcher that dies
    -- mid-delivery leaves the row due again; 'infinity': a webhook waiting
    -- for its request's storage write.
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (request_id, kind)
) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02);

CREATE INDEX deliveries_due ON asyncinfer.deliveries (next_attempt_at) WHERE state = 'PENDING';

-- Webhook signing secrets. Several may be active during a rotation: every
-- active one signs each delivery. Secrets must be readable to sign (HMAC),
-- so they are kept only here, never logged, and shown once at creation.
CREATE TABLE asyncinfer.webhook_secrets (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    secret      text        NOT NULL CHECK (secret ~ '^whsec_[A-Za-z0-9+/=]{20,}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- Append-only log of every transition and of captured model log lines.
CREATE TABLE asyncinfer.request_events (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id  bigint      NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind        text        NOT NULL,   -- submitted, claimed, succeeded, retried, failed, cancel_requested, canceled, expired, lease_lost, requeued, log
    state       asyncinfer.request_state, -- state after the event (NULL for log lines)
    attempt     smallint,
    worker_id   bigint,
    detail      jsonb
) WITH (autovacuum_vacuum_insert_scale_factor = 0.05);

CREATE INDEX request_events_by_request ON asyncinfer.request_events (request_id, id);
