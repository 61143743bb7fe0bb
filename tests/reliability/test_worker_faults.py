"""Worker faults under load: a fleet of worker processes serving a flaky
batching model (random failures, poison inputs, whole batches that raise),
thousands of requests, and one worker SIGKILLed mid-batch, or frozen with
SIGSTOP past its lease and then resumed.

At the end of each: accepted == terminal, exactly one terminal event per
request, capacity never exceeded (sampled every 10 ms), nothing stuck.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import psycopg
import pytest

from tests.reliability.helpers import (
    CapacitySampler,
    Procs,
    Proc,
    flaky_items,
    flaky_toml,
    reconcile,
    submit_bulk,
    wait_drained,
    wait_workers_healthy,
)

MODEL = "flaky"
LEASE_S = 2.0  # FAST_ENV
TICK_S = 0.3


def _held(db: psycopg.Connection, worker_id: int) -> list[tuple[int, int]]:
    return db.execute("SELECT id, attempt FROM asyncinfer.requests WHERE state = 'IN_PROGRESS'"
                      " AND lease_owner = %s ORDER BY id", (worker_id,)).fetchall()


def _wait_holding(db: psycopg.Connection, worker_id: int, at_least: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(_held(db, worker_id)) < at_least:
        assert time.monotonic() < deadline, f"worker {worker_id} never held {at_least} requests"
        time.sleep(0.005)


def _fleet(database_url: str, procs: Procs, workers: int, capacity: int, batch_sleep_ms: float,
           ) -> tuple[list[Proc], dict[int, int], str]:
    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute("SELECT asyncinfer.upsert_model(%s, %s)", (MODEL, capacity))
    toml = flaky_toml(MODEL, capacity=capacity, max_batch_size=8, fail_rate=0.1, batch_sleep_ms=batch_sleep_ms)
    fleet = [procs.worker(toml, [MODEL]) for _ in range(workers)]
    return fleet, wait_workers_healthy(database_url, fleet), toml


def _hit(database_url: str, procs: Procs, db: psycopg.Connection, fleet: list[Proc], ids_by_pid: dict[int, int],
         toml: str, fault: str) -> tuple[Proc, int, float, list[tuple[int, int]]]:
    """Kill or freeze a worker while it holds requests. A worker may be
    between batches (its finish landing just as it is hit, the model's
    capacity held by the others): then it held nothing, and the next worker
    (a fresh one after a kill) is hit instead."""
    for attempt in range(6):
        victim = fleet[attempt % len(fleet)]
        victim_id = ids_by_pid[victim.pid]
        _wait_holding(db, victim_id, 4)  # mid-batch: it holds a batch it is running
        if fault == "kill":
            victim.signal(signal.SIGKILL)
            assert victim.popen.wait(10) == -signal.SIGKILL
        else:
            victim.signal(signal.SIGSTOP)
        hit_at = time.monotonic()
        time.sleep(0.3)  # a statement the victim sent just before the hit still runs to its commit
        orphaned = _held(db, victim_id)
        if orphaned:
            return victim, victim_id, hit_at, orphaned
        if fault == "kill":
            fleet.remove(victim)
            fleet.append(procs.worker(toml, [MODEL]))
            ids_by_pid.update(wait_workers_healthy(database_url, fleet))
        else:
            victim.signal(signal.SIGCONT)
    raise AssertionError("no worker held anything when hit, six times")


def _run_fault(database_url: str, procs: Procs, figures: dict[str, Any], n: int, batch_sleep_ms: float,
               fault: str) -> None:
    fleet, ids_by_pid, toml = _fleet(database_url, procs, workers=3, capacity=12, batch_sleep_ms=batch_sleep_ms)
    with CapacitySampler(database_url) as sampler, psycopg.connect(database_url, autocommit=True) as db:
        started = time.monotonic()
        accepted = submit_bulk(database_url, MODEL, flaky_items(n))
        deadline = time.monotonic() + 30
        while db.execute("SELECT count(*) FROM asyncinfer.requests WHERE finished_at IS NOT NULL"
                         ).fetchone()[0] < n // 5:  # under way: a fifth done
            assert time.monotonic() < deadline
            time.sleep(0.02)
        victim, victim_id, hit_at, orphaned = _hit(database_url, procs, db, fleet, ids_by_pid, toml, fault)
        progress = db.execute("SELECT count(*) FROM asyncinfer.requests WHERE finished_at IS NOT NULL").fetchone()[0]

        # Liveness (invariant 4): the victim's requests are back in the queue
        # (or finished elsewhere) within lease + one reaper tick (+ slack).
        deadline = hit_at + LEASE_S + TICK_S * 1.5 + 3.0
        while True:
            still = db.execute("SELECT count(*) FROM asyncinfer.requests WHERE id = ANY(%s)"
                               " AND state = 'IN_PROGRESS' AND lease_owner = %s",
                               ([i for i, _ in orphaned], victim_id)).fetchone()[0]
            if still == 0:
                break
            assert time.monotonic() < deadline, f"{still} requests still held by the dead worker"
            time.sleep(0.02)
        rescued_s = time.monotonic() - hit_at

        if fault == "stop":
            time.sleep(0.5)  # well past its lease by now
            victim.signal(signal.SIGCONT)
        drained_s = wait_drained(database_url, 90, procs=fleet)
        elapsed = time.monotonic() - started

        # The victim's own outcome for the attempts it held is never recorded.
        late = db.execute(
            "SELECT count(*) FROM asyncinfer.request_events e JOIN unnest(%s::bigint[], %s::smallint[]) h(id, attempt)"
            "  ON e.request_id = h.id AND e.attempt = h.attempt"
            " WHERE e.worker_id = %s AND e.kind IN ('succeeded', 'failed', 'retried', 'canceled')",
            ([i for i, _ in orphaned], [a for _, a in orphaned], victim_id)).fetchone()[0]
        assert late == 0, f"{late} outcomes of the lost attempts were recorded"
        lease_lost = db.execute("SELECT count(DISTINCT request_id) FROM asyncinfer.request_events"
                                " WHERE kind = 'lease_lost' AND worker_id = %s", (victim_id,)).fetchone()[0]
        assert lease_lost == len(orphaned)
        # Replaying the late completion by hand is refused by the fencing guard.
        replay = db.execute("SELECT count(*) FROM asyncinfer.finish_requests(%s, %s::jsonb)", (victim_id, json.dumps(
            [{"id": i, "attempt": a, "output": "late"} for i, a in orphaned]))).fetchone()[0]
        assert replay == 0

    capacity = sampler.assert_ok()
    result = reconcile(database_url, accepted, exact=True)
    assert result["by_state"].get("SUCCEEDED", 0) > n * 0.9
    assert result["by_state"].get("FAILED", 0) >= n // 97  # the poison inputs at least
    figures.update(submitted=n, workers=3, fault=fault, hit_after_finished=progress, orphaned=len(orphaned),
                   rescued_s=round(rescued_s, 2), drain_s=round(drained_s, 1),
                   throughput_per_s=round(n / elapsed), **capacity, **result)
    if fault == "stop":
        time.sleep(0.3)
        log = victim.log()
        assert victim.alive(), log[-3000:]
        assert "lease lost" in log or "outcome refused" in log, log[-3000:]
        figures["victim_log"] = "lease lost" if "lease lost" in log else "outcome refused"


def test_worker_sigkill_mid_batch(database_url: str, procs: Procs, figures: dict[str, Any]) -> None:
    _run_fault(database_url, procs, figures, n=3000, batch_sleep_ms=10, fault="kill")


def test_worker_sigstop_past_lease_then_sigcont(database_url: str, procs: Procs, figures: dict[str, Any]) -> None:
    _run_fault(database_url, procs, figures, n=3000, batch_sleep_ms=10, fault="stop")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_worker_faults_heavier(database_url: str, procs: Procs, figures: dict[str, Any], fault: str) -> None:
    _run_fault(database_url, procs, figures, n=20_000, batch_sleep_ms=10, fault=fault)


def test_webhook_of_a_request_failed_by_the_reaper_is_delivered(db: psycopg.Connection) -> None:
    """A worker dies holding the last attempt of a request that has a
    webhook: the reaper fails it (lease_lost), and the caller must still be
    told, like for any FAILED request."""
    db.execute("SELECT asyncinfer.upsert_model(%s, 1)", (MODEL,))
    [rid] = [r[0] for r in db.execute(
        "SELECT request_id::text FROM asyncinfer.submit_requests(%s, %s::jsonb)",
        (MODEL, json.dumps({"model_input": 1, "webhook_endpoint": "https://hooks.example.com/done",
                            "inference_retry_config": {"max_attempts": 1}}))).fetchall()]
    worker_id = db.execute("SELECT asyncinfer.register_worker('doomed', 'localhost', 1, %s)", ([MODEL],)).fetchone()[0]
    assert len(db.execute("SELECT * FROM asyncinfer.claim_requests(%s, %s, 1, 0.05)", (MODEL, worker_id)).fetchall()) == 1
    time.sleep(0.1)  # the worker is gone; its lease runs out
    db.execute("SELECT * FROM asyncinfer.run_maintenance()")
    state, webhook_status = db.execute(
        "SELECT r.state::text, asyncinfer.webhook_status(r.id) FROM asyncinfer.requests r WHERE r.public_id = %s",
        (rid,)).fetchone()
    assert state == "FAILED"
    deliveries = db.execute("SELECT d.kind, d.state::text FROM asyncinfer.deliveries d JOIN asyncinfer.requests r"
                            " ON r.id = d.request_id WHERE r.public_id = %s", (rid,)).fetchall()
    assert deliveries == [("webhook", "PENDING")], (deliveries, webhook_status)
