"""Connection pools for the queue core (psycopg 3, async, autocommit)."""

from __future__ import annotations

import time
import weakref
from typing import Literal

import msgspec
import psycopg
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

# check="idle": a connection used within this many seconds is handed out
# without a ping; one idle longer is pinged first.
CHECK_IDLE_SECONDS = 1.0
_last_used: weakref.WeakKeyDictionary[psycopg.AsyncConnection, float] = weakref.WeakKeyDictionary()

Check = Literal["always", "idle", "never"]


class UndecodableJson:
    """A jsonb value PostgreSQL stores but Python cannot hold: a number beyond
    a double (1e5000) or an integer of more than 4300 digits. Returned in
    place of the value instead of raising, so one such value in a result
    (say, one input of a claimed batch) fails that request alone, not the
    statement that fetched it and every row with it."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"UndecodableJson({self.error!r})"


def decode_json(data: bytes | bytearray | memoryview | str) -> object:
    # msgspec decodes jsonb several times faster than the stdlib.
    try:
        return msgspec.json.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        return UndecodableJson(str(error))


async def _configure(conn: psycopg.AsyncConnection) -> None:
    set_json_loads(decode_json, conn)


async def _check_if_idle(conn: psycopg.AsyncConnection) -> None:
    last = _last_used.get(conn)
    if last is None or time.monotonic() - last > CHECK_IDLE_SECONDS:
        await AsyncConnectionPool.check_connection(conn)


async def _mark_used(conn: psycopg.AsyncConnection) -> None:
    _last_used[conn] = time.monotonic()


async def open_pool(
    database_url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    name: str = "asyncinfer",
    check: Check = "always",
    timeout: float = 30.0,
    wait: bool = True,
    lock_timeout_ms: int | None = None,
    statement_timeout_ms: int | None = None,
) -> AsyncConnectionPool:
    """An open pool whose connections run each statement as its own transaction.

    `check` trades a round trip for early detection of dead connections
    (after a PostgreSQL restart): "always" pings on every checkout; "idle"
    only connections unused for a second (the API: under load no extra round
    trip, and a dead one costs one 503); "never" (workers: every loop retries
    a failed call, and the pool drops a broken connection on return).
    `timeout` bounds the wait for a connection; wait=False opens without
    waiting for the first connections (a service that starts while the
    database is down). `lock_timeout_ms` / `statement_timeout_ms` bound how
    long one statement may wait on a lock / run (the API: a session holding
    a row must not pin every connection of the pool).
    """
    checks = {"always": AsyncConnectionPool.check_connection, "idle": _check_if_idle, "never": None}
    options = " ".join(f"-c {setting}={value}" for setting, value in (
        ("lock_timeout", lock_timeout_ms), ("statement_timeout", statement_timeout_ms)) if value is not None)
    pool = AsyncConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        kwargs={"autocommit": True, "application_name": name, "connect_timeout": 5,
                **({"options": options} if options else {})},
        configure=_configure,
        check=checks[check],
        reset=_mark_used if check == "idle" else None,
        timeout=timeout,
        open=False,
    )
    await pool.open(wait=wait, timeout=timeout)
    return pool
