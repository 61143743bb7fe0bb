"""Creating, listing and revoking API keys (SQL functions of migration 0002).

The key is generated and hashed here; PostgreSQL only ever sees the hash.
Used by the admin routes (async pool) and `asyncinfer keys` (one sync
connection).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from app.api.auth import display_prefix, hash_key, new_key
from app.queue.reads import API_KEYS_SQL

CREATE_SQL = (
    "SELECT id, name, prefix, is_admin, rate_limit_per_second, created_at, revoked_at"
    " FROM asyncinfer.create_api_key(%s, %s, %s, %s, %s)"
)
REVOKE_SQL = (
    "SELECT id, name, prefix, is_admin, rate_limit_per_second, created_at, revoked_at"
    " FROM asyncinfer.revoke_api_key(%s)"
)


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: int
    name: str
    prefix: str
    is_admin: bool
    rate_limit_per_second: float | None
    created_at: datetime
    revoked_at: datetime | None
    key: str | None = None  # the secret, only right after creation

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id, "name": self.name, "prefix": self.prefix, "is_admin": self.is_admin,
            "created_at": self.created_at, "rate_limit_per_second": self.rate_limit_per_second,
            "revoked_at": self.revoked_at,
        }
        if self.key is not None:
            body["key"] = self.key
        return {k: v for k, v in body.items() if v is not None}


def _create_params(name: str, is_admin: bool, rate: float | None) -> tuple[str, tuple[Any, ...]]:
    key = new_key()
    return key, (name, hash_key(key), display_prefix(key), is_admin, rate)


async def create_key(pool: AsyncConnectionPool, name: str, is_admin: bool = False,
                     rate_limit_per_second: float | None = None) -> ApiKey:
    key, params = _create_params(name, is_admin, rate_limit_per_second)
    async with pool.connection() as conn:
        cur = await conn.cursor(row_factory=tuple_row).execute(CREATE_SQL, params)
        row = await cur.fetchone()
    assert row is not None
    return ApiKey(*row, key=key)


async def list_keys(pool: AsyncConnectionPool) -> list[ApiKey]:
    async with pool.connection() as conn:
        cur = await conn.cursor(row_factory=tuple_row).execute(API_KEYS_SQL)
        return [ApiKey(*r) for r in await cur.fetchall()]


async def revoke_key(pool: AsyncConnectionPool, key_id: int) -> ApiKey | None:
    async with pool.connection() as conn:
        cur = await conn.cursor(row_factory=tuple_row).execute(REVOKE_SQL, (key_id,))
        row = await cur.fetchone()
    return ApiKey(*row) if row else None


# -- sync, for the CLI --------------------------------------------------------


def create_key_sync(conn: psycopg.Connection, name: str, is_admin: bool = False,
                    rate_limit_per_second: float | None = None) -> ApiKey:
    key, params = _create_params(name, is_admin, rate_limit_per_second)
    row = conn.cursor(row_factory=tuple_row).execute(CREATE_SQL, params).fetchone()
    assert row is not None
    return ApiKey(*row, key=key)


def list_keys_sync(conn: psycopg.Connection) -> list[ApiKey]:
    return [ApiKey(*r) for r in conn.cursor(row_factory=tuple_row).execute(API_KEYS_SQL).fetchall()]


def revoke_key_sync(conn: psycopg.Connection, key_id: int) -> ApiKey | None:
    row = conn.cursor(row_factory=tuple_row).execute(REVOKE_SQL, (key_id,)).fetchone()
    return ApiKey(*row) if row else None
