-- The slowest finished requests: end to end, split into queue and run time.
--   psql "$DATABASE_URL" [-v hours=24] [-v limit=20] -f sql/reports/slowest_requests.sql
\if :{?hours} \else \set hours 24 \endif
\if :{?limit} \else \set limit 20 \endif
SELECT public_id                                                        AS request_id,
       model,
       state,
       attempt                                                          AS attempts,
       round((extract(epoch FROM finished_at - created_at) * 1000)::numeric, 1) AS total_ms,
       round((extract(epoch FROM started_at - created_at) * 1000)::numeric, 1)  AS queue_ms,
       round((extract(epoch FROM finished_at - started_at) * 1000)::numeric, 1) AS run_ms
  FROM asyncinfer.requests
 WHERE finished_at >= now() - make_interval(hours => :hours)
   AND started_at IS NOT NULL
 ORDER BY finished_at - created_at DESC
 LIMIT :limit;
