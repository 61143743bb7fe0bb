"""The dashboard's reads: one snapshot of queues, capacity, recent activity,
workers and failures.

Every statement is bounded so a dashboard left open all night costs little
however many finished requests are retained:

* queues and capacity: the counts of `asyncinfer.queue_overview`, written
  so each reads one partial index (`requests_ready`, `requests_running`)
  instead of filtering the whole table on state;
* throughput, failure counts and recent failures read finished rows through
  `requests_finished_at`, within the window;
* time in queue is measured on requests that *started* within the window:
  those finished since (a request finishes after it starts, so the
  `finished_at` index bounds them) plus those running now (the
  `requests_running` partial index). A request retried back into the queue
  counts again once it finishes;
* workers come from `asyncinfer.workers_overview`, limited to live ones and
  those stopped within the window; stuck requests from
  `asyncinfer.stuck_requests` (running rows only).

All statements run in one REPEATABLE READ, READ ONLY transaction, so the
numbers agree with each other and share one `now()`; a statement timeout keeps
a slow database from piling dashboard queries up. `%(name)s` are parameters:
each statement runs as is at a psql prompt once they are filled in.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

WINDOW_SECONDS = 3600
THROUGHPUT_BUCKET_SECONDS = 60
TIME_IN_QUEUE_BUCKET_SECONDS = 300
FAILURES_WINDOW_SECONDS = 3600
FAILURES_LIMIT = 25
WORKERS_LIMIT = 200
STUCK_LIMIT = 25
ERROR_PREVIEW_CHARS = 300
STATEMENT_TIMEOUT_MS = 5000

# The window's buckets are aligned on the bucket size (epoch based), the last
# one holding now(); `%(start)s` below is always the first bucket's start.
WINDOW_SQL = """
SELECT now(),
       to_timestamp(floor(extract(epoch FROM now()) / %(tp)s) * %(tp)s - %(window)s + %(tp)s)  AS tp_start,
       to_timestamp(floor(extract(epoch FROM now()) / %(tq)s) * %(tq)s - %(window)s + %(tq)s)  AS tq_start
"""

# Per model: what waits (by priority) and what runs. Each count reads one
# partial index only (requests_ready for QUEUED, requests_running for
# IN_PROGRESS: index-only scans), never finished rows; the counts are the
# ones GET /v1/models/{model}/async_queue_status answers. The oldest queued
# age is the longest wait among the heads of the priority levels (one index
# probe per level): a retried request still waiting out its backoff is not
# a head until it is due.
MODELS_SQL = """
SELECT m.name, m.capacity, m.in_flight, coalesce(r.in_progress, 0), m.paused, m.max_queue_depth,
       coalesce(q.queued, 0), coalesce(q.queued_rt, 0), coalesce(q.queued_p0, 0), coalesce(q.queued_p1, 0),
       coalesce(q.queued_p2, 0),
       extract(epoch FROM now() - h.oldest_created_at)::float8
  FROM asyncinfer.models m
  LEFT JOIN (SELECT x.model,
                    count(*)                                AS queued,
                    count(*) FILTER (WHERE x.priority < 0)  AS queued_rt,
                    count(*) FILTER (WHERE x.priority = 0)  AS queued_p0,
                    count(*) FILTER (WHERE x.priority = 1)  AS queued_p1,
                    count(*) FILTER (WHERE x.priority = 2)  AS queued_p2
               FROM asyncinfer.requests x
              WHERE x.state = 'QUEUED'
              GROUP BY x.model) q ON q.model = m.name
  LEFT JOIN (SELECT x.model, count(*) AS in_progress
               FROM asyncinfer.requests x
              WHERE x.state = 'IN_PROGRESS'
              GROUP BY x.model) r ON r.model = m.name
  LEFT JOIN LATERAL (
        SELECT min(head.created_at) AS oldest_created_at
          FROM (VALUES (-1), (0), (1), (2)) AS p(priority)
         CROSS JOIN LATERAL (
               SELECT x.created_at FROM asyncinfer.requests x
                WHERE x.model = m.name AND x.state = 'QUEUED' AND x.priority = p.priority
                ORDER BY x.run_at, x.id
                LIMIT 1) head
  ) h ON true
 ORDER BY m.name
"""

# Finished requests per model, bucket and final state (requests_finished_at).
THROUGHPUT_SQL = """
SELECT r.model,
       (floor(extract(epoch FROM r.finished_at) / %(tp)s) * %(tp)s)::bigint AS bucket,
       count(*) FILTER (WHERE r.state = 'SUCCEEDED') AS succeeded,
       count(*) FILTER (WHERE r.state = 'FAILED')    AS failed,
       count(*) FILTER (WHERE r.state = 'EXPIRED')   AS expired,
       count(*) FILTER (WHERE r.state = 'CANCELED')  AS canceled
  FROM asyncinfer.requests r
 WHERE r.finished_at >= %(tp_start)s
 GROUP BY 1, 2
"""

# Time in queue (submit -> first start) of the requests that started in the
# window, per model and bucket of their start.
TIME_IN_QUEUE_SQL = """
SELECT s.model,
       (floor(extract(epoch FROM s.started_at) / %(tq)s) * %(tq)s)::bigint AS bucket,
       count(*) AS started,
       percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (
           ORDER BY extract(epoch FROM s.started_at - s.created_at) * 1000) AS ms
  FROM (SELECT r.model, r.created_at, r.started_at
          FROM asyncinfer.requests r
         WHERE r.finished_at >= %(tq_start)s AND r.started_at >= %(tq_start)s
        UNION ALL
        SELECT r.model, r.created_at, r.started_at
          FROM asyncinfer.requests r
         WHERE r.state = 'IN_PROGRESS' AND r.started_at >= %(tq_start)s) s
 GROUP BY 1, 2
"""

WORKERS_SQL = """
SELECT w.id, w.name, w.hostname, w.pid, w.models, w.state, w.detail, w.alive,
       w.heartbeat_age_seconds::float8, w.held_leases, w.started_at, w.stopped_at
  FROM asyncinfer.workers_overview w
 WHERE w.state <> 'stopped' OR w.stopped_at >= now() - make_interval(secs => %(window)s)
 ORDER BY w.alive DESC, w.state = 'stopped', w.id DESC
 LIMIT %(workers_limit)s
"""

# The latest FAILED and EXPIRED requests (requests_finished_at, newest first).
FAILURES_SQL = """
SELECT r.public_id::text, r.model, r.state::text, r.priority, r.attempt,
       r.created_at, r.started_at, r.finished_at,
       (SELECT left(o.error::text, %(error_chars)s) FROM asyncinfer.request_outputs o WHERE o.request_id = r.id)
  FROM asyncinfer.requests r
 WHERE r.finished_at >= now() - make_interval(secs => %(failures_window)s)
   AND r.state IN ('FAILED', 'EXPIRED')
 ORDER BY r.finished_at DESC
 LIMIT %(failures_limit)s
"""

STUCK_SQL = """
SELECT s.request_id::text, s.model, s.attempt, s.worker_id, s.worker_name, s.reason,
       extract(epoch FROM now() - s.started_at)::float8
  FROM asyncinfer.stuck_requests s
 ORDER BY s.started_at
 LIMIT %(stuck_limit)s
"""


# -- the answer ----------------------------------------------------------------


class Throughput(msgspec.Struct):
    """Requests finished per bucket, by final state (columns; `t`: bucket start, epoch seconds)."""

    t: list[int]
    succeeded: list[int]
    failed: list[int]
    expired: list[int]
    canceled: list[int]


class TimeInQueue(msgspec.Struct):
    """Submit -> first start of the requests started per bucket (null where none started)."""

    t: list[int]
    started: list[int]
    p50_ms: list[float | None]
    p95_ms: list[float | None]


class WindowCounts(msgspec.Struct):
    succeeded: int = 0
    failed: int = 0
    expired: int = 0
    canceled: int = 0


class ModelSummary(msgspec.Struct):
    model: str
    capacity: int
    in_flight: int
    in_progress: int
    paused: bool
    max_queue_depth: int | None
    queued: int
    queued_by_priority: dict[str, int]  # "-1" (real time), "0", "1", "2": as async_queue_status
    oldest_queued_age_seconds: float | None
    last_hour: WindowCounts
    throughput_per_minute: float  # finished in the window / its minutes
    throughput: Throughput
    time_in_queue: TimeInQueue


class WorkerSummary(msgspec.Struct):
    id: int
    name: str
    hostname: str
    pid: int
    models: list[str]
    state: str
    detail: str | None
    alive: bool
    heartbeat_age_seconds: float
    held_leases: int
    started_at: datetime
    stopped_at: datetime | None


class Failure(msgspec.Struct):
    request_id: str
    model: str
    state: str
    priority: int
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime
    error: str | None  # the stored error as JSON text, cut to ERROR_PREVIEW_CHARS


class StuckRequest(msgspec.Struct):
    request_id: str
    model: str
    attempt: int
    worker_id: int | None
    worker_name: str | None
    reason: str
    running_seconds: float | None


class Totals(msgspec.Struct):
    models: int
    queued: int
    in_progress: int
    capacity: int
    finished_last_hour: int
    failed_last_hour: int
    expired_last_hour: int
    workers_alive: int
    workers_unresponsive: int
    stuck_requests: int


class DashboardSummary(msgspec.Struct):
    generated_at: datetime
    window_seconds: int
    throughput_bucket_seconds: int
    time_in_queue_bucket_seconds: int
    totals: Totals
    models: list[ModelSummary]
    workers: list[WorkerSummary]
    recent_failures: list[Failure]
    stuck_requests: list[StuckRequest]


def _buckets(start: datetime, size: int, window: int) -> list[int]:
    first = int(start.timestamp())
    return [first + i * size for i in range(window // size)]


async def dashboard_summary(pool: AsyncConnectionPool) -> DashboardSummary:
    params: dict[str, Any] = {
        "window": WINDOW_SECONDS, "tp": THROUGHPUT_BUCKET_SECONDS, "tq": TIME_IN_QUEUE_BUCKET_SECONDS,
        "workers_limit": WORKERS_LIMIT, "failures_window": FAILURES_WINDOW_SECONDS,
        "failures_limit": FAILURES_LIMIT, "error_chars": ERROR_PREVIEW_CHARS, "stuck_limit": STUCK_LIMIT,
    }
    async with pool.connection() as conn:
        async with conn.transaction():
            async with conn.cursor(row_factory=tuple_row) as cur:
                await cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                await cur.execute(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
                await cur.execute(WINDOW_SQL, params)
                now, params["tp_start"], params["tq_start"] = (await cur.fetchall())[0]
                await cur.execute(MODELS_SQL, params)
                models = await cur.fetchall()
                await cur.execute(THROUGHPUT_SQL, params)
                throughput = await cur.fetchall()
                await cur.execute(TIME_IN_QUEUE_SQL, params)
                time_in_queue = await cur.fetchall()
                await cur.execute(WORKERS_SQL, params)
                workers = await cur.fetchall()
                await cur.execute(FAILURES_SQL, params)
                failures = await cur.fetchall()
                await cur.execute(STUCK_SQL, params)
                stuck = await cur.fetchall()

    tp_t = _buckets(params["tp_start"], THROUGHPUT_BUCKET_SECONDS, WINDOW_SECONDS)
    tq_t = _buckets(params["tq_start"], TIME_IN_QUEUE_BUCKET_SECONDS, WINDOW_SECONDS)
    tp_index = {t: i for i, t in enumerate(tp_t)}
    tq_index = {t: i for i, t in enumerate(tq_t)}

    summaries: dict[str, ModelSummary] = {}
    for (name, capacity, in_flight, in_progress, paused, max_depth, queued, q_rt, q0, q1, q2, oldest) in models:
        n = len(tp_t)
        m = len(tq_t)
        summaries[name] = ModelSummary(
            model=name, capacity=capacity, in_flight=in_flight, in_progress=in_progress, paused=paused,
            max_queue_depth=max_depth, queued=queued,
            queued_by_priority={"-1": q_rt, "0": q0, "1": q1, "2": q2},
            oldest_queued_age_seconds=oldest, last_hour=WindowCounts(), throughput_per_minute=0.0,
            throughput=Throughput(t=tp_t, succeeded=[0] * n, failed=[0] * n, expired=[0] * n, canceled=[0] * n),
            time_in_queue=TimeInQueue(t=tq_t, started=[0] * m, p50_ms=[None] * m, p95_ms=[None] * m),
        )
    for name, bucket, succeeded, failed, expired, canceled in throughput:
        s = summaries.get(name)
        i = tp_index.get(bucket)
        if s is None or i is None:
            continue
        s.throughput.succeeded[i] = succeeded
        s.throughput.failed[i] = failed
        s.throughput.expired[i] = expired
        s.throughput.canceled[i] = canceled
        s.last_hour.succeeded += succeeded
        s.last_hour.failed += failed
        s.last_hour.expired += expired
        s.last_hour.canceled += canceled
    for name, bucket, started, quantiles in time_in_queue:
        s = summaries.get(name)
        i = tq_index.get(bucket)
        if s is None or i is None:
            continue
        s.time_in_queue.started[i] = started
        s.time_in_queue.p50_ms[i] = round(quantiles[0], 2)
        s.time_in_queue.p95_ms[i] = round(quantiles[1], 2)
    minutes = WINDOW_SECONDS / 60
    for s in summaries.values():
        c = s.last_hour
        s.throughput_per_minute = round((c.succeeded + c.failed + c.expired + c.canceled) / minutes, 3)

    worker_list = [WorkerSummary(*w) for w in workers]
    model_list = list(summaries.values())
    totals = Totals(
        models=len(model_list),
        queued=sum(s.queued for s in model_list),
        in_progress=sum(s.in_progress for s in model_list),
        capacity=sum(s.capacity for s in model_list),
        finished_last_hour=sum(s.last_hour.succeeded + s.last_hour.failed + s.last_hour.expired
                               + s.last_hour.canceled for s in model_list),
        failed_last_hour=sum(s.last_hour.failed for s in model_list),
        expired_last_hour=sum(s.last_hour.expired for s in model_list),
        workers_alive=sum(1 for w in worker_list if w.alive),
        workers_unresponsive=sum(1 for w in worker_list if not w.alive and w.state != "stopped"),
        stuck_requests=len(stuck),
    )
    return DashboardSummary(
        generated_at=now, window_seconds=WINDOW_SECONDS, throughput_bucket_seconds=THROUGHPUT_BUCKET_SECONDS,
        time_in_queue_bucket_seconds=TIME_IN_QUEUE_BUCKET_SECONDS, totals=totals, models=model_list,
        workers=worker_list, recent_failures=[Failure(*f) for f in failures],
        stuck_requests=[StuckRequest(*s) for s in stuck],
    )
