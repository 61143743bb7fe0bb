"""Submitting over HTTP: async_predict, bulk, defaults, idempotency, coalescing, backpressure."""

from __future__ import annotations

import asyncio
import re
import uuid

from pathlib import Path

import httpx
import psycopg

from tests.api.helpers import ApiServer, assert_error, new_key, new_model, start_server


def stored(db: psycopg.Connection, request_id: str) -> dict[str, object]:
    row = db.execute(
        "SELECT r.model, r.state::text, r.priority, r.max_attempts, r.initial_delay_ms, r.max_delay_ms,"
        "       extract(epoch FROM r.expires_at - r.created_at)::int, r.idempotency_key, r.api_key_id,"
        "       i.model_input, i.webhook_endpoint, i.output_url, i.metadata"
        "  FROM asyncinfer.requests r JOIN asyncinfer.request_inputs i ON i.request_id = r.id"
        " WHERE r.public_id = %s", (request_id,)).fetchone()
    assert row is not None, f"request {request_id} is not in the database"
    keys = ["model", "state", "priority", "max_attempts", "initial_delay_ms", "max_delay_ms", "queue_seconds",
            "idempotency_key", "api_key_id", "model_input", "webhook_endpoint", "output_url", "metadata"]
    return dict(zip(keys, row))


def test_async_predict_stores_every_field_and_answers_201(user: httpx.Client, model: str, api_db) -> None:
    body = {
        "model_input": {"prompt": "héllo", "n": [1, 2.5, None, True]},
        "webhook_endpoint": "http://127.0.0.1:9/hook",
        "priority": 0,
        "max_time_in_queue_seconds": 120,
        "inference_retry_config": {"max_attempts": 5, "initial_delay_ms": 10, "max_delay_ms": 20},
        "output_url": "file:///tmp/outputs/",
        "idempotency_key": "k-1",
        "metadata": {"team": "search", "n": 1},
    }
    response = user.post(f"/v1/models/{model}/async_predict", json=body)
    assert response.status_code == 201, response.text
    assert set(response.json()) == {"request_id"}
    request_id = response.json()["request_id"]
    assert str(uuid.UUID(request_id)) == request_id
    row = stored(api_db, request_id)
    assert row["model"] == model and row["state"] == "QUEUED" and row["priority"] == 0
    assert (row["max_attempts"], row["initial_delay_ms"], row["max_delay_ms"]) == (5, 10, 20)
    assert row["queue_seconds"] == 120
    assert row["model_input"] == body["model_input"]
    assert row["webhook_endpoint"] == "http://127.0.0.1:9/hook" and row["output_url"] == "file:///tmp/outputs/"
    assert row["metadata"] == {"team": "search", "n": 1} and row["idempotency_key"] == "k-1"
    assert row["api_key_id"] is not None


def test_defaults_come_from_the_model_then_the_service(admin: httpx.Client, user: httpx.Client, api_db) -> None:
    plain = new_model(admin)
    tuned = new_model(admin, defaults={"priority": 2, "max_time_in_queue_seconds": 60,
                                       "inference_retry_config": {"max_attempts": 7}})
    a = user.post(f"/v1/models/{plain}/async_predict", json={"model_input": 1}).json()["request_id"]
    b = user.post(f"/v1/models/{tuned}/async_predict", json={"model_input": 1}).json()["request_id"]
    c = user.post(f"/v1/models/{tuned}/async_predict", json={"model_input": 1, "priority": 0}).json()["request_id"]
    ra, rb, rc = stored(api_db, a), stored(api_db, b), stored(api_db, c)
    assert (ra["priority"], ra["queue_seconds"], ra["max_attempts"]) == (1, 600, 3)
    assert (ra["initial_delay_ms"], ra["max_delay_ms"]) == (1000, 5000)
    assert (rb["priority"], rb["queue_seconds"], rb["max_attempts"]) == (2, 60, 7)
    assert rc["priority"] == 0


def test_idempotent_resubmit_returns_the_same_request(user: httpx.Client, other_user: httpx.Client,
                                                       model: str, api_db) -> None:
    body = {"model_input": {"x": 1}, "idempotency_key": "order-42"}
    first = user.post(f"/v1/models/{model}/async_predict", json=body)
    again = user.post(f"/v1/models/{model}/async_predict", json={**body, "model_input": {"x": 2}})
    assert first.status_code == 201 and again.status_code == 200, (first.text, again.text)
    assert again.json()["request_id"] == first.json()["request_id"]
    # the same key string from another API key is another request
    theirs = other_user.post(f"/v1/models/{model}/async_predict", json=body)
    assert theirs.status_code == 201 and theirs.json()["request_id"] != first.json()["request_id"]
    count = api_db.execute("SELECT count(*) FROM asyncinfer.requests WHERE model = %s", (model,)).fetchone()[0]
    assert count == 2
    # and in bulk: a repeated key inside one batch and one matching the earlier request
    batch = user.post(f"/v1/models/{model}/async_predict_batch", json={"requests": [
        {"model_input": 1, "idempotency_key": "order-42"},
        {"model_input": 2, "idempotency_key": "order-43"},
        {"model_input": 3, "idempotency_key": "order-43"},
    ]})
    assert batch.status_code == 201, batch.text
    ids = batch.json()["request_ids"]
    assert ids[0] == first.json()["request_id"] and ids[1] == ids[2] and ids[1] != ids[0]


def test_bulk_submit_keeps_order_and_is_all_or_nothing(user: httpx.Client, model: str, api_db) -> None:
    items = [{"model_input": {"i": i}, "priority": i % 3} for i in range(50)]
    response = user.post(f"/v1/models/{model}/async_predict_batch", json={"requests": items})
    assert response.status_code == 201, response.text
    ids = response.json()["request_ids"]
    assert len(ids) == 50 and len(set(ids)) == 50
    for i in (0, 17, 49):
        row = stored(api_db, ids[i])
        assert row["model_input"] == {"i": i} and row["priority"] == i % 3

    before = api_db.execute("SELECT count(*) FROM asyncinfer.requests WHERE model = %s", (model,)).fetchone()[0]
    bad = [{"model_input": 1}, {"model_input": 2, "priority": 5}, {"model_input": 3}]
    assert_error(user.post(f"/v1/models/{model}/async_predict_batch", json={"requests": bad}), 400,
                 "requests[1].priority")
    bad_hook = [{"model_input": 1}, {"model_input": 2, "webhook_endpoint": "gopher://x"}]
    assert_error(user.post(f"/v1/models/{model}/async_predict_batch", json={"requests": bad_hook}), 400,
                 "requests[1].webhook_endpoint")
    # the database refuses one item (a number jsonb cannot hold): none are stored
    huge = [{"model_input": 1}, {"model_input": 2}]
    raw = httpx.Request("POST", "/", json={"requests": huge}).content.replace(b'"model_input":2', b'"model_input":1e-999999')
    assert_error(user.post(f"/v1/models/{model}/async_predict_batch", content=raw,
                           headers={"content-type": "application/json"}), 400)
    after = api_db.execute("SELECT count(*) FROM asyncinfer.requests WHERE model = %s", (model,)).fetchone()[0]
    assert after == before

    assert_error(user.post(f"/v1/models/{model}/async_predict_batch", json={"requests": []}), 400, "requests")
    too_many = {"requests": [{"model_input": 0}] * 2001}  # the test server allows 2000
    body = assert_error(user.post(f"/v1/models/{model}/async_predict_batch", json=too_many), 400, "requests")
    assert "2000" in body["errors"][0]["rule"]  # type: ignore[index]
    assert_error(user.post(f"/v1/models/{model}/async_predict_batch", json=[{"model_input": 1}]), 400, "body")
    assert_error(user.post(f"/v1/models/{model}/async_predict_batch", json={"requests": [1]}), 400, "requests[0]")


def test_bulk_submit_accepts_the_configured_maximum(user: httpx.Client, model: str, api_db) -> None:
    response = user.post(f"/v1/models/{model}/async_predict_batch",
                         json={"requests": [{"model_input": i} for i in range(2000)]})
    assert response.status_code == 201, response.text
    assert len(response.json()["request_ids"]) == 2000
    count = api_db.execute("SELECT count(*) FROM asyncinfer.requests WHERE model = %s", (model,)).fetchone()[0]
    assert count == 2000


async def test_concurrent_single_submits_share_one_insert(api: ApiServer, admin: httpx.Client, model: str,
                                                           api_db, tmp_path: Path) -> None:
    key_id, key = new_key(admin, "burst")
    # A server of its own on the same database, whose statements may wait on
    # the held lock below (the default lock_timeout would end the wait at 0.5 s).
    patient = start_server(api.database_url, tmp_path, db_lock_timeout_ms="60000")
    try:
        await _submits_coalesce_while_one_insert_waits(patient, admin, model, key_id, key)
    finally:
        patient.stop()
    count = api_db.execute("SELECT count(*) FROM asyncinfer.requests WHERE model = %s", (model,)).fetchone()[0]
    assert count == 200


async def _submits_coalesce_while_one_insert_waits(api: ApiServer, admin: httpx.Client, model: str, key_id: int,
                                                   key: str) -> None:

    def gauge(name: str) -> int:  # this server's own counters
        text = httpx.get(f"{api.base_url}/metrics", timeout=10).text
        return int(re.search(rf"^{name}\{{[^}}]*\}} (\d+)$", text, re.M).group(1))  # type: ignore[union-attr]

    inserts0 = gauge("asyncinfer_api_submit_inserts_total")
    # Hold an idempotency key in an open transaction: the first submit's insert
    # waits on it, and every submit arriving meanwhile must queue behind it.
    with psycopg.connect(api.database_url) as blocker:  # type: ignore[arg-type]
        blocker.execute("SELECT asyncinfer.submit_requests(%s, '{\"model_input\": 0, \"idempotency_key\": \"hold\"}',"
                        " %s)", (model, key_id))
        async with api.async_client(key, limits=httpx.Limits(max_connections=250)) as client:
            first = asyncio.create_task(client.post(f"/v1/models/{model}/async_predict",
                                                    json={"model_input": 0, "idempotency_key": "hold"}))
            await asyncio.sleep(0.3)
            rest = [asyncio.create_task(client.post(f"/v1/models/{model}/async_predict", json={"model_input": i}))
                    for i in range(1, 200)]
            deadline = asyncio.get_running_loop().time() + 20
            while gauge("asyncinfer_api_submits_waiting") < 199:
                assert asyncio.get_running_loop().time() < deadline, gauge("asyncinfer_api_submits_waiting")
                await asyncio.sleep(0.05)
            blocker.rollback()
            responses = [await first, *await asyncio.gather(*rest)]
    assert [r.status_code for r in responses] == [201] * 200, [r.text for r in responses if r.status_code != 201]
    assert len({r.json()["request_id"] for r in responses}) == 200
    inserts = gauge("asyncinfer_api_submit_inserts_total") - inserts0
    assert inserts <= 3, inserts  # the held one, then the 199 that waited together


async def test_one_bad_item_never_fails_the_others_in_its_insert(api: ApiServer, admin: httpx.Client, model: str,
                                                                 api_db) -> None:
    _, key = new_key(admin, "mixed")
    # every 10th body holds a number PostgreSQL's jsonb refuses (an exponent
    # below numeric's range; Python reads it as 0.0): it passes the API's
    # checks, so only the database can refuse it, in a coalesced insert
    good = b'{"model_input": {"n": %d}}'
    bad = b'{"model_input": 1e-999999}'
    bodies = [bad if i % 10 == 0 else good % i for i in range(200)]
    async with api.async_client(key, limits=httpx.Limits(max_connections=50)) as client:
        responses = await asyncio.gather(*(
            client.post(f"/v1/models/{model}/async_predict", content=b, headers={"content-type": "application/json"})
            for b in bodies))
    codes = [r.status_code for r in responses]
    assert codes.count(201) == 180 and codes.count(400) == 20, codes
    for i, response in enumerate(responses):
        if i % 10 == 0:
            assert_error(response, 400, "body")
    assert len({r.json()["request_id"] for r in responses if r.status_code == 201}) == 180
    count = api_db.execute("SELECT count(*) FROM asyncinfer.requests WHERE model = %s", (model,)).fetchone()[0]
    assert count == 180


def test_full_queue_answers_429_with_retry_after(admin: httpx.Client, user: httpx.Client) -> None:
    model = new_model(admin, max_queue_depth=2)
    for _ in range(2):
        assert user.post(f"/v1/models/{model}/async_predict", json={"model_input": 1}).status_code == 201
    response = user.post(f"/v1/models/{model}/async_predict", json={"model_input": 1})
    assert_error(response, 429, "model")
    assert int(response.headers["retry-after"]) >= 1
    assert_error(user.post(f"/v1/models/{model}/async_predict_batch", json={"requests": [{"model_input": 1}]}), 429)


def test_key_rate_limit_answers_429_with_retry_after(api: ApiServer, admin: httpx.Client, model: str) -> None:
    _, key = new_key(admin, "slow", rate_limit_per_second=1)
    with api.client(key) as client:
        first = client.post(f"/v1/models/{model}/async_predict", json={"model_input": 1})
        second = client.post(f"/v1/models/{model}/async_predict", json={"model_input": 1})
    assert first.status_code == 201, first.text
    assert_error(second, 429, "Authorization")
    assert int(second.headers["retry-after"]) >= 1
