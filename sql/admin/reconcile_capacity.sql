-- Recount every model's in-flight counter from its running rows (the
-- maintenance tick does this too). Lists the models that had drifted.
--   psql "$DATABASE_URL" -f sql/admin/reconcile_capacity.sql
\set ON_ERROR_STOP on
SELECT model, counted, running FROM asyncinfer.reconcile_capacity();
