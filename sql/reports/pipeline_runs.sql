-- Pipeline runs per pipeline over a window: outcomes, end-to-end time, and
-- where that time went: waiting in the steps' queues, or running in models
-- (a fan-out step counts from its first item queued to its last finished).
--   psql "$DATABASE_URL" [-v hours=24] -f sql/reports/pipeline_runs.sql
\if :{?hours} \else \set hours 24 \endif
WITH runs AS (
    SELECT r.id, p.pipeline, r.state, r.created_at, r.finished_at
      FROM asyncinfer.requests r
      JOIN asyncinfer.pipeline_runs p ON p.request_id = r.id
     WHERE r.finished_at >= now() - make_interval(hours => :hours)
),
step_times AS (
    SELECT s.run_id, s.step,
           min(sr.started_at) - min(sr.created_at)  AS waited,
           max(sr.finished_at) - min(sr.started_at) AS ran
      FROM asyncinfer.pipeline_steps s
      JOIN asyncinfer.requests sr ON sr.id = s.request_id
     WHERE s.run_id IN (SELECT id FROM runs)
     GROUP BY s.run_id, s.step
),
run_times AS (
    SELECT run_id, count(*) AS steps_run,
           sum(extract(epoch FROM waited)) AS waited_s, sum(extract(epoch FROM ran)) AS ran_s
      FROM step_times
     GROUP BY run_id
)
SELECT r.pipeline,
       count(*)                                                                    AS runs,
       count(*) FILTER (WHERE r.state = 'SUCCEEDED')                               AS succeeded,
       count(*) FILTER (WHERE r.state = 'FAILED')                                  AS failed,
       count(*) FILTER (WHERE r.state = 'CANCELED')                                AS canceled,
       count(*) FILTER (WHERE r.state = 'EXPIRED')                                 AS expired,
       round(avg(t.steps_run), 2)                                                  AS avg_steps_run,
       round((percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM r.finished_at - r.created_at)) * 1000)::numeric, 1) AS p50_ms,
       round((percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM r.finished_at - r.created_at)) * 1000)::numeric, 1) AS p95_ms,
       round((sum(t.waited_s) / nullif(sum(t.waited_s) + sum(t.ran_s), 0))::numeric, 3) AS queued_share
  FROM runs r
  LEFT JOIN run_times t ON t.run_id = r.id
 GROUP BY r.pipeline
 ORDER BY r.pipeline;
