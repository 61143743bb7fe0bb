-- Requests finished per model per minute, by final state.
--   psql "$DATABASE_URL" [-v minutes=60] [-v model=echo] -f sql/reports/throughput.sql
\if :{?minutes} \else \set minutes 60 \endif
\if :{?model} \else \set model '' \endif
SELECT model,
       date_trunc('minute', finished_at)                  AS minute,
       count(*)                                           AS finished,
       count(*) FILTER (WHERE state = 'SUCCEEDED')        AS succeeded,
       count(*) FILTER (WHERE state = 'FAILED')           AS failed,
       count(*) FILTER (WHERE state = 'CANCELED')         AS canceled,
       count(*) FILTER (WHERE state = 'EXPIRED')          AS expired
  FROM asyncinfer.requests
 WHERE finished_at >= now() - make_interval(mins => :minutes)
   AND (:'model' = '' OR model = :'model')
 GROUP BY model, minute
 ORDER BY model, minute;
