"""Connection pools for the queue core (psycopg 3, async, autocommit)."""

from __future__ import annotations

import msgspec
import psycopg
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool


async def _configure(conn: psycopg.AsyncConnection) -> None:
    # msgspec decodes jsonb several times faster than the stdlib.
    set_json_loads(msgspec.json.decode, conn)


async def open_pool(database_url: str, *, min_size: int = 1, max_size: int = 10, name: str = "asyncinfer") -> AsyncConnectionPool:
    """An open pool whose connections run each statement as its own transaction.

    Connections are checked on checkout, so a pool survives a PostgreSQL
    restart: dead connections are dropped and replaced instead of handed out.
    """
    pool = AsyncConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        kwargs={"autocommit": True, "application_name": name},
        configure=_configure,
        check=AsyncConnectionPool.check_connection,
        open=False,
    )
    await pool.open(wait=True, timeout=30)
    return pool
