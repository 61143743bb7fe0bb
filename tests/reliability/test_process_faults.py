"""Process faults around the queue: the API process SIGKILLed while submits
are in flight, and the webhook dispatcher SIGKILLed mid-delivery while the
receiver is down for a while."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from tests.api.helpers import ApiServer, new_key
from tests.reliability.helpers import (
    CapacitySampler,
    Procs,
    Receiver,
    SubmitLoad,
    descendants,
    flaky_items,
    flaky_toml,
    kill_tree,
    pid_alive,
    reconcile,
    submit_bulk,
    wait_drained,
    wait_workers_healthy,
)

MODEL = "flaky"


def test_api_sigkill_with_submits_in_flight(database_url: str, procs: Procs,
                                           api_factory: Callable[..., ApiServer], figures: dict[str, Any]) -> None:
    """Every request whose 201 reached the client exists; none is half-written
    (each request row has its inputs row and its `submitted` event); the
    queue finishes them all; a new API process serves at once."""
    api = api_factory(database_url)
    with api.client(api.admin_key) as admin:
        assert admin.put(f"/v1/models/{MODEL}", json={"capacity": 8}).status_code == 201
        _, key = new_key(admin, "load")
    fleet = [procs.worker(flaky_toml(MODEL, capacity=8, fail_rate=0.05, batch_sleep_ms=2), [MODEL])
             for _ in range(2)]
    wait_workers_healthy(database_url, fleet)
    load = SubmitLoad(api.base_url, key, MODEL, total=20_000, concurrency=48, retry=False, deadline_s=60)
    with CapacitySampler(database_url) as sampler:
        load.start()
        deadline = time.monotonic() + 30
        while len(load.result.accepted) < 1000:
            assert time.monotonic() < deadline and load.is_alive(), load.result.statuses
            time.sleep(0.01)
        victims = kill_tree(api.process.pid)  # the main process and its granian worker: the whole API dies
        killed_at_accepted = len(load.result.accepted)
        result = load.stop()
        assert not load.is_alive()
        assert api.process.wait(10) == -signal.SIGKILL
        in_flight = sum(result.errors.values())
        assert in_flight > 0, "no submit was in flight when the API died"
        assert not result.unexpected, result.unexpected[:5]

        # A new API process on the same database serves at once.
        again = api_factory(database_url)
        with again.client(key) as client:
            response = client.post(f"/v1/models/{MODEL}/async_predict", json={"model_input": {"n": -1}})
            assert response.status_code == 201, response.text
        accepted = [*result.accepted.values(), response.json()["request_id"]]
        drain_s = wait_drained(database_url, 60, procs=fleet)
    capacity = sampler.assert_ok()
    outcome = reconcile(database_url, accepted)
    figures.update(api_pids_killed=len(victims), accepted_201=len(result.accepted),
                   accepted_when_killed=killed_at_accepted, submits_in_flight_at_kill=in_flight,
                   rows_without_201=outcome["requests"] - len(accepted), drain_s=round(drain_s, 1),
                   **capacity, **outcome)


def test_api_main_sigkill_leaves_no_orphan_serving(database_url: str, api_factory: Callable[..., ApiServer],
                                                   figures: dict[str, Any]) -> None:
    """kill -9 of the `asyncinfer serve` pid (what an OOM killer or a
    supervisor's last resort does) must take the API down with it: a
    granian worker left running keeps answering on the port, with the old
    code and settings, beside any new server bound there (SO_REUSEPORT)."""
    api = api_factory(database_url)
    workers = descendants(api.process.pid)
    assert workers
    api.process.send_signal(signal.SIGKILL)
    api.process.wait(10)
    deadline = time.monotonic() + 3
    while any(pid_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [pid for pid in workers if pid_alive(pid)]
    try:
        answered = httpx.get(api.base_url + "/healthz", timeout=2).status_code
    except httpx.HTTPError:
        answered = None
    figures.update(orphans=len(orphans), healthz_after_kill=answered)
    assert not orphans, f"granian workers {orphans} still alive 3 s after the main process was killed"
    assert answered is None


def test_dispatcher_killed_mid_delivery_and_receiver_down(database_url: str, procs: Procs,
                                                         figures: dict[str, Any]) -> None:
    """Every webhook is delivered at least once: the killed dispatcher's
    claimed rows come due again after the delivery lease, the receiver's
    outage is ridden out on the retry schedule."""
    env = {"ASYNCINFER_DELIVERY_LEASE_SECONDS": "2", "ASYNCINFER_ALLOW_PRIVATE_WEBHOOKS": "true",
           "ASYNCINFER_WEBHOOK_RETRY_SCHEDULE_SECONDS": "[0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]",
           "ASYNCINFER_WEBHOOK_CONNECT_TIMEOUT_SECONDS": "1", "ASYNCINFER_WEBHOOK_TIMEOUT_SECONDS": "2"}
    procs.env.update(env)
    receiver = Receiver(delay_s=0.02)  # slow enough that deliveries are in flight when the kill lands
    receiver.up()
    try:
        with psycopg.connect(database_url, autocommit=True) as db:
            db.execute("SELECT asyncinfer.upsert_model(%s, 8)", (MODEL,))
        fleet = [procs.worker(flaky_toml(MODEL, capacity=8, fail_rate=0.1, batch_sleep_ms=2), [MODEL])
                 for _ in range(2)]
        first = procs.dispatcher()
        wait_workers_healthy(database_url, fleet)
        n = 1500
        accepted = submit_bulk(database_url, MODEL, flaky_items(n, webhook_endpoint=f"{receiver.url}/hook"))
        deadline = time.monotonic() + 30
        with psycopg.connect(database_url, autocommit=True) as db:
            while True:  # mid-delivery: calls made, and rows claimed right now
                claimed = db.execute("SELECT count(*) FROM asyncinfer.deliveries WHERE state = 'PENDING'"
                                     " AND attempts > 0 AND next_attempt_at > now() + interval '1 second'"
                                     ).fetchone()[0]
                if receiver.calls >= 200 and claimed:
                    break
                assert time.monotonic() < deadline, (receiver.calls, claimed)
                time.sleep(0.005)
            first.signal(signal.SIGKILL)
            assert first.popen.wait(10) == -signal.SIGKILL
            calls_at_kill = receiver.calls
            receiver.down()
            down_at = time.monotonic()
            second = procs.dispatcher()
            time.sleep(4.0)
            refused = db.execute("SELECT count(*) FROM asyncinfer.request_events"
                                 " WHERE kind = 'webhook_retry'").fetchone()[0]
            receiver.up()
            down_s = time.monotonic() - down_at
            wait_drained(database_url, 60, procs=fleet)
            deadline = time.monotonic() + 60
            while db.execute("SELECT count(*) FROM asyncinfer.deliveries WHERE state = 'PENDING'").fetchone()[0]:
                assert time.monotonic() < deadline, (db.execute(
                    "SELECT state::text, attempts, left(last_error, 80), count(*) FROM asyncinfer.deliveries"
                    " GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 20").fetchall(), receiver.calls, second.log()[-1500:])
                time.sleep(0.1)
            attempts = db.execute("SELECT max(attempts), sum(attempts) FROM asyncinfer.deliveries").fetchone()
        outcome = reconcile(database_url, accepted, exact=True, webhooks=True)
        assert outcome["webhooks"] == {"SUCCEEDED": n}, outcome["webhooks"]
        assert set(accepted) <= receiver.request_ids, f"{len(set(accepted) - receiver.request_ids)} never arrived"
        assert refused > 0, "the outage was not felt"
        figures.update(submitted=n, calls_before_kill=calls_at_kill, receiver_down_s=round(down_s, 1),
                       retries_during_outage=refused, receiver_calls=receiver.calls, unique_webhook_ids=receiver.unique(),
                       duplicate_deliveries=receiver.duplicates(), max_attempts=attempts[0],
                       total_attempts=attempts[1], **outcome)
    finally:
        receiver.down()
