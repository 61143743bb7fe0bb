-- Time in queue (submit -> first start) per model and hour: p50 / p95 / p99.
--   psql "$DATABASE_URL" [-v hours=24] [-v model=echo] -f sql/reports/time_in_queue.sql
\if :{?hours} \else \set hours 24 \endif
\if :{?model} \else \set model '' \endif
SELECT model,
       date_trunc('hour', created_at)                                   AS hour,
       count(*)                                                         AS started,
       round((percentile_cont(0.50) WITHIN GROUP (ORDER BY ms))::numeric, 1) AS p50_ms,
       round((percentile_cont(0.95) WITHIN GROUP (ORDER BY ms))::numeric, 1) AS p95_ms,
       round((percentile_cont(0.99) WITHIN GROUP (ORDER BY ms))::numeric, 1) AS p99_ms,
       round(max(ms)::numeric, 1)                                       AS max_ms
  FROM (SELECT model, created_at,
               extract(epoch FROM started_at - created_at) * 1000 AS ms
          FROM asyncinfer.requests
         WHERE started_at IS NOT NULL
           AND created_at >= now() - make_interval(hours => :hours)
           AND (:'model' = '' OR model = :'model')) AS started
 GROUP BY model, hour
 ORDER BY model, hour;
