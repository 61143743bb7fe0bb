"""finish_requests and renew_leases skip rows another session holds (and say
so) instead of waiting: one locked row no longer stalls a worker's batch.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from migrations.sqlfile import run_sql_file

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0004_skip_locked_rows.sql")


def downgrade() -> None:
    raise NotImplementedError("asyncinfer migrations are forward-only")
