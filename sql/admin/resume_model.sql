-- Hand out a paused model's requests again (idle workers are woken).
--   psql "$DATABASE_URL" -v model=echo -f sql/admin/resume_model.sql
\set ON_ERROR_STOP on
SELECT name, capacity, in_flight, paused FROM asyncinfer.resume_model(:'model');
