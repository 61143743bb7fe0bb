"""Pipelines end to end: the real API process, real worker processes (one per
model, as in production), the real dispatcher and a webhook receiver, all
on loopback against a real PostgreSQL.

The pipelines come from the models file the workers load ([pipelines.*]),
so these tests also prove that a worker declares them on start.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.api.helpers import ADMIN_KEY, ApiServer, start_server
from tests.reliability.helpers import Proc, Procs, Receiver, wait_workers_healthy

TOML = """
[models.stage-a]
class = "tests.pipelines.models:Stage"
capacity = 4
[models.stage-a.load_options]
name = "a"

[models.stage-b]
class = "tests.pipelines.models:Stage"
capacity = 4
[models.stage-b.load_options]
name = "b"

[models.stage-c]
class = "tests.pipelines.models:Stage"
capacity = 4
[models.stage-c.load_options]
name = "c"

[models.split]
class = "worker.models.echo:Echo"
capacity = 4

[models.double]
class = "tests.pipelines.models:Double"
capacity = 256
max_batch_size = 128
max_batch_wait_ms = 2

[pipelines.abc]
steps = [{ model = "stage-a" }, { model = "stage-b" }, { model = "stage-c" }]

[pipelines.fan]
steps = [
  { model = "split" },
  { model = "double", fan_out = "$.items" },
  { model = "stage-c", input = { gathered = "$", trail = [] } },
]
"""

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELED", "EXPIRED")
RETRY = {"max_attempts": 3, "initial_delay_ms": 20, "max_delay_ms": 200}


@dataclass
class Stack:
    api: ApiServer
    procs: Procs
    receiver: Receiver
    database_url: str
    client: httpx.Client

    def worker(self, *models: str) -> Proc:
        return self.procs.worker(TOML, models)

    def submit(self, pipeline: str, model_input: Any, **options: Any) -> str:
        body = {"model_input": model_input, "webhook_endpoint": self.receiver.url + "/hook",
                "inference_retry_config": RETRY, **options}
        answer = self.client.post(f"/v1/pipelines/{pipeline}/async_predict", json=body)
        assert answer.status_code == 201, answer.text
        return answer.json()["request_id"]

    def status(self, request_id: str) -> dict[str, Any]:
        answer = self.client.get(f"/v1/async_request/{request_id}")
        assert answer.status_code == 200, answer.text
        return answer.json()

    def wait(self, request_id: str, timeout: float = 30.0, until: tuple[str, ...] = TERMINAL) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(request_id)
            if status["status"] in until:
                return status
            if time.monotonic() > deadline:
                logs = "".join(f"\n--- {p.name} {p.pid}\n{p.log()[-1500:]}" for p in self.procs.all)
                raise AssertionError(f"run {request_id} still {status} after {timeout}s{logs}")
            time.sleep(0.05)

    def db(self) -> psycopg.Connection:
        return psycopg.connect(self.database_url, autocommit=True)


@pytest.fixture
def stack(database_url: str, tmp_path: Path) -> Iterator[Stack]:
    receiver = Receiver()
    receiver.up()
    api = start_server(database_url, tmp_path)
    procs = Procs(database_url, tmp_path, env={"ASYNCINFER_ALLOW_PRIVATE_WEBHOOKS": "true"})
    client = api.client(ADMIN_KEY)
    try:
        yield Stack(api, procs, receiver, database_url, client)
    finally:
        client.close()
        procs.close()
        api.stop()
        receiver.down()


def step_events(db: psycopg.Connection, run_id: str) -> list[tuple[int, str]]:
    """(step, event kind) of every step request's events, in order."""
    return db.execute(
        "SELECT s.step, e.kind FROM asyncinfer.request_events e"
        " JOIN asyncinfer.pipeline_steps s ON s.request_id = e.request_id"
        " WHERE s.run_id = asyncinfer.request_id_of(%s) ORDER BY e.id", (run_id,)).fetchall()


def webhook_bodies(receiver: Receiver, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while receiver.unique() < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{receiver.unique()} of {count} webhooks")
        time.sleep(0.05)


def test_three_step_pipeline_end_to_end(stack: Stack) -> None:
    workers = [stack.worker(m) for m in ("stage-a", "stage-b", "stage-c")]
    dispatcher = stack.procs.dispatcher()
    wait_workers_healthy(stack.database_url, workers)
    assert [p["name"] for p in stack.client.get("/v1/pipelines").json()["pipelines"]] == ["abc", "fan"]

    run = stack.submit("abc", {"doc": 7}, metadata={"team": "search"})
    status = stack.wait(run)
    assert status["status"] == "SUCCEEDED", status
    assert status["model"] == "pipeline:abc"
    steps = status["pipeline"]["steps"]
    assert [(s["step"], s["model"], s["status"]) for s in steps] == [
        (0, "stage-a", "SUCCEEDED"), (1, "stage-b", "SUCCEEDED"), (2, "stage-c", "SUCCEEDED")]
    for s in steps:
        assert s["time_in_queue_ms"] >= 0 and s["run_time_ms"] >= 0 and s["request_id"]
    assert status["pipeline"]["current_step"] == 2

    output = stack.client.get(f"/v1/async_request/{run}/output").json()
    assert output["output"] == {"doc": 7, "trail": ["a", "b", "c"]}

    events = stack.client.get(f"/v1/async_request/{run}/events").json()["events"]
    assert {e.get("step") for e in events if "request_id" in e} == {0, 1, 2}
    assert [e["kind"] for e in events if "request_id" not in e] == [
        "submitted", "step_queued", "step_queued", "step_queued", "succeeded"]
    assert [e["request_id"] for e in events if e.get("kind") == "succeeded" and "request_id" in e] == [
        s["request_id"] for s in steps]

    # one webhook, for the whole run, carrying the final output
    webhook_bodies(stack.receiver, 1)
    time.sleep(0.5)
    assert stack.receiver.request_ids == {run} and stack.receiver.duplicates() == 0
    assert stack.receiver.calls == 1
    assert dispatcher.alive()


def test_worker_killed_mid_step_and_between_steps(stack: Stack) -> None:
    a = stack.worker("stage-a")
    c = stack.worker("stage-c")
    b1 = stack.worker("stage-b")
    wait_workers_healthy(stack.database_url, [a, b1, c])
    run = stack.submit("abc", {"sleep_at": "b", "sleep_ms": 1500})
    with stack.db() as db:
        deadline = time.monotonic() + 20
        # step 1 running on b1: kill it mid-step
        while not db.execute("SELECT 1 FROM asyncinfer.requests WHERE model = 'stage-b' AND state = 'IN_PROGRESS'"
                             " AND parent_id = asyncinfer.request_id_of(%s)", (run,)).fetchone():
            assert time.monotonic() < deadline, "step 1 never started"
            time.sleep(0.02)
        b1.signal(signal.SIGKILL)
        b1.popen.wait(10)
        # and stop stage-c's worker too: the run must wait, durable, between steps
        c.signal(signal.SIGKILL)
        c.popen.wait(10)
        b2 = stack.worker("stage-b")  # the lease runs out (2 s), the reaper requeues step 1, b2 runs it
        wait_workers_healthy(stack.database_url, [b2])
        status = stack.wait(run, until=TERMINAL + ("IN_PROGRESS",))
        deadline = time.monotonic() + 20
        while stack.status(run)["pipeline"]["current_step"] < 2:
            assert time.monotonic() < deadline, stack.status(run)
            time.sleep(0.05)
        status = stack.status(run)
        assert status["status"] == "IN_PROGRESS"
        assert status["pipeline"]["steps"][2]["status"] == "QUEUED"
        c2 = stack.worker("stage-c")
        status = stack.wait(run)
        assert status["status"] == "SUCCEEDED", status
        assert stack.client.get(f"/v1/async_request/{run}/output").json()["output"]["trail"] == ["a", "b", "c"]
        events = step_events(db, run)
        # step 1 was claimed twice (lease lost, then run again) and succeeded once; each step exactly one success
        assert [k for s, k in events if s == 1].count("lease_lost") == 1
        assert [s for s, k in events if k == "succeeded"] == [0, 1, 2]
        assert db.execute("SELECT count(*) FROM asyncinfer.pipeline_steps"
                          " WHERE run_id = asyncinfer.request_id_of(%s)", (run,)).fetchone() == (3,)
        assert c2.alive()


def test_failing_middle_step_fails_the_run(stack: Stack) -> None:
    workers = [stack.worker(m) for m in ("stage-a", "stage-b", "stage-c")]
    stack.procs.dispatcher()
    wait_workers_healthy(stack.database_url, workers)
    run = stack.submit("abc", {"fail_at": "b"})
    status = stack.wait(run)
    assert status["status"] == "FAILED", status
    error = status["error"]
    assert (error["type"], error["step"], error["model"]) == ("step_failed", 1, "stage-b")
    assert error["request_id"] == status["pipeline"]["steps"][1]["request_id"]
    assert "refuses this input" in json.dumps(error["error"])
    assert [s["status"] for s in status["pipeline"]["steps"]] == ["SUCCEEDED", "FAILED", "NOT_RUN"]
    webhook_bodies(stack.receiver, 1)
    assert stack.receiver.request_ids == {run}


def test_cancel_mid_pipeline(stack: Stack) -> None:
    workers = [stack.worker(m) for m in ("stage-a", "stage-b", "stage-c")]
    wait_workers_healthy(stack.database_url, workers)
    run = stack.submit("abc", {"sleep_at": "b", "sleep_ms": 30_000})
    deadline = time.monotonic() + 20
    while stack.status(run)["pipeline"]["steps"][1]["status"] != "IN_PROGRESS":
        assert time.monotonic() < deadline, stack.status(run)
        time.sleep(0.05)
    answer = stack.client.delete(f"/v1/async_request/{run}")
    assert answer.status_code == 202, answer.text
    assert answer.json()["cancel_requested"] is True
    status = stack.wait(run, timeout=15)  # the worker is told at once; far sooner than the 30 s sleep
    assert status["status"] == "CANCELED"
    assert [s["status"] for s in status["pipeline"]["steps"]] == ["SUCCEEDED", "CANCELED", "NOT_RUN"]
    assert stack.client.delete(f"/v1/async_request/{run}").status_code == 409


def test_fan_out_of_1000_items_gathers_in_order(stack: Stack) -> None:
    workers = [stack.worker("split"), stack.worker("double"), stack.worker("stage-c")]
    wait_workers_healthy(stack.database_url, workers)
    items = list(range(1000))
    run = stack.submit("fan", {"items": items})
    status = stack.wait(run, timeout=60)
    assert status["status"] == "SUCCEEDED", status
    fan = status["pipeline"]["steps"][1]
    assert (fan["fan_out"], fan["num_requests"], fan["requests_by_status"]) == (True, 1000, {"SUCCEEDED": 1000})
    output = stack.client.get(f"/v1/async_request/{run}/output").json()["output"]
    assert output == {"gathered": [2 * i for i in items], "trail": ["c"]}
    with stack.db() as db:
        # each item ran exactly once
        assert db.execute("SELECT count(*), count(DISTINCT item) FROM asyncinfer.pipeline_steps"
                          " WHERE run_id = asyncinfer.request_id_of(%s) AND step = 1", (run,)).fetchone() == (1000, 1000)
        assert [k for s, k in step_events(db, run) if k == "succeeded"].count("succeeded") == 1002
