-- Cancel one request (any API key). QUEUED ends CANCELED at once; IN_PROGRESS
-- is flagged, its worker told over NOTIFY, and it ends CANCELED.
--   psql "$DATABASE_URL" -v request_id=<uuid> -f sql/admin/cancel_request.sql
\set ON_ERROR_STOP on
SELECT state, cancel_requested, changed
  FROM asyncinfer.cancel_request(:'request_id'::uuid);
