-- Failure, retry, expiry and cancel rates per model over a window.
-- Rates are fractions of the requests that finished in the window; retries
-- count every retried attempt (model errors and lost leases).
--   psql "$DATABASE_URL" [-v hours=24] -f sql/reports/outcome_rates.sql
\if :{?hours} \else \set hours 24 \endif
WITH finished AS (
    SELECT id, model, state, attempt
      FROM asyncinfer.requests
     WHERE finished_at >= now() - make_interval(hours => :hours)
),
retries AS (
    SELECT f.model, count(*) AS retries
      FROM asyncinfer.request_events e
      JOIN finished f ON f.id = e.request_id
     WHERE e.kind = 'retried' OR (e.kind = 'lease_lost' AND e.state = 'QUEUED')
     GROUP BY f.model
)
SELECT f.model,
       count(*)                                                              AS finished,
       round(avg((f.state = 'SUCCEEDED')::int), 4)                           AS success_rate,
       round(avg((f.state = 'FAILED')::int), 4)                              AS failure_rate,
       round(avg((f.state = 'EXPIRED')::int), 4)                             AS expiry_rate,
       round(avg((f.state = 'CANCELED')::int), 4)                            AS cancel_rate,
       coalesce(max(r.retries), 0)                                           AS retries,
       round(coalesce(max(r.retries), 0)::numeric / count(*), 4)             AS retries_per_request,
       round(avg((f.attempt > 1)::int), 4)                                   AS retried_request_rate
  FROM finished f
  LEFT JOIN retries r ON r.model = f.model
 GROUP BY f.model
 ORDER BY f.model;
