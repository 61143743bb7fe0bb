"""Queue core: schema, indexes, every state-changing function, operator views, retention.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from migrations.sqlfile import run_sql_file

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0001_schema.sql")
    run_sql_file("0001_functions.sql")
    run_sql_file("0001_delivery.sql")
    run_sql_file("0001_operations.sql")


def downgrade() -> None:
    raise NotImplementedError("asyncinfer migrations are forward-only")
