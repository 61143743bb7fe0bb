-- asyncinfer queue core, migration 0001: every operation that changes a
-- request's state. The API, the workers and an admin at a psql prompt all call
-- these functions, so each invariant is kept in exactly one place.
--
-- Conventions
--   * Each function is one statement or one short transaction.
--   * Lock order: a models row before request rows. Claims hold the models row
--     and take request rows with SKIP LOCKED only, so they never wait while
--     holding it; finishers and the reaper take request rows first, then the
--     models rows in name order. No cycle, no deadlock.
--   * Errors raised for callers use SQLSTATEs the API maps to HTTP codes:
--       AI404 unknown model / request, AI409 wrong state, AI429 queue full,
--       22023 invalid parameter value (message names the field and the rule).
--   * NOTIFY is a hint, never a claim. Channels:
--       asyncinfer_queue     'submit:<model>:<count>' | 'capacity:<model>:<free>'
--       asyncinfer_cancel    '<worker_id>:<request_id>:<attempt>'
--       asyncinfer_finished  '<public_id>:<state>'   (real-time requests only)
--       asyncinfer_delivery  '<count>'                (new outbox rows)

-- Backoff before retry number `attempt` (1-based): doubling from the initial
-- delay, capped at the maximum.
CREATE FUNCTION asyncinfer.retry_delay(attempt integer, initial_delay_ms integer, max_delay_ms integer)
RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT make_interval(secs => least(initial_delay_ms::float8 * power(2, greatest(attempt, 1) - 1),
                                       max_delay_ms::float8) / 1000.0)
$$;

------------------------------------------------------------------------------
-- Models
------------------------------------------------------------------------------

-- Create or update a model. NULL arguments leave the stored value as it is.
CREATE FUNCTION asyncinfer.upsert_model(
    p_name text,
    p_capacity integer DEFAULT NULL,
    p_max_queue_depth integer DEFAULT NULL,
    p_paused boolean DEFAULT NULL
) RETURNS asyncinfer.models
LANGUAGE plpgsql AS $$
DECLARE
    v_model asyncinfer.models;
BEGIN
    INSERT INTO asyncinfer.models AS m (name, capacity, max_queue_depth, paused)
    VALUES (p_name, coalesce(p_capacity, 1), p_max_queue_depth, coalesce(p_paused, false))
    ON CONFLICT (name) DO UPDATE
        SET capacity        = coalesce(p_capacity, m.capacity),
            max_queue_depth = coalesce(p_max_queue_depth, m.max_queue_depth),
            paused          = coalesce(p_paused, m.paused),
            updated_at      = now()
    RETURNING * INTO v_model;
    IF v_model.capacity > v_model.in_flight AND NOT v_model.paused THEN
        PERFORM pg_notify('asyncinfer_queue',
                          format('capacity:%s:%s', p_name, v_model.capacity - v_model.in_flight));
    END IF;
    RETURN v_model;
END
$$;

-- Create a model with an initial capacity if it does not exist; an existing
-- model is left as it is (workers call this on start, so a capacity an
-- admin set since is not overwritten by a restart).
CREATE FUNCTION asyncinfer.ensure_model(p_name text, p_capacity integer DEFAULT 1)
RETURNS asyncinfer.models
LANGUAGE plpgsql AS $$
DECLARE
    v_model asyncinfer.models;
BEGIN
    INSERT INTO asyncinfer.models (name, capacity) VALUES (p_name, coalesce(p_capacity, 1))
    ON CONFLICT (name) DO NOTHING
    RETURNING * INTO v_model;
    IF NOT FOUND THEN
        SELECT * INTO v_model FROM asyncinfer.models WHERE name = p_name;
    END IF;
    RETURN v_model;
END
$$;

CREATE FUNCTION asyncinfer.set_capacity(p_model text, p_capacity integer)
RETURNS asyncinfer.models
LANGUAGE plpgsql AS $$
DECLARE
    v_model asyncinfer.models;
BEGIN
    IF p_capacity IS NULL OR p_capacity < 0 THEN
        RAISE EXCEPTION 'capacity: must be an integer >= 0, got %', p_capacity USING ERRCODE = '22023';
    END IF;
    UPDATE asyncinfer.models SET capacity = p_capacity, updated_at = now()
     WHERE name = p_model
    RETURNING * INTO v_model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model %: unknown model', p_model USING ERRCODE = 'AI404';
    END IF;
    -- Lowering capacity below in_flight is allowed: running requests drain,
    -- claims hand out nothing until in_flight < capacity.
    IF v_model.capacity > v_model.in_flight AND NOT v_model.paused THEN
        PERFORM pg_notify('asyncinfer_queue',
                          format('capacity:%s:%s', p_model, v_model.capacity - v_model.in_flight));
    END IF;
    RETURN v_model;
END
$$;

CREATE FUNCTION asyncinfer.pause_model(p_model text)
RETURNS asyncinfer.models
LANGUAGE plpgsql AS $$
DECLARE
    v_model asyncinfer.models;
BEGIN
    UPDATE asyncinfer.models SET paused = true, updated_at = now()
     WHERE name = p_model
    RETURNING * INTO v_model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model %: unknown model', p_model USING ERRCODE = 'AI404';
    END IF;
    RETURN v_model;
END
$$;

CREATE FUNCTION asyncinfer.resume_model(p_model text)
RETURNS asyncinfer.models
LANGUAGE plpgsql AS $$
DECLARE
    v_model asyncinfer.models;
BEGIN
    UPDATE asyncinfer.models SET paused = false, updated_at = now()
     WHERE name = p_model
    RETURNING * INTO v_model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model %: unknown model', p_model USING ERRCODE = 'AI404';
    END IF;
    IF v_model.capacity > v_model.in_flight THEN
        PERFORM pg_notify('asyncinfer_queue',
                          format('capacity:%s:%s', p_model, v_model.capacity - v_model.in_flight));
    END IF;
    RETURN v_model;
END
$$;

------------------------------------------------------------------------------
-- Submit
------------------------------------------------------------------------------

-- Submit one request (a JSON object) or many (a JSON array of objects) to a
-- model in one statement. Each object has the shape of the async_predict body:
--   {model_input, priority?, max_time_in_queue_seconds?,
--    inference_retry_config?: {max_attempts?, initial_delay_ms?, max_delay_ms?},
--    webhook_endpoint?, output_url?, idempotency_key?, metadata?}
-- Returns one row per item, in input order. `created` is false when an
-- idempotency key matched an existing request (its id is returned instead).
CREATE FUNCTION asyncinfer.submit_requests(p_model text, p_items jsonb, p_api_key_id bigint DEFAULT NULL)
RETURNS TABLE (ordinal bigint, request_id uuid, created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_model   asyncinfer.models;
    v_count   integer;
    v_queued  bigint;
    v_ords    bigint[];
    v_ids     uuid[];
    v_keys    text[];
    v_new     integer;
BEGIN
    SELECT * INTO v_model FROM asyncinfer.models WHERE name = p_model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model %: unknown model', p_model USING ERRCODE = 'AI404';
    END IF;
    IF jsonb_typeof(p_items) = 'object' THEN
        p_items := jsonb_build_array(p_items);
    ELSIF jsonb_typeof(p_items) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'items: must be a JSON object or an array of objects' USING ERRCODE = '22023';
    END IF;
    v_count := jsonb_array_length(p_items);
    IF v_count = 0 THEN
        RETURN;
    END IF;
    SELECT e.ord - 1 INTO v_queued
      FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(item, ord)
     WHERE jsonb_typeof(e.item) IS DISTINCT FROM 'object' OR coalesce(e.item -> 'model_input', 'null') = 'null'
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'items[%].model_input: required (any JSON value but null)', v_queued USING ERRCODE = '22023';
    END IF;

    -- Backpressure. Counting is only paid for when a depth limit is set; two
    -- concurrent submitters may overshoot it by one batch, which is fine for
    -- a load-shedding limit (capacity, unlike this, is exact).
    IF v_model.max_queue_depth IS NOT NULL THEN
        SELECT count(*) INTO v_queued
          FROM asyncinfer.requests WHERE model = p_model AND state = 'QUEUED';
        IF v_queued + v_count > v_model.max_queue_depth THEN
            RAISE EXCEPTION 'model %: queue is full (% queued, max_queue_depth %)',
                p_model, v_queued, v_model.max_queue_depth USING ERRCODE = 'AI429';
        END IF;
    END IF;

    WITH parsed AS MATERIALIZED (
        SELECT e.ord,
               nextval('asyncinfer.requests_id_seq') AS id,
               r.model_input,
               coalesce(r.priority, v_model.default_priority, 1)                       AS priority,
               coalesce(r.max_time_in_queue_seconds, v_model.default_max_time_in_queue_s, 600)
                                                                                        AS max_time_in_queue_s,
               coalesce((r.inference_retry_config ->> 'max_attempts')::smallint,
                        v_model.default_max_attempts, 3)                               AS max_attempts,
               coalesce((r.inference_retry_config ->> 'initial_delay_ms')::integer,
                        v_model.default_initial_delay_ms, 1000)                        AS initial_delay_ms,
               coalesce((r.inference_retry_config ->> 'max_delay_ms')::integer,
                        v_model.default_max_delay_ms, 5000)                            AS max_delay_ms,
               r.webhook_endpoint,
               coalesce(r.output_url, v_model.default_output_url)                       AS output_url,
               r.idempotency_key, r.metadata
          FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(item, ord)
         CROSS JOIN LATERAL jsonb_to_record(e.item) AS r(
               model_input jsonb, priority smallint, max_time_in_queue_seconds integer,
               inference_retry_config jsonb, webhook_endpoint text, output_url text,
               idempotency_key text, metadata jsonb)
    ),
    items AS MATERIALIZED (
        SELECT p.*, asyncinfer.new_public_id(p.id) AS public_id FROM parsed p
    ),
    inserted AS (
        INSERT INTO asyncinfer.requests
               (id, public_id, model, priority, max_attempts, initial_delay_ms, max_delay_ms,
                expires_at, api_key_id, idempotency_key, deliver)
        SELECT c.id, c.public_id, p_model, c.priority, c.max_attempts, c.initial_delay_ms, c.max_delay_ms,
               now() + make_interval(secs => c.max_time_in_queue_s), p_api_key_id, c.idempotency_key,
               c.webhook_endpoint IS NOT NULL OR c.output_url IS NOT NULL
          FROM items c
         ORDER BY c.ord
        ON CONFLICT ((coalesce(api_key_id, 0)), idempotency_key) WHERE idempotency_key IS NOT NULL
        DO NOTHING
        RETURNING id, public_id
    ),
    inputs AS (
        INSERT INTO asyncinfer.request_inputs (request_id, model_input, webhook_endpoint, output_url, metadata)
        SELECT n.id, c.model_input, c.webhook_endpoint, c.output_url, c.metadata
          FROM inserted n JOIN items c USING (id)
    ),
    events AS (
        INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt)
        SELECT n.id, 'submitted', 'QUEUED', 0 FROM inserted n
    )
    SELECT array_agg(c.ord ORDER BY c.ord),
           array_agg(n.public_id ORDER BY c.ord),
           array_agg(c.idempotency_key ORDER BY c.ord),
           count(n.public_id)
      INTO v_ords, v_ids, v_keys, v_new
      FROM items c LEFT JOIN inserted n USING (id);

    IF v_new > 0 THEN
        -- One wake-up per statement, carrying the count (never one per row).
        PERFORM pg_notify('asyncinfer_queue', format('submit:%s:%s', p_model, v_new));
    END IF;

    -- Items whose idempotency key matched: look the existing request up in a
    -- new statement, which sees rows committed while we waited on the conflict.
    RETURN QUERY
    SELECT u.ord - 1, coalesce(u.id, existing.public_id), u.id IS NOT NULL
      FROM unnest(v_ords, v_ids, v_keys) AS u(ord, id, key)
      LEFT JOIN asyncinfer.requests existing
             ON u.id IS NULL
            AND coalesce(existing.api_key_id, 0) = coalesce(p_api_key_id, 0)
            AND existing.idempotency_key = u.key
     ORDER BY u.ord;
END
$$;

------------------------------------------------------------------------------
-- Claim
------------------------------------------------------------------------------

-- Claim up to p_limit runnable requests of one model for a worker.
--   * Lower priority number first, FIFO (run_at, id) within a level.
--   * Never beyond the model's capacity, over all workers: the models row is
--     locked for the transaction, which serializes claims per model, and the
--     in_flight counter moves in the same statement as the rows.
--   * A request past its queue deadline that never started becomes EXPIRED
--     instead of running. A paused model hands out nothing.
CREATE FUNCTION asyncinfer.claim_requests(
    p_model text, p_worker_id bigint, p_limit integer, p_lease_seconds double precision DEFAULT 30
) RETURNS TABLE (
    id bigint, public_id uuid, attempt smallint, max_attempts smallint, priority smallint,
    created_at timestamptz, model_input jsonb, metadata jsonb
)
LANGUAGE plpgsql AS $$
DECLARE
    v_free   integer;
    v_paused boolean;
    v_claim  bigint[];
    v_expire bigint[];
BEGIN
    SELECT m.capacity - m.in_flight, m.paused INTO v_free, v_paused
      FROM asyncinfer.models m WHERE m.name = p_model
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model %: unknown model', p_model USING ERRCODE = 'AI404';
    END IF;
    IF v_paused OR v_free <= 0 OR p_limit <= 0 THEN
        RETURN;
    END IF;

    -- Lock the next runnable rows first, then change them by primary key:
    -- claim cost stays flat however deep the queue is.
    SELECT array_agg(c.id) FILTER (WHERE NOT c.past_deadline),
           array_agg(c.id) FILTER (WHERE c.past_deadline)
      INTO v_claim, v_expire
      FROM (SELECT r.id,
                   (r.expires_at <= now() AND r.started_at IS NULL) AS past_deadline
              FROM asyncinfer.requests r
             WHERE r.model = p_model AND r.state = 'QUEUED' AND r.run_at <= now()
             ORDER BY r.priority, r.run_at, r.id
             LIMIT least(p_limit, v_free)
               FOR NO KEY UPDATE SKIP LOCKED) AS c;

    IF v_expire IS NOT NULL THEN
        WITH expired AS (
            UPDATE asyncinfer.requests r
               SET state = 'EXPIRED', finished_at = now()
             WHERE r.id = ANY (v_expire)
            RETURNING r.id, r.attempt
        )
        INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt)
        SELECT e.id, 'expired', 'EXPIRED', e.attempt FROM expired e;
    END IF;
    IF v_claim IS NULL THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH claimed AS (
        UPDATE asyncinfer.requests r
           SET state = 'IN_PROGRESS',
               attempt = r.attempt + 1,
               lease_owner = p_worker_id,
               lease_expires_at = now() + make_interval(secs => p_lease_seconds),
               started_at = coalesce(r.started_at, now())
         WHERE r.id = ANY (v_claim)
        RETURNING r.id, r.public_id, r.attempt, r.max_attempts, r.priority, r.created_at
    ),
    counted AS (
        UPDATE asyncinfer.models m
           SET in_flight = m.in_flight + (SELECT count(*) FROM claimed)
         WHERE m.name = p_model
    ),
    events AS (
        INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt, worker_id)
        SELECT c.id, 'claimed', 'IN_PROGRESS', c.attempt, p_worker_id FROM claimed c
    ),
    inputs AS (
        SELECT i.request_id, i.model_input, i.metadata
          FROM asyncinfer.request_inputs i
         WHERE i.request_id = ANY (v_claim)
    )
    SELECT c.id, c.public_id, c.attempt, c.max_attempts, c.priority, c.created_at, i.model_input, i.metadata
      FROM claimed c
      JOIN inputs i ON i.request_id = c.id
     ORDER BY c.priority, c.id;
END
$$;

------------------------------------------------------------------------------
-- Leases
------------------------------------------------------------------------------

-- Renew every lease a worker holds in one statement and refresh its
-- heartbeat. p_ids/p_attempts are what the worker believes it runs; the rows
-- returned are the ones it still holds (with cancel_requested). An id missing
-- from the answer is a lost lease: the worker must drop that work.
CREATE FUNCTION asyncinfer.renew_leases(
    p_worker_id bigint, p_ids bigint[], p_attempts smallint[], p_lease_seconds double precision DEFAULT 30
) RETURNS TABLE (id bigint, cancel_requested boolean)
LANGUAGE sql AS $$
    WITH heartbeat AS (
        UPDATE asyncinfer.workers SET heartbeat_at = now() WHERE workers.id = p_worker_id
    )
    UPDATE asyncinfer.requests r
       SET lease_expires_at = now() + make_interval(secs => p_lease_seconds)
      FROM unnest(p_ids, p_attempts) AS held(id, attempt)
     WHERE r.id = held.id
       AND r.attempt = held.attempt
       AND r.state = 'IN_PROGRESS'
       AND r.lease_owner = p_worker_id
    RETURNING r.id, r.cancel_requested
$$;

------------------------------------------------------------------------------
-- Finish (complete, fail, retry, acknowledge a cancel)
------------------------------------------------------------------------------

-- Record the outcome of many requests in one statement. p_results is a JSON
-- array of {id, attempt, output?, error?, retryable?, canceled?}:
--   * no error                       -> SUCCEEDED, output stored
--   * error, retryable, attempts left -> QUEUED again after the backoff delay
--   * error otherwise                -> FAILED, error stored
--   * canceled, or a cancel was requested meanwhile -> CANCELED
-- Each row is guarded by state, lease owner and attempt: a worker that lost
-- its lease (reaped, requeued, re-claimed) finishes nothing. The rows
-- returned are the ones accepted, with the state they moved to.
CREATE FUNCTION asyncinfer.finish_requests(p_worker_id bigint, p_results jsonb)
RETURNS TABLE (id bigint, public_id uuid, state asyncinfer.request_state)
LANGUAGE plpgsql AS $$
DECLARE
    v_ids      bigint[];
    v_public   uuid[];
    v_states   asyncinfer.request_state[];
    v_wake     text[];
    v_freed    text[];
    v_deliveries bigint;
BEGIN
    WITH results AS (
        SELECT * FROM jsonb_to_recordset(p_results)
            AS x(id bigint, attempt smallint, output jsonb, error jsonb, retryable boolean, canceled boolean)
    ),
    decided AS MATERIALIZED (
        SELECT r.id, r.model, r.attempt, r.priority, r.deliver, x.output, x.error,
               CASE WHEN r.cancel_requested OR coalesce(x.canceled, false) THEN 'CANCELED'
                    WHEN x.error IS NULL OR x.error = 'null'::jsonb           THEN 'SUCCEEDED'
                    WHEN coalesce(x.retryable, true) AND r.attempt < r.max_attempts THEN 'QUEUED'
                    ELSE 'FAILED'
               END::asyncinfer.request_state AS next_state,
               asyncinfer.retry_delay(r.attempt, r.initial_delay_ms, r.max_delay_ms) AS delay
          FROM results x
          JOIN asyncinfer.requests r ON r.id = x.id
         WHERE r.state = 'IN_PROGRESS'
           AND r.lease_owner = p_worker_id
           AND r.attempt = x.attempt
         ORDER BY r.id
           FOR NO KEY UPDATE OF r
    ),
    updated AS (
        UPDATE asyncinfer.requests r
           SET state = d.next_state,
               run_at = CASE WHEN d.next_state = 'QUEUED' THEN now() + d.delay ELSE r.run_at END,
               finished_at = CASE WHEN d.next_state = 'QUEUED' THEN NULL ELSE now() END,
               lease_owner = NULL,
               lease_expires_at = NULL
          FROM decided d
         WHERE r.id = d.id
        RETURNING r.id, r.public_id, r.state, r.priority
    ),
    outputs AS (
        INSERT INTO asyncinfer.request_outputs (request_id, output, error)
        SELECT d.id,
               CASE WHEN d.next_state = 'SUCCEEDED' THEN d.output END,
               CASE WHEN d.next_state = 'FAILED' THEN d.error END
          FROM decided d
         WHERE d.next_state IN ('SUCCEEDED', 'FAILED')
    ),
    events AS (
        INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt, worker_id, detail)
        SELECT d.id,
               CASE d.next_state WHEN 'QUEUED' THEN 'retried' ELSE lower(d.next_state::text) END,
               d.next_state, d.attempt, p_worker_id,
               CASE WHEN d.next_state = 'QUEUED'
                    THEN jsonb_build_object('error', d.error, 'retry_in_ms',
                                            (extract(epoch FROM d.delay) * 1000)::bigint)
                    WHEN d.next_state = 'FAILED' THEN jsonb_build_object('error', d.error)
               END
          FROM decided d
    ),
    -- The outbox, in the same transaction as the finish: a storage write for
    -- an output, a webhook call for an output or a final error. The webhook
    -- of a request with a storage write waits for it (next_attempt_at =
    -- infinity until the write is done) so it can carry the object's URL.
    outbox AS (
        INSERT INTO asyncinfer.deliveries (request_id, kind, target, next_attempt_at)
        SELECT d.id, t.kind, t.target,
               CASE WHEN t.kind = 'webhook' AND d.next_state = 'SUCCEEDED' AND i.output_url IS NOT NULL
                    THEN 'infinity'::timestamptz ELSE now() END
          FROM decided d
          JOIN asyncinfer.request_inputs i ON i.request_id = d.id
         CROSS JOIN LATERAL (VALUES
                ('storage', CASE WHEN d.next_state = 'SUCCEEDED' THEN i.output_url END),
                ('webhook', i.webhook_endpoint)) AS t(kind, target)
         WHERE d.deliver AND d.next_state IN ('SUCCEEDED', 'FAILED') AND t.target IS NOT NULL
        RETURNING 1
    ),
    locked_models AS MATERIALIZED (
        SELECT m.name FROM asyncinfer.models m
         WHERE m.name IN (SELECT DISTINCT d.model FROM decided d)
         ORDER BY m.name
           FOR NO KEY UPDATE
    ),
    released AS (
        UPDATE asyncinfer.models m
           SET in_flight = m.in_flight - c.n
          FROM (SELECT d.model, count(*) AS n FROM decided d GROUP BY d.model) c
         WHERE m.name = c.model AND m.name IN (SELECT name FROM locked_models)
        RETURNING m.name, m.capacity, m.paused, m.in_flight, m.in_flight + c.n AS in_flight_before
    )
    SELECT array_agg(u.id), array_agg(u.public_id), array_agg(u.state),
           array_agg(format('%s:%s', u.public_id, u.state)) FILTER (WHERE u.priority < 0),
           (SELECT array_agg(format('capacity:%s:%s', rl.name, rl.capacity - rl.in_flight))
              FROM released rl WHERE rl.in_flight_before >= rl.capacity AND NOT rl.paused)
           || (SELECT array_agg(format('submit:%s:%s', g.model, g.n))  -- retries runnable at once
                 FROM (SELECT d.model, count(*) AS n FROM decided d
                        WHERE d.next_state = 'QUEUED' AND d.delay = interval '0'
                        GROUP BY d.model) AS g),
           (SELECT count(*) FROM outbox)
      INTO v_ids, v_public, v_states, v_wake, v_freed, v_deliveries
      FROM updated u;

    -- Wake real-time callers waiting on these requests, workers waiting for
    -- capacity of a model that was full, and the dispatchers.
    PERFORM pg_notify('asyncinfer_finished', w) FROM unnest(v_wake) AS w;
    PERFORM pg_notify('asyncinfer_queue', f) FROM unnest(v_freed) AS f;
    IF v_deliveries > 0 THEN
        PERFORM pg_notify('asyncinfer_delivery', v_deliveries::text);
    END IF;

    RETURN QUERY SELECT * FROM unnest(v_ids, v_public, v_states);
END
$$;

-- Append captured model log lines to requests' event logs (JSON array of
-- {id, attempt, line}). Logs are not state changes: no guard beyond the id.
CREATE FUNCTION asyncinfer.append_logs(p_worker_id bigint, p_lines jsonb)
RETURNS integer
LANGUAGE sql AS $$
    WITH ins AS (
        INSERT INTO asyncinfer.request_events (request_id, kind, attempt, worker_id, detail)
        SELECT x.id, 'log', x.attempt, p_worker_id, jsonb_build_object('line', x.line)
          FROM jsonb_to_recordset(p_lines) AS x(id bigint, attempt smallint, line text)
        RETURNING 1
    )
    SELECT count(*)::integer FROM ins
$$;

------------------------------------------------------------------------------
-- Cancel and requeue
------------------------------------------------------------------------------

-- Cancel a request. p_api_key_id limits it to that key's requests (NULL:
-- any, as an admin). A QUEUED request ends CANCELED at once; an IN_PROGRESS
-- one is flagged and its worker told; it ends CANCELED when the worker stops
-- it, finishes it, or its lease runs out. Returns the state after the call
-- and whether this call changed anything; no row when the id is unknown.
CREATE FUNCTION asyncinfer.cancel_request(p_public_id uuid, p_api_key_id bigint DEFAULT NULL)
RETURNS TABLE (state asyncinfer.request_state, cancel_requested boolean, changed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_req asyncinfer.requests;
BEGIN
    SELECT * INTO v_req FROM asyncinfer.requests r
     WHERE r.id = asyncinfer.request_id_of(p_public_id) AND r.public_id = p_public_id
       AND (p_api_key_id IS NULL OR r.api_key_id = p_api_key_id)
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;

    IF v_req.state = 'QUEUED' THEN
        UPDATE asyncinfer.requests r SET state = 'CANCELED', finished_at = now() WHERE r.id = v_req.id;
        INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt)
        VALUES (v_req.id, 'canceled', 'CANCELED', v_req.attempt);
        IF v_req.priority < 0 THEN
            PERFORM pg_notify('asyncinfer_finished', format('%s:%s', v_req.public_id, 'CANCELED'));
        END IF;
        RETURN QUERY SELECT 'CANCELED'::asyncinfer.request_state, false, true;
    ELSIF v_req.state = 'IN_PROGRESS' THEN
        IF NOT v_req.cancel_requested THEN
            UPDATE asyncinfer.requests r SET cancel_requested = true WHERE r.id = v_req.id;
            INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt, worker_id)
            VALUES (v_req.id, 'cancel_requested', 'IN_PROGRESS', v_req.attempt, v_req.lease_owner);
            PERFORM pg_notify('asyncinfer_cancel', format('%s:%s:%s', v_req.lease_owner, v_req.id, v_req.attempt));
        END IF;
        RETURN QUERY SELECT 'IN_PROGRESS'::asyncinfer.request_state, true, NOT v_req.cancel_requested;
    ELSE
        RETURN QUERY SELECT v_req.state, v_req.cancel_requested, false;
    END IF;
END
$$;

-- Admin: put a request back to run now. QUEUED: its backoff is skipped.
-- IN_PROGRESS: taken from its worker (whose late finish is then refused by
-- the attempt/owner guard), capacity released, queued again. Terminal
-- requests are never reopened (each request ends exactly once): resubmit.
CREATE FUNCTION asyncinfer.requeue_request(p_public_id uuid)
RETURNS asyncinfer.request_state
LANGUAGE plpgsql AS $$
DECLARE
    v_req asyncinfer.requests;
BEGIN
    SELECT * INTO v_req FROM asyncinfer.requests r
     WHERE r.id = asyncinfer.request_id_of(p_public_id) AND r.public_id = p_public_id
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'request %: not found', p_public_id USING ERRCODE = 'AI404';
    END IF;
    IF v_req.state NOT IN ('QUEUED', 'IN_PROGRESS') THEN
        RAISE EXCEPTION 'request %: is % (terminal); terminal requests are not reopened, resubmit instead',
            p_public_id, v_req.state USING ERRCODE = 'AI409';
    END IF;

    UPDATE asyncinfer.requests r
       SET state = 'QUEUED', run_at = now(), lease_owner = NULL, lease_expires_at = NULL
     WHERE r.id = v_req.id;
    INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt, worker_id)
    VALUES (v_req.id, 'requeued', 'QUEUED', v_req.attempt, v_req.lease_owner);

    IF v_req.state = 'IN_PROGRESS' THEN
        UPDATE asyncinfer.models m SET in_flight = m.in_flight - 1 WHERE m.name = v_req.model;
        -- Tell the old worker to drop the work; its finish would be refused anyway.
        PERFORM pg_notify('asyncinfer_cancel', format('%s:%s:%s', v_req.lease_owner, v_req.id, v_req.attempt));
    END IF;
    PERFORM pg_notify('asyncinfer_queue', format('submit:%s:1', v_req.model));
    RETURN 'QUEUED';
END
$$;

-- Admin: cancel every QUEUED request of a model in one statement.
CREATE FUNCTION asyncinfer.purge_queue(p_model text)
RETURNS bigint
LANGUAGE sql AS $$
    WITH purged AS (
        UPDATE asyncinfer.requests r
           SET state = 'CANCELED', finished_at = now()
         WHERE r.model = p_model AND r.state = 'QUEUED'
        RETURNING r.id, r.attempt
    ),
    events AS (
        INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt, detail)
        SELECT p.id, 'canceled', 'CANCELED', p.attempt, '{"reason": "purge_queue"}'::jsonb FROM purged p
    )
    SELECT count(*) FROM purged
$$;

------------------------------------------------------------------------------
-- Workers
------------------------------------------------------------------------------

CREATE FUNCTION asyncinfer.register_worker(p_name text, p_hostname text, p_pid integer, p_models text[])
RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO asyncinfer.workers (name, hostname, pid, models)
    VALUES (p_name, p_hostname, p_pid, p_models)
    RETURNING id
$$;

CREATE FUNCTION asyncinfer.set_worker_state(p_worker_id bigint, p_state text, p_detail text DEFAULT NULL)
RETURNS void
LANGUAGE sql AS $$
    UPDATE asyncinfer.workers
       SET state = p_state, detail = p_detail, heartbeat_at = now(),
           stopped_at = CASE WHEN p_state = 'stopped' THEN now() END
     WHERE id = p_worker_id
$$;

-- A worker leaving cleanly gives back whatever it still holds: those
-- requests are queued again at once (attempt kept) instead of waiting for
-- their leases to run out.
CREATE FUNCTION asyncinfer.release_worker(p_worker_id bigint)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_released bigint;
    v_wake     text[];
BEGIN
    WITH held AS MATERIALIZED (
        SELECT r.id, r.model, r.attempt, r.cancel_requested FROM asyncinfer.requests r
         WHERE r.state = 'IN_PROGRESS' AND r.lease_owner = p_worker_id
         ORDER BY r.id
           FOR NO KEY UPDATE
    ),
    updated AS (
        UPDATE asyncinfer.requests r
           SET state = CASE WHEN h.cancel_requested THEN 'CANCELED' ELSE 'QUEUED' END::asyncinfer.request_state,
               finished_at = CASE WHEN h.cancel_requested THEN now() END,
               run_at = now(), lease_owner = NULL, lease_expires_at = NULL
          FROM held h WHERE r.id = h.id
        RETURNING r.id, r.state, r.attempt
    ),
    events AS (
        INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt, worker_id)
        SELECT u.id, CASE WHEN u.state = 'CANCELED' THEN 'canceled' ELSE 'released' END,
               u.state, u.attempt, p_worker_id
          FROM updated u
    ),
    locked_models AS MATERIALIZED (
        SELECT m.name FROM asyncinfer.models m
         WHERE m.name IN (SELECT DISTINCT h.model FROM held h)
         ORDER BY m.name
           FOR NO KEY UPDATE
    ),
    released AS (
        UPDATE asyncinfer.models m SET in_flight = m.in_flight - c.n
          FROM (SELECT h.model, count(*) AS n FROM held h GROUP BY h.model) c
         WHERE m.name = c.model AND m.name IN (SELECT name FROM locked_models)
        RETURNING m.name, c.n
    )
    SELECT (SELECT count(*) FROM updated),
           (SELECT array_agg(format('submit:%s:%s', rl.name, rl.n)) FROM released rl)
      INTO v_released, v_wake;

    PERFORM asyncinfer.set_worker_state(p_worker_id, 'stopped');
    PERFORM pg_notify('asyncinfer_queue', w) FROM unnest(v_wake) AS w;
    RETURN v_released;
END
$$;

------------------------------------------------------------------------------
-- Maintenance: reaper, deadline sweep, capacity reconciliation
------------------------------------------------------------------------------

-- Rescue requests whose lease ran out (their worker died or froze): in one
-- guarded UPDATE they go back to the queue with backoff, or FAIL when their
-- attempts are used up, or end CANCELED when a cancel was pending. Rows
-- being finished right now are skipped (SKIP LOCKED) and re-checked by the
-- guard, so a rescue never overwrites a finish.
CREATE FUNCTION asyncinfer.reap_expired_leases(p_limit integer DEFAULT 1000)
RETURNS TABLE (id bigint, public_id uuid, state asyncinfer.request_state)
LANGUAGE plpgsql AS $$
DECLARE
    v_ids    bigint[];
    v_public uuid[];
    v_states asyncinfer.request_state[];
    v_wake   text[];
    v_freed  text[];
    v_deliveries bigint;
BEGIN
    WITH lost AS MATERIALIZED (
        SELECT r.id, r.model, r.attempt, r.lease_owner,
               CASE WHEN r.cancel_requested            THEN 'CANCELED'
                    WHEN r.attempt < r.max_attempts    THEN 'QUEUED'
                    ELSE 'FAILED'
               END::asyncinfer.request_state AS next_state,
               asyncinfer.retry_delay(r.attempt, r.initial_delay_ms, r.max_delay_ms) AS delay
          FROM asyncinfer.requests r
         WHERE r.state = 'IN_PROGRESS' AND r.lease_expires_at < now()
         ORDER BY r.id
         LIMIT p_limit
           FOR NO KEY UPDATE SKIP LOCKED
    ),
    updated AS (
        UPDATE asyncinfer.requests r
           SET state = l.next_state,
               run_at = CASE WHEN l.next_state = 'QUEUED' THEN now() + l.delay ELSE r.run_at END,
               finished_at = CASE WHEN l.next_state = 'QUEUED' THEN NULL ELSE now() END,
               lease_owner = NULL,
               lease_expires_at = NULL
          FROM lost l
         WHERE r.id = l.id
           AND r.state = 'IN_PROGRESS' AND r.lease_expires_at < now()   -- the guard, again
        RETURNING r.id, r.public_id, r.state, r.priority, r.model, r.deliver
    ),
    outputs AS (
        INSERT INTO asyncinfer.request_outputs (request_id, error)
        SELECT l.id, jsonb_build_object('type', 'lease_lost',
                                        'message', 'worker stopped renewing its lease; attempts exhausted')
          FROM lost l JOIN updated u ON u.id = l.id
         WHERE u.state = 'FAILED'
    ),
    -- A request failed here still owes its webhook (same outbox as a finish).
    outbox AS (
        INSERT INTO asyncinfer.deliveries (request_id, kind, target)
        SELECT u.id, 'webhook', i.webhook_endpoint
          FROM updated u
          JOIN asyncinfer.request_inputs i ON i.request_id = u.id
         WHERE u.state = 'FAILED' AND u.deliver AND i.webhook_endpoint IS NOT NULL
        RETURNING 1
    ),
    events AS (
        INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt, worker_id, detail)
        SELECT l.id, 'lease_lost', u.state, l.attempt, l.lease_owner,
               CASE WHEN u.state = 'QUEUED'
                    THEN jsonb_build_object('retry_in_ms', (extract(epoch FROM l.delay) * 1000)::bigint)
               END
          FROM lost l JOIN updated u ON u.id = l.id
    ),
    locked_models AS MATERIALIZED (
        SELECT m.name FROM asyncinfer.models m
         WHERE m.name IN (SELECT DISTINCT u.model FROM updated u)
         ORDER BY m.name
           FOR NO KEY UPDATE
    ),
    released AS (
        UPDATE asyncinfer.models m SET in_flight = m.in_flight - c.n
          FROM (SELECT u.model, count(*) AS n FROM updated u GROUP BY u.model) c
         WHERE m.name = c.model AND m.name IN (SELECT name FROM locked_models)
        RETURNING m.name, m.capacity, m.in_flight, m.paused
    )
    SELECT array_agg(u.id), array_agg(u.public_id), array_agg(u.state),
           array_agg(format('%s:%s', u.public_id, u.state)) FILTER (WHERE u.priority < 0 AND u.state <> 'QUEUED'),
           (SELECT array_agg(format('capacity:%s:%s', rl.name, rl.capacity - rl.in_flight))
              FROM released rl WHERE NOT rl.paused),
           (SELECT count(*) FROM outbox)
      INTO v_ids, v_public, v_states, v_wake, v_freed, v_deliveries
      FROM updated u;

    PERFORM pg_notify('asyncinfer_finished', w) FROM unnest(v_wake) AS w;
    PERFORM pg_notify('asyncinfer_queue', f) FROM unnest(v_freed) AS f;
    IF v_deliveries > 0 THEN
        PERFORM pg_notify('asyncinfer_delivery', v_deliveries::text);
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_ids, v_public, v_states);
END
$$;

-- EXPIRE queued requests that never started before their deadline (claims
-- also do this for the rows they meet; this sweep catches the rest).
CREATE FUNCTION asyncinfer.expire_queued(p_limit integer DEFAULT 5000)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_wake  text[];
    v_count bigint;
BEGIN
    WITH due AS MATERIALIZED (
        SELECT r.id FROM asyncinfer.requests r
         WHERE r.state = 'QUEUED' AND r.expires_at <= now() AND r.started_at IS NULL
         ORDER BY r.expires_at
         LIMIT p_limit
           FOR NO KEY UPDATE SKIP LOCKED
    ),
    expired AS (
        UPDATE asyncinfer.requests r SET state = 'EXPIRED', finished_at = now()
          FROM due WHERE r.id = due.id
        RETURNING r.id, r.public_id, r.attempt, r.priority
    ),
    events AS (
        INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt)
        SELECT e.id, 'expired', 'EXPIRED', e.attempt FROM expired e
    )
    SELECT count(*), array_agg(format('%s:EXPIRED', e.public_id)) FILTER (WHERE e.priority < 0)
      INTO v_count, v_wake
      FROM expired e;
    PERFORM pg_notify('asyncinfer_finished', w) FROM unnest(v_wake) AS w;
    RETURN v_count;
END
$$;

-- Set every model's in_flight to the number of its IN_PROGRESS rows. Each
-- models row is locked before counting, so no claim or finish of that model
-- is between its row change and its counter change while we count. Returns
-- the models whose counter had drifted (an admin's raw UPDATE, a bug).
CREATE FUNCTION asyncinfer.reconcile_capacity()
RETURNS TABLE (model text, counted integer, running integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_name    text;
    v_counted integer;
    v_running integer;
BEGIN
    FOR v_name IN SELECT m.name FROM asyncinfer.models m ORDER BY m.name LOOP
        SELECT m.in_flight INTO v_counted FROM asyncinfer.models m WHERE m.name = v_name FOR NO KEY UPDATE;
        -- a new statement, so a new snapshot taken after the lock was granted
        SELECT count(*) INTO v_running
          FROM asyncinfer.requests r WHERE r.model = v_name AND r.state = 'IN_PROGRESS';
        IF v_running <> v_counted THEN
            UPDATE asyncinfer.models m SET in_flight = v_running, updated_at = now() WHERE m.name = v_name;
            RAISE WARNING 'asyncinfer: model % in_flight was %, % running; corrected', v_name, v_counted, v_running;
            model := v_name; counted := v_counted; running := v_running;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

-- One maintenance tick. Any number of processes may call it; a transaction
-- advisory lock makes sure one runs it at a time (the others get leader =
-- false and NULL counts). Retention is one batch per tick (prune_finished).
CREATE FUNCTION asyncinfer.run_maintenance(
    p_request_retention interval DEFAULT interval '7 days',
    p_output_retention interval DEFAULT interval '7 days'
) RETURNS TABLE (leader boolean, reaped bigint, expired bigint, reconciled bigint, pruned bigint)
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('asyncinfer.maintenance')) THEN
        RETURN QUERY SELECT false, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    RETURN QUERY SELECT true,
        (SELECT count(*) FROM asyncinfer.reap_expired_leases()),
        asyncinfer.expire_queued(),
        (SELECT count(*) FROM asyncinfer.reconcile_capacity()),
        (SELECT p.requests_deleted FROM asyncinfer.prune_finished(p_request_retention, p_output_retention) p);
END
$$;
