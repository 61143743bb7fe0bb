"""Run one of our raw SQL migration files inside alembic's transaction."""

from __future__ import annotations

from pathlib import Path

from alembic import op

SQL_DIR = Path(__file__).parent / "sql"


def run_sql_file(name: str) -> None:
    sql = (SQL_DIR / name).read_text()
    # Straight to the driver: no bind-parameter parsing of ':' or '%' in the SQL.
    dbapi_connection = op.get_bind().connection.dbapi_connection
    with dbapi_connection.cursor() as cursor:
        cursor.execute(sql)
