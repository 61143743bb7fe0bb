-- Stop handing out a model's requests (running ones finish; submits still queue).
--   psql "$DATABASE_URL" -v model=echo -f sql/admin/pause_model.sql
\set ON_ERROR_STOP on
SELECT name, capacity, in_flight, paused FROM asyncinfer.pause_model(:'model');
