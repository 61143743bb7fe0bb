"""Shared bench plumbing: a throwaway migrated database and a machine line."""

from __future__ import annotations

import os
import platform
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from app.db.migrate import migrate
from app.db.url import with_database


def machine_line() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()} | {os.cpu_count()} cores | {mem_gib:.0f} GiB | {cpu} | Python {platform.python_version()}"


@contextmanager
def bench_database() -> Iterator[tuple[str, str]]:
    """A fresh migrated database on DATABASE_URL's server (or the embedded one).

    Yields (url, server_version)."""
    server = None
    base = os.environ.get("DATABASE_URL")
    if not base:
        from app.db.embedded import EmbeddedPostgres
        from app.settings import get_settings

        data_dir = get_settings().data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        server = EmbeddedPostgres(data_dir)
        base = server.start()
    name = f"asyncinfer_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        version = conn.execute("SHOW server_version").fetchone()[0]
    url = with_database(base, name)
    try:
        migrate(url)
        yield url, version
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if server is not None:
            server.stop()


def print_table(title: str, header: list[str], rows: list[list[object]], notes: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n## {title}")
    for note in notes:
        print(f"- {note}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")
