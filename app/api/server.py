"""`asyncinfer serve`: find the database (DATABASE_URL, or the embedded
PostgreSQL), migrate it, export DATABASE_URL for the worker processes, and
run the Litestar app under granian (ASGI, uvloop). SIGTERM or Ctrl-C stops
granian's workers, then the embedded PostgreSQL if this process started it.
"""

from __future__ import annotations

import argparse
import logging
import os

from app.api.supervision import SERVE_PID_VARIABLE
from app.db.migrate import migrate
from app.db.url import resolve_database_url
from app.logs import configure_logging
from app.settings import Settings

log = logging.getLogger("asyncinfer.serve")

APP_FACTORY = "app.api.app:create_app"


def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings)
    host = getattr(args, "host", None) or settings.host
    port = getattr(args, "port", None) or settings.port
    workers = getattr(args, "workers", None) or settings.api_workers

    from app.db.embedded import stop_on_sigterm

    stop_on_sigterm()  # until granian takes the signals over: SIGTERM unwinds through `finally`
    url, server = resolve_database_url(settings)
    try:
        migrate(url)
        os.environ["DATABASE_URL"] = url  # granian's worker processes read their settings from here
        os.environ[SERVE_PID_VARIABLE] = str(os.getpid())  # ...and die with this process (app/api/supervision.py)
        from granian import Granian

        log.info("serving on http://%s:%s with %d worker process(es)", host, port, workers)
        Granian(
            APP_FACTORY,
            factory=True,
            address=host,
            port=port,
            interface="asgi",
            loop="uvloop",
            workers=workers,
            backlog=2048,
            log_enabled=True,
            log_access=False,
            log_level=settings.log_level.lower(),  # type: ignore[arg-type]
            respawn_failed_workers=True,
            runtime_mode="st",  # single-threaded Rust runtime per worker: measured faster here
        ).serve()
        return 0
    finally:
        if server is not None:
            server.stop()
