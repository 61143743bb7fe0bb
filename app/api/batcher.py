"""Coalescing concurrent single submits into one `submit_requests` call.

PostgreSQL commits a few thousand single-row transactions per second at
best; one statement inserting 50 rows costs about as much as three single
ones. So single `async_predict` calls are queued here per (model, API key)
and inserted together:

  * while fewer than `max_inflight` inserts of that (model, key) are running,
    a new item is flushed on the next event-loop turn (everything that
    arrived in the same turn goes with it): no added latency when idle;
  * while `max_inflight` are running, items wait and go together as soon as
    one finishes (up to `max_items` per insert): under load, batches grow
    with the arrival rate, like PostgreSQL's own group commit.

A batch is one statement, so one bad item would fail all of them: when a
coalesced insert is refused (queue full, a value the database rejects), its
items are retried one by one and each caller gets its own answer. A
database outage fails the batch as a whole (each caller gets a 503).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from app.queue.errors import QueueError, UnknownModel
from app.queue.operations import Queue, Submitted

log = logging.getLogger("asyncinfer.api.batcher")

BatchKey = tuple[str, int | None]
Pending = list[tuple[bytes, "asyncio.Future[Submitted]"]]

_UNAVAILABLE = (PoolTimeout, psycopg.OperationalError, psycopg.InterfaceError)


class SubmitBatcher:
    def __init__(self, queue: Queue, max_items: int = 500, max_inflight: int = 1,
                 on_flush: Callable[[int], None] | None = None) -> None:
        self.queue = queue
        self.max_items = max_items
        self.max_inflight = max_inflight
        self.on_flush = on_flush
        self._pending: dict[BatchKey, Pending] = {}
        self._scheduled: set[BatchKey] = set()
        self._inflight: dict[BatchKey, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """Submits waiting for an insert to start (not counting those in flight)."""
        return sum(len(p) for p in self._pending.values())

    async def submit(self, model: str, api_key_id: int | None, item: bytes) -> Submitted:
        """Submit one encoded async_predict item; resolves when its batch commits."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Submitted] = loop.create_future()
        key = (model, api_key_id)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = []
        pending.append((item, future))
        if key not in self._scheduled and self._inflight.get(key, 0) < self.max_inflight:
            self._scheduled.add(key)
            loop.call_soon(self._flush, key)
        return await future

    def _flush(self, key: BatchKey) -> None:
        self._scheduled.discard(key)
        pending = self._pending.get(key)
        while pending and self._inflight.get(key, 0) < self.max_inflight:
            batch, rest = pending[: self.max_items], pending[self.max_items :]
            if rest:
                self._pending[key] = pending = rest
            else:
                del self._pending[key]
                pending = None
            self._inflight[key] = self._inflight.get(key, 0) + 1
            task = asyncio.get_running_loop().create_task(self._run(key, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, key: BatchKey, batch: Pending) -> None:
        model, api_key_id = key
        try:
            live = [(item, fut) for item, fut in batch if not fut.done()]
            if live:
                await self._insert(model, api_key_id, live)
        finally:
            count = self._inflight[key] - 1
            if count:
                self._inflight[key] = count
            else:
                del self._inflight[key]
            if self._pending.get(key):
                self._flush(key)

    async def _insert(self, model: str, api_key_id: int | None, batch: Pending) -> None:
        if self.on_flush is not None:
            self.on_flush(len(batch))
        payload = b"[" + b",".join(item for item, _ in batch) + b"]"
        try:
            results = await self.queue.submit(model, payload, api_key_id)
        except BaseException as error:
            if len(batch) == 1 or isinstance(error, (UnknownModel, *_UNAVAILABLE)) \
                    or not isinstance(error, (QueueError, psycopg.Error)):
                for _, fut in batch:
                    _fail(fut, error)
                if isinstance(error, asyncio.CancelledError):
                    raise
                return
            # One bad item must not fail the others: retry them one by one.
            log.info("coalesced submit of %d items refused (%s); retrying one by one", len(batch), error)
            await asyncio.gather(*(self._insert(model, api_key_id, [entry]) for entry in batch))
            return
        if len(results) != len(batch):  # cannot happen: one row per item
            error = RuntimeError(f"submit returned {len(results)} rows for {len(batch)} items")
            for _, fut in batch:
                _fail(fut, error)
            return
        for (_, fut), result in zip(batch, results):
            if not fut.done():
                fut.set_result(result)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        if isinstance(error, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(error)
