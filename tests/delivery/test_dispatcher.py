"""Webhooks and storage writes end to end: real PostgreSQL, real HTTP receiver, real S3 server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from pathlib import Path

import psycopg
import pytest
from standardwebhooks import Webhook

from app.delivery.dispatcher import Dispatcher
from app.delivery.signing import new_secret
from app.queue.operations import Outcome, Queue
from app.settings import Settings
from tests.queue.helpers import new_worker


def settings(**overrides: object) -> Settings:
    base = dict(allow_private_webhooks=True, webhook_retry_schedule_seconds=[0.05, 0.05], poll_interval_seconds=0.05,
                delivery_lease_seconds=5)
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


async def run_request(queue: Queue, item: dict, *, error: object = None, output: object = None) -> str:
    await queue.upsert_model("m", capacity=10)
    [sub] = await queue.submit("m", [item])
    worker = await new_worker(queue, ["m"])
    [req] = await queue.claim("m", worker, 1, 30)
    await queue.finish(worker, [Outcome(req.id, req.attempt, output=output if output is not None else {"echo": 1},
                                        error=error, retryable=False)])
    return str(sub.request_id)


async def drain(dispatcher: Dispatcher, rounds: int = 100) -> None:
    """Run the dispatcher until no delivery is left PENDING (bounded)."""
    for _ in range(rounds):
        if not await dispatcher.run_once():
            async with dispatcher.queue.pool.connection() as conn:
                cur = await conn.execute("SELECT count(*) FROM asyncinfer.deliveries WHERE state = 'PENDING'")
                if (await cur.fetchone())[0] == 0:
                    return
            await asyncio.sleep(0.02)


async def test_webhook_is_signed_both_ways_and_carries_the_output(queue: Queue, receiver) -> None:
    old, new = new_secret(), new_secret()
    await queue.add_webhook_secret(old)
    await queue.add_webhook_secret(new)
    request_id = await run_request(queue, {"model_input": 1, "webhook_endpoint": receiver.url + "/hook",
                                           "metadata": {"user": "u1"}})
    dispatcher = Dispatcher(queue, settings())
    await drain(dispatcher)
    await dispatcher.close()
    [call] = receiver.wait_for(1)
    payload = json.loads(call.body)
    assert payload["request_id"] == request_id and payload["type"] == "async_request_completed"
    assert payload["data"] == {"echo": 1} and payload["errors"] == [] and payload["metadata"] == {"user": "u1"}
    assert payload["model"] == "m"
    # Standard Webhooks, verified by its own library, with either secret during rotation
    for secret in (old, new):
        assert Webhook(secret).verify(call.body, call.headers) == payload
    # Baseten-style header: one v1=<hex> per active secret
    expected = {"v1=" + hmac.new(s.encode(), call.body, hashlib.sha256).hexdigest() for s in (old, new)}
    assert set(call.headers["x-baseten-signature"].split(",")) == expected
    assert call.headers["webhook-id"] == "msg_" + request_id.replace("-", "")


async def test_failed_request_webhook_lists_the_error(queue: Queue, receiver) -> None:
    await run_request(queue, {"model_input": 1, "webhook_endpoint": receiver.url + "/hook"},
                      error={"message": "model exploded"})
    dispatcher = Dispatcher(queue, settings())
    await drain(dispatcher)
    await dispatcher.close()
    payload = json.loads(receiver.wait_for(1)[0].body)
    assert payload["data"] is None and payload["errors"] == [{"message": "model exploded"}]


async def test_retries_with_a_stable_message_id_until_success(queue: Queue, db: psycopg.Connection, receiver) -> None:
    receiver.plan["/flaky"] = [500, 429]
    await run_request(queue, {"model_input": 1, "webhook_endpoint": receiver.url + "/flaky"})
    dispatcher = Dispatcher(queue, settings())
    await drain(dispatcher)
    await dispatcher.close()
    calls = receiver.wait_for(3)
    assert len({c.headers["webhook-id"] for c in calls}) == 1
    assert db.execute("SELECT state::text, attempts, last_status_code FROM asyncinfer.deliveries").fetchone() == (
        "SUCCEEDED", 3, 200)


async def test_receiver_down_ends_webhook_failed_but_output_kept(queue: Queue, db: psycopg.Connection) -> None:
    await run_request(queue, {"model_input": 1, "webhook_endpoint": "http://127.0.0.1:9/nobody-listens"})
    dispatcher = Dispatcher(queue, settings())
    await drain(dispatcher)
    await dispatcher.close()
    row = db.execute("SELECT state::text, attempts, last_error FROM asyncinfer.deliveries").fetchone()
    assert row[0] == "FAILED" and row[1] == 3 and "Connect" in row[2]
    assert db.execute("SELECT asyncinfer.webhook_status(id) FROM asyncinfer.requests").fetchone() == ("FAILED",)
    assert db.execute("SELECT output FROM asyncinfer.request_outputs").fetchone() == ({"echo": 1},)


async def test_redirect_is_not_followed_and_reported(queue: Queue, db: psycopg.Connection, receiver) -> None:
    receiver.plan["/moved"] = [302, 302, 302]
    await run_request(queue, {"model_input": 1, "webhook_endpoint": receiver.url + "/moved"})
    dispatcher = Dispatcher(queue, settings())
    await drain(dispatcher)
    await dispatcher.close()
    assert len(receiver.received) == 3  # nothing went to the Location
    assert db.execute("SELECT state::text, last_status_code, last_error FROM asyncinfer.deliveries").fetchone() == (
        "FAILED", 302, "HTTP 302: redirect not followed")


async def test_private_target_refused_without_retry_unless_allowed(queue: Queue, db: psycopg.Connection, receiver) -> None:
    await run_request(queue, {"model_input": 1, "webhook_endpoint": receiver.url + "/hook"})
    dispatcher = Dispatcher(queue, settings(allow_private_webhooks=False))
    await drain(dispatcher)
    await dispatcher.close()
    assert receiver.received == []
    state, attempts, error = db.execute("SELECT state::text, attempts, last_error FROM asyncinfer.deliveries").fetchone()
    assert (state, attempts) == ("FAILED", 1) and "loopback" in error


async def test_dispatcher_killed_mid_delivery_delivers_again_after_lease(queue: Queue, receiver) -> None:
    await run_request(queue, {"model_input": 1, "webhook_endpoint": receiver.url + "/hook"})
    # A dispatcher claims and dies before recording anything.
    assert len(await queue.claim_deliveries(10, lease_seconds=2)) == 1
    dispatcher = Dispatcher(queue, settings())
    assert await dispatcher.run_once() == 0  # leased by the dead one
    await asyncio.sleep(2.1)
    assert await dispatcher.run_once() == 1
    await dispatcher.close()
    assert len(receiver.wait_for(1)) == 1


async def test_output_written_to_file_storage_then_webhook_carries_its_url(queue: Queue, tmp_path: Path, receiver,
                                                                           db: psycopg.Connection) -> None:
    prefix = f"file://{tmp_path}/outputs/"
    request_id = await run_request(queue, {"model_input": 1, "output_url": prefix,
                                           "webhook_endpoint": receiver.url + "/hook"}, output={"big": "x" * 100})
    dispatcher = Dispatcher(queue, settings(output_inline_limit_bytes=10))
    await drain(dispatcher)
    await dispatcher.close()
    stored = tmp_path / "outputs" / f"{request_id}.json"
    assert json.loads(stored.read_bytes()) == {"big": "x" * 100}
    payload = json.loads(receiver.wait_for(1)[0].body)
    assert payload["output_url"] == prefix + f"{request_id}.json"
    # above the inline limit: the output now lives only in storage
    assert db.execute("SELECT output, stored_url FROM asyncinfer.request_outputs").fetchone() == (
        None, prefix + f"{request_id}.json")


async def test_output_written_to_an_s3_compatible_server(queue: Queue, s3_endpoint: str, db: psycopg.Connection) -> None:
    import boto3  # moto's own dependency: an independent S3 client to check what we wrote

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="results")
    request_id = await run_request(queue, {"model_input": 1, "output_url": "s3://results/run-1/"},
                                   output={"vector": [0.5, 0.25]})
    dispatcher = Dispatcher(queue, settings(s3_endpoint_url=s3_endpoint, s3_allow_http=True, s3_region="us-east-1"))
    await drain(dispatcher)
    await dispatcher.close()
    got = s3.get_object(Bucket="results", Key=f"run-1/{request_id}.json")["Body"].read()
    assert json.loads(got) == {"vector": [0.5, 0.25]}
    assert db.execute("SELECT state::text FROM asyncinfer.deliveries").fetchone() == ("SUCCEEDED",)


async def test_unwritable_storage_fails_and_releases_the_webhook(queue: Queue, db: psycopg.Connection, receiver) -> None:
    await run_request(queue, {"model_input": 1, "output_url": "s3://no-such-bucket-here/x/",
                              "webhook_endpoint": receiver.url + "/hook"})
    dispatcher = Dispatcher(queue, settings(s3_endpoint_url="http://127.0.0.1:9", s3_allow_http=True,
                                            s3_region="us-east-1", webhook_retry_schedule_seconds=[0.01]))
    await drain(dispatcher)
    await dispatcher.close()
    rows = dict(db.execute("SELECT kind, state::text FROM asyncinfer.deliveries").fetchall())
    assert rows == {"storage": "FAILED", "webhook": "SUCCEEDED"}
    payload = json.loads(receiver.wait_for(1)[0].body)
    assert payload["data"] == {"echo": 1} and "output_url" not in payload
