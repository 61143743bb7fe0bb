"""Running a long-lived asyncinfer process: find (or start) the database,
migrate it, run an async main on uvloop until SIGTERM/SIGINT, stop cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

import uvloop

from app.db.migrate import migrate
from app.db.url import resolve_database_url
from app.logs import configure_logging
from app.settings import Settings

ServiceMain = Callable[[str, asyncio.Event], Awaitable[None]]


def run_service(main: ServiceMain, settings: Settings) -> int:
    """Run `main(database_url, stop)`; `stop` is set on SIGTERM or SIGINT."""
    configure_logging(settings)
    url, server = resolve_database_url(settings)
    try:
        migrate(url)
        os.environ["DATABASE_URL"] = url  # for any child process

        async def supervised() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await main(url, stop)

        uvloop.run(supervised())
        return 0
    finally:
        if server is not None:
            server.stop()
