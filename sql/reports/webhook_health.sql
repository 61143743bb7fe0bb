-- Webhook and storage delivery health per model and kind over a window:
-- success rate, attempts per delivery, pending now and the oldest pending.
--   psql "$DATABASE_URL" [-v hours=24] -f sql/reports/webhook_health.sql
\if :{?hours} \else \set hours 24 \endif
SELECT r.model,
       d.kind,
       count(*)                                                                AS deliveries,
       count(*) FILTER (WHERE d.state = 'SUCCEEDED')                           AS succeeded,
       count(*) FILTER (WHERE d.state = 'FAILED')                              AS failed,
       count(*) FILTER (WHERE d.state = 'PENDING')                             AS pending,
       round(count(*) FILTER (WHERE d.state = 'SUCCEEDED')::numeric
             / nullif(count(*) FILTER (WHERE d.state <> 'PENDING'), 0), 4)     AS success_rate,
       round(avg(d.attempts) FILTER (WHERE d.state <> 'PENDING'), 2)           AS attempts_per_delivery,
       round(extract(epoch FROM now() - min(d.created_at) FILTER (WHERE d.state = 'PENDING'))::numeric, 1)
                                                                               AS oldest_pending_s
  FROM asyncinfer.deliveries d
  JOIN asyncinfer.requests r ON r.id = d.request_id
 WHERE d.created_at >= now() - make_interval(hours => :hours)
 GROUP BY r.model, d.kind
 ORDER BY r.model, d.kind;
