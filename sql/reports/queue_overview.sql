-- What waits and what runs now, per model and priority, against capacity.
--   psql "$DATABASE_URL" -f sql/reports/queue_overview.sql
SELECT m.name                                                        AS model,
       r.priority,
       count(*) FILTER (WHERE r.state = 'QUEUED')                    AS queued,
       count(*) FILTER (WHERE r.state = 'QUEUED' AND r.run_at > now()) AS waiting_backoff,
       count(*) FILTER (WHERE r.state = 'IN_PROGRESS')               AS in_progress,
       m.capacity,
       m.paused,
       round(extract(epoch FROM now() - min(r.created_at) FILTER (WHERE r.state = 'QUEUED'))::numeric, 1)
                                                                     AS oldest_queued_s
  FROM asyncinfer.models m
  LEFT JOIN asyncinfer.requests r
         ON r.model = m.name AND r.state IN ('QUEUED', 'IN_PROGRESS')
 GROUP BY m.name, r.priority, m.capacity, m.paused
 ORDER BY m.name, r.priority NULLS LAST;
