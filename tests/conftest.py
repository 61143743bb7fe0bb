"""Test databases on a real PostgreSQL.

DATABASE_URL (any database on the server; tests create and drop their own)
selects the server. Without it the suite starts the embedded PostgreSQL 18 in
a temporary directory, exactly as the service does on a fresh machine.

One template database is migrated per session; each test gets a fresh copy
(CREATE DATABASE ... TEMPLATE), which takes milliseconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from app.db.migrate import migrate
from app.db.pool import open_pool
from app.db.url import with_database
from app.queue.operations import Queue


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from app.db.embedded import EmbeddedPostgres

    # Not under pytest's basetemp: other pytest sessions on the machine rotate
    # old basetemps away, which would delete a live server's data directory.
    data_dir = Path(tempfile.mkdtemp(prefix="asyncinfer-test-pg-"))
    server = EmbeddedPostgres(data_dir)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _admin(server_url: str) -> psycopg.Connection:
    return psycopg.connect(server_url, autocommit=True)


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    name = f"asyncinfer_tmpl_{uuid.uuid4().hex[:10]}"
    with _admin(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    migrate(with_database(server_url, name))
    yield name
    with _admin(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(server_url: str, template_db: str) -> Iterator[str]:
    name = f"asyncinfer_test_{uuid.uuid4().hex[:12]}"
    with _admin(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield with_database(server_url, name)
    with _admin(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def queue(database_url: str) -> AsyncIterator[Queue]:
    pool = await open_pool(database_url, min_size=1, max_size=12, name="asyncinfer-test")
    try:
        yield Queue(pool)
    finally:
        await pool.close()


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """A plain autocommit connection: what an admin at psql has."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn
