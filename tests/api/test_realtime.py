"""Real-time predict: ahead of every async priority on the same capacity,
woken by NOTIFY, 504 and canceled on timeout."""

from __future__ import annotations

import asyncio
import time

import httpx

from app.queue.operations import ClaimedRequest, Outcome, Queue
from tests.api.helpers import ADMIN_KEY, ApiServer, FakeWorker, assert_error, echo, new_key, new_model


async def test_predict_returns_the_output_woken_by_notify(api: ApiServer, admin: httpx.Client,
                                                          api_queue: Queue) -> None:
    model = new_model(admin)
    _, key = new_key(admin)
    # The worker polls every 2 ms; the API's own fallback sweep runs every 2 s,
    # so an answer well under that can only come from the NOTIFY.
    worker = await FakeWorker(api_queue, model, echo).start()
    try:
        async with api.async_client(key) as client:
            for payload in ({"text": "hi"}, [1, 2, 3], "plain", 0):
                started = time.monotonic()
                response = await client.post(f"/v1/models/{model}/predict", json=payload)
                elapsed = time.monotonic() - started
                assert response.status_code == 200, response.text
                assert response.json() == {"echo": payload}
                assert elapsed < 1.0, elapsed
            request_id = response.headers["x-request-id"]
            status = (await client.get(f"/v1/async_request/{request_id}")).json()
            assert status["status"] == "SUCCEEDED" and status["priority"] == -1 and status["model"] == model
    finally:
        await worker.stop()


async def test_a_live_request_overtakes_a_backlog_of_1000(api: ApiServer, admin: httpx.Client,
                                                          api_queue: Queue, api_db) -> None:
    model = new_model(admin, capacity=1)
    _, key = new_key(admin)
    async with api.async_client(key) as client:
        for priority in (0, 2):  # the most urgent async level too
            backlog = [{"model_input": {"i": i}, "priority": priority} for i in range(500)]
            response = await client.post(f"/v1/models/{model}/async_predict_batch", json={"requests": backlog})
            assert response.status_code == 201, response.text
        # one request at a time, 3 ms each: the backlog alone takes several seconds
        worker = await FakeWorker(api_queue, model, echo, per_item_seconds=0.003).start()
        try:
            await asyncio.sleep(0.3)  # the backlog is running
            started = time.monotonic()
            response = await client.post(f"/v1/models/{model}/predict", json={"live": True})
            elapsed = time.monotonic() - started
        finally:
            await worker.stop()
    assert response.status_code == 200, response.text
    assert response.json() == {"echo": {"live": True}}
    assert elapsed < 2.0, elapsed
    live = response.headers["x-request-id"]
    done, after = api_db.execute(
        "SELECT count(*) FILTER (WHERE r.state = 'SUCCEEDED'),"
        "       count(*) FILTER (WHERE r.state = 'QUEUED' OR r.started_at > l.started_at)"
        "  FROM asyncinfer.requests r, asyncinfer.requests l"
        " WHERE l.public_id = %s AND r.model = %s AND r.priority >= 0", (live, model)).fetchone()
    assert done < 500, done  # it did not wait for the backlog ...
    assert after > 500, after  # ... which mostly ran after it (capacity 1 the whole time)
    capacity = api_db.execute("SELECT in_flight <= capacity FROM asyncinfer.models WHERE name = %s",
                              (model,)).fetchone()[0]
    assert capacity


async def test_predict_times_out_with_504_and_cancels(api: ApiServer, admin: httpx.Client) -> None:
    model = new_model(admin)  # no worker at all
    async with api.async_client(ADMIN_KEY) as client:
        started = time.monotonic()
        response = await client.post(f"/v1/models/{model}/predict", params={"timeout_seconds": "0.5"},
                                     json={"x": 1})
        elapsed = time.monotonic() - started
        body = assert_error(response, 504, "timeout_seconds")
        assert 0.45 < elapsed < 3.0, elapsed
        request_id = response.headers["x-request-id"]
        assert body["request_id"] == request_id
        status = (await client.get(f"/v1/async_request/{request_id}")).json()
        assert status["status"] == "CANCELED"


async def test_model_failure_is_502_and_cancel_meanwhile_is_409(api: ApiServer, admin: httpx.Client,
                                                                 api_queue: Queue) -> None:
    model = new_model(admin)

    def fail(request: ClaimedRequest) -> Outcome:
        return Outcome(request.id, request.attempt, error={"type": "RuntimeError", "message": "boom"},
                       retryable=False)

    worker = await FakeWorker(api_queue, model, fail).start()
    try:
        async with api.async_client(ADMIN_KEY) as client:
            response = await client.post(f"/v1/models/{model}/predict", json={"x": 1})
    finally:
        await worker.stop()
    body = assert_error(response, 502)
    assert body["error"] == {"type": "RuntimeError", "message": "boom"}
    assert body["request_status"] == "FAILED"

    # canceled by someone else while waiting: answered at once, not at the timeout
    async with api.async_client(ADMIN_KEY) as client:
        call = asyncio.create_task(client.post(f"/v1/models/{model}/predict", json={"x": 2},
                                               params={"timeout_seconds": "30"}))
        request_id = None
        for _ in range(200):
            await asyncio.sleep(0.02)
            async with api_queue.pool.connection() as conn:
                row = await (await conn.execute(
                    "SELECT public_id::text FROM asyncinfer.requests WHERE model = %s AND state = 'QUEUED'",
                    (model,))).fetchone()
            if row:
                request_id = row[0]
                break
        assert request_id is not None
        started = time.monotonic()
        assert (await client.delete(f"/v1/async_request/{request_id}")).status_code == 200
        response = await call
        assert time.monotonic() - started < 1.5
    body = assert_error(response, 409)
    assert body["request_status"] == "CANCELED"


def test_predict_input_rules(user: httpx.Client, model: str) -> None:
    assert_error(user.post(f"/v1/models/{model}/predict", content=b" null ",
                           headers={"content-type": "application/json"}), 400, "model_input")
    assert_error(user.post(f"/v1/models/{model}/predict", content=b"{bad",
                           headers={"content-type": "application/json"}), 400, "body")
    assert_error(user.post(f"/v1/models/{model}/predict", content=b"[" * 3000 + b"]" * 3000,
                           headers={"content-type": "application/json"}), 400, "body")
    assert_error(user.post(f"/v1/models/{model}/predict", json={}, params={"timeout_seconds": "soon"}), 400,
                 "timeout_seconds")
    assert_error(user.post(f"/v1/models/{model}/predict", json={}, params={"timeout_seconds": "100000"}), 400,
                 "timeout_seconds")
    assert_error(user.post(f"/v1/models/{model}/predict", content=b"{}", headers={"content-type": "text/plain"}),
                 415, "content-type")


async def test_a_lost_listen_connection_is_replaced(api: ApiServer, admin: httpx.Client, api_queue: Queue,
                                                   api_db) -> None:
    listening = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                 " AND (query ILIKE 'LISTEN%%' OR query ILIKE '%%pg_listening_channels%%')")
    before = {r[0] for r in api_db.execute(listening).fetchall()}
    assert before, "no LISTEN connection found"
    for pid in before:
        api_db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + 10
    while not ({r[0] for r in api_db.execute(listening).fetchall()} - before):
        assert time.monotonic() < deadline, "the API did not listen again"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    model = new_model(admin)
    worker = await FakeWorker(api_queue, model, echo).start()
    try:
        async with api.async_client(ADMIN_KEY) as client:
            started = time.monotonic()
            response = await client.post(f"/v1/models/{model}/predict", json={"again": 1})
            assert response.status_code == 200, response.text
            assert time.monotonic() - started < 1.0  # woken by NOTIFY, not by the 2 s fallback sweep
    finally:
        await worker.stop()
