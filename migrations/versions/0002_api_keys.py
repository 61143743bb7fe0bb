"""API keys (stored hashed) and the admin model update used by the HTTP API.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from migrations.sqlfile import run_sql_file

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0002_api_keys.sql")


def downgrade() -> None:
    raise NotImplementedError("asyncinfer migrations are forward-only")
