-- asyncinfer, migration 0002: API keys, and the one model update the admin
-- API needs (defaults, clearing max_queue_depth).
--
-- A key is a high-entropy random string shown once at creation. Only its
-- SHA-256 is stored (a hash of 190+ random bits needs no salt or slow KDF);
-- `prefix` is its first characters, for people to tell keys apart.
-- requests.api_key_id refers to api_keys.id (no foreign key: the hot table
-- takes no extra lock or check per insert; keys are revoked, never deleted).

CREATE TABLE asyncinfer.api_keys (
    id                    bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                  text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    key_hash              bytea       NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    prefix                text        NOT NULL CHECK (length(prefix) BETWEEN 4 AND 32),
    is_admin              boolean     NOT NULL DEFAULT false,
    -- submit calls per second, per API process; NULL: unlimited
    rate_limit_per_second double precision CHECK (rate_limit_per_second IS NULL OR rate_limit_per_second > 0),
    created_at            timestamptz NOT NULL DEFAULT now(),
    revoked_at            timestamptz
);

-- Create a key from its hash (the API and `asyncinfer keys create` generate
-- the key and hash it; the secret itself never reaches the database).
CREATE FUNCTION asyncinfer.create_api_key(
    p_name text, p_key_hash bytea, p_prefix text, p_is_admin boolean DEFAULT false,
    p_rate_limit_per_second double precision DEFAULT NULL
) RETURNS asyncinfer.api_keys
LANGUAGE sql AS $$
    INSERT INTO asyncinfer.api_keys (name, key_hash, prefix, is_admin, rate_limit_per_second)
    VALUES (p_name, p_key_hash, p_prefix, coalesce(p_is_admin, false), p_rate_limit_per_second)
    RETURNING *
$$;

-- Revoke a key at once: API processes cache keys for a few seconds and drop
-- the cached entry when they hear this NOTIFY. Returns the key row (already
-- revoked ones unchanged); no row for an unknown id.
--   psql: SELECT * FROM asyncinfer.revoke_api_key(42);
CREATE FUNCTION asyncinfer.revoke_api_key(p_id bigint)
RETURNS SETOF asyncinfer.api_keys
LANGUAGE plpgsql AS $$
DECLARE
    v_key asyncinfer.api_keys;
BEGIN
    UPDATE asyncinfer.api_keys k SET revoked_at = coalesce(k.revoked_at, now())
     WHERE k.id = p_id
    RETURNING * INTO v_key;
    IF FOUND THEN
        PERFORM pg_notify('asyncinfer_api_keys', p_id::text);
        RETURN NEXT v_key;
    END IF;
END
$$;

-- Admin: change a model (creating it when absent). p_changes is a JSON
-- object; a key that is present is applied (null clears an optional value),
-- a key that is absent keeps the stored value:
--   capacity, paused, max_queue_depth, default_priority,
--   default_max_time_in_queue_s, default_max_attempts,
--   default_initial_delay_ms, default_max_delay_ms, default_output_url
-- Capacity and pause go through set_capacity / pause_model / resume_model,
-- so their wake-ups and rules stay in one place.
--   psql: SELECT * FROM asyncinfer.update_model('embed', '{"capacity": 8, "default_priority": 2}');
CREATE FUNCTION asyncinfer.update_model(p_name text, p_changes jsonb DEFAULT '{}')
RETURNS TABLE (created boolean, model jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_created boolean := false;
    v_unknown text;
    v_model   asyncinfer.models;
BEGIN
    IF jsonb_typeof(p_changes) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'changes: must be a JSON object' USING ERRCODE = '22023';
    END IF;
    SELECT k INTO v_unknown FROM jsonb_object_keys(p_changes) AS k
     WHERE k NOT IN ('capacity', 'paused', 'max_queue_depth', 'default_priority', 'default_max_time_in_queue_s',
                     'default_max_attempts', 'default_initial_delay_ms', 'default_max_delay_ms',
                     'default_output_url')
     LIMIT 1;
    IF v_unknown IS NOT NULL THEN
        RAISE EXCEPTION '%: unknown model setting', v_unknown USING ERRCODE = '22023';
    END IF;
    IF p_changes ? 'capacity' AND jsonb_typeof(p_changes -> 'capacity') IS DISTINCT FROM 'number' THEN
        RAISE EXCEPTION 'capacity: must be an integer >= 0' USING ERRCODE = '22023';
    END IF;
    IF p_changes ? 'paused' AND jsonb_typeof(p_changes -> 'paused') IS DISTINCT FROM 'boolean' THEN
        RAISE EXCEPTION 'paused: must be true or false' USING ERRCODE = '22023';
    END IF;

    PERFORM 1 FROM asyncinfer.models m WHERE m.name = p_name FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM asyncinfer.upsert_model(p_name, (p_changes ->> 'capacity')::integer, NULL,
                                        (p_changes ->> 'paused')::boolean);
        v_created := true;
    ELSE
        IF p_changes ? 'capacity' THEN
            PERFORM asyncinfer.set_capacity(p_name, (p_changes ->> 'capacity')::integer);
        END IF;
        IF (p_changes ->> 'paused')::boolean THEN
            PERFORM asyncinfer.pause_model(p_name);
        ELSIF NOT (p_changes ->> 'paused')::boolean THEN
            PERFORM asyncinfer.resume_model(p_name);
        END IF;
    END IF;

    UPDATE asyncinfer.models m SET
        max_queue_depth = CASE WHEN p_changes ? 'max_queue_depth'
                               THEN (p_changes ->> 'max_queue_depth')::integer ELSE m.max_queue_depth END,
        default_priority = CASE WHEN p_changes ? 'default_priority'
                                THEN (p_changes ->> 'default_priority')::smallint ELSE m.default_priority END,
        default_max_time_in_queue_s = CASE WHEN p_changes ? 'default_max_time_in_queue_s'
                                           THEN (p_changes ->> 'default_max_time_in_queue_s')::integer
                                           ELSE m.default_max_time_in_queue_s END,
        default_max_attempts = CASE WHEN p_changes ? 'default_max_attempts'
                                    THEN (p_changes ->> 'default_max_attempts')::smallint
                                    ELSE m.default_max_attempts END,
        default_initial_delay_ms = CASE WHEN p_changes ? 'default_initial_delay_ms'
                                        THEN (p_changes ->> 'default_initial_delay_ms')::integer
                                        ELSE m.default_initial_delay_ms END,
        default_max_delay_ms = CASE WHEN p_changes ? 'default_max_delay_ms'
                                    THEN (p_changes ->> 'default_max_delay_ms')::integer
                                    ELSE m.default_max_delay_ms END,
        default_output_url = CASE WHEN p_changes ? 'default_output_url'
                                  THEN p_changes ->> 'default_output_url' ELSE m.default_output_url END,
        updated_at = now()
     WHERE m.name = p_name
    RETURNING * INTO v_model;

    RETURN QUERY SELECT v_created, to_jsonb(v_model);
END
$$;
