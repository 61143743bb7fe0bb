"""Reading and canceling requests: status, queue position, output, events,
cancel, queue status, and key isolation (another key's request is a 404)."""

from __future__ import annotations

from datetime import datetime

import httpx

from app.queue.operations import DeliveryResult, Outcome, Queue
from tests.api.helpers import assert_error, new_model


def submit(client: httpx.Client, model: str, **body: object) -> str:
    response = client.post(f"/v1/models/{model}/async_predict", json={"model_input": {"x": 1}, **body})
    assert response.status_code == 201, response.text
    return response.json()["request_id"]


async def claim_one(queue: Queue, model: str) -> tuple[int, object]:
    worker = await queue.register_worker("api-test", "localhost", 0, [model])
    [claimed] = await queue.claim(model, worker, 1, 30)
    return worker, claimed


def test_status_of_a_queued_request_and_its_queue_position(user: httpx.Client, model: str) -> None:
    low = [submit(user, model, priority=2) for _ in range(3)]
    urgent = submit(user, model, priority=0)
    status = user.get(f"/v1/async_request/{urgent}").json()
    assert status["request_id"] == urgent and status["model"] == model
    assert status["status"] == "QUEUED" and status["webhook_status"] == "NO_WEBHOOK_PROVIDED"
    assert status["priority"] == 0 and status["attempts"] == 0
    assert status["queue_position"] == 0  # jumps the three priority-2 requests
    assert status["started_at"] is None and status["finished_at"] is None and status["time_in_queue_ms"] >= 0
    datetime.fromisoformat(status["created_at"].replace("Z", "+00:00"))
    assert "error" not in status and "output_url" not in status
    assert [user.get(f"/v1/async_request/{r}").json()["queue_position"] for r in low] == [1, 2, 3]


async def test_status_output_and_events_through_a_run(user: httpx.Client, model: str, api_queue: Queue) -> None:
    request_id = submit(user, model, metadata={"k": "v"})
    assert_error(user.get(f"/v1/async_request/{request_id}/output"), 409, "request_id")
    worker, claimed = await claim_one(api_queue, model)
    assert str(claimed.public_id) == request_id  # type: ignore[attr-defined]
    running = user.get(f"/v1/async_request/{request_id}").json()
    assert running["status"] == "IN_PROGRESS" and running["attempts"] == 1 and "queue_position" not in running
    assert running["started_at"] is not None
    assert user.get(f"/v1/async_request/{request_id}/output").json()["request_status"] == "IN_PROGRESS"
    await api_queue.append_logs(worker, [(claimed.id, claimed.attempt, "loading weights")])  # type: ignore[attr-defined]
    await api_queue.finish(worker, [Outcome(claimed.id, claimed.attempt, output={"y": [1, 2], "s": "é"})])  # type: ignore[attr-defined]

    done = user.get(f"/v1/async_request/{request_id}").json()
    assert done["status"] == "SUCCEEDED" and done["finished_at"] is not None and "queue_position" not in done
    output = user.get(f"/v1/async_request/{request_id}/output")
    assert output.status_code == 200, output.text
    assert output.json() == {"request_id": request_id, "status": "SUCCEEDED", "output": {"y": [1, 2], "s": "é"}}

    events = user.get(f"/v1/async_request/{request_id}/events").json()
    assert events["request_id"] == request_id
    kinds = [e["kind"] for e in events["events"]]
    assert kinds == ["submitted", "claimed", "log", "succeeded"]
    assert events["events"][2]["detail"] == {"line": "loading weights"}
    assert events["events"][1]["worker_id"] == worker and events["events"][1]["state"] == "IN_PROGRESS"
    ids = [e["id"] for e in events["events"]]
    page = user.get(f"/v1/async_request/{request_id}/events", params={"after": ids[0], "limit": 2}).json()
    assert [e["id"] for e in page["events"]] == ids[1:3]


async def test_failed_request_shows_its_error(user: httpx.Client, model: str, api_queue: Queue) -> None:
    request_id = submit(user, model, inference_retry_config={"max_attempts": 1})
    worker, claimed = await claim_one(api_queue, model)
    await api_queue.finish(worker, [Outcome(claimed.id, claimed.attempt,  # type: ignore[attr-defined]
                                            error={"type": "ValueError", "message": "bad input"}, retryable=False)])
    status = user.get(f"/v1/async_request/{request_id}").json()
    assert status["status"] == "FAILED" and status["error"] == {"type": "ValueError", "message": "bad input"}
    output = user.get(f"/v1/async_request/{request_id}/output").json()
    assert output["status"] == "FAILED" and output["error"]["message"] == "bad input" and "output" not in output


async def test_output_gone_after_retention_and_absent_for_canceled(user: httpx.Client, model: str,
                                                                   api_queue: Queue, api_db) -> None:
    request_id = submit(user, model)
    worker, claimed = await claim_one(api_queue, model)
    await api_queue.finish(worker, [Outcome(claimed.id, claimed.attempt, output=1)])  # type: ignore[attr-defined]
    assert user.get(f"/v1/async_request/{request_id}/output").status_code == 200
    # retention dropped the output (prune_finished does this after output_retention)
    api_db.execute("DELETE FROM asyncinfer.request_outputs WHERE request_id = asyncinfer.request_id_of(%s)",
                   (request_id,))
    body = assert_error(user.get(f"/v1/async_request/{request_id}/output"), 404, "request_id")
    assert "retain" in body["detail"]  # type: ignore[operator]

    canceled = submit(user, model)
    assert user.delete(f"/v1/async_request/{canceled}").status_code == 200
    body = assert_error(user.get(f"/v1/async_request/{canceled}/output"), 404, "request_id")
    assert body["request_status"] == "CANCELED"


async def test_stored_output_url_and_webhook_failed_status(user: httpx.Client, model: str, api_queue: Queue) -> None:
    request_id = submit(user, model, webhook_endpoint="http://127.0.0.1:9/hook", output_url="file:///tmp/out/")
    worker, claimed = await claim_one(api_queue, model)
    await api_queue.finish(worker, [Outcome(claimed.id, claimed.attempt, output={"big": True})])  # type: ignore[attr-defined]
    assert user.get(f"/v1/async_request/{request_id}").json()["webhook_status"] == "PENDING"
    deliveries = await api_queue.claim_deliveries(10, 60)
    mine = {d.kind: d for d in deliveries if str(d.request_id) == request_id}
    await api_queue.finish_deliveries([DeliveryResult(mine["storage"].id, mine["storage"].attempts, ok=True,
                                                      stored_url=f"file:///tmp/out/{request_id}.json")])
    webhook = [d for d in await api_queue.claim_deliveries(10, 60) if str(d.request_id) == request_id]
    await api_queue.finish_deliveries([DeliveryResult(webhook[0].id, webhook[0].attempts, ok=False,
                                                      status_code=500, error="receiver down")])
    status = user.get(f"/v1/async_request/{request_id}").json()
    assert status["status"] == "WEBHOOK_FAILED" and status["webhook_status"] == "FAILED"
    assert status["output_url"] == f"file:///tmp/out/{request_id}.json"
    output = user.get(f"/v1/async_request/{request_id}/output").json()  # still retrievable
    assert output["output"] == {"big": True} and output["output_url"] == status["output_url"]


async def test_cancel_queued_running_and_finished(user: httpx.Client, admin: httpx.Client, api_queue: Queue) -> None:
    model = new_model(admin)
    queued = submit(user, model, priority=2)
    running = submit(user, model, priority=0)
    worker, claimed = await claim_one(api_queue, model)
    assert str(claimed.public_id) == running  # type: ignore[attr-defined]

    response = user.delete(f"/v1/async_request/{queued}")
    assert response.status_code == 200, response.text
    assert response.json() == {"request_id": queued, "status": "CANCELED", "canceled": True, "cancel_requested": False}
    assert user.get(f"/v1/async_request/{queued}").json()["status"] == "CANCELED"
    again = assert_error(user.delete(f"/v1/async_request/{queued}"), 409, "request_id")
    assert again["request_status"] == "CANCELED"

    response = user.delete(f"/v1/async_request/{running}")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "IN_PROGRESS" and response.json()["cancel_requested"] is True
    assert user.get(f"/v1/async_request/{running}").json()["cancel_requested"] is True
    await api_queue.finish(worker, [Outcome(claimed.id, claimed.attempt, output="late")])  # type: ignore[attr-defined]
    assert user.get(f"/v1/async_request/{running}").json()["status"] == "CANCELED"
    assert_error(user.delete(f"/v1/async_request/{running}"), 409)


def test_a_key_sees_and_cancels_only_its_own_requests(user: httpx.Client, other_user: httpx.Client,
                                                       admin: httpx.Client, model: str) -> None:
    mine = submit(user, model)
    for method, path in (("GET", ""), ("GET", "/output"), ("GET", "/events"), ("DELETE", "")):
        response = other_user.request(method, f"/v1/async_request/{mine}{path}")
        assert_error(response, 404, "request_id")
    assert user.get(f"/v1/async_request/{mine}").json()["status"] == "QUEUED"  # the DELETE did nothing
    # admin keys see everyone's requests
    assert admin.get(f"/v1/async_request/{mine}").json()["request_id"] == mine
    # a made-up id with a real row number is unknown too (the public id carries 64 random bits)
    forged = "00000000-0000-0000" + mine[18:]
    assert_error(user.get(f"/v1/async_request/{forged}"), 404)


async def test_queue_status_counts_by_priority(user: httpx.Client, admin: httpx.Client, api_queue: Queue) -> None:
    model = new_model(admin, capacity=3)
    for priority in (0, 1, 1, 2, 2, 2):
        submit(user, model, priority=priority)
    await claim_one(api_queue, model)  # takes the priority-0 one
    status = user.get(f"/v1/models/{model}/async_queue_status")
    assert status.status_code == 200, status.text
    body = status.json()
    assert body["model"] == model and body["capacity"] == 3 and body["paused"] is False
    assert body["num_queued_requests"] == 5 and body["num_in_progress_requests"] == 1
    assert body["queued_by_priority"] == {"-1": 0, "0": 0, "1": 2, "2": 3}
    assert body["oldest_queued_age_seconds"] >= 0 and body["max_queue_depth"] is None
    empty = new_model(admin)
    body = user.get(f"/v1/models/{empty}/async_queue_status").json()
    assert body["num_queued_requests"] == 0 and body["oldest_queued_age_seconds"] is None
