from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def psql_binary() -> str:
    """The machine's psql, else the one shipped with the embedded PostgreSQL."""
    found = shutil.which("psql")
    if found:
        return found
    from app.db.embedded import postgres_binary

    return str(postgres_binary("psql"))


@pytest.fixture
def run_psql(psql_binary: str, database_url: str):
    """Run a file under sql/ as an admin would: psql -v name=value -f FILE."""

    def run(relative_path: str, **variables: object) -> str:
        args = [psql_binary, database_url, "-X", "-q", "-A", "-t", "-f", str(REPO / relative_path)]
        for name, value in variables.items():
            args[1:1] = ["-v", f"{name}={value}"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"psql failed ({done.returncode}): {done.stderr}")
        return done.stdout.strip()

    return run
