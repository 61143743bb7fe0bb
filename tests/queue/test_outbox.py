"""The delivery outbox: written with the finish, claimed, retried, fenced, redelivered."""

from __future__ import annotations

import psycopg

from app.queue.operations import DeliveryResult, Outcome, Queue
from tests.queue.helpers import new_worker


async def finish_one(queue: Queue, item: dict, *, error: object = None) -> int:
    await queue.upsert_model("m", capacity=5)
    await queue.submit("m", [item])
    worker = await new_worker(queue, ["m"])
    [req] = await queue.claim("m", worker, 1, 30)
    await queue.finish(worker, [Outcome(req.id, req.attempt, output={"y": 1} if error is None else None,
                                        error=error, retryable=False)])
    return req.id


def deliveries(db: psycopg.Connection) -> list[tuple]:
    return db.execute(
        "SELECT kind, target, state::text, attempts, next_attempt_at = 'infinity' FROM asyncinfer.deliveries ORDER BY kind"
    ).fetchall()


async def test_no_target_no_outbox_row(queue: Queue, db: psycopg.Connection) -> None:
    await finish_one(queue, {"model_input": 1})
    assert deliveries(db) == []


async def test_finish_writes_webhook_row_in_the_same_transaction(queue: Queue, db: psycopg.Connection, database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listener:
        await listener.execute("LISTEN asyncinfer_delivery")
        await finish_one(queue, {"model_input": 1, "webhook_endpoint": "https://example.com/hook"})
        notes = [n.payload async for n in listener.notifies(timeout=0.3)]
    assert deliveries(db) == [("webhook", "https://example.com/hook", "PENDING", 0, False)]
    assert notes == ["1"]
    [due] = await queue.claim_deliveries(10, 60)
    assert (due.kind, due.state, due.output, due.attempts) == ("webhook", "SUCCEEDED", {"y": 1}, 1)
    assert await queue.claim_deliveries(10, 60) == []  # leased: not handed out twice


async def test_failed_request_gets_a_webhook_but_no_storage_write(queue: Queue, db: psycopg.Connection) -> None:
    await finish_one(queue, {"model_input": 1, "webhook_endpoint": "https://e.com/h", "output_url": "file:///tmp/x/"},
                     error={"message": "boom"})
    assert deliveries(db) == [("webhook", "https://e.com/h", "PENDING", 0, False)]


async def test_webhook_waits_for_storage_then_is_released(queue: Queue, db: psycopg.Connection) -> None:
    await finish_one(queue, {"model_input": 1, "webhook_endpoint": "https://e.com/h", "output_url": "s3://b/p/"})
    [storage] = await queue.claim_deliveries(10, 60)
    assert storage.kind == "storage"
    assert deliveries(db)[1][4] is True  # the webhook waits
    accepted = await queue.finish_deliveries([DeliveryResult(storage.id, storage.attempts, ok=True,
                                                             stored_url="s3://b/p/x.json", drop_inline=True)])
    assert accepted == {storage.id: "SUCCEEDED"}
    [hook] = await queue.claim_deliveries(10, 60)
    assert (hook.kind, hook.stored_url, hook.output) == ("webhook", "s3://b/p/x.json", None)


async def test_retry_then_give_up_and_redeliver(queue: Queue, db: psycopg.Connection) -> None:
    await finish_one(queue, {"model_input": 1, "webhook_endpoint": "https://e.com/h"})
    [due] = await queue.claim_deliveries(10, 60)
    await queue.finish_deliveries([DeliveryResult(due.id, due.attempts, ok=False, status_code=503, error="HTTP 503",
                                                  retry_in_seconds=0)])
    [due2] = await queue.claim_deliveries(10, 60)
    assert due2.attempts == 2
    # the first claim's late report is refused (fenced by attempts)
    assert await queue.finish_deliveries([DeliveryResult(due.id, due.attempts, ok=True)]) == {}
    assert await queue.finish_deliveries([DeliveryResult(due2.id, due2.attempts, ok=False, error="timeout")]) == {
        due2.id: "FAILED"}
    status = db.execute("SELECT asyncinfer.webhook_status(id) FROM asyncinfer.requests").fetchone()[0]
    assert status == "FAILED"
    assert await queue.redeliver_failed("m") == 1
    [due3] = await queue.claim_deliveries(10, 60)
    assert due3.attempts == 3
    await queue.finish_deliveries([DeliveryResult(due3.id, due3.attempts, ok=True, status_code=200)])
    assert db.execute("SELECT asyncinfer.webhook_status(id) FROM asyncinfer.requests").fetchone()[0] == "SUCCEEDED"
    kinds = [r[0] for r in db.execute("SELECT kind FROM asyncinfer.request_events WHERE kind LIKE 'webhook%%' OR kind = 'redeliver' ORDER BY id")]
    assert kinds == ["webhook_retry", "webhook_failed", "redeliver", "webhook_succeeded"]


async def test_dead_dispatcher_lease_lapses_and_row_is_due_again(queue: Queue, db: psycopg.Connection) -> None:
    await finish_one(queue, {"model_input": 1, "webhook_endpoint": "https://e.com/h"})
    [due] = await queue.claim_deliveries(10, lease_seconds=0.01)
    db.execute("SELECT pg_sleep(0.05)")
    [again] = await queue.claim_deliveries(10, 60)
    assert again.id == due.id and again.attempts == 2


async def test_webhook_status_names(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=1)
    a, b = await queue.submit("m", [{"model_input": 1}, {"model_input": 2, "webhook_endpoint": "https://e.com/h"}])
    await queue.cancel(b.request_id)
    got = dict(db.execute("SELECT public_id, asyncinfer.webhook_status(id) FROM asyncinfer.requests").fetchall())
    assert got == {a.request_id: "NO_WEBHOOK_PROVIDED", b.request_id: "CANCELED"}
