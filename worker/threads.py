"""Small concurrency pieces the worker loop is built from.

* `DaemonPool`: threads for blocking model code. Daemon threads on purpose: a
  model call that never returns must not keep the process alive after a
  shutdown has handed its request back (concurrent.futures joins its threads
  at exit).
* `Inbox`: how those threads hand results to the event loop. Many results
  coalesce into one loop wake-up (one call_soon_threadsafe per burst, not
  one per request).
* `Signal`: a level-triggered wake-up with an optional timeout, lighter than
  asyncio.wait_for(event.wait()).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

log = logging.getLogger("asyncinfer.worker")


class DaemonPool:
    """Up to `size` daemon threads, started on demand, running submitted calls in order."""

    def __init__(self, size: int, name: str) -> None:
        self.size = max(1, size)
        self.name = name
        self._calls: SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._calls.put((fn, args))
        if len(self._threads) < self.size:
            thread = threading.Thread(target=self._run, name=f"{self.name}-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # the wrappers catch model errors; this is a bug in ours
                log.exception("worker thread call crashed")

    def close(self) -> None:
        for _ in self._threads:
            self._calls.put(None)


class Inbox:
    """Calls posted from any thread, run on the event loop in posting order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._scheduled = False

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        self._items.append((fn, args))
        if not self._scheduled:
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # loop closed: the process is exiting
                pass

    def _drain(self) -> None:
        self._scheduled = False
        items = self._items
        while items:
            fn, args = items.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("worker completion handler crashed")


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Signal:
    """Set by anyone on the loop; one waiter at a time. Stays set until cleared."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[bool] | None = None

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, timeout: float | None = None) -> bool:
        """True when set (now or later), False when the timeout passed first."""
        if self._set:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        handle = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            return await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()
