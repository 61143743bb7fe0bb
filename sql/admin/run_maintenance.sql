-- One maintenance tick by hand: rescue expired leases, expire overdue queued
-- requests, reconcile capacity. Safe next to running workers (advisory lock).
--   psql "$DATABASE_URL" -f sql/admin/run_maintenance.sql
\set ON_ERROR_STOP on
SELECT leader, reaped, expired, reconciled, pruned FROM asyncinfer.run_maintenance();
