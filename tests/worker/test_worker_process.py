"""Worker processes end to end: real `asyncinfer worker` processes, the real
PostgreSQL, state changes observed in the database."""

from __future__ import annotations

import asyncio
import signal
import time

from app.queue.operations import Queue
from tests.worker.helpers import (
    Spawn,
    events,
    fetch,
    request_row,
    terminate,
    wait_ready,
    wait_state,
    wait_until,
    worker_rows,
)

NO_BACKOFF = {"max_attempts": 3, "initial_delay_ms": 0, "max_delay_ms": 0}


async def test_echo_end_to_end_heartbeat_and_clean_stop(queue: Queue, spawn: Spawn) -> None:
    worker = spawn(["echo"], env={"ASYNCINFER_LEASE_SECONDS": "1.5"})
    [worker_id] = await wait_ready(queue, worker)
    assert await fetch(queue, "SELECT capacity, in_flight FROM asyncinfer.models WHERE name = 'echo'") == [(8, 0)]

    submitted = await queue.submit("echo", [{"model_input": {"n": n, "text": "é✓"}} for n in range(20)])
    for n, s in enumerate(submitted):
        state, attempt, output, error, _ = await wait_state(queue, s.request_id, "SUCCEEDED")
        assert (attempt, output, error) == (1, {"n": n, "text": "é✓"}, None)
    kinds = [(e[0], e[3]) for e in await events(queue, submitted[0].request_id)]
    assert kinds == [("submitted", None), ("claimed", worker_id), ("succeeded", worker_id)]

    # The heartbeat moves while the worker holds nothing (renewals every lease/3).
    [(_, _, _, _, first)] = await worker_rows(queue, worker.pid)
    await asyncio.sleep(1.2)
    [(_, _, state, _, later)] = await worker_rows(queue, worker.pid)
    assert state == "healthy" and later > first

    assert terminate(worker) == 0
    [(_, _, state, _, _)] = await worker_rows(queue, worker.pid)
    assert state == "stopped"
    assert await fetch(queue, "SELECT in_flight FROM asyncinfer.models WHERE name = 'echo'") == [(0,)]


BATCHING = """
[models.rec]
class = "tests.worker.sample_models:BatchRecorder"
capacity = 16
max_batch_size = 8
max_batch_wait_ms = 1000

[models.partly-bad]
class = "tests.worker.sample_models:PartlyBad"
capacity = 4
max_batch_size = 4
max_batch_wait_ms = 0
"""


async def test_dynamic_batching_forms_batches_and_isolates_a_bad_item(queue: Queue, spawn: Spawn) -> None:
    worker = spawn(["rec", "partly-bad"], BATCHING)
    await wait_ready(queue, worker)

    # 16 requests committed at once: two full batches of 8, each from one claim.
    burst = await queue.submit("rec", [{"model_input": {"n": n}} for n in range(16)])
    outputs = [(await wait_state(queue, s.request_id, "SUCCEEDED"))[2] for s in burst]
    assert [o["input"]["n"] for o in outputs] == list(range(16))
    assert sorted(o["batch_size"] for o in outputs) == [8] * 16
    assert len({o["batch"] for o in outputs}) == 2

    # Three requests trickling in while the worker waits for its batch to fill:
    # one batch of 3, formed within max_batch_wait_ms.
    trickle = []
    for n in range(3):
        trickle += await queue.submit("rec", [{"model_input": {"n": 100 + n}}])
        await asyncio.sleep(0.05)
    outputs = [(await wait_state(queue, s.request_id, "SUCCEEDED"))[2] for s in trickle]
    assert [o["batch_size"] for o in outputs] == [3, 3, 3]
    assert len({o["batch"] for o in outputs}) == 1

    # predict_batch raising for one bad input: the others still succeed (per-item fallback).
    items = [{"model_input": {"n": n, "bad": n == 2}, "inference_retry_config": {"max_attempts": 1}}
             for n in range(4)]
    mixed = await queue.submit("partly-bad", items)
    rows = [await wait_state(queue, s.request_id, {"SUCCEEDED", "FAILED"}) for s in mixed]
    assert [r[0] for r in rows] == ["SUCCEEDED", "SUCCEEDED", "FAILED", "SUCCEEDED"]
    assert [r[2]["via"] for r in rows if r[0] == "SUCCEEDED"] == ["predict"] * 3
    assert rows[2][3]["message"] == "bad input 2" and "ValueError" in rows[2][3]["traceback"]


CAPACITY = """
[models.slow]
class = "tests.worker.sample_models:Blocking"
capacity = 2
"""


async def test_capacity_holds_across_three_worker_processes(queue: Queue, spawn: Spawn) -> None:
    workers = [spawn(["slow"], CAPACITY, concurrency=2) for _ in range(3)]
    await wait_ready(queue, *workers)
    submitted = await queue.submit("slow", [{"model_input": {"seconds": 0.25}} for _ in range(12)])
    ids = [s.request_id for s in submitted]

    peak = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        [(running, in_flight, done)] = await fetch(
            queue, "SELECT count(*) FILTER (WHERE state = 'IN_PROGRESS'), (SELECT in_flight FROM asyncinfer.models"
                   " WHERE name = 'slow'), count(*) FILTER (WHERE state = 'SUCCEEDED')"
                   " FROM asyncinfer.requests WHERE model = 'slow'")
        assert running <= 2 and in_flight <= 2, (running, in_flight)
        peak = max(peak, running)
        if done == len(ids):
            break
        await asyncio.sleep(0.01)
    assert done == len(ids)
    assert peak == 2

    # Exact check from the event log: at no instant more than 2 requests ran.
    spans = await fetch(queue, "SELECT min(e.at) FILTER (WHERE e.kind = 'claimed'),"
                               " max(e.at) FILTER (WHERE e.kind = 'succeeded') FROM asyncinfer.request_events e"
                               " JOIN asyncinfer.requests r ON r.id = e.request_id WHERE r.model = 'slow'"
                               " GROUP BY e.request_id")
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans], key=lambda x: (x[0], x[1]))
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    assert most <= 2
    for worker in workers:
        assert terminate(worker) == 0


KILL = """
[models.rec]
class = "tests.worker.sample_models:BatchRecorder"
capacity = 4
max_batch_size = 4
max_batch_wait_ms = 0
"""


async def test_kill_9_mid_batch_requests_rescued_and_finished_once(queue: Queue, spawn: Spawn) -> None:
    env = {"ASYNCINFER_LEASE_SECONDS": "1.5"}
    first = spawn(["rec"], KILL, env=env)
    [first_id] = await wait_ready(queue, first)
    submitted = await queue.submit("rec", [{"model_input": {"n": n, "sleep": 2.0}, "inference_retry_config": NO_BACKOFF}
                                           for n in range(4)])

    async def all_running() -> bool:
        rows = [await request_row(queue, s.request_id) for s in submitted]
        return all(r[0] == "IN_PROGRESS" and r[4] == first_id for r in rows)

    await wait_until(all_running, 10, "the batch to be running on the first worker")
    await asyncio.sleep(0.3)  # mid-batch
    first.signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL

    second = spawn(["rec"], KILL, env=env)
    [second_id] = await wait_ready(queue, second)
    for n, s in enumerate(submitted):
        state, attempt, output, _, _ = await wait_state(queue, s.request_id, "SUCCEEDED", timeout=20)
        assert attempt == 2 and output["input"]["n"] == n and output["pid"] == second.pid
        log = await events(queue, s.request_id)
        kinds = [(e[0], e[3]) for e in log]
        assert kinds == [("submitted", None), ("claimed", first_id), ("lease_lost", first_id),
                         ("claimed", second_id), ("succeeded", second_id)], kinds
    [(outputs,)] = await fetch(queue, "SELECT count(*) FROM asyncinfer.request_outputs")
    assert outputs == 4
    assert await fetch(queue, "SELECT in_flight FROM asyncinfer.models WHERE name = 'rec'") == [(0,)]
    assert terminate(second) == 0


async def test_sigterm_finishes_short_work_and_hands_back_long_work(queue: Queue, spawn: Spawn) -> None:
    worker = spawn(["sleep"], env={"ASYNCINFER_WORKER_SHUTDOWN_GRACE_SECONDS": "2"})
    [worker_id] = await wait_ready(queue, worker)
    short, long = await queue.submit("sleep", [{"model_input": {"seconds": 0.8}}, {"model_input": {"seconds": 60}}])
    await wait_state(queue, short.request_id, "IN_PROGRESS")
    await wait_state(queue, long.request_id, "IN_PROGRESS")
    started = time.monotonic()
    assert terminate(worker, timeout=15) == 0, worker.output()
    assert time.monotonic() - started < 6
    assert (await request_row(queue, short.request_id))[0] == "SUCCEEDED"
    state, attempt, _, _, owner = await request_row(queue, long.request_id)
    assert (state, attempt, owner) == ("QUEUED", 1, None)
    assert [e[0] for e in await events(queue, long.request_id)][-1] == "released"
    assert (await worker_rows(queue, worker.pid))[0][2] == "stopped"
    assert "handed back 1 unfinished requests" in worker.output()


async def test_cancel_reaches_the_running_request(queue: Queue, spawn: Spawn) -> None:
    worker = spawn(["sleep"], concurrency=1)
    await wait_ready(queue, worker)
    [long] = await queue.submit("sleep", [{"model_input": {"seconds": 60}}])
    await wait_state(queue, long.request_id, "IN_PROGRESS")
    asked = time.monotonic()
    result = await queue.cancel(long.request_id)
    assert result is not None and result.cancel_requested
    await wait_state(queue, long.request_id, "CANCELED", timeout=5)
    assert time.monotonic() - asked < 2
    assert [e[0] for e in await events(queue, long.request_id)][-2:] == ["cancel_requested", "canceled"]
    # The one slot (--concurrency 1) is free again: the sleep really stopped.
    [short] = await queue.submit("sleep", [{"model_input": {"seconds": 0.05}}])
    await wait_state(queue, short.request_id, "SUCCEEDED", timeout=3)
    assert terminate(worker) == 0


FAILING = """
[models.boom]
class = "tests.worker.sample_models:Boom"
capacity = 2
"""


async def test_model_exception_is_retried_then_failed_with_traceback_and_logs(queue: Queue, spawn: Spawn) -> None:
    worker = spawn(["boom"], FAILING)
    [worker_id] = await wait_ready(queue, worker)
    [s] = await queue.submit("boom", [{"model_input": "x1", "inference_retry_config":
                                       {"max_attempts": 2, "initial_delay_ms": 0, "max_delay_ms": 0}}])
    state, attempt, _, error, _ = await wait_state(queue, s.request_id, "FAILED")
    assert attempt == 2
    assert error["type"] == "model_error" and error["exception"] == "ValueError" and error["message"] == "kaboom x1"
    assert "sample_models.py" in error["traceback"] and "ValueError: kaboom x1" in error["traceback"]

    log = await events(queue, s.request_id)
    kinds = [e[0] for e in log]
    assert [k for k in kinds if k != "log"] == ["submitted", "claimed", "retried", "claimed", "failed"]
    retried = next(e for e in log if e[0] == "retried")
    assert "ValueError: kaboom x1" in retried[4]["error"]["traceback"]
    lines = [(e[2], e[4]["line"]) for e in log if e[0] == "log"]
    for attempt in (1, 2):
        assert (attempt, "WARNING sample.model: about to fail on x1") in lines
        assert (attempt, "stdout: printed before failing on x1") in lines
    # Every worker log line about the request names it, its model, attempt and worker.
    out = worker.output()
    assert f"request_id={s.request_id} model=boom attempt=1 worker_id={worker_id}" in out
    assert terminate(worker) == 0


BAD_LOAD = """
[models.bad-load]
class = "tests.worker.sample_models:BadLoad"
capacity = 1
"""


async def test_load_failure_marks_worker_unhealthy_and_claims_nothing(queue: Queue, spawn: Spawn) -> None:
    worker = spawn(["bad-load"], BAD_LOAD)
    await wait_ready(queue, worker, state="unhealthy")
    [(_, _, state, detail, _)] = await worker_rows(queue, worker.pid)
    assert "bad-load" in detail and "RuntimeError: weights missing at /nowhere/model.bin" in detail
    [s] = await queue.submit("bad-load", [{"model_input": 1}])
    await asyncio.sleep(1.0)  # several polls
    assert (await request_row(queue, s.request_id))[0] == "QUEUED"
    assert "model bad-load failed to load" in worker.output()
    assert terminate(worker) == 1  # still stops cleanly; the status says it was not healthy


TIMEOUTS = """
[models.sleepy]
class = "worker.models.sleep:Sleep"
capacity = 2
execution_timeout_seconds = 0.5

[models.blocking]
class = "tests.worker.sample_models:Blocking"
capacity = 2
execution_timeout_seconds = 0.5
"""


async def test_execution_timeouts_per_model_and_per_request(queue: Queue, spawn: Spawn) -> None:
    worker = spawn(["sleepy", "blocking", "sleep"], TIMEOUTS)
    await wait_ready(queue, worker)
    once = {"max_attempts": 1}
    started = time.monotonic()
    [a] = await queue.submit("sleepy", [{"model_input": {"seconds": 30}, "inference_retry_config": once}])
    [b] = await queue.submit("blocking", [{"model_input": {"seconds": 3}, "inference_retry_config": once}])
    [c] = await queue.submit("sleep", [{"model_input": {"seconds": 30}, "inference_retry_config": once,
                                         "metadata": {"execution_timeout_seconds": 0.3}}])
    for s, limit in ((a, 0.5), (b, 0.5), (c, 0.3)):
        _, _, _, error, _ = await wait_state(queue, s.request_id, "FAILED", timeout=5)
        assert error["type"] == "timeout" and error["timeout_seconds"] == limit
    assert time.monotonic() - started < 2.5  # not the 3 s of the blocked thread, nor 30 s
    # A timed-out request is retried like any error when it has attempts left.
    [d] = await queue.submit("sleepy", [{"model_input": {"seconds": 30}, "inference_retry_config": NO_BACKOFF}])
    await wait_state(queue, d.request_id, "FAILED", timeout=8)
    assert [e[0] for e in await events(queue, d.request_id)].count("retried") == 2
    assert terminate(worker) == 0


BLOCKING = """
[models.blocking]
class = "tests.worker.sample_models:Blocking"
capacity = 1
"""


async def test_blocking_predict_does_not_stall_lease_renewal(queue: Queue, spawn: Spawn) -> None:
    worker = spawn(["blocking"], BLOCKING, env={"ASYNCINFER_LEASE_SECONDS": "0.9"})
    await wait_ready(queue, worker)
    [s] = await queue.submit("blocking", [{"model_input": {"seconds": 3}}])
    state, attempt, output, _, _ = await wait_state(queue, s.request_id, "SUCCEEDED", timeout=10)
    assert attempt == 1 and output["slept"] == 3  # renewed every 0.3 s while the thread slept
    assert [e[0] for e in await events(queue, s.request_id)] == ["submitted", "claimed", "succeeded"]
    assert terminate(worker) == 0


STAMP = """
[models.stamp]
class = "tests.worker.sample_models:Stamp"
capacity = 1
"""


async def test_wake_up_comes_from_notify_not_the_poll_and_survives_a_dead_listener(
        queue: Queue, spawn: Spawn) -> None:
    worker = spawn(["stamp"], STAMP, env={"ASYNCINFER_POLL_INTERVAL_SECONDS": "30",
                                          "ASYNCINFER_LISTEN_HEALTH_CHECK_SECONDS": "0.5"})
    [worker_id] = await wait_ready(queue, worker)
    await asyncio.sleep(0.5)  # idle: its first claim found nothing, it now waits (30 s poll)

    async def latency() -> float:
        submitted_at = time.time()
        [s] = await queue.submit("stamp", [{"model_input": {}}])
        output = (await wait_state(queue, s.request_id, "SUCCEEDED", timeout=5))[2]
        return output["started_at"] - submitted_at

    samples = [await latency() for _ in range(5)]
    assert max(samples) < 0.5, samples  # far below the 30 s poll

    listener = f"asyncinfer-listen:{worker_id}"
    [(killed,)] = await fetch(queue, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                     " WHERE application_name = %s AND datname = current_database()", listener)
    assert killed == 1

    async def relistening() -> bool:
        rows = await fetch(queue, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                                 " AND datname = current_database()", listener)
        return rows[0][0] == 1

    await wait_until(relistening, 5, "the listen connection to come back")
    assert await latency() < 0.5
    assert "listen connection lost" in worker.output()
    assert terminate(worker) == 0


async def test_admin_requeue_of_a_running_request_drops_the_stale_result(queue: Queue, spawn: Spawn) -> None:
    worker = spawn(["blocking"], BLOCKING)
    [worker_id] = await wait_ready(queue, worker)
    [s] = await queue.submit("blocking", [{"model_input": {"seconds": 1.0}}])
    await wait_state(queue, s.request_id, "IN_PROGRESS")
    assert await queue.requeue(s.request_id) == "QUEUED"  # taken from the worker while its thread runs
    state, attempt, output, _, _ = await wait_state(queue, s.request_id, "SUCCEEDED", timeout=10)
    assert attempt == 2
    kinds = [(e[0], e[2]) for e in await events(queue, s.request_id)]
    assert kinds == [("submitted", 0), ("claimed", 1), ("requeued", 1), ("claimed", 2), ("succeeded", 2)], kinds
    assert "lease lost" in worker.output() and "outcome refused" not in worker.output()
    assert terminate(worker) == 0
