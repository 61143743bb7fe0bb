"""Webhook secrets and redelivery through the admin HTTP API, end to end with a dispatcher."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from app.delivery.dispatcher import Dispatcher
from app.queue.operations import Outcome, Queue
from app.settings import Settings
from tests.api.helpers import ADMIN_KEY, ApiServer, start_server
from tests.queue.helpers import new_worker


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[ApiServer]:
    server = start_server(database_url, tmp_path)
    yield server
    server.stop()


async def test_secrets_and_redeliver_via_api(api: ApiServer, queue: Queue, receiver) -> None:
    async with api.async_client(ADMIN_KEY) as admin:
        created = await admin.post("/v1/webhook_secrets")
        assert created.status_code == 201
        secret = created.json()["secret"]
        listed = (await admin.get("/v1/webhook_secrets")).json()["webhook_secrets"]
        assert [s["id"] for s in listed] == [created.json()["id"]] and secret not in json.dumps(listed)

        await admin.put("/v1/models/m", json={"capacity": 2})
        sub = await admin.post("/v1/models/m/async_predict",
                               json={"model_input": 1, "webhook_endpoint": receiver.url + "/hook"})
        request_id = sub.json()["request_id"]
        worker = await new_worker(queue, ["m"])
        [req] = await queue.claim("m", worker, 1, 30)
        await queue.finish(worker, [Outcome(req.id, req.attempt, output={"ok": True})])

        dispatcher = Dispatcher(queue, Settings(allow_private_webhooks=True))
        assert await dispatcher.run_once() == 1
        first = receiver.wait_for(1)[0]
        assert Webhook(secret).verify(first.body, first.headers)["data"] == {"ok": True}

        again = await admin.post(f"/v1/async_request/{request_id}/redeliver", params={"kind": "webhook"})
        assert again.json() == {"request_id": request_id, "requeued_deliveries": 1}
        assert await dispatcher.run_once() == 1
        calls = receiver.wait_for(2)
        assert calls[0].headers["webhook-id"] == calls[1].headers["webhook-id"]  # same message: receivers dedupe

        assert (await admin.post("/v1/models/m/redeliver_failed")).json()["requeued_deliveries"] == 0
        assert (await admin.delete(f"/v1/webhook_secrets/{created.json()['id']}")).status_code == 200
        assert (await admin.delete(f"/v1/webhook_secrets/{created.json()['id']}")).status_code == 404
        bad = await admin.post(f"/v1/async_request/{request_id}/redeliver", params={"kind": "fax"})
        assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "kind"
        await dispatcher.close()

    async with httpx.AsyncClient(base_url=api.base_url) as anonymous:
        assert (await anonymous.post("/v1/webhook_secrets")).status_code == 401
    await asyncio.sleep(0)
