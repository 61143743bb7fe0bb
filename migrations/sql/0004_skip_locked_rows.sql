-- asyncinfer migration 0004: a worker's batch never waits on one locked row.
--
-- finish_requests and renew_leases used to lock their rows waiting: one row
-- held by another session (an admin's open transaction in psql, say) stalled
-- the whole batch of outcomes, or every lease renewal, of its worker. Both now
-- take their rows with SKIP LOCKED and say which ones they skipped, so the
-- worker records the rest at once and retries only those. Same signatures.

-- As in 0001, except: rows locked by another transaction are skipped, and
-- come back as (id, NULL, NULL) when they still match the worker's lease
-- (state, owner, attempt): "not recorded yet, try again". Rows that no longer
-- match are refused as before (absent from the answer).
CREATE OR REPLACE FUNCTION asyncinfer.finish_requests(p_worker_id bigint, p_results jsonb)
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
           FOR NO KEY UPDATE OF r SKIP LOCKED
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
    -- Skipped because another transaction holds the row, yet still this
    -- worker's: the caller keeps the outcome and tries again. (Only looked
    -- for when some outcome was not recorded: the common case costs nothing.)
    IF coalesce(cardinality(v_ids), 0) < jsonb_array_length(p_results) THEN
        RETURN QUERY
        SELECT r.id, NULL::uuid, NULL::asyncinfer.request_state
          FROM jsonb_to_recordset(p_results) AS x(id bigint, attempt smallint)
          JOIN asyncinfer.requests r ON r.id = x.id
         WHERE r.state = 'IN_PROGRESS' AND r.lease_owner = p_worker_id AND r.attempt = x.attempt
           AND r.id <> ALL (coalesce(v_ids, '{}'));
    END IF;
END
$$;

-- As in 0001, except: rows locked by another transaction are not waited for.
-- They are returned as still held (their lease is left as it was and renewed
-- on the next tick), so the worker neither stalls nor drops the work.
CREATE OR REPLACE FUNCTION asyncinfer.renew_leases(
    p_worker_id bigint, p_ids bigint[], p_attempts smallint[], p_lease_seconds double precision DEFAULT 30
) RETURNS TABLE (id bigint, cancel_requested boolean)
LANGUAGE sql AS $$
    WITH heartbeat AS (
        UPDATE asyncinfer.workers SET heartbeat_at = now() WHERE workers.id = p_worker_id
    ),
    mine AS (
        SELECT r.id, held.attempt
          FROM asyncinfer.requests r
          JOIN unnest(p_ids, p_attempts) AS held(id, attempt) ON r.id = held.id
         WHERE r.attempt = held.attempt
           AND r.state = 'IN_PROGRESS'
           AND r.lease_owner = p_worker_id
    ),
    lockable AS (
        SELECT r.id, mine.attempt
          FROM asyncinfer.requests r JOIN mine ON mine.id = r.id
         ORDER BY r.id
           FOR NO KEY UPDATE OF r SKIP LOCKED
    ),
    renewed AS (
        UPDATE asyncinfer.requests r
           SET lease_expires_at = now() + make_interval(secs => p_lease_seconds)
          FROM lockable l
         WHERE r.id = l.id
           AND r.attempt = l.attempt AND r.state = 'IN_PROGRESS'   -- the guard, on the locked version
           AND r.lease_owner = p_worker_id
        RETURNING r.id, r.cancel_requested
    )
    SELECT renewed.id, renewed.cancel_requested FROM renewed
    UNION ALL
    SELECT r.id, r.cancel_requested FROM asyncinfer.requests r
     WHERE r.id IN (SELECT mine.id FROM mine EXCEPT SELECT lockable.id FROM lockable)
$$;
