-- The steps of a pipeline run: one row per declared step with its model,
-- request counts by state (fan-out steps have many), the step's request id
-- (a plain step), and its times. A step not reached yet has requests = 0.
--   psql "$DATABASE_URL" -v request_id=<uuid of the run> -f sql/admin/pipeline_status.sql
-- To stop a run: sql/admin/cancel_request.sql with the run's id. To retry a
-- stuck step now: sql/admin/requeue_request.sql with the step's request_id.
\set ON_ERROR_STOP on
SELECT step, model, fan_out, requests, queued, in_progress, succeeded, failed, canceled, expired,
       request_id, started_at, finished_at
  FROM asyncinfer.pipeline_status(:'request_id'::uuid);
