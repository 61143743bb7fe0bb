"""Where the database is: DATABASE_URL, or the embedded PostgreSQL."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from app.db.embedded import EmbeddedPostgres
    from app.settings import Settings


def with_database(database_url: str, dbname: str) -> str:
    """The same server URL, pointing at another database."""
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(path="/" + dbname))


def resolve_database_url(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """DATABASE_URL when set; otherwise start (or reuse) the embedded server.

    The caller owns the returned EmbeddedPostgres and stops it on exit (it is
    also stopped at interpreter exit and when the process dies).
    """
    if settings.database_url:
        return settings.database_url, None
    from app.db.embedded import EmbeddedPostgres

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedPostgres(settings.data_dir)
    return server.start(), server
