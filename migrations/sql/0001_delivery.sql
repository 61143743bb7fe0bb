-- asyncinfer, migration 0001: output delivery (the outbox's state changes).
-- Rows are written by finish_requests; dispatchers move them with these.

-- Claim up to p_limit due deliveries. Each claim counts an attempt and
-- pushes the row's due time one lease ahead: if the dispatcher dies, the row
-- is simply due again after the lease. Returns what a dispatcher needs to
-- build the payload; `attempts` fences the finish.
CREATE FUNCTION asyncinfer.claim_deliveries(p_limit integer, p_lease_seconds double precision DEFAULT 60)
RETURNS TABLE (
    id bigint, kind text, target text, attempts integer,
    request_id uuid, model text, state asyncinfer.request_state, finished_at timestamptz,
    output jsonb, error jsonb, stored_url text, output_url text, metadata jsonb
)
LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
BEGIN
    SELECT array_agg(d.id) INTO v_ids
      FROM (SELECT d.id FROM asyncinfer.deliveries d
             WHERE d.state = 'PENDING' AND d.next_attempt_at <= now()
             ORDER BY d.next_attempt_at
             LIMIT p_limit
               FOR NO KEY UPDATE SKIP LOCKED) d;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH claimed AS (
        UPDATE asyncinfer.deliveries d
           SET attempts = d.attempts + 1,
               next_attempt_at = now() + make_interval(secs => p_lease_seconds)
         WHERE d.id = ANY (v_ids)
        RETURNING d.id, d.request_id, d.kind, d.target, d.attempts
    )
    SELECT c.id, c.kind, c.target, c.attempts,
           r.public_id, r.model, r.state, r.finished_at,
           o.output, o.error, o.stored_url, i.output_url, i.metadata
      FROM claimed c
      JOIN asyncinfer.requests r ON r.id = c.request_id
      LEFT JOIN asyncinfer.request_outputs o ON o.request_id = c.request_id
      LEFT JOIN asyncinfer.request_inputs i ON i.request_id = c.request_id
     ORDER BY c.id;
END
$$;

-- Record delivery attempts in one statement. p_results: JSON array of
--   {id, attempts, ok, status_code?, error?, retry_in_seconds?, stored_url?, drop_inline?}
-- ok -> SUCCEEDED (a storage write records stored_url, may drop the inline
-- copy of a large output, and releases the request's webhook);
-- not ok with retry_in_seconds -> due again then; not ok without -> FAILED
-- (a failed storage write still releases the webhook: the output stays in
-- PostgreSQL). Guarded by attempts: a dispatcher whose claim lapsed and was
-- re-claimed elsewhere records nothing. Returns the rows accepted.
CREATE FUNCTION asyncinfer.finish_deliveries(p_results jsonb)
RETURNS TABLE (id bigint, state asyncinfer.delivery_state)
LANGUAGE plpgsql AS $$
DECLARE
    v_ids      bigint[];
    v_states   asyncinfer.delivery_state[];
    v_released boolean;
BEGIN
    WITH results AS (
        SELECT * FROM jsonb_to_recordset(p_results) AS x(
            id bigint, attempts integer, ok boolean, status_code integer, error text,
            retry_in_seconds double precision, stored_url text, drop_inline boolean)
    ),
    updated AS (
        UPDATE asyncinfer.deliveries d
           SET state = CASE WHEN x.ok THEN 'SUCCEEDED'
                            WHEN x.retry_in_seconds IS NULL THEN 'FAILED'
                            ELSE 'PENDING' END::asyncinfer.delivery_state,
               next_attempt_at = CASE WHEN x.ok OR x.retry_in_seconds IS NULL THEN d.next_attempt_at
                                      ELSE now() + make_interval(secs => x.retry_in_seconds) END,
               finished_at = CASE WHEN x.ok OR x.retry_in_seconds IS NULL THEN now() END,
               last_status_code = x.status_code,
               last_error = x.error
          FROM results x
         WHERE d.id = x.id AND d.attempts = x.attempts AND d.state = 'PENDING'
        RETURNING d.id, d.request_id, d.kind, d.state, d.attempts, x.status_code, x.error,
                  x.stored_url, coalesce(x.drop_inline, false) AS drop_inline
    ),
    stored AS (
        UPDATE asyncinfer.request_outputs o
           SET stored_url = u.stored_url,
               output = CASE WHEN u.drop_inline THEN NULL ELSE o.output END
          FROM updated u
         WHERE o.request_id = u.request_id AND u.kind = 'storage' AND u.state = 'SUCCEEDED'
    ),
    released AS (
        UPDATE asyncinfer.deliveries w
           SET next_attempt_at = now()
          FROM updated u
         WHERE w.request_id = u.request_id AND w.kind = 'webhook' AND w.state = 'PENDING'
           AND w.next_attempt_at = 'infinity' AND u.kind = 'storage' AND u.state <> 'PENDING'
    ),
    events AS (
        INSERT INTO asyncinfer.request_events (request_id, kind, attempt, detail)
        SELECT u.request_id,
               u.kind || '_' || CASE u.state WHEN 'PENDING' THEN 'retry' ELSE lower(u.state::text) END, NULL,
               jsonb_strip_nulls(jsonb_build_object('delivery_attempt', u.attempts,
                                                    'status_code', u.status_code, 'error', u.error))
          FROM updated u
    )
    SELECT array_agg(u.id), array_agg(u.state), bool_or(u.kind = 'storage' AND u.state <> 'PENDING')
      INTO v_ids, v_states, v_released
      FROM updated u;

    IF v_released THEN  -- webhooks that waited for a storage write are due now
        PERFORM pg_notify('asyncinfer_delivery', '1');
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_ids, v_states);
END
$$;

-- Deliver a request's outputs again (FAILED or already SUCCEEDED ones), for
-- one kind or both. Returns how many deliveries were queued again.
CREATE FUNCTION asyncinfer.redeliver_request(p_public_id uuid, p_kind text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_count bigint;
BEGIN
    WITH again AS (
        UPDATE asyncinfer.deliveries d
           SET state = 'PENDING', next_attempt_at = now(), finished_at = NULL
          FROM asyncinfer.requests r
         WHERE r.id = asyncinfer.request_id_of(p_public_id) AND r.public_id = p_public_id
           AND d.request_id = r.id
           AND d.state <> 'PENDING' AND (p_kind IS NULL OR d.kind = p_kind)
        RETURNING d.request_id, d.kind
    ), events AS (
        INSERT INTO asyncinfer.request_events (request_id, kind, detail)
        SELECT a.request_id, 'redeliver', jsonb_build_object('kind', a.kind) FROM again a
    )
    SELECT count(*) INTO v_count FROM again;
    IF v_count > 0 THEN
        PERFORM pg_notify('asyncinfer_delivery', v_count::text);
    END IF;
    RETURN v_count;
END
$$;

-- Deliver again every FAILED delivery of a model's requests (after fixing a
-- receiver that was down). Returns how many were queued again.
CREATE FUNCTION asyncinfer.redeliver_failed(p_model text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_count bigint;
BEGIN
    WITH again AS (
        UPDATE asyncinfer.deliveries d
           SET state = 'PENDING', next_attempt_at = now(), finished_at = NULL
          FROM asyncinfer.requests r
         WHERE d.request_id = r.id AND r.model = p_model AND d.state = 'FAILED'
        RETURNING d.request_id, d.kind
    ), events AS (
        INSERT INTO asyncinfer.request_events (request_id, kind, detail)
        SELECT a.request_id, 'redeliver', jsonb_build_object('kind', a.kind) FROM again a
    )
    SELECT count(*) INTO v_count FROM again;
    IF v_count > 0 THEN
        PERFORM pg_notify('asyncinfer_delivery', v_count::text);
    END IF;
    RETURN v_count;
END
$$;

-- Webhook secrets: add one (returns its id), revoke one. Every active secret
-- signs every delivery, so rotate by adding the new one, moving receivers
-- over, then revoking the old one.
CREATE FUNCTION asyncinfer.add_webhook_secret(p_secret text)
RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO asyncinfer.webhook_secrets (secret) VALUES (p_secret) RETURNING id
$$;

CREATE FUNCTION asyncinfer.revoke_webhook_secret(p_id bigint)
RETURNS boolean
LANGUAGE sql AS $$
    UPDATE asyncinfer.webhook_secrets SET revoked_at = now()
     WHERE id = p_id AND revoked_at IS NULL
    RETURNING true
$$;

-- Webhook status as clients see it (Baseten's names).
CREATE FUNCTION asyncinfer.webhook_status(p_request_id bigint)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
             WHEN i.webhook_endpoint IS NULL                  THEN 'NO_WEBHOOK_PROVIDED'
             WHEN d.state IS NOT NULL                         THEN d.state::text
             WHEN r.state IN ('CANCELED', 'EXPIRED')          THEN 'CANCELED'
             ELSE 'PENDING'
           END
      FROM asyncinfer.requests r
      LEFT JOIN asyncinfer.request_inputs i ON i.request_id = r.id
      LEFT JOIN asyncinfer.deliveries d ON d.request_id = r.id AND d.kind = 'webhook'
     WHERE r.id = p_request_id
$$;
