-- asyncinfer migration 0003: multi-step pipelines.
--
-- To its caller a pipeline run is one request: one public id, one status,
-- one output, one webhook, one storage write; cancel, events, idempotency,
-- API-key scoping and retention work as for any request. Its row in
-- `requests` (the "parent") has model 'pipeline:<name>' and stays
-- IN_PROGRESS, holding no lease, from submit until it ends. No worker can
-- claim it: model names cannot contain ':', and it is never QUEUED.
--
-- Each step is an ordinary request of its model (requests.parent_id names the
-- parent), so it gets that model's capacity, priority order, retries, leases,
-- reaper and log capture. The one new moving part is a trigger: when a step
-- request ends, in the same transaction, asyncinfer.advance_pipeline enqueues
-- the next step or ends the run. Whatever ends a step (a worker's finish, the
-- reaper, the queue-deadline sweep, a cancel, an admin's purge_queue in psql)
-- advances its pipeline the same way, and a crash can never fall between two
-- steps: the finish of step k and the insert of step k+1 commit together.
--
-- Lock order: step rows, then models rows, then the parent row (the order in
-- which finish_requests and the reaper take them; the trigger runs at the end
-- of their statement). Canceling a run takes the parent row first and then
-- touches its steps with SKIP LOCKED only, so it never waits for a step.
-- Two finish statements that each end steps of the same two runs can still
-- take the two parents in opposite orders; PostgreSQL then aborts one
-- (deadlock detected) and that worker records its batch again (it retries
-- any failed finish): a delay, never a loss.

------------------------------------------------------------------------------
-- Tables
------------------------------------------------------------------------------

-- Declared pipelines: the models file's [pipelines.<name>] tables (written by
-- workers on start), PUT /v1/pipelines/{name}, or asyncinfer.upsert_pipeline.
CREATE TABLE asyncinfer.pipelines (
    name        text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'),
    steps       jsonb       NOT NULL,   -- checked by asyncinfer.check_pipeline_steps
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- A step request's pipeline run (its parent's id). NULL for every other
-- request. Adding a nullable column rewrites nothing.
ALTER TABLE asyncinfer.requests ADD COLUMN parent_id bigint;

-- A parent row is IN_PROGRESS without a lease; any other row keeps the rule
-- of migration 0001 (IN_PROGRESS exactly when it holds a lease).
ALTER TABLE asyncinfer.requests DROP CONSTRAINT running_has_lease;
ALTER TABLE asyncinfer.requests ADD CONSTRAINT running_has_lease CHECK (
    CASE WHEN model LIKE 'pipeline:%'
         THEN lease_owner IS NULL AND lease_expires_at IS NULL
         ELSE (state = 'IN_PROGRESS') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)
    END
) NOT VALID;
ALTER TABLE asyncinfer.requests VALIDATE CONSTRAINT running_has_lease;

-- One row per run, keyed by the parent request's id.
CREATE TABLE asyncinfer.pipeline_runs (
    request_id    bigint   PRIMARY KEY,
    pipeline      text     NOT NULL,
    steps         jsonb    NOT NULL,   -- the definition at submit: editing a pipeline never changes a run
    -- the caller's request options every step inherits (priority,
    -- max_time_in_queue_seconds, inference_retry_config); what is absent
    -- takes each step's model default, then the service default
    options       jsonb    NOT NULL DEFAULT '{}',
    current_step  smallint NOT NULL DEFAULT 0,
    pending_items integer  NOT NULL DEFAULT 0 CHECK (pending_items >= 0)  -- fan-out items not yet succeeded
);

-- Which run, step and fan-out item each step request is. The unique index
-- is the last guard against a step enqueued twice.
CREATE TABLE asyncinfer.pipeline_steps (
    request_id  bigint   PRIMARY KEY,
    run_id      bigint   NOT NULL,
    step        smallint NOT NULL,
    item        integer  NOT NULL DEFAULT 0   -- position in the fan-out list (0 for a plain step)
);
CREATE UNIQUE INDEX pipeline_steps_by_run ON asyncinfer.pipeline_steps (run_id, step, item);

------------------------------------------------------------------------------
-- Definitions
------------------------------------------------------------------------------

-- A step's input template: any JSON in which a string starting with '$' is a
-- JSON path into the previous step's output ('$' alone: all of it), and one
-- starting with '$input' a path into the pipeline's own input; '$$...' is the
-- literal string '$...'. Raises 22023 naming the field for a path that does
-- not parse or names a variable.
CREATE FUNCTION asyncinfer.check_step_path(p_path text, p_field text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    -- silent => false on an empty document: a syntax error or an unknown
    -- $variable raises here, never later inside a worker's finish
    PERFORM jsonb_path_query_first('null'::jsonb, p_path::jsonpath);
EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION '%: % is not a JSON path (%)', p_field, to_jsonb(p_path), SQLERRM USING ERRCODE = '22023';
END
$$;

CREATE FUNCTION asyncinfer.input_path(p_reference text)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    -- '$input.a' -> '$.a' (a path into the pipeline input); NULL otherwise
    SELECT CASE WHEN p_reference = '$input' OR p_reference ~ '^\$input[.\[]'
                THEN '$' || substr(p_reference, 7) END
$$;

-- Check a list of steps; returns it unchanged or raises 22023 naming the field.
CREATE FUNCTION asyncinfer.check_pipeline_steps(p_steps jsonb)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $fn$
DECLARE
    v_step  jsonb;
    v_index integer := 0;
    v_key   text;
    v_ref   text;
BEGIN
    IF jsonb_typeof(p_steps) IS DISTINCT FROM 'array' OR jsonb_array_length(p_steps) NOT BETWEEN 1 AND 32 THEN
        RAISE EXCEPTION 'steps: must be an array of 1 to 32 steps' USING ERRCODE = '22023';
    END IF;
    FOR v_step IN SELECT e.value FROM jsonb_array_elements(p_steps) AS e LOOP
        IF jsonb_typeof(v_step) <> 'object' THEN
            RAISE EXCEPTION 'steps[%]: must be an object {model, input?, fan_out?}', v_index USING ERRCODE = '22023';
        END IF;
        SELECT k INTO v_key FROM jsonb_object_keys(v_step) AS k WHERE k NOT IN ('model', 'input', 'fan_out') LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'steps[%].%: unknown field (allowed: model, input, fan_out)', v_index, v_key
                USING ERRCODE = '22023';
        END IF;
        IF jsonb_typeof(v_step -> 'model') IS DISTINCT FROM 'string'
           OR (v_step ->> 'model') !~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$' THEN
            RAISE EXCEPTION 'steps[%].model: must be a model name matching [A-Za-z0-9][A-Za-z0-9._-]{0,127}', v_index
                USING ERRCODE = '22023';
        END IF;
        IF v_step ? 'fan_out' THEN
            IF jsonb_typeof(v_step -> 'fan_out') IS DISTINCT FROM 'string' OR left(v_step ->> 'fan_out', 1) <> '$'
               OR asyncinfer.input_path(v_step ->> 'fan_out') IS NOT NULL THEN
                RAISE EXCEPTION 'steps[%].fan_out: must be a JSON path into the previous output, such as "$" or "$.chunks"',
                    v_index USING ERRCODE = '22023';
            END IF;
            PERFORM asyncinfer.check_step_path(v_step ->> 'fan_out', format('steps[%s].fan_out', v_index));
        END IF;
        FOR v_ref IN
            SELECT s #>> '{}' FROM jsonb_path_query(coalesce(v_step -> 'input', 'null'), 'lax $.**') AS s
             WHERE jsonb_typeof(s) = 'string' AND left(s #>> '{}', 1) = '$' AND left(s #>> '{}', 2) <> '$$'
        LOOP
            PERFORM asyncinfer.check_step_path(coalesce(asyncinfer.input_path(v_ref), v_ref),
                                               format('steps[%s].input', v_index));
        END LOOP;
        v_index := v_index + 1;
    END LOOP;
    RETURN p_steps;
END
$fn$;

CREATE FUNCTION asyncinfer.upsert_pipeline(p_name text, p_steps jsonb)
RETURNS asyncinfer.pipelines
LANGUAGE plpgsql AS $$
DECLARE
    v_pipeline asyncinfer.pipelines;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$' THEN
        RAISE EXCEPTION 'pipeline: must be a name matching [A-Za-z0-9][A-Za-z0-9._-]{0,127}' USING ERRCODE = '22023';
    END IF;
    INSERT INTO asyncinfer.pipelines AS p (name, steps)
    VALUES (p_name, asyncinfer.check_pipeline_steps(p_steps))
    ON CONFLICT (name) DO UPDATE
        SET steps = excluded.steps,
            updated_at = CASE WHEN p.steps = excluded.steps THEN p.updated_at ELSE now() END
    RETURNING * INTO v_pipeline;
    RETURN v_pipeline;
END
$$;

CREATE FUNCTION asyncinfer.delete_pipeline(p_name text)
RETURNS boolean
LANGUAGE sql AS $$
    -- runs in flight keep their own copy of the steps
    WITH gone AS (DELETE FROM asyncinfer.pipelines WHERE name = p_name RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM gone)
$$;

------------------------------------------------------------------------------
-- Step inputs
------------------------------------------------------------------------------

-- Render a step's input template (see check_step_path) against the previous
-- output and the pipeline input. A path that finds nothing gives null; it
-- never raises (silent => true), so bad data fails one run, not a batch.
CREATE FUNCTION asyncinfer.render_step_input(p_template jsonb, p_previous jsonb, p_input jsonb)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $fn$
DECLARE
    v_text text;
BEGIN
    CASE jsonb_typeof(p_template)
    WHEN 'object' THEN
        RETURN coalesce((SELECT jsonb_object_agg(e.key, coalesce(
                                    asyncinfer.render_step_input(e.value, p_previous, p_input), 'null'))
                           FROM jsonb_each(p_template) AS e), '{}');
    WHEN 'array' THEN
        RETURN coalesce((SELECT jsonb_agg(coalesce(asyncinfer.render_step_input(e.value, p_previous, p_input), 'null')
                                          ORDER BY e.ord)
                           FROM jsonb_array_elements(p_template) WITH ORDINALITY AS e(value, ord)), '[]');
    WHEN 'string' THEN
        v_text := p_template #>> '{}';
        IF left(v_text, 2) = '$$' THEN
            RETURN to_jsonb(substr(v_text, 2));
        ELSIF asyncinfer.input_path(v_text) IS NOT NULL THEN
            RETURN jsonb_path_query_first(p_input, asyncinfer.input_path(v_text)::jsonpath, '{}', true);
        ELSIF left(v_text, 1) = '$' THEN
            RETURN jsonb_path_query_first(p_previous, v_text::jsonpath, '{}', true);
        END IF;
        RETURN p_template;
    ELSE
        RETURN p_template;
    END CASE;
END
$fn$;

------------------------------------------------------------------------------
-- Moving a run along
------------------------------------------------------------------------------

-- Stop what is left of a run: its QUEUED steps end CANCELED, its running ones
-- are flagged and their workers told (they end CANCELED when the worker stops
-- or its lease runs out). Step rows locked right now by a finish or a claim
-- are skipped; they find the run ended when their own transaction reaches it.
CREATE FUNCTION asyncinfer.stop_pipeline_steps(p_run_id bigint, p_reason text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_notes text[];
BEGIN
    WITH open AS MATERIALIZED (
        SELECT r.id, r.state, r.attempt, r.lease_owner, r.cancel_requested
          FROM asyncinfer.pipeline_steps s
          JOIN asyncinfer.requests r ON r.id = s.request_id
         WHERE s.run_id = p_run_id AND r.finished_at IS NULL
         ORDER BY r.id
           FOR NO KEY UPDATE OF r SKIP LOCKED
    ),
    canceled AS (
        UPDATE asyncinfer.requests r SET state = 'CANCELED', finished_at = now()
          FROM open o WHERE r.id = o.id AND o.state = 'QUEUED'
        RETURNING r.id, r.attempt
    ),
    flagged AS (
        UPDATE asyncinfer.requests r SET cancel_requested = true
          FROM open o WHERE r.id = o.id AND o.state = 'IN_PROGRESS' AND NOT o.cancel_requested
        RETURNING r.id, r.attempt, r.lease_owner
    ),
    events AS (
        INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt, worker_id, detail)
        SELECT c.id, 'canceled', 'CANCELED'::asyncinfer.request_state, c.attempt, NULL::bigint,
               jsonb_build_object('reason', p_reason)
          FROM canceled c
        UNION ALL
        SELECT f.id, 'cancel_requested', 'IN_PROGRESS', f.attempt, f.lease_owner, jsonb_build_object('reason', p_reason)
          FROM flagged f
    )
    SELECT array_agg(format('%s:%s:%s', f.lease_owner, f.id, f.attempt)) INTO v_notes FROM flagged f;
    PERFORM pg_notify('asyncinfer_cancel', n) FROM unnest(v_notes) AS n;
END
$$;

-- End a run (once): the parent takes its final state, output or error; its
-- webhook and storage write go to the outbox exactly as finish_requests puts
-- them there; whatever of the run is still queued or running is stopped.
CREATE FUNCTION asyncinfer.end_pipeline(
    p_run_id bigint, p_state asyncinfer.request_state, p_output jsonb, p_error jsonb
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_parent     asyncinfer.requests;
    v_deliveries bigint := 0;
BEGIN
    UPDATE asyncinfer.requests r SET state = p_state, finished_at = now()
     WHERE r.id = p_run_id AND r.finished_at IS NULL
    RETURNING * INTO v_parent;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF p_state IN ('SUCCEEDED', 'FAILED') THEN
        INSERT INTO asyncinfer.request_outputs (request_id, output, error)
        VALUES (p_run_id, CASE WHEN p_state = 'SUCCEEDED' THEN p_output END,
                          CASE WHEN p_state = 'FAILED' THEN p_error END);
    END IF;
    INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt, detail)
    VALUES (p_run_id, lower(p_state::text), p_state, 0,
            CASE WHEN p_error IS NOT NULL THEN jsonb_build_object('error', p_error) END);

    IF v_parent.deliver AND p_state IN ('SUCCEEDED', 'FAILED') THEN
        INSERT INTO asyncinfer.deliveries (request_id, kind, target, next_attempt_at)
        SELECT p_run_id, t.kind, t.target,
               CASE WHEN t.kind = 'webhook' AND p_state = 'SUCCEEDED' AND i.output_url IS NOT NULL
                    THEN 'infinity'::timestamptz ELSE now() END
          FROM asyncinfer.request_inputs i
         CROSS JOIN LATERAL (VALUES
                ('storage', CASE WHEN p_state = 'SUCCEEDED' THEN i.output_url END),
                ('webhook', i.webhook_endpoint)) AS t(kind, target)
         WHERE i.request_id = p_run_id AND t.target IS NOT NULL;
        GET DIAGNOSTICS v_deliveries = ROW_COUNT;
    END IF;
    IF v_deliveries > 0 THEN
        PERFORM pg_notify('asyncinfer_delivery', v_deliveries::text);
    END IF;
    PERFORM asyncinfer.stop_pipeline_steps(p_run_id, format('pipeline %s', lower(p_state::text)));
END
$$;

-- Enqueue step p_step of a run from the previous step's output (for step 0,
-- the pipeline input). A fan-out step becomes one request per list element;
-- an empty list skips the step (its output is []); past the last step the
-- run SUCCEEDS with p_previous as its output.
CREATE FUNCTION asyncinfer.enqueue_pipeline_step(p_run_id bigint, p_step integer, p_previous jsonb)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_run     asyncinfer.pipeline_runs;
    v_parent  asyncinfer.requests;
    v_input   jsonb;
    v_meta    jsonb;
    v_def     jsonb;
    v_list    jsonb;
    v_inputs  jsonb;
    v_model   asyncinfer.models;
    v_count   integer;
BEGIN
    SELECT * INTO v_run FROM asyncinfer.pipeline_runs WHERE request_id = p_run_id;
    SELECT * INTO v_parent FROM asyncinfer.requests WHERE id = p_run_id;
    SELECT i.model_input, i.metadata INTO v_input, v_meta FROM asyncinfer.request_inputs i WHERE i.request_id = p_run_id;
    LOOP
        IF p_step >= jsonb_array_length(v_run.steps) THEN
            PERFORM asyncinfer.end_pipeline(p_run_id, 'SUCCEEDED', p_previous, NULL);
            RETURN;
        END IF;
        v_def := v_run.steps -> p_step;

        IF v_def ? 'fan_out' THEN
            v_list := jsonb_path_query_first(p_previous, (v_def ->> 'fan_out')::jsonpath, '{}', true);
            IF jsonb_typeof(v_list) IS DISTINCT FROM 'array' THEN
                PERFORM asyncinfer.end_pipeline(p_run_id, 'FAILED', NULL, jsonb_build_object(
                    'type', 'fan_out_not_a_list', 'step', p_step, 'model', v_def ->> 'model',
                    'message', format('steps[%s].fan_out %s selects %s, not a list', p_step,
                                      v_def ->> 'fan_out', coalesce(jsonb_typeof(v_list), 'nothing'))));
                RETURN;
            END IF;
            IF v_list = '[]'::jsonb THEN
                p_previous := '[]';
                p_step := p_step + 1;
                CONTINUE;
            END IF;
            SELECT jsonb_agg(CASE WHEN v_def ? 'input'
                                  THEN coalesce(asyncinfer.render_step_input(v_def -> 'input', e.value, v_input), 'null')
                                  ELSE e.value END
                             ORDER BY e.ord)
              INTO v_inputs
              FROM jsonb_array_elements(v_list) WITH ORDINALITY AS e(value, ord);
        ELSE
            v_inputs := jsonb_build_array(CASE WHEN v_def ? 'input'
                                               THEN coalesce(asyncinfer.render_step_input(v_def -> 'input', p_previous, v_input), 'null')
                                               ELSE coalesce(p_previous, 'null') END);
        END IF;

        SELECT * INTO v_model FROM asyncinfer.models WHERE name = v_def ->> 'model';
        IF NOT FOUND THEN
            PERFORM asyncinfer.end_pipeline(p_run_id, 'FAILED', NULL, jsonb_build_object(
                'type', 'unknown_model', 'step', p_step, 'model', v_def ->> 'model',
                'message', format('steps[%s].model %s: unknown model', p_step, v_def ->> 'model')));
            RETURN;
        END IF;

        -- Steps take the run's options, else their model's defaults, else the
        -- service's; they have no webhook, output location or idempotency key
        -- of their own (the run delivers once, at its end) and no queue-depth
        -- limit (the run was admitted at submit; refusing now would lose it).
        WITH items AS MATERIALIZED (
            SELECT e.ord - 1 AS item, nextval('asyncinfer.requests_id_seq') AS id, e.value AS model_input
              FROM jsonb_array_elements(v_inputs) WITH ORDINALITY AS e(value, ord)
        ),
        inserted AS (
            INSERT INTO asyncinfer.requests
                   (id, public_id, model, priority, max_attempts, initial_delay_ms, max_delay_ms,
                    expires_at, api_key_id, parent_id)
            SELECT i.id, asyncinfer.new_public_id(i.id), v_model.name,
                   coalesce((v_run.options ->> 'priority')::smallint, v_model.default_priority, 1),
                   coalesce((v_run.options #>> '{inference_retry_config,max_attempts}')::smallint,
                            v_model.default_max_attempts, 3),
                   coalesce((v_run.options #>> '{inference_retry_config,initial_delay_ms}')::integer,
                            v_model.default_initial_delay_ms, 1000),
                   coalesce((v_run.options #>> '{inference_retry_config,max_delay_ms}')::integer,
                            v_model.default_max_delay_ms, 5000),
                   now() + make_interval(secs => coalesce((v_run.options ->> 'max_time_in_queue_seconds')::integer,
                                                          v_model.default_max_time_in_queue_s, 600)),
                   v_parent.api_key_id, p_run_id
              FROM items i
             ORDER BY i.item
            RETURNING 1
        ),
        inputs AS (
            INSERT INTO asyncinfer.request_inputs (request_id, model_input, metadata)
            SELECT i.id, i.model_input, v_meta FROM items i
        ),
        steps AS (
            INSERT INTO asyncinfer.pipeline_steps (request_id, run_id, step, item)
            SELECT i.id, p_run_id, p_step, i.item FROM items i
        ),
        events AS (
            INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt, detail)
            SELECT i.id, 'submitted', 'QUEUED', 0, jsonb_build_object('pipeline_step', p_step) FROM items i
        )
        SELECT count(*) INTO v_count FROM inserted;

        UPDATE asyncinfer.pipeline_runs SET current_step = p_step, pending_items = v_count
         WHERE request_id = p_run_id;
        INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt, detail)
        VALUES (p_run_id, 'step_queued', 'IN_PROGRESS', 0,
                jsonb_build_object('step', p_step, 'model', v_model.name, 'requests', v_count));
        PERFORM pg_notify('asyncinfer_queue', format('submit:%s:%s', v_model.name, v_count));
        RETURN;
    END LOOP;
END
$$;

-- A step request ended (any terminal state): move its run along. Called by
-- the trigger below, in the transaction that ended the step.
CREATE FUNCTION asyncinfer.advance_pipeline(
    p_run_id bigint, p_step_request_id bigint, p_step_state asyncinfer.request_state
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_parent  asyncinfer.requests;
    v_run     asyncinfer.pipeline_runs;
    v_step    asyncinfer.pipeline_steps;
    v_def     jsonb;
    v_output  jsonb;
    v_pending integer;
BEGIN
    SELECT * INTO v_parent FROM asyncinfer.requests r WHERE r.id = p_run_id FOR NO KEY UPDATE;
    IF NOT FOUND OR v_parent.finished_at IS NOT NULL THEN
        RETURN;  -- the run has ended (failed, canceled): a late step changes nothing
    END IF;
    SELECT * INTO v_run FROM asyncinfer.pipeline_runs WHERE request_id = p_run_id;
    SELECT * INTO v_step FROM asyncinfer.pipeline_steps WHERE request_id = p_step_request_id;
    IF NOT FOUND OR v_step.step <> v_run.current_step THEN
        RETURN;  -- not the step the run waits for: never advance twice
    END IF;
    v_def := v_run.steps -> v_step.step;

    IF v_parent.cancel_requested THEN
        PERFORM asyncinfer.end_pipeline(p_run_id, 'CANCELED', NULL, NULL);
        RETURN;
    END IF;

    IF p_step_state <> 'SUCCEEDED' THEN
        PERFORM asyncinfer.end_pipeline(
            p_run_id,
            CASE WHEN p_step_state = 'CANCELED'                      THEN 'CANCELED'
                 WHEN p_step_state = 'EXPIRED' AND v_step.step = 0   THEN 'EXPIRED'  -- nothing of it ever ran
                 ELSE 'FAILED' END::asyncinfer.request_state,
            NULL,
            jsonb_build_object(
                'type', 'step_' || lower(p_step_state::text),
                'step', v_step.step,
                'model', v_def ->> 'model',
                'request_id', (SELECT r.public_id FROM asyncinfer.requests r WHERE r.id = p_step_request_id),
                'message', format('steps[%s] (%s) ended %s', v_step.step, v_def ->> 'model', p_step_state),
                'error', (SELECT o.error FROM asyncinfer.request_outputs o WHERE o.request_id = p_step_request_id)));
        RETURN;
    END IF;

    IF v_def ? 'fan_out' THEN
        UPDATE asyncinfer.pipeline_runs SET pending_items = pending_items - 1
         WHERE request_id = p_run_id
        RETURNING pending_items INTO v_pending;
        IF v_pending > 0 THEN
            RETURN;  -- gather waits for the last item
        END IF;
        SELECT jsonb_agg(coalesce(o.output, 'null') ORDER BY s.item) INTO v_output
          FROM asyncinfer.pipeline_steps s
          LEFT JOIN asyncinfer.request_outputs o ON o.request_id = s.request_id
         WHERE s.run_id = p_run_id AND s.step = v_step.step;
    ELSE
        SELECT o.output INTO v_output FROM asyncinfer.request_outputs o WHERE o.request_id = p_step_request_id;
    END IF;
    PERFORM asyncinfer.enqueue_pipeline_step(p_run_id, v_step.step + 1, coalesce(v_output, 'null'));
END
$$;

-- No EXCEPTION block here, on purpose: each would open a subtransaction per
-- finished step, and a batch ending more than 64 steps would overflow the
-- backend's subtransaction cache, which slows every other session's
-- snapshots. Advancing cannot raise on data instead: steps are checked by
-- CHECK constraints (below, and on pipelines), options by the parent row's
-- own constraints at submit, JSON paths run with silent => true, and a
-- missing model fails the run. What can still raise (a deadlock, a lock or
-- statement timeout) is the caller's to retry, as for any finish.
CREATE FUNCTION asyncinfer.pipeline_step_ended()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM asyncinfer.advance_pipeline(NEW.parent_id, NEW.id, NEW.state);
    RETURN NULL;
END
$$;

-- Steps stored anywhere are valid steps, whoever writes them (an admin's
-- raw UPDATE included): advancing relies on it.
ALTER TABLE asyncinfer.pipelines
    ADD CONSTRAINT pipelines_steps_valid CHECK (asyncinfer.check_pipeline_steps(steps) IS NOT NULL);
ALTER TABLE asyncinfer.pipeline_runs
    ADD CONSTRAINT pipeline_runs_steps_valid CHECK (asyncinfer.check_pipeline_steps(steps) IS NOT NULL);

-- Fires only for step requests reaching a terminal state: for every other
-- request the WHEN clause is false and nothing runs.
CREATE TRIGGER pipeline_step_ended
AFTER UPDATE OF state ON asyncinfer.requests
FOR EACH ROW
WHEN (NEW.parent_id IS NOT NULL AND OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL)
EXECUTE FUNCTION asyncinfer.pipeline_step_ended();

------------------------------------------------------------------------------
-- Submit
------------------------------------------------------------------------------

-- Submit one run (a JSON object) or many (an array) of a pipeline: the
-- declared one named p_pipeline, or, with p_steps, an inline one labelled
-- p_pipeline. Items have the async_predict shape. Every step's model must
-- exist; the first step's model's max_queue_depth applies. Returns one row
-- per item in input order, as submit_requests does.
CREATE FUNCTION asyncinfer.submit_pipeline(
    p_pipeline text, p_items jsonb, p_api_key_id bigint DEFAULT NULL, p_steps jsonb DEFAULT NULL
) RETURNS TABLE (ordinal bigint, request_id uuid, created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_steps   jsonb;
    v_first   asyncinfer.models;
    v_missing text;
    v_index   bigint;
    v_count   integer;
    v_queued  bigint;
    v_ords    bigint[];
    v_ids     uuid[];
    v_keys    text[];
    v_new     bigint[];
BEGIN
    IF p_pipeline IS NULL OR p_pipeline !~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$' THEN
        RAISE EXCEPTION 'pipeline: must be a name matching [A-Za-z0-9][A-Za-z0-9._-]{0,127}' USING ERRCODE = '22023';
    END IF;
    IF p_steps IS NULL THEN
        SELECT p.steps INTO v_steps FROM asyncinfer.pipelines p WHERE p.name = p_pipeline;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'pipeline %: unknown pipeline', p_pipeline USING ERRCODE = 'AI404';
        END IF;
    ELSE
        v_steps := asyncinfer.check_pipeline_steps(p_steps);
    END IF;
    SELECT e.ord - 1, e.step ->> 'model' INTO v_index, v_missing
      FROM jsonb_array_elements(v_steps) WITH ORDINALITY AS e(step, ord)
     WHERE NOT EXISTS (SELECT 1 FROM asyncinfer.models m WHERE m.name = e.step ->> 'model')
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'model %: unknown model (pipeline %, steps[%])', v_missing, p_pipeline, v_index
            USING ERRCODE = 'AI404';
    END IF;
    SELECT * INTO v_first FROM asyncinfer.models WHERE name = v_steps #>> '{0,model}';

    IF jsonb_typeof(p_items) = 'object' THEN
        p_items := jsonb_build_array(p_items);
    ELSIF jsonb_typeof(p_items) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'items: must be a JSON object or an array of objects' USING ERRCODE = '22023';
    END IF;
    v_count := jsonb_array_length(p_items);
    IF v_count = 0 THEN
        RETURN;
    END IF;
    SELECT e.ord - 1 INTO v_index
      FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(item, ord)
     WHERE jsonb_typeof(e.item) IS DISTINCT FROM 'object' OR coalesce(e.item -> 'model_input', 'null') = 'null'
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'items[%].model_input: required (any JSON value but null)', v_index USING ERRCODE = '22023';
    END IF;
    IF v_first.max_queue_depth IS NOT NULL THEN
        SELECT count(*) INTO v_queued FROM asyncinfer.requests WHERE model = v_first.name AND state = 'QUEUED';
        IF v_queued + v_count > v_first.max_queue_depth THEN
            RAISE EXCEPTION 'model %: queue is full (% queued, max_queue_depth %; first step of pipeline %)',
                v_first.name, v_queued, v_first.max_queue_depth, p_pipeline USING ERRCODE = 'AI429';
        END IF;
    END IF;

    -- The parent rows. Their retry and deadline columns show the options the
    -- first step runs with; each step computes its own from its model.
    WITH parsed AS MATERIALIZED (
        SELECT e.ord, nextval('asyncinfer.requests_id_seq') AS id, e.item, r.*
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
               (id, public_id, model, state, priority, max_attempts, initial_delay_ms, max_delay_ms,
                expires_at, api_key_id, idempotency_key, deliver, started_at)
        SELECT c.id, c.public_id, 'pipeline:' || p_pipeline, 'IN_PROGRESS',
               coalesce(c.priority, v_first.default_priority, 1),
               coalesce((c.inference_retry_config ->> 'max_attempts')::smallint, v_first.default_max_attempts, 3),
               coalesce((c.inference_retry_config ->> 'initial_delay_ms')::integer, v_first.default_initial_delay_ms, 1000),
               coalesce((c.inference_retry_config ->> 'max_delay_ms')::integer, v_first.default_max_delay_ms, 5000),
               now() + make_interval(secs => coalesce(c.max_time_in_queue_seconds,
                                                      v_first.default_max_time_in_queue_s, 600)),
               p_api_key_id, c.idempotency_key,
               c.webhook_endpoint IS NOT NULL OR c.output_url IS NOT NULL, now()
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
    runs AS (
        INSERT INTO asyncinfer.pipeline_runs (request_id, pipeline, steps, options)
        SELECT n.id, p_pipeline, v_steps,
               jsonb_strip_nulls(jsonb_build_object(
                   'priority', c.item -> 'priority',
                   'max_time_in_queue_seconds', c.item -> 'max_time_in_queue_seconds',
                   'inference_retry_config', c.item -> 'inference_retry_config'))
          FROM inserted n JOIN items c USING (id)
    ),
    events AS (
        INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt, detail)
        SELECT n.id, 'submitted', 'IN_PROGRESS', 0,
               jsonb_build_object('pipeline', p_pipeline, 'steps', jsonb_array_length(v_steps))
          FROM inserted n
    )
    SELECT array_agg(c.ord ORDER BY c.ord),
           array_agg(n.public_id ORDER BY c.ord),
           array_agg(c.idempotency_key ORDER BY c.ord),
           array_agg(n.id) FILTER (WHERE n.id IS NOT NULL)
      INTO v_ords, v_ids, v_keys, v_new
      FROM items c LEFT JOIN inserted n USING (id);

    -- Step 0 of each new run, in its own statement (it reads the rows above).
    PERFORM asyncinfer.enqueue_pipeline_step(i.request_id, 0, i.model_input)
       FROM asyncinfer.request_inputs i
      WHERE i.request_id = ANY (v_new)
      ORDER BY i.request_id;

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
-- Cancel, requeue, retention: the 0001 functions, taught about runs
------------------------------------------------------------------------------

-- As in 0001, plus: canceling a run flags its parent, cancels its queued
-- steps at once and asks its running ones to stop; the run ends CANCELED
-- when its current step ends (at once when that step was only queued).
CREATE OR REPLACE FUNCTION asyncinfer.cancel_request(p_public_id uuid, p_api_key_id bigint DEFAULT NULL)
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

    IF v_req.model LIKE 'pipeline:%' THEN
        IF v_req.state <> 'IN_PROGRESS' THEN
            RETURN QUERY SELECT v_req.state, v_req.cancel_requested, false;
            RETURN;
        END IF;
        IF NOT v_req.cancel_requested THEN
            UPDATE asyncinfer.requests r SET cancel_requested = true WHERE r.id = v_req.id;
            INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt)
            VALUES (v_req.id, 'cancel_requested', 'IN_PROGRESS', 0);
        END IF;
        PERFORM asyncinfer.stop_pipeline_steps(v_req.id, 'pipeline canceled');
        RETURN QUERY SELECT r.state, r.cancel_requested, NOT v_req.cancel_requested
                       FROM asyncinfer.requests r WHERE r.id = v_req.id;
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

-- A run is not a queued request: requeue one of its steps instead.
CREATE OR REPLACE FUNCTION asyncinfer.requeue_request(p_public_id uuid)
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
    IF v_req.model LIKE 'pipeline:%' THEN
        RAISE EXCEPTION 'request %: is a pipeline run; requeue its current step instead (see asyncinfer.pipeline_status)',
            p_public_id USING ERRCODE = 'AI409';
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
        PERFORM pg_notify('asyncinfer_cancel', format('%s:%s:%s', v_req.lease_owner, v_req.id, v_req.attempt));
    END IF;
    PERFORM pg_notify('asyncinfer_queue', format('submit:%s:1', v_req.model));
    RETURN 'QUEUED';
END
$$;

-- As in 0001, plus the pipeline bookkeeping rows of the requests it deletes.
CREATE OR REPLACE FUNCTION asyncinfer.prune_finished(
    p_request_retention interval DEFAULT interval '7 days',
    p_output_retention interval DEFAULT interval '7 days',
    p_limit integer DEFAULT 5000
) RETURNS TABLE (requests_deleted bigint, outputs_deleted bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_ids     bigint[];
    v_outputs bigint;
BEGIN
    SELECT array_agg(r.id) INTO v_ids
      FROM (SELECT r.id FROM asyncinfer.requests r
             WHERE r.finished_at < now() - p_request_retention
             ORDER BY r.finished_at
             LIMIT p_limit
               FOR UPDATE SKIP LOCKED) r;
    IF v_ids IS NOT NULL THEN
        DELETE FROM asyncinfer.request_events e WHERE e.request_id = ANY (v_ids);
        DELETE FROM asyncinfer.request_inputs i WHERE i.request_id = ANY (v_ids);
        DELETE FROM asyncinfer.request_outputs o WHERE o.request_id = ANY (v_ids);
        DELETE FROM asyncinfer.deliveries d WHERE d.request_id = ANY (v_ids);
        DELETE FROM asyncinfer.pipeline_steps s WHERE s.request_id = ANY (v_ids);
        DELETE FROM asyncinfer.pipeline_runs p WHERE p.request_id = ANY (v_ids);
        DELETE FROM asyncinfer.requests r WHERE r.id = ANY (v_ids);
    END IF;

    WITH old AS (
        SELECT o.request_id FROM asyncinfer.request_outputs o
         WHERE o.created_at < now() - p_output_retention
         ORDER BY o.created_at
         LIMIT p_limit
    ), gone AS (
        DELETE FROM asyncinfer.request_outputs o USING old WHERE o.request_id = old.request_id RETURNING 1
    )
    SELECT count(*) INTO v_outputs FROM gone;

    RETURN QUERY SELECT coalesce(cardinality(v_ids), 0)::bigint, v_outputs;
END
$$;

------------------------------------------------------------------------------
-- Reading a run
------------------------------------------------------------------------------

-- Each step of a run, for status pages and psql:
--   SELECT * FROM asyncinfer.pipeline_status('<request id>');
-- A step not reached yet has requests = 0 and NULL times.
CREATE FUNCTION asyncinfer.pipeline_status(p_public_id uuid)
RETURNS TABLE (
    pipeline text, current_step smallint, step integer, model text, fan_out boolean,
    requests bigint, queued bigint, in_progress bigint, succeeded bigint, failed bigint,
    canceled bigint, expired bigint, request_id uuid,
    created_at timestamptz, started_at timestamptz, finished_at timestamptz
)
LANGUAGE sql STABLE AS $$
    SELECT p.pipeline, p.current_step, (d.ord - 1)::integer, d.def ->> 'model', d.def ? 'fan_out',
           count(r.id),
           count(r.id) FILTER (WHERE r.state = 'QUEUED'),
           count(r.id) FILTER (WHERE r.state = 'IN_PROGRESS'),
           count(r.id) FILTER (WHERE r.state = 'SUCCEEDED'),
           count(r.id) FILTER (WHERE r.state = 'FAILED'),
           count(r.id) FILTER (WHERE r.state = 'CANCELED'),
           count(r.id) FILTER (WHERE r.state = 'EXPIRED'),
           CASE WHEN count(r.id) = 1 THEN min(r.public_id::text)::uuid END,
           min(r.created_at), min(r.started_at),
           CASE WHEN count(r.id) > 0 AND count(r.finished_at) = count(r.id) THEN max(r.finished_at) END
      FROM asyncinfer.requests parent
      JOIN asyncinfer.pipeline_runs p ON p.request_id = parent.id
     CROSS JOIN LATERAL jsonb_array_elements(p.steps) WITH ORDINALITY AS d(def, ord)
      LEFT JOIN asyncinfer.pipeline_steps s ON s.run_id = p.request_id AND s.step = d.ord - 1
      LEFT JOIN asyncinfer.requests r ON r.id = s.request_id
     WHERE parent.id = asyncinfer.request_id_of(p_public_id) AND parent.public_id = p_public_id
     GROUP BY p.pipeline, p.current_step, d.ord, d.def
     ORDER BY d.ord
$$;

-- As in 0001, less pipeline runs: a run is IN_PROGRESS without a lease or a
-- worker by design; it is stuck only when its current step is (and that
-- step shows here itself).
CREATE OR REPLACE VIEW asyncinfer.stuck_requests AS
SELECT r.public_id                                    AS request_id,
       r.model,
       r.attempt,
       r.lease_owner                                  AS worker_id,
       w.name                                         AS worker_name,
       w.hostname,
       r.started_at,
       r.lease_expires_at,
       w.heartbeat_at,
       r.cancel_requested,
       CASE WHEN r.lease_expires_at < now() THEN 'lease expired'
            ELSE 'worker heartbeat older than 60 s' END AS reason
  FROM asyncinfer.requests r
  LEFT JOIN asyncinfer.workers w ON w.id = r.lease_owner
 WHERE r.state = 'IN_PROGRESS'
   AND r.model NOT LIKE 'pipeline:%'
   AND (r.lease_expires_at < now() OR w.heartbeat_at IS NULL OR w.heartbeat_at < now() - interval '60 seconds');

-- Whether a run's current step still has a request that has not finished
-- (what keeps an IN_PROGRESS run moving).
CREATE FUNCTION asyncinfer.run_has_open_step(p_run_id bigint)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1
          FROM asyncinfer.pipeline_runs p
          JOIN asyncinfer.pipeline_steps s ON s.run_id = p.request_id AND s.step = p.current_step
          JOIN asyncinfer.requests sr ON sr.id = s.request_id
         WHERE p.request_id = p_run_id AND sr.finished_at IS NULL)
$$;

-- A run IN_PROGRESS whose current step has no unfinished request can only
-- come from outside the queue's functions (a step row deleted, or ended by a
-- raw UPDATE that did not change its state): nothing would ever move it, so
-- the maintenance tick ends it FAILED, naming the step. Returns the runs.
CREATE FUNCTION asyncinfer.reconcile_pipelines()
RETURNS TABLE (request_id uuid, step smallint)
LANGUAGE plpgsql AS $$
DECLARE
    v_candidate bigint;
    v_public    uuid;
    v_step      smallint;
    v_model     text;
BEGIN
    FOR v_candidate IN
        SELECT r.id FROM asyncinfer.requests r
         WHERE r.state = 'IN_PROGRESS' AND r.model LIKE 'pipeline:%'
           AND r.created_at < now() - interval '10 seconds'   -- never a run being submitted right now
           AND NOT asyncinfer.run_has_open_step(r.id)
         ORDER BY r.id
    LOOP
        -- Lock the run, then look again (a new statement, so a new snapshot):
        -- a finish may have moved it on meanwhile.
        SELECT r.public_id INTO v_public FROM asyncinfer.requests r
         WHERE r.id = v_candidate AND r.state = 'IN_PROGRESS'
           FOR NO KEY UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND OR asyncinfer.run_has_open_step(v_candidate);
        SELECT p.current_step, p.steps -> p.current_step ->> 'model' INTO v_step, v_model
          FROM asyncinfer.pipeline_runs p WHERE p.request_id = v_candidate;
        PERFORM asyncinfer.end_pipeline(v_candidate, 'FAILED', NULL, jsonb_build_object(
            'type', 'pipeline_stalled', 'step', v_step, 'model', v_model,
            'message', format('steps[%s] (%s) has no request left to run (changed outside the queue functions?)',
                              v_step, v_model)));
        RAISE WARNING 'asyncinfer: pipeline run % stalled at steps[%]; ended FAILED', v_public, v_step;
        request_id := v_public;
        step := v_step;
        RETURN NEXT;
    END LOOP;
END
$$;

-- As in 0001, plus asyncinfer.reconcile_pipelines (counted in `reconciled`).
CREATE OR REPLACE FUNCTION asyncinfer.run_maintenance(
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
        (SELECT count(*) FROM asyncinfer.reconcile_capacity()) + (SELECT count(*) FROM asyncinfer.reconcile_pipelines()),
        (SELECT p.requests_deleted FROM asyncinfer.prune_finished(p_request_retention, p_output_retention) p);
END
$$;
