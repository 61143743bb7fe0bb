-- Change how many requests of a model may run at once, over all workers.
-- Lowering it below what runs now lets the running ones drain.
--   psql "$DATABASE_URL" -v model=echo -v capacity=8 -f sql/admin/set_capacity.sql
\set ON_ERROR_STOP on
SELECT name, capacity, in_flight, paused
  FROM asyncinfer.set_capacity(:'model', :capacity);
