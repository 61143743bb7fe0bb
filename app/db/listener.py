"""One dedicated LISTEN connection per process, outside any pool.

NOTIFY is only a hint, so the contract is small: `wait()` returns when a
notification arrives or the timeout passes, whichever is first. The
connection is health-checked (`pg_listening_channels()` on it) and
re-established when it dies; after a reconnect `wait()` returns at once so
the caller runs a catch-up claim for whatever it missed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import psycopg
from psycopg import sql

log = logging.getLogger("asyncinfer.listener")


class Listener:
    def __init__(
        self,
        database_url: str,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None] | None = None,
        health_check_seconds: float = 5.0,
        on_reconnect: Callable[[], None] | None = None,
        application_name: str = "asyncinfer-listen",
    ) -> None:
        self.database_url = database_url
        self.channels = tuple(channels)
        self.on_notify = on_notify
        self.on_reconnect = on_reconnect  # after a reconnect: notifications may have been missed
        self.application_name = application_name  # lets operators (and tests) find this connection
        self.health_check_seconds = health_check_seconds
        self._conn: psycopg.AsyncConnection | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.connected = asyncio.Event()

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.create_task(self._run(), name="asyncinfer-listener")

    async def close(self) -> None:
        self._closed = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._conn is not None:
            await self._conn.close()

    async def wait(self, timeout: float) -> bool:
        """Wait for a notification (True) or the timeout (False)."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._wake.clear()

    def poke(self) -> None:
        """Wake a waiter from inside the process (e.g. capacity freed here)."""
        self._wake.set()

    async def _connect(self) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True, application_name=self.application_name
        )
        for channel in self.channels:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self._conn = conn
        self.connected.set()

    async def _healthy(self) -> bool:
        assert self._conn is not None
        try:
            cur = await self._conn.execute("SELECT pg_listening_channels()")
            listening = {row[0] for row in await cur.fetchall()}
            return set(self.channels) <= listening
        except psycopg.Error:
            return False

    async def _run(self) -> None:
        backoff = 0.1
        while not self._closed:
            try:
                assert self._conn is not None
                gen = self._conn.notifies(timeout=self.health_check_seconds)
                async for note in gen:
                    if self.on_notify is not None:
                        self.on_notify(note.channel, note.payload)
                    self._wake.set()
                if not await self._healthy():
                    raise psycopg.OperationalError("listen connection is not listening")
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a dead connection: reconnect, then catch up
                self.connected.clear()
                log.warning("listen connection lost (%s); reconnecting in %.1fs", error, backoff)
                if self._conn is not None:
                    try:
                        await self._conn.close()
                    except Exception:
                        pass
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                try:
                    await self._connect()
                    log.info("listen connection re-established on %s", ", ".join(self.channels))
                    self._wake.set()  # catch up on anything missed while away
                    if self.on_reconnect is not None:
                        self.on_reconnect()
                except Exception as reconnect_error:
                    log.warning("reconnect failed: %s", reconnect_error)
