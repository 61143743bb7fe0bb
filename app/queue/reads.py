"""Read-only queries over the queue: what the API shows and /metrics exports.

Nothing here changes state (that is operations.py and the SQL functions).
Each function is one statement, written to be readable and runnable at a
psql prompt: `%(name)s` are the parameters. A request is always found by its
public id the same way as the SQL functions do it: primary key
(asyncinfer.request_id_of) plus an equality check on public_id, so a guessed
row id without its 64 random bits finds nothing.

`api_key_id`: None means "any request" (an admin); otherwise only requests
submitted with that key are visible, and another key's request reads as
absent (the API answers 404, never 403, so ids cannot be probed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

# -- one request --------------------------------------------------------------

REQUEST_STATUS_SQL = """
SELECT r.public_id,
       r.model,
       r.state::text,
       asyncinfer.webhook_status(r.id)                                    AS webhook_status,
       r.priority,
       r.attempt,
       r.created_at,
       r.started_at,
       r.finished_at,
       -- time waited before the first start; still counting while queued
       (extract(epoch FROM coalesce(r.started_at, r.finished_at, now()) - r.created_at) * 1000)::bigint
                                                                            AS time_in_queue_ms,
       -- requests of the same model a claim takes before this one (0: next)
       CASE WHEN r.state = 'QUEUED' THEN (
           SELECT count(*) FROM asyncinfer.requests q
            WHERE q.model = r.model AND q.state = 'QUEUED'
              AND (q.priority, q.run_at, q.id) < (r.priority, r.run_at, r.id))
       END                                                                  AS queue_position,
       o.error,
       o.stored_url,
       r.cancel_requested
  FROM asyncinfer.requests r
  LEFT JOIN asyncinfer.request_outputs o ON o.request_id = r.id
 WHERE r.id = asyncinfer.request_id_of(%(request_id)s::uuid)
   AND r.public_id = %(request_id)s::uuid
   AND (%(api_key_id)s::bigint IS NULL OR r.api_key_id = %(api_key_id)s::bigint)
"""


@dataclass(frozen=True, slots=True)
class RequestStatus:
    request_id: UUID
    model: str
    state: str
    webhook_status: str
    priority: int
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    time_in_queue_ms: int
    queue_position: int | None
    error: Any
    stored_url: str | None
    cancel_requested: bool


REQUEST_OUTPUT_SQL = """
SELECT r.state::text,
       o.request_id IS NOT NULL AS has_output_row,
       o.output::text           AS output_json,
       o.error::text            AS error_json,
       o.stored_url
  FROM asyncinfer.requests r
  LEFT JOIN asyncinfer.request_outputs o ON o.request_id = r.id
 WHERE r.id = asyncinfer.request_id_of(%(request_id)s::uuid)
   AND r.public_id = %(request_id)s::uuid
   AND (%(api_key_id)s::bigint IS NULL OR r.api_key_id = %(api_key_id)s::bigint)
"""


@dataclass(frozen=True, slots=True)
class RequestOutput:
    state: str
    has_output_row: bool
    output_json: str | None  # the stored jsonb as JSON text (never decoded on the way)
    error_json: str | None
    stored_url: str | None


# A pipeline run's log holds its steps' events too (each with the step's
# request id, step and fan-out item); for any other request the step list
# is empty and this is the request's own log.
REQUEST_EVENTS_SQL = """
SELECT e.id, e.at, e.kind, e.state::text, e.attempt, e.worker_id, e.detail::text,
       step_request.public_id AS step_request_id, s.step, s.item
  FROM asyncinfer.request_events e
  LEFT JOIN asyncinfer.pipeline_steps s ON s.request_id = e.request_id
  LEFT JOIN asyncinfer.requests step_request ON step_request.id = s.request_id
 WHERE e.request_id = ANY (ARRAY(
           SELECT asyncinfer.request_id_of(%(request_id)s::uuid)
           UNION ALL
           SELECT ps.request_id FROM asyncinfer.pipeline_steps ps
            WHERE ps.run_id = asyncinfer.request_id_of(%(request_id)s::uuid)))
   AND e.id > %(after_id)s
 ORDER BY e.id
 LIMIT %(limit)s
"""

# The steps of a pipeline run (one row per declared step; see the SQL
# function for the columns).
PIPELINE_STATUS_SQL = """
SELECT pipeline, current_step, step, model, fan_out, requests, queued, in_progress, succeeded, failed,
       canceled, expired, request_id, created_at, started_at, finished_at
  FROM asyncinfer.pipeline_status(%(request_id)s::uuid)
"""

PIPELINES_SQL = """
SELECT p.name, p.steps, p.created_at, p.updated_at FROM asyncinfer.pipelines p
 WHERE %(name)s::text IS NULL OR p.name = %(name)s::text
 ORDER BY p.name
"""

REQUEST_VISIBLE_SQL = """
SELECT 1 FROM asyncinfer.requests r
 WHERE r.id = asyncinfer.request_id_of(%(request_id)s::uuid)
   AND r.public_id = %(request_id)s::uuid
   AND (%(api_key_id)s::bigint IS NULL OR r.api_key_id = %(api_key_id)s::bigint)
"""

REQUEST_STATES_SQL = """
SELECT r.public_id::text, r.state::text
  FROM asyncinfer.requests r
 WHERE r.id = ANY (SELECT asyncinfer.request_id_of(p) FROM unnest(%(request_ids)s::uuid[]) AS p)
   AND r.public_id = ANY (%(request_ids)s::uuid[])
"""


@dataclass(frozen=True, slots=True)
class RequestEvent:
    id: int
    at: datetime
    kind: str
    state: str | None
    attempt: int | None
    worker_id: int | None
    detail_json: str | None
    step_request_id: UUID | None = None  # pipeline runs: the event is of this step request
    step: int | None = None
    item: int | None = None


@dataclass(frozen=True, slots=True)
class PipelineStep:
    pipeline: str
    current_step: int
    step: int
    model: str
    fan_out: bool
    requests: int
    queued: int
    in_progress: int
    succeeded: int
    failed: int
    canceled: int
    expired: int
    request_id: UUID | None  # when the step is one request
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


# -- models and queues -------------------------------------------------------

# Counting walks the queued and running rows of one model (index-only on the
# ready index): fine for a status call, not for a hot loop.
QUEUE_STATUS_SQL = """
SELECT m.name,
       m.capacity,
       m.in_flight,
       m.paused,
       m.max_queue_depth,
       (SELECT count(*) FROM asyncinfer.requests r WHERE r.model = m.name AND r.state = 'IN_PROGRESS')
                                                                            AS in_progress,
       q.queued, q.queued_p0, q.queued_p1, q.queued_p2, q.queued_realtime,
       extract(epoch FROM now() - q.oldest_queued_at)::float8             AS oldest_queued_age_seconds
  FROM asyncinfer.models m
 CROSS JOIN LATERAL (
       SELECT count(*)                                  AS queued,
              count(*) FILTER (WHERE r.priority = 0)    AS queued_p0,
              count(*) FILTER (WHERE r.priority = 1)    AS queued_p1,
              count(*) FILTER (WHERE r.priority = 2)    AS queued_p2,
              count(*) FILTER (WHERE r.priority < 0)    AS queued_realtime,
              min(r.created_at)                         AS oldest_queued_at
         FROM asyncinfer.requests r
        WHERE r.model = m.name AND r.state = 'QUEUED'
 ) q
 WHERE m.name = %(model)s
"""


@dataclass(frozen=True, slots=True)
class QueueStatus:
    model: str
    capacity: int
    in_flight: int
    paused: bool
    max_queue_depth: int | None
    in_progress: int
    queued: int
    queued_p0: int
    queued_p1: int
    queued_p2: int
    queued_realtime: int
    oldest_queued_age_seconds: float | None


MODELS_SQL = """
SELECT to_jsonb(m) FROM asyncinfer.models m
 WHERE %(model)s::text IS NULL OR m.name = %(model)s::text
 ORDER BY m.name
"""

MODEL_EXISTS_SQL = "SELECT 1 FROM asyncinfer.models WHERE name = %(model)s"

# -- API keys ----------------------------------------------------------------

API_KEY_BY_HASH_SQL = """
SELECT k.id, k.key_hash, k.is_admin, k.rate_limit_per_second
  FROM asyncinfer.api_keys k
 WHERE k.key_hash = %(key_hash)s AND k.revoked_at IS NULL
"""

API_KEYS_SQL = """
SELECT k.id, k.name, k.prefix, k.is_admin, k.rate_limit_per_second, k.created_at, k.revoked_at
  FROM asyncinfer.api_keys k
 ORDER BY k.id
"""

# -- metrics -----------------------------------------------------------------

# Queue depth by model, priority and state. Each half matches one partial
# index (requests_ready, requests_running), so a scrape never reads finished
# rows however many are retained.
METRICS_DEPTH_SQL = """
SELECT r.model, r.priority, 'QUEUED' AS state, count(*)
  FROM asyncinfer.requests r WHERE r.state = 'QUEUED'
 GROUP BY r.model, r.priority
UNION ALL
SELECT r.model, r.priority, 'IN_PROGRESS', count(*)
  FROM asyncinfer.requests r WHERE r.state = 'IN_PROGRESS'
 GROUP BY r.model, r.priority
"""

# Per model: capacity and the in-flight counter, and how long the head of
# each priority level has been runnable (one index probe per level).
METRICS_MODELS_SQL = """
SELECT m.name, m.capacity, m.in_flight, m.paused, m.max_queue_depth,
       p.priority,
       extract(epoch FROM now() - (
           SELECT r.run_at FROM asyncinfer.requests r
            WHERE r.model = m.name AND r.state = 'QUEUED' AND r.priority = p.priority
            ORDER BY r.run_at, r.id LIMIT 1))::float8 AS head_wait_seconds
  FROM asyncinfer.models m
 CROSS JOIN (VALUES (-1), (0), (1), (2)) AS p(priority)
 ORDER BY m.name, p.priority
"""

METRICS_DELIVERIES_SQL = """
SELECT d.kind, count(*), extract(epoch FROM now() - min(d.created_at))::float8
  FROM asyncinfer.deliveries d WHERE d.state = 'PENDING'
 GROUP BY d.kind
"""

METRICS_WORKERS_SQL = """
SELECT count(*) FILTER (WHERE alive), count(*) FILTER (WHERE NOT alive AND state <> 'stopped')
  FROM asyncinfer.workers_overview
"""

# Recent activity, derived from PostgreSQL at scrape time over a sliding
# window (nothing here lives in a process, so nothing resets on a restart).
# Reads finished rows through the finished_at indexes only.
METRICS_WINDOW_SECONDS = 300

METRICS_RECENT_SQL = f"""
SELECT model, state::text,
       count(*),
       sum(attempt - 1) FILTER (WHERE attempt > 1),
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at))
           FILTER (WHERE started_at IS NOT NULL),
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at))
           FILTER (WHERE started_at IS NOT NULL),
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))
  FROM asyncinfer.requests
 WHERE finished_at > now() - interval '{METRICS_WINDOW_SECONDS} seconds'
 GROUP BY model, state
"""

METRICS_RECENT_DELIVERIES_SQL = f"""
SELECT kind, state::text, count(*), sum(attempts),
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))
  FROM asyncinfer.deliveries
 WHERE finished_at > now() - interval '{METRICS_WINDOW_SECONDS} seconds'
 GROUP BY kind, state
"""

SCHEMA_REVISION_SQL = "SELECT version_num FROM public.alembic_version"


@dataclass(frozen=True, slots=True)
class Metrics:
    depth: list[tuple[str, int, str, int]]
    models: list[tuple[str, int, int, bool, int | None, int, float | None]]
    deliveries: list[tuple[str, int, float]]
    workers_alive: int
    workers_unresponsive: int
    recent: list[tuple[Any, ...]]  # (model, state, count, retries, queue q[], inference q[], total q[])
    recent_deliveries: list[tuple[Any, ...]]  # (kind, state, count, attempts, latency q[])


class Reads:
    """The read side over one pool (autocommit: each call is one snapshot)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def _rows(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        async with self.pool.connection() as conn:
            async with conn.cursor(row_factory=tuple_row) as cur:
                await cur.execute(sql, params)
                return await cur.fetchall()

    async def request_status(self, request_id: UUID | str, api_key_id: int | None) -> RequestStatus | None:
        rows = await self._rows(REQUEST_STATUS_SQL, {"request_id": str(request_id), "api_key_id": api_key_id})
        return RequestStatus(*rows[0]) if rows else None

    async def request_output(self, request_id: UUID | str, api_key_id: int | None) -> RequestOutput | None:
        rows = await self._rows(REQUEST_OUTPUT_SQL, {"request_id": str(request_id), "api_key_id": api_key_id})
        return RequestOutput(*rows[0]) if rows else None

    async def request_events(
        self, request_id: UUID | str, api_key_id: int | None, after_id: int = 0, limit: int = 1000
    ) -> list[RequestEvent] | None:
        """The event log (oldest first); None when the request is not visible."""
        params = {"request_id": str(request_id), "api_key_id": api_key_id, "after_id": after_id, "limit": limit}
        async with self.pool.connection() as conn:
            async with conn.cursor(row_factory=tuple_row) as cur:
                await cur.execute(REQUEST_VISIBLE_SQL, params)
                if not await cur.fetchall():
                    return None
                await cur.execute(REQUEST_EVENTS_SQL, params)
                return [RequestEvent(*r) for r in await cur.fetchall()]

    async def pipeline_status(self, request_id: UUID | str) -> list[PipelineStep]:
        """The steps of a run (the caller has checked it may see the run)."""
        return [PipelineStep(*r) for r in await self._rows(PIPELINE_STATUS_SQL, {"request_id": str(request_id)})]

    async def pipelines(self, name: str | None = None) -> list[tuple[Any, ...]]:
        return await self._rows(PIPELINES_SQL, {"name": name})

    async def request_states(self, request_ids: list[str]) -> dict[str, str]:
        """{public id: state} for the ids that exist (no key filter: internal use)."""
        if not request_ids:
            return {}
        rows = await self._rows(REQUEST_STATES_SQL, {"request_ids": request_ids})
        return {r[0]: r[1] for r in rows}

    async def queue_status(self, model: str) -> QueueStatus | None:
        rows = await self._rows(QUEUE_STATUS_SQL, {"model": model})
        return QueueStatus(*rows[0]) if rows else None

    async def models(self, model: str | None = None) -> list[dict[str, Any]]:
        return [r[0] for r in await self._rows(MODELS_SQL, {"model": model})]

    async def model_exists(self, model: str) -> bool:
        return bool(await self._rows(MODEL_EXISTS_SQL, {"model": model}))

    async def api_key_by_hash(self, key_hash: bytes) -> tuple[int, bytes, bool, float | None] | None:
        rows = await self._rows(API_KEY_BY_HASH_SQL, {"key_hash": key_hash})
        if not rows:
            return None
        key_id, stored_hash, is_admin, rate = rows[0]
        return key_id, bytes(stored_hash), is_admin, rate

    async def api_keys(self) -> list[tuple[Any, ...]]:
        return await self._rows(API_KEYS_SQL, {})

    async def schema_revision(self) -> str | None:
        rows = await self._rows(SCHEMA_REVISION_SQL, {})
        return rows[0][0] if rows else None

    async def metrics(self) -> Metrics:
        async with self.pool.connection() as conn:
            async with conn.cursor(row_factory=tuple_row) as cur:
                await cur.execute(METRICS_DEPTH_SQL)
                depth = await cur.fetchall()
                await cur.execute(METRICS_MODELS_SQL)
                models = await cur.fetchall()
                await cur.execute(METRICS_DELIVERIES_SQL)
                deliveries = await cur.fetchall()
                await cur.execute(METRICS_WORKERS_SQL)
                alive, unresponsive = (await cur.fetchall())[0]
                await cur.execute(METRICS_RECENT_SQL)
                recent = await cur.fetchall()
                await cur.execute(METRICS_RECENT_DELIVERIES_SQL)
                recent_deliveries = await cur.fetchall()
        return Metrics(depth, models, deliveries, alive or 0, unresponsive or 0, recent, recent_deliveries)
