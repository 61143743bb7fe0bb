"""What one API process holds: the pool, the queue, the read side, the submit
batcher, the key cache, the real-time hub, and a few process counters."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from psycopg_pool import AsyncConnectionPool

from app.api.auth import API_KEYS_CHANNEL, KeyCache
from app.api.batcher import SubmitBatcher
from app.api.realtime import RealtimeHub
from app.api.validation import UrlChecker
from app.db.pool import open_pool
from app.queue.operations import Queue
from app.queue.reads import Reads
from app.settings import Settings

log = logging.getLogger("asyncinfer.api")

class ApiState:
    def __init__(self, settings: Settings, database_url: str, head_revision: str | None) -> None:
        self.settings = settings
        self.database_url = database_url
        self.head_revision = head_revision
        self.urls = UrlChecker(settings.allow_private_webhooks)
        self.pool: AsyncConnectionPool | None = None
        self.queue: Queue
        self.reads: Reads
        self.batcher: SubmitBatcher
        self.keys: KeyCache
        self.hub: RealtimeHub
        # process counters for /metrics
        self.submitted: Counter[str] = Counter()  # by model
        self.batches = 0
        self.batch_items = 0
        self.realtime: Counter[str] = Counter()  # by outcome
        self.errors: Counter[int] = Counter()  # by status code
        self._background: set[asyncio.Future[Any]] = set()

    def spawn(self, coro: Any) -> None:
        """Run a coroutine in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _count_flush(self, items: int) -> None:
        self.batches += 1
        self.batch_items += items

    def _on_key_revoked(self, payload: str) -> None:
        try:
            self.keys.invalidate(int(payload))
        except ValueError:
            self.keys.invalidate()

    @asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        s = self.settings
        # Not waiting: an API whose database is down starts and answers 503.
        pool = await open_pool(self.database_url, min_size=min(2, s.db_pool_size), max_size=s.db_pool_size,
                               name="asyncinfer-api", check="idle", timeout=s.db_timeout_seconds, wait=False,
                               lock_timeout_ms=s.db_lock_timeout_ms, statement_timeout_ms=s.db_statement_timeout_ms)
        self.pool = pool
        self.queue = Queue(pool)
        self.reads = Reads(pool)
        self.batcher = SubmitBatcher(self.queue, s.submit_coalesce_max_items, s.submit_coalesce_inflight,
                                     on_flush=self._count_flush)
        self.keys = KeyCache(self.reads, s.admin_key, s.api_key_cache_seconds)
        self.hub = RealtimeHub(self.database_url, self.reads, extra_channels={API_KEYS_CHANNEL: self._on_key_revoked},
                               on_reconnect=self.keys.invalidate,
                               health_check_seconds=getattr(s, "listen_health_check_seconds", 5.0))
        starter = asyncio.create_task(self._start_hub())
        try:
            yield
        finally:
            starter.cancel()
            if self._background:
                await asyncio.wait(self._background, timeout=5)
            await self.batcher.close()
            await self.hub.close()
            await pool.close()

    async def _start_hub(self) -> None:
        delay = 0.2
        while True:
            try:
                await self.hub.start()
                return
            except Exception as error:  # the database is not reachable yet
                log.warning("listen connection failed (%s); retrying in %.1fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
