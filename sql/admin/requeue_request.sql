-- Run a request again now: a QUEUED one skips its backoff; an IN_PROGRESS one
-- is taken from its (stuck) worker, whose late finish is then refused.
-- Terminal requests are never reopened: resubmit them instead.
--   psql "$DATABASE_URL" -v request_id=<uuid> -f sql/admin/requeue_request.sql
\set ON_ERROR_STOP on
SELECT asyncinfer.requeue_request(:'request_id'::uuid) AS state;
