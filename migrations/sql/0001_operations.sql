-- asyncinfer, migration 0001: operator views and retention.

-- Per model: capacity against what runs, and what waits by priority.
CREATE VIEW asyncinfer.queue_overview AS
SELECT m.name                                   AS model,
       m.capacity,
       m.in_flight,
       m.paused,
       m.max_queue_depth,
       coalesce(q.queued, 0)                    AS queued,
       coalesce(q.queued_p0, 0)                 AS queued_p0,
       coalesce(q.queued_p1, 0)                 AS queued_p1,
       coalesce(q.queued_p2, 0)                 AS queued_p2,
       coalesce(q.realtime, 0)                  AS queued_realtime,
       coalesce(p.in_progress, 0)               AS in_progress,
       q.oldest_queued_at,
       extract(epoch FROM now() - q.oldest_queued_at) AS oldest_queued_age_seconds
  FROM asyncinfer.models m
  -- Two lookups, each on its partial index (requests_ready, requests_running),
  -- so the view never scans finished rows.
  LEFT JOIN LATERAL (
        SELECT count(*)                                  AS queued,
               count(*) FILTER (WHERE r.priority = 0)    AS queued_p0,
               count(*) FILTER (WHERE r.priority = 1)    AS queued_p1,
               count(*) FILTER (WHERE r.priority = 2)    AS queued_p2,
               count(*) FILTER (WHERE r.priority < 0)    AS realtime,
               min(r.created_at)                         AS oldest_queued_at
          FROM asyncinfer.requests r
         WHERE r.model = m.name AND r.state = 'QUEUED'
  ) q ON true
  LEFT JOIN LATERAL (
        SELECT count(*) AS in_progress
          FROM asyncinfer.requests r
         WHERE r.model = m.name AND r.state = 'IN_PROGRESS'
  ) p ON true;

-- Worker processes: alive when their heartbeat is recent (renewed every
-- lease/3 while running), with the leases they hold now.
CREATE VIEW asyncinfer.workers_overview AS
SELECT w.id,
       w.name,
       w.hostname,
       w.pid,
       w.models,
       w.state,
       w.detail,
       w.state <> 'stopped' AND w.heartbeat_at > now() - interval '60 seconds' AS alive,
       w.heartbeat_at,
       extract(epoch FROM now() - w.heartbeat_at)                             AS heartbeat_age_seconds,
       (SELECT count(*) FROM asyncinfer.requests r
         WHERE r.state = 'IN_PROGRESS' AND r.lease_owner = w.id)               AS held_leases,
       w.started_at,
       w.stopped_at
  FROM asyncinfer.workers w;

-- Running requests that look stuck: lease already expired (the reaper will
-- take them on its next tick) or the worker's heartbeat is old.
CREATE VIEW asyncinfer.stuck_requests AS
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
   AND (r.lease_expires_at < now() OR w.heartbeat_at IS NULL OR w.heartbeat_at < now() - interval '60 seconds');

-- Retention, in small batches that never hold long locks:
--   * outputs of requests finished before now() - p_output_retention are
--     dropped (the request row and its history stay);
--   * requests finished before now() - p_request_retention are deleted with
--     their input, output and events.
-- Returns how many requests and outputs were removed. The maintenance tick
-- calls it; it is safe to call by hand.
CREATE FUNCTION asyncinfer.prune_finished(
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

CREATE INDEX request_outputs_created_at ON asyncinfer.request_outputs (created_at);
