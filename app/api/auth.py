"""API keys: `Authorization: Api-Key <key>`.

A key is `ai_` + 43 URL-safe characters (256 random bits). Only SHA-256 of
it is stored; a presented key is hashed, looked up by hash, and the stored
hash compared with hmac.compare_digest. Lookups are cached per process for
ASYNCINFER_API_KEY_CACHE_SECONDS; a revoke sends NOTIFY asyncinfer_api_keys,
which drops the cached entry at once (and a lost listen connection drops the
whole cache), so a revoked key stops working immediately.

ASYNCINFER_ADMIN_KEY, when set, is accepted as an admin key without being
stored (bootstrap for `asyncinfer up` and tests). Its requests carry no key
id; admin keys see and cancel every request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

from app.api.errors import ApiError
from app.queue.reads import Reads

KEY_PREFIX = "ai_"
API_KEYS_CHANNEL = "asyncinfer_api_keys"  # payload: the revoked key's id


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def display_prefix(key: str) -> str:
    return key[:10]


@dataclass(slots=True)
class Principal:
    key_id: int | None  # None: the bootstrap admin key
    is_admin: bool
    rate: float | None = None
    # token bucket (per process), only used when rate is set
    tokens: float = 0.0
    refilled_at: float = field(default_factory=time.monotonic)

    @property
    def scope(self) -> int | None:
        """The key id that limits what this caller sees; None: everything."""
        return None if self.is_admin else self.key_id

    def take(self) -> float:
        """Spend one token; returns 0 when allowed, else seconds until one is free."""
        if self.rate is None:
            return 0.0
        now = time.monotonic()
        burst = max(self.rate, 1.0)
        self.tokens = min(burst, self.tokens + (now - self.refilled_at) * self.rate)
        self.refilled_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


UNAUTHORIZED = ApiError(
    401, "Authorization: must be 'Api-Key <key>' with a valid, unrevoked key",
    [("Authorization", "must be 'Api-Key <key>' with a valid, unrevoked key")],
    headers={"WWW-Authenticate": "Api-Key"},
)
FORBIDDEN = ApiError(403, "Authorization: this route needs an admin key", [("Authorization", "must be an admin key")])


class KeyCache:
    def __init__(self, reads: Reads, admin_key: str | None, ttl_seconds: float, max_entries: int = 100_000) -> None:
        self.reads = reads
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._admin = Principal(key_id=None, is_admin=True)
        self._entries: dict[bytes, tuple[float, Principal | None]] = {}
        self._loading: dict[bytes, asyncio.Future[Principal | None]] = {}

    def invalidate(self, key_id: int | None = None) -> None:
        """Forget one key (by id) or, with None, everything."""
        if key_id is None:
            self._entries.clear()
            return
        for digest, (_, principal) in list(self._entries.items()):
            if principal is not None and principal.key_id == key_id:
                del self._entries[digest]

    async def authenticate(self, header: str | None) -> Principal:
        if not header:
            raise UNAUTHORIZED
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() not in ("api-key", "bearer") or not key or len(key) > 512:
            raise UNAUTHORIZED
        digest = hash_key(key)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return self._admin
        now = time.monotonic()
        cached = self._entries.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            principal = await self._load(digest)
        if principal is None:
            raise UNAUTHORIZED
        return principal

    async def _load(self, digest: bytes) -> Principal | None:
        # One lookup per key however many requests arrive with it at once.
        pending = self._loading.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._loading[digest] = future
        try:
            row = await self.reads.api_key_by_hash(digest)
            principal = None
            if row is not None and hmac.compare_digest(row[1], digest):
                principal = Principal(key_id=row[0], is_admin=row[2], rate=row[3], tokens=max(row[3] or 0, 1.0))
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            # unknown keys are cached briefly too: a flood of bad keys costs one query each per TTL
            self._entries[digest] = (time.monotonic() + (self.ttl if principal else min(self.ttl, 2.0)), principal)
            future.set_result(principal)
            return principal
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            del self._loading[digest]
