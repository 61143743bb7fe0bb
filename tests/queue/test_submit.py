"""Submit: one, many, idempotency, validation, backpressure, wake-up."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from app.queue.errors import InvalidParameter, QueueFull, UnknownModel
from app.queue.operations import Queue


async def test_submit_returns_ids_in_input_order(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("echo", capacity=2)
    results = await queue.submit("echo", [{"model_input": {"n": n}} for n in range(5)])
    assert [r.created for r in results] == [True] * 5
    rows = db.execute(
        "SELECT r.public_id, i.model_input FROM asyncinfer.requests r"
        " JOIN asyncinfer.request_inputs i ON i.request_id = r.id"
    ).fetchall()
    by_id = dict(rows)
    assert [by_id[r.request_id] for r in results] == [{"n": n} for n in range(5)]
    # every submit is in the event log
    assert db.execute("SELECT count(*) FROM asyncinfer.request_events WHERE kind = 'submitted'").fetchone()[0] == 5


async def test_bulk_submit_10000_in_one_statement(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("bulk", capacity=1)
    results = await queue.submit("bulk", [{"model_input": i, "priority": i % 3} for i in range(10_000)])
    assert len(results) == 10_000
    assert len({r.request_id for r in results}) == 10_000
    counts = dict(
        db.execute("SELECT priority, count(*) FROM asyncinfer.requests WHERE state = 'QUEUED' GROUP BY 1").fetchall()
    )
    assert counts == {0: 3334, 1: 3333, 2: 3333}


async def test_idempotency_key_returns_existing_request(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("echo")
    first = await queue.submit("echo", [{"model_input": 1, "idempotency_key": "order-42"}], api_key_id=7)
    again = await queue.submit("echo", [{"model_input": 2, "idempotency_key": "order-42"}], api_key_id=7)
    assert first[0].created and not again[0].created
    assert again[0].request_id == first[0].request_id
    # the same key under another API key is a different request
    other = await queue.submit("echo", [{"model_input": 3, "idempotency_key": "order-42"}], api_key_id=8)
    assert other[0].created and other[0].request_id != first[0].request_id
    # duplicates inside one batch collapse to one request
    batch = await queue.submit("echo", [{"model_input": 4, "idempotency_key": "b"}, {"model_input": 5, "idempotency_key": "b"}])
    assert batch[0].request_id == batch[1].request_id
    assert [r.created for r in batch] == [True, False]
    assert db.execute("SELECT count(*) FROM asyncinfer.requests").fetchone()[0] == 3


async def test_concurrent_submits_with_same_key_create_one_request(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("echo")
    results = await asyncio.gather(
        *[queue.submit("echo", [{"model_input": i, "idempotency_key": "race"}]) for i in range(8)]
    )
    assert len({r[0].request_id for r in results}) == 1
    assert sum(r[0].created for r in results) == 1
    assert db.execute("SELECT count(*) FROM asyncinfer.requests").fetchone()[0] == 1


async def test_unknown_model_is_refused(queue: Queue) -> None:
    with pytest.raises(UnknownModel, match="nope"):
        await queue.submit("nope", [{"model_input": 1}])


@pytest.mark.parametrize(
    ("item", "rule"),
    [
        ({"model_input": 1, "priority": 3}, "priority"),
        ({"model_input": 1, "max_time_in_queue_seconds": 5}, "queue_deadline_range"),
        ({"model_input": 1, "inference_retry_config": {"max_attempts": 11}}, "max_attempts"),
        ({"model_input": 1, "inference_retry_config": {"max_delay_ms": 60001}}, "max_delay_ms"),
        ({"model_input": 1, "priority": "high"}, "smallint"),
    ],
)
async def test_out_of_range_values_are_refused_whole_batch(queue: Queue, db: psycopg.Connection, item: dict, rule: str) -> None:
    await queue.upsert_model("echo")
    with pytest.raises(InvalidParameter, match=rule):
        await queue.submit("echo", [{"model_input": 0}, item])
    assert db.execute("SELECT count(*) FROM asyncinfer.requests").fetchone()[0] == 0


async def test_max_queue_depth_applies_backpressure(queue: Queue) -> None:
    await queue.upsert_model("small", capacity=1, max_queue_depth=3)
    await queue.submit("small", [{"model_input": i} for i in range(3)])
    with pytest.raises(QueueFull, match="max_queue_depth 3"):
        await queue.submit("small", [{"model_input": 4}])


async def test_submit_notifies_once_per_statement(queue: Queue, database_url: str) -> None:
    await queue.upsert_model("echo")
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listener:
        await listener.execute("LISTEN asyncinfer_queue")
        await queue.submit("echo", [{"model_input": i} for i in range(500)])
        received = []
        gen = listener.notifies(timeout=0.5)
        async for note in gen:
            received.append(note.payload)
        assert received == ["submit:echo:500"]


async def test_public_ids_are_unguessable_and_name_their_row(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("echo")
    results = await queue.submit("echo", [{"model_input": i} for i in range(200)])
    rows = db.execute(
        "SELECT id, public_id, asyncinfer.request_id_of(public_id) FROM asyncinfer.requests ORDER BY id"
    ).fetchall()
    assert [r[1] for r in rows] == [r.request_id for r in results]
    assert all(row_id == decoded for row_id, _, decoded in rows)
    random_halves = {r.request_id.hex[:16] for r in results}
    assert len(random_halves) == 200  # 64 random bits each
    # A guessed id with the right row number but wrong random part finds nothing.
    forged = results[0].request_id.hex[:15] + ("0" if results[0].request_id.hex[15] != "0" else "1")
    forged += results[0].request_id.hex[16:]
    assert await queue.cancel(forged) is None


async def test_missing_or_null_model_input_names_the_field(queue: Queue) -> None:
    await queue.upsert_model("echo")
    for items in ([{"model_input": 1}, {"priority": 1}], [{"model_input": None}], [7]):
        with pytest.raises(InvalidParameter, match=r"items\[\d\]\.model_input: required"):
            await queue.submit("echo", items)


async def test_ensure_model_keeps_an_admins_capacity(queue: Queue) -> None:
    assert (await queue.ensure_model("m", capacity=2))["capacity"] == 2
    await queue.set_capacity("m", 9)
    assert (await queue.ensure_model("m", capacity=2))["capacity"] == 9
