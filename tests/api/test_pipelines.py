"""The pipeline routes: declare, submit (declared or inline), status with
steps, events of every step, key isolation, and the 4xx of bad input."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from app.queue.operations import Queue
from tests.api.helpers import FakeWorker, assert_error, echo, new_model


def new_pipeline(admin: httpx.Client, steps: list[dict[str, object]]) -> str:
    name = f"p-{uuid.uuid4().hex[:10]}"
    answer = admin.put(f"/v1/pipelines/{name}", json={"steps": steps})
    assert answer.status_code == 201, answer.text
    return name


def test_declare_read_replace_delete(admin: httpx.Client, user: httpx.Client, model: str) -> None:
    name = new_pipeline(admin, [{"model": model}])
    got = user.get(f"/v1/pipelines/{name}").json()
    assert got["steps"] == [{"model": model}] and got["name"] == name
    assert name in [p["name"] for p in user.get("/v1/pipelines").json()["pipelines"]]
    replaced = admin.put(f"/v1/pipelines/{name}", json={"steps": [{"model": model}, {"model": model,
                                                                                   "input": {"x": "$.echo"}}]})
    assert replaced.status_code == 200 and len(replaced.json()["steps"]) == 2
    assert_error(user.put(f"/v1/pipelines/{name}", json={"steps": [{"model": model}]}), 403)
    assert_error(user.delete(f"/v1/pipelines/{name}"), 403)
    assert admin.delete(f"/v1/pipelines/{name}").json() == {"name": name, "deleted": True}
    assert_error(admin.get(f"/v1/pipelines/{name}"), 404, "name")
    assert_error(admin.delete(f"/v1/pipelines/{name}"), 404, "name")


@pytest.mark.parametrize(("body", "field"), [
    ({"steps": []}, "steps"),
    ({"steps": [{"model": "a", "extra": 1}]}, "steps[0].extra"),
    ({"steps": [{"model": "bad name"}]}, "steps[0].model"),
    ({"steps": [{"model": "a", "fan_out": "items"}]}, "steps[0].fan_out"),
    ({"steps": [{"model": "a", "fan_out": "$["}]}, "steps[0].fan_out"),
    ({"steps": [{"model": "a", "input": {"x": "$nope"}}]}, "steps[0].input"),
    ({"steps": [{"model": "a"}], "more": 1}, "more"),
])
def test_bad_declarations_name_the_field(admin: httpx.Client, body: dict[str, object], field: str) -> None:
    assert_error(admin.put(f"/v1/pipelines/p-{uuid.uuid4().hex[:8]}", json=body), 400, field)


def test_bad_submits(user: httpx.Client, admin: httpx.Client, model: str) -> None:
    assert_error(user.post("/v1/pipelines/nope/async_predict", json={"model_input": 1}), 404, "pipeline")
    name = new_pipeline(admin, [{"model": model}])
    assert_error(user.post(f"/v1/pipelines/{name}/async_predict", json={"model_input": None}), 400, "model_input")
    assert_error(user.post(f"/v1/pipelines/{name}/async_predict", json={"model_input": 1, "priority": 7}), 400,
                 "priority")
    assert_error(user.post(f"/v1/pipelines/{name}/async_predict",
                           json={"model_input": 1, "webhook_endpoint": "ftp://x"}), 400, "webhook_endpoint")
    assert_error(user.post(f"/v1/pipelines/{name}/async_predict",
                           json={"model_input": 1, "steps": [{"model": "ghost-model"}]}), 404, "model")


async def test_run_status_events_and_isolation(
    admin: httpx.Client, user: httpx.Client, other_user: httpx.Client, api_queue: Queue
) -> None:
    first, second = new_model(admin, capacity=4), new_model(admin, capacity=4)
    name = new_pipeline(admin, [{"model": first}, {"model": second, "input": {"from_first": "$.echo"}}])
    answer = user.post(f"/v1/pipelines/{name}/async_predict", json={"model_input": {"n": 1}, "priority": 0,
                                                                     "idempotency_key": "run-1"})
    assert answer.status_code == 201, answer.text
    run = answer.json()["request_id"]
    again = user.post(f"/v1/pipelines/{name}/async_predict", json={"model_input": {"n": 2}, "idempotency_key": "run-1"})
    assert (again.status_code, again.json()["request_id"]) == (200, run)

    status = user.get(f"/v1/async_request/{run}").json()
    assert (status["status"], status["model"], status["priority"]) == ("IN_PROGRESS", f"pipeline:{name}", 0)
    assert [s["status"] for s in status["pipeline"]["steps"]] == ["QUEUED", "PENDING"]
    assert_error(other_user.get(f"/v1/async_request/{run}"), 404)  # another key's run reads as absent
    assert_error(user.get(f"/v1/async_request/{run}/output"), 409)

    workers = [await FakeWorker(api_queue, m, echo).start() for m in (first, second)]
    try:
        for _ in range(500):
            status = user.get(f"/v1/async_request/{run}").json()
            if status["status"] != "IN_PROGRESS":
                break
            await asyncio.sleep(0.01)
    finally:
        for w in workers:
            await w.stop()
    assert status["status"] == "SUCCEEDED", status
    assert user.get(f"/v1/async_request/{run}/output").json()["output"] == {"echo": {"from_first": {"n": 1}}}
    # the steps are requests of their own, visible to the same key
    step_id = status["pipeline"]["steps"][0]["request_id"]
    assert user.get(f"/v1/async_request/{step_id}").json()["model"] == first
    events = user.get(f"/v1/async_request/{run}/events").json()["events"]
    assert {e["request_id"] for e in events if "request_id" in e} == {
        s["request_id"] for s in status["pipeline"]["steps"]}
    page = user.get(f"/v1/async_request/{run}/events", params={"after": events[2]["id"], "limit": 2}).json()
    assert [e["id"] for e in page["events"]] == [e["id"] for e in events[3:5]]


async def test_inline_pipeline_and_cancel(admin: httpx.Client, user: httpx.Client) -> None:
    model = new_model(admin, capacity=1)
    body = {"model_input": [1, 2, 3], "steps": [{"model": model, "fan_out": "$"}]}
    answer = user.post("/v1/pipelines/adhoc/async_predict", json=body)
    assert answer.status_code == 201, answer.text
    run = answer.json()["request_id"]
    status = user.get(f"/v1/async_request/{run}").json()
    step = status["pipeline"]["steps"][0]
    assert (step["fan_out"], step["num_requests"], step["requests_by_status"]) == (True, 3, {"QUEUED": 3})
    canceled = user.delete(f"/v1/async_request/{run}")
    assert canceled.status_code == 200 and canceled.json()["status"] == "CANCELED"
    status = user.get(f"/v1/async_request/{run}").json()
    assert status["status"] == "CANCELED"
    assert status["pipeline"]["steps"][0]["requests_by_status"] == {"CANCELED": 3}


def test_batch_of_runs_all_or_none(admin: httpx.Client, user: httpx.Client, api_db) -> None:
    model = new_model(admin, capacity=1)
    name = new_pipeline(admin, [{"model": model}])
    answer = user.post(f"/v1/pipelines/{name}/async_predict_batch",
                       json={"requests": [{"model_input": i, "priority": 2} for i in range(50)]})
    assert answer.status_code == 201, answer.text
    ids = answer.json()["request_ids"]
    assert len(set(ids)) == 50
    assert api_db.execute("SELECT count(*) FROM asyncinfer.requests WHERE model = %s AND state = 'QUEUED'",
                          (model,)).fetchone() == (50,)  # step 0 of each run, queued
    # one bad item: none of the batch is accepted
    bad = {"requests": [{"model_input": 1}, {"model_input": 2, "priority": 9}]}
    assert_error(user.post(f"/v1/pipelines/{name}/async_predict_batch", json=bad), 400, "requests[1].priority")
    assert_error(user.post(f"/v1/pipelines/{name}/async_predict_batch", json={"requests": []}), 400, "requests")
    inline = user.post("/v1/pipelines/adhoc/async_predict_batch",
                       json={"requests": [{"model_input": 1}], "steps": [{"model": model}]})
    assert inline.status_code == 201, inline.text
    assert api_db.execute("SELECT count(*) FROM asyncinfer.requests WHERE model = %s", (model,)).fetchone() == (51,)
