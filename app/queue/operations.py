"""The queue core, seen from Python: one thin method per SQL function in
migrations/sql/*_functions.sql. Every state change happens in that SQL, so the
API, the workers and an admin at a psql prompt keep the same invariants. This
layer only encodes arguments, decodes rows and translates errors.

Each method is one round trip and one transaction (pool connections run in
autocommit mode; each call is a single statement).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from app.queue.errors import translate

_encode = msgspec.json.encode


def encode_json(value: Any) -> str:
    """JSON text for a jsonb parameter (msgspec: several times faster than json)."""
    return _encode(value).decode()


def json_param(value: Any) -> str:
    """A jsonb parameter from a value, or from JSON the caller has already
    encoded (bytes or str: a body the API has just validated is not re-encoded)."""
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else encode_json(value)


@dataclass(frozen=True, slots=True)
class Submitted:
    request_id: UUID
    created: bool  # False: an idempotency key matched an existing request


@dataclass(frozen=True, slots=True)
class ClaimedRequest:
    id: int
    public_id: UUID
    attempt: int
    max_attempts: int
    priority: int
    created_at: datetime
    model_input: Any
    metadata: Any


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a worker reports for one claimed request."""

    id: int
    attempt: int
    output: Any = None
    error: Any = None  # None: success. Anything else: the error (JSON-able)
    retryable: bool = True
    canceled: bool = False

    def to_json(self) -> dict[str, Any]:
        item: dict[str, Any] = {"id": self.id, "attempt": self.attempt}
        if self.canceled:
            item["canceled"] = True
        elif self.error is not None:
            item["error"] = self.error
            item["retryable"] = self.retryable
        else:
            item["output"] = self.output
        return item


@dataclass(frozen=True, slots=True)
class Finished:
    id: int
    public_id: UUID | None
    state: str | None  # None: the row is locked by another session; not recorded yet, try again


@dataclass(frozen=True, slots=True)
class CancelResult:
    state: str
    cancel_requested: bool
    changed: bool


@dataclass(frozen=True, slots=True)
class DueDelivery:
    """A claimed outbox row and what its payload is built from."""

    id: int
    kind: str  # "webhook" | "storage"
    target: str
    attempts: int
    request_id: UUID
    model: str
    state: str
    finished_at: datetime
    output: Any
    error: Any
    stored_url: str | None
    output_url: str | None
    metadata: Any


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    id: int
    attempts: int
    ok: bool
    status_code: int | None = None
    error: str | None = None
    retry_in_seconds: float | None = None  # None after a failure: give up (FAILED)
    stored_url: str | None = None
    drop_inline: bool = False

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in (
            ("id", self.id), ("attempts", self.attempts), ("ok", self.ok), ("status_code", self.status_code),
            ("error", self.error), ("retry_in_seconds", self.retry_in_seconds), ("stored_url", self.stored_url),
            ("drop_inline", self.drop_inline),
        ) if v is not None}


@dataclass(frozen=True, slots=True)
class MaintenanceResult:
    leader: bool
    reaped: int
    expired: int
    reconciled: int
    pruned: int


class Queue:
    """All queue operations over one connection pool."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            async with self.pool.connection() as conn:
                async with conn.cursor(row_factory=tuple_row) as cur:
                    await cur.execute(sql, params)
                    return await cur.fetchall() if cur.description else []
        except psycopg.Error as error:
            raise translate(error) from error

    # -- models -------------------------------------------------------------

    async def upsert_model(
        self,
        name: str,
        capacity: int | None = None,
        max_queue_depth: int | None = None,
        paused: bool | None = None,
    ) -> dict[str, Any]:
        rows = await self._fetch(
            "SELECT to_jsonb(m) FROM asyncinfer.upsert_model(%s, %s, %s, %s) AS m",
            (name, capacity, max_queue_depth, paused),
        )
        return rows[0][0]

    async def ensure_model(self, name: str, capacity: int = 1) -> dict[str, Any]:
        """Create a model with this capacity unless it exists (then leave it)."""
        rows = await self._fetch("SELECT to_jsonb(m) FROM asyncinfer.ensure_model(%s, %s) AS m", (name, capacity))
        return rows[0][0]

    async def set_capacity(self, model: str, capacity: int) -> dict[str, Any]:
        rows = await self._fetch("SELECT to_jsonb(m) FROM asyncinfer.set_capacity(%s, %s) AS m", (model, capacity))
        return rows[0][0]

    async def update_model(self, name: str, changes: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Create or change a model (asyncinfer.update_model, migration 0002):
        keys present in `changes` are applied (None clears an optional one),
        absent ones keep their value. Returns (created, the model row)."""
        rows = await self._fetch(
            "SELECT created, model FROM asyncinfer.update_model(%s, %s::jsonb)", (name, encode_json(changes))
        )
        return rows[0][0], rows[0][1]

    async def pause_model(self, model: str) -> dict[str, Any]:
        rows = await self._fetch("SELECT to_jsonb(m) FROM asyncinfer.pause_model(%s) AS m", (model,))
        return rows[0][0]

    async def resume_model(self, model: str) -> dict[str, Any]:
        rows = await self._fetch("SELECT to_jsonb(m) FROM asyncinfer.resume_model(%s) AS m", (model,))
        return rows[0][0]

    # -- submit -------------------------------------------------------------

    async def submit(
        self, model: str, items: Sequence[dict[str, Any]] | bytes | str, api_key_id: int | None = None
    ) -> list[Submitted]:
        """Submit requests (async_predict bodies) in one statement; results in input order.

        `items` may already be encoded JSON (an array), which saves re-encoding
        a body the API has just validated.
        """
        rows = await self._fetch(
            "SELECT request_id, created FROM asyncinfer.submit_requests(%s, %s::jsonb, %s)",
            (model, json_param(items), api_key_id),
        )
        return [Submitted(request_id=r[0], created=r[1]) for r in rows]

    # -- pipelines ----------------------------------------------------------

    async def upsert_pipeline(self, name: str, steps: list[dict[str, Any]] | str) -> dict[str, Any]:
        """Declare (or redeclare) a pipeline; the steps are checked in SQL."""
        rows = await self._fetch(
            "SELECT to_jsonb(p) FROM asyncinfer.upsert_pipeline(%s, %s::jsonb) AS p", (name, json_param(steps))
        )
        return rows[0][0]

    async def delete_pipeline(self, name: str) -> bool:
        rows = await self._fetch("SELECT asyncinfer.delete_pipeline(%s)", (name,))
        return bool(rows[0][0])

    async def submit_pipeline(
        self,
        pipeline: str,
        items: Sequence[dict[str, Any]] | bytes | str,
        api_key_id: int | None = None,
        steps: list[dict[str, Any]] | str | None = None,
    ) -> list[Submitted]:
        """Submit pipeline runs (async_predict bodies): the declared pipeline
        named `pipeline`, or with `steps` an inline one labelled so."""
        rows = await self._fetch(
            "SELECT request_id, created FROM asyncinfer.submit_pipeline(%s, %s::jsonb, %s, %s::jsonb)",
            (pipeline, json_param(items), api_key_id, None if steps is None else json_param(steps)),
        )
        return [Submitted(request_id=r[0], created=r[1]) for r in rows]

    # -- worker side --------------------------------------------------------

    async def claim(
        self, model: str, worker_id: int, limit: int, lease_seconds: float
    ) -> list[ClaimedRequest]:
        rows = await self._fetch(
            "SELECT id, public_id, attempt, max_attempts, priority, created_at, model_input, metadata"
            " FROM asyncinfer.claim_requests(%s, %s, %s, %s)",
            (model, worker_id, limit, lease_seconds),
        )
        return [ClaimedRequest(*r) for r in rows]

    async def renew_leases(
        self, worker_id: int, held: Iterable[tuple[int, int]], lease_seconds: float
    ) -> dict[int, bool]:
        """Renew all leases of a worker; returns {id: cancel_requested} for the
        ones it still holds (a row another session has locked is reported as
        held and renewed next time). An id missing from the answer is a lost lease."""
        ids: list[int] = []
        attempts: list[int] = []
        for request_id, attempt in held:
            ids.append(request_id)
            attempts.append(attempt)
        rows = await self._fetch(
            "SELECT id, cancel_requested FROM asyncinfer.renew_leases(%s, %s::bigint[], %s::smallint[], %s)",
            (worker_id, ids, attempts, lease_seconds),
        )
        return {r[0]: r[1] for r in rows}

    async def finish(self, worker_id: int, outcomes: Sequence[Outcome]) -> list[Finished]:
        """Record many outcomes in one statement. Accepted ones come back with
        their new state; ones skipped because another session holds the row
        come back with state None (retry them); refused ones do not come back."""
        if not outcomes:
            return []
        rows = await self._fetch(
            "SELECT id, public_id, state FROM asyncinfer.finish_requests(%s, %s::jsonb)",
            (worker_id, encode_json([o.to_json() for o in outcomes])),
        )
        return [Finished(*r) for r in rows]

    async def append_logs(self, worker_id: int, lines: Sequence[tuple[int, int, str]]) -> int:
        if not lines:
            return 0
        payload = encode_json([{"id": i, "attempt": a, "line": line} for i, a, line in lines])
        rows = await self._fetch("SELECT asyncinfer.append_logs(%s, %s::jsonb)", (worker_id, payload))
        return rows[0][0]

    async def register_worker(self, name: str, hostname: str, pid: int, models: Sequence[str]) -> int:
        rows = await self._fetch(
            "SELECT asyncinfer.register_worker(%s, %s, %s, %s::text[])", (name, hostname, pid, list(models))
        )
        return rows[0][0]

    async def set_worker_state(self, worker_id: int, state: str, detail: str | None = None) -> None:
        await self._fetch("SELECT asyncinfer.set_worker_state(%s, %s, %s)", (worker_id, state, detail))

    async def release_worker(self, worker_id: int) -> int:
        rows = await self._fetch("SELECT asyncinfer.release_worker(%s)", (worker_id,))
        return rows[0][0]

    # -- cancel and admin ---------------------------------------------------

    async def cancel(self, request_id: UUID | str, api_key_id: int | None = None) -> CancelResult | None:
        rows = await self._fetch(
            "SELECT state::text, cancel_requested, changed FROM asyncinfer.cancel_request(%s::uuid, %s)",
            (str(request_id), api_key_id),
        )
        return CancelResult(*rows[0]) if rows else None

    async def requeue(self, request_id: UUID | str) -> str:
        rows = await self._fetch("SELECT asyncinfer.requeue_request(%s::uuid)::text", (str(request_id),))
        return rows[0][0]

    async def purge_queue(self, model: str) -> int:
        rows = await self._fetch("SELECT asyncinfer.purge_queue(%s)", (model,))
        return rows[0][0]

    # -- delivery (outbox) ---------------------------------------------------

    async def claim_deliveries(self, limit: int, lease_seconds: float) -> list[DueDelivery]:
        rows = await self._fetch(
            "SELECT id, kind, target, attempts, request_id, model, state::text, finished_at, output, error,"
            " stored_url, output_url, metadata FROM asyncinfer.claim_deliveries(%s, %s)",
            (limit, lease_seconds),
        )
        return [DueDelivery(*r) for r in rows]

    async def finish_deliveries(self, results: Sequence[DeliveryResult]) -> dict[int, str]:
        """Record attempts; returns {delivery id: state} for the accepted ones."""
        if not results:
            return {}
        rows = await self._fetch(
            "SELECT id, state::text FROM asyncinfer.finish_deliveries(%s::jsonb)",
            (encode_json([r.to_json() for r in results]),),
        )
        return {r[0]: r[1] for r in rows}

    async def redeliver_request(self, request_id: UUID | str, kind: str | None = None) -> int:
        rows = await self._fetch("SELECT asyncinfer.redeliver_request(%s::uuid, %s)", (str(request_id), kind))
        return rows[0][0]

    async def redeliver_failed(self, model: str) -> int:
        rows = await self._fetch("SELECT asyncinfer.redeliver_failed(%s)", (model,))
        return rows[0][0]

    async def add_webhook_secret(self, secret: str) -> int:
        rows = await self._fetch("SELECT asyncinfer.add_webhook_secret(%s)", (secret,))
        return rows[0][0]

    async def revoke_webhook_secret(self, secret_id: int) -> bool:
        rows = await self._fetch("SELECT asyncinfer.revoke_webhook_secret(%s)", (secret_id,))
        return bool(rows and rows[0][0])

    async def list_webhook_secrets(self) -> list[dict[str, Any]]:
        """Secrets for display: id, dates and a short hint, never the secret."""
        rows = await self._fetch(
            "SELECT id, left(secret, 10) || '...', created_at, revoked_at FROM asyncinfer.webhook_secrets ORDER BY id",
            (),
        )
        return [{"id": r[0], "hint": r[1], "created_at": r[2], "revoked_at": r[3]} for r in rows]

    async def active_webhook_secrets(self) -> list[str]:
        rows = await self._fetch(
            "SELECT secret FROM asyncinfer.webhook_secrets WHERE revoked_at IS NULL ORDER BY id", ()
        )
        return [r[0] for r in rows]

    # -- maintenance --------------------------------------------------------

    async def run_maintenance(
        self, request_retention_seconds: float | None = None, output_retention_seconds: float | None = None
    ) -> MaintenanceResult:
        """One maintenance tick (reap, expire, reconcile, prune); a no-op
        (leader=False) while another process runs one. None: SQL defaults."""
        rows = await self._fetch(
            "SELECT leader, reaped, expired, reconciled, pruned FROM asyncinfer.run_maintenance("
            " coalesce(make_interval(secs => %s), interval '7 days'),"
            " coalesce(make_interval(secs => %s), interval '7 days'))",
            (request_retention_seconds, output_retention_seconds),
        )
        leader, reaped, expired, reconciled, pruned = rows[0]
        return MaintenanceResult(leader, reaped or 0, expired or 0, reconciled or 0, pruned or 0)

    async def prune_finished(
        self, request_retention_seconds: float, output_retention_seconds: float, limit: int = 5000
    ) -> tuple[int, int]:
        rows = await self._fetch(
            "SELECT requests_deleted, outputs_deleted FROM asyncinfer.prune_finished("
            "make_interval(secs => %s), make_interval(secs => %s), %s)",
            (request_retention_seconds, output_retention_seconds, limit),
        )
        return rows[0]

    async def reconcile_capacity(self) -> list[tuple[str, int, int]]:
        rows = await self._fetch("SELECT model, counted, running FROM asyncinfer.reconcile_capacity()", ())
        return [tuple(r) for r in rows]  # type: ignore[misc]
