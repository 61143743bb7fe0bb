"""Multi-step pipelines: definitions, runs, steps, and the trigger that enqueues
step k+1 in the transaction that ends step k.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from migrations.sqlfile import run_sql_file

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0003_pipelines.sql")


def downgrade() -> None:
    raise NotImplementedError("asyncinfer migrations are forward-only")
