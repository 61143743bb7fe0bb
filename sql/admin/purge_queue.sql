-- Cancel every QUEUED request of a model (running ones are left alone).
--   psql "$DATABASE_URL" -v model=echo -f sql/admin/purge_queue.sql
\set ON_ERROR_STOP on
SELECT asyncinfer.purge_queue(:'model') AS canceled;
