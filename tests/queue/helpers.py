"""Small shared steps for queue-core tests."""

from __future__ import annotations

import psycopg

from app.queue.operations import Queue


async def new_worker(queue: Queue, models: list[str], name: str = "test-worker") -> int:
    return await queue.register_worker(name, "localhost", 0, models)


def states(db: psycopg.Connection) -> dict[str, int]:
    return dict(db.execute("SELECT state::text, count(*) FROM asyncinfer.requests GROUP BY 1").fetchall())


def in_flight(db: psycopg.Connection, model: str) -> int:
    return db.execute("SELECT in_flight FROM asyncinfer.models WHERE name = %s", (model,)).fetchone()[0]


def age_request(db: psycopg.Connection, request_id: int, *, lease_expired: bool = False, run_now: bool = False) -> None:
    """Move a request's clock instead of sleeping: expire its lease or its backoff."""
    if lease_expired:
        db.execute(
            "UPDATE asyncinfer.requests SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
            (request_id,),
        )
    if run_now:
        db.execute("UPDATE asyncinfer.requests SET run_at = now() WHERE id = %s", (request_id,))
