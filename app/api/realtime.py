"""Waiting for real-time requests to finish, woken by NOTIFY.

One dedicated LISTEN connection per API process (app.db.listener.Listener:
health-checked, reconnects) carries `asyncinfer_finished` ('<public_id>:
<state>', sent by the core for priority -1 requests only) and
`asyncinfer_api_keys` (revocations). A waiting predict call parks on a
future keyed by its request id; the notification resolves it. No polling
per request.

Two gaps are closed without polling per request:
  * a request can finish between its submit returning and its future being
    registered: notifications for ids nobody waits on are kept for a while
    and checked at registration;
  * a notification can be lost (the listen connection died): a sweep looks
    up the states of all waiting requests in one query, every few seconds
    while connected and every 0.2 s while the connection is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from app.db.listener import Listener
from app.queue.notifications import FINISHED_CHANNEL
from app.queue.reads import Reads

log = logging.getLogger("asyncinfer.api.realtime")

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "EXPIRED"})


class RealtimeHub:
    def __init__(
        self,
        database_url: str,
        reads: Reads,
        extra_channels: dict[str, Callable[[str], None]] | None = None,
        on_reconnect: Callable[[], None] | None = None,
        sweep_seconds: float = 2.0,
        health_check_seconds: float = 5.0,
        early_keep: int = 10_000,
        early_seconds: float = 60.0,
    ) -> None:
        self.reads = reads
        self.extra = extra_channels or {}
        self.on_reconnect = on_reconnect
        self.sweep_seconds = sweep_seconds
        self.early_keep = early_keep
        self.early_seconds = early_seconds
        # After a reconnect whatever was sent meanwhile is lost (revocations
        # included), so the owner is told (on_reconnect) and waiters re-check.
        self.listener = Listener(database_url, (FINISHED_CHANNEL, *self.extra), on_notify=self._on_notify,
                                 health_check_seconds=health_check_seconds, on_reconnect=on_reconnect,
                                 application_name="asyncinfer-api-listen")
        self._waiters: dict[str, asyncio.Future[str]] = {}
        self._early: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self.notifications = 0

    async def start(self) -> None:
        await self.listener.start()
        self._task = asyncio.create_task(self._sweeper(), name="asyncinfer-realtime-sweep")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self.listener.close()
        for future in self._waiters.values():
            if not future.done():
                future.cancel()

    @property
    def running(self) -> bool:
        return self._task is not None

    @property
    def connected(self) -> bool:
        return self.listener.connected.is_set()

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel != FINISHED_CHANNEL:
            handler = self.extra.get(channel)
            if handler is not None:
                handler(payload)
            return
        self.notifications += 1
        public_id, sep, state = payload.partition(":")
        if not sep:
            return
        self._resolve(public_id, state)

    def _resolve(self, public_id: str, state: str) -> None:
        future = self._waiters.get(public_id)
        if future is not None:
            if not future.done():
                future.set_result(state)
            return
        early = self._early
        early[public_id] = (time.monotonic(), state)
        while len(early) > self.early_keep:
            early.popitem(last=False)

    def register(self, public_id: str) -> asyncio.Future[str]:
        """A future resolved with the request's terminal state."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        early = self._early.pop(public_id, None)
        if early is not None:
            future.set_result(early[1])
        else:
            self._waiters[public_id] = future
        return future

    def unregister(self, public_id: str) -> None:
        self._waiters.pop(public_id, None)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_seconds if self.connected else 0.2)
            now = time.monotonic()
            while self._early:
                first = next(iter(self._early.values()))
                if now - first[0] <= self.early_seconds:
                    break
                self._early.popitem(last=False)
            waiting = [pid for pid, fut in self._waiters.items() if not fut.done()]
            if not waiting:
                continue
            try:
                states = await self.reads.request_states(waiting)
            except Exception as error:  # the database is down: try again next tick
                log.warning("real-time sweep failed: %s", error)
                continue
            for public_id, state in states.items():
                if state in TERMINAL:
                    self._resolve(public_id, state)
