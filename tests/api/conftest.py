"""The HTTP API under test: `asyncinfer serve` as a real process (granian,
uvloop) on a free loopback port, against a real PostgreSQL database.

One server (and one database, copied from the migrated template) serves the
whole session; tests keep apart by using their own model names and API
keys. Tests that need other settings or break the database start their own
server with `start_server`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest

from app.db.pool import open_pool
from app.queue.operations import Queue
from tests.api.helpers import (
    ADMIN_KEY,
    ApiServer,
    create_database,
    drop_database,
    new_key,
    new_model,
    start_server,
)


@pytest.fixture(scope="session")
def api_database(server_url: str, template_db: str) -> Iterator[str]:
    url = create_database(server_url, template_db)
    yield url
    drop_database(server_url, url)


@pytest.fixture(scope="session")
def api(api_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = start_server(api_database, tmp_path_factory.mktemp("api"), max_batch_items="2000")
    yield server
    assert server.stop() == 0, server.log()[-3000:]


@pytest.fixture
def admin(api: ApiServer) -> Iterator[httpx.Client]:
    with api.client(ADMIN_KEY) as client:
        yield client


@pytest.fixture
def model(admin: httpx.Client) -> str:
    return new_model(admin)


@pytest.fixture
def user(api: ApiServer, admin: httpx.Client) -> Iterator[httpx.Client]:
    _, key = new_key(admin, "user")
    with api.client(key) as client:
        yield client


@pytest.fixture
def other_user(api: ApiServer, admin: httpx.Client) -> Iterator[httpx.Client]:
    _, key = new_key(admin, "other")
    with api.client(key) as client:
        yield client


@pytest.fixture
def api_db(api: ApiServer) -> Iterator[psycopg.Connection]:
    """What an admin at psql sees of the server's database."""
    assert api.database_url
    with psycopg.connect(api.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
async def api_queue(api: ApiServer) -> AsyncIterator[Queue]:
    """The queue core on the server's database, to play the worker in tests."""
    assert api.database_url
    pool = await open_pool(api.database_url, min_size=1, max_size=4, name="asyncinfer-api-test")
    try:
        yield Queue(pool)
    finally:
        await pool.close()
