"""Soak: the whole system (API, three workers, the dispatcher and a webhook
receiver) under a stream of requests with random model failures, poison
inputs, cancels, and a chaos loop that SIGKILLs and SIGSTOPs workers and
kills the dispatcher. At the end: the same reconciliation as the fault
scenarios, and the memory of every process and the size of every table.

CI runs 5 000 requests; `-m slow` runs 100 000.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from tests.api.helpers import ApiServer, new_key
from tests.reliability.helpers import (
    FAST_RETRY,
    CapacitySampler,
    Proc,
    Procs,
    Receiver,
    SubmitLoad,
    descendants,
    flaky_toml,
    reconcile,
    rss_kb,
    wait_drained,
    wait_workers_healthy,
)

MODEL = "flaky"
TABLES = ("requests", "request_inputs", "request_outputs", "request_events", "deliveries", "models", "workers")


def _body(receiver_url: str) -> Callable[[int], dict[str, Any]]:
    def body(i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"model_input": {"n": i, **({"poison": True} if i % 101 == 0 else {})},
                                "inference_retry_config": FAST_RETRY, "priority": i % 3}
        if i % 10 == 0:
            item["webhook_endpoint"] = f"{receiver_url}/hook"
        return item
    return body


class BulkLoad(threading.Thread):
    """Bulk submits (async_predict_batch) of `chunk` requests until `total`."""

    def __init__(self, api: ApiServer, key: str, total: int, chunk: int, body: Callable[[int], dict[str, Any]],
                 start_at: int, rate_per_s: float) -> None:
        super().__init__(name="bulk-load", daemon=True)
        self.api, self.key, self.total, self.chunk, self.body = api, key, total, chunk, body
        self.start_at, self.rate = start_at, rate_per_s
        self.accepted: list[str] = []
        self.failures: list[str] = []

    def run(self) -> None:
        started = time.monotonic()
        with self.api.client(self.key) as client:
            for offset in range(0, self.total, self.chunk):
                due = started + offset / self.rate
                if due > time.monotonic():
                    time.sleep(due - time.monotonic())
                items = [self.body(self.start_at + i) for i in range(offset, min(offset + self.chunk, self.total))]
                for _ in range(20):
                    try:
                        r = client.post(f"/v1/models/{MODEL}/async_predict_batch", json={"requests": items})
                    except httpx.HTTPError as error:
                        self.failures.append(repr(error))
                        time.sleep(0.2)
                        continue
                    if r.status_code == 201:
                        self.accepted += r.json()["request_ids"]
                        break
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
                    time.sleep(0.2)


class Chaos(threading.Thread):
    """Every `every_s`: SIGKILL a worker (and start a new one), freeze one
    past its lease, or SIGKILL the dispatcher (and start a new one)."""

    def __init__(self, procs: Procs, fleet: list[Proc], dispatcher: list[Proc], toml: str, every_s: float,
                 seed: int = 7) -> None:
        super().__init__(name="chaos", daemon=True)
        self.procs, self.fleet, self.dispatcher, self.toml = procs, fleet, dispatcher, toml
        self.every_s = every_s
        self.random = random.Random(seed)
        self.actions: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        plan = ["kill_worker", "stop_worker", "kill_dispatcher"]
        i = 0
        while not self.halt.wait(self.every_s):
            action = plan[i % len(plan)] if i < len(plan) else self.random.choice(plan)
            i += 1
            if action == "kill_worker":
                victim = self.fleet.pop(self.random.randrange(len(self.fleet)))
                victim.signal(signal.SIGKILL)
                victim.popen.wait(10)
                self.fleet.append(self.procs.worker(self.toml, [MODEL]))
            elif action == "stop_worker":
                victim = self.fleet[self.random.randrange(len(self.fleet))]
                victim.signal(signal.SIGSTOP)
                if self.halt.wait(3.0):  # past its 2 s lease
                    victim.signal(signal.SIGCONT)
                    break
                victim.signal(signal.SIGCONT)
            else:
                old = self.dispatcher.pop()
                old.signal(signal.SIGKILL)
                old.popen.wait(10)
                self.dispatcher.append(self.procs.dispatcher())
            self.actions.append(action)


def _memory(api: ApiServer, api_workers: list[int], fleet: list[Proc], dispatcher: list[Proc]) -> dict[str, Any]:
    out: dict[str, Any] = {"api_main": rss_kb(api.process.pid)}
    for n, pid in enumerate(api_workers):
        out[f"api_worker_{n}"] = rss_kb(pid)
    for n, proc in enumerate(fleet):
        out[f"worker_{n}"] = rss_kb(proc.pid)
    out["dispatcher"] = rss_kb(dispatcher[-1].pid)
    return out


def _soak(database_url: str, procs: Procs, api_factory: Callable[..., ApiServer], figures: dict[str, Any],
          total: int, rate_per_s: float, chaos_every_s: float) -> None:
    procs.env.update({"ASYNCINFER_DELIVERY_LEASE_SECONDS": "2", "ASYNCINFER_ALLOW_PRIVATE_WEBHOOKS": "true",
                      "ASYNCINFER_WEBHOOK_RETRY_SCHEDULE_SECONDS": "[0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1]",
                      "ASYNCINFER_LOG_LEVEL": "WARNING"})
    receiver = Receiver()
    receiver.up()
    api = api_factory(database_url, log_level="WARNING")
    api_workers = descendants(api.process.pid)
    with api.client(api.admin_key) as admin:
        assert admin.put(f"/v1/models/{MODEL}", json={"capacity": 16}).status_code == 201
        _, key = new_key(admin, "soak")
    toml = flaky_toml(MODEL, capacity=16, max_batch_size=16, fail_rate=0.1, batch_sleep_ms=2)
    fleet = [procs.worker(toml, [MODEL]) for _ in range(3)]
    dispatcher = [procs.dispatcher()]
    wait_workers_healthy(database_url, fleet)
    body = _body(receiver.url)
    singles = total // 5
    single_load = SubmitLoad(api.base_url, key, MODEL, singles, concurrency=8, body=body,
                             rate_per_s=rate_per_s / 5, deadline_s=total / rate_per_s * 3 + 60)
    bulk = BulkLoad(api, key, total - singles, chunk=250, body=body, start_at=singles, rate_per_s=rate_per_s * 4 / 5)
    chaos = Chaos(procs, fleet, dispatcher, toml, every_s=chaos_every_s)
    canceled: list[int] = []
    memory_mid: dict[str, Any] = {}
    try:
        with CapacitySampler(database_url, interval=0.02) as sampler:
            started = time.monotonic()
            single_load.start()
            bulk.start()
            chaos.start()
            with api.client(key) as client:
                rng = random.Random(3)
                while bulk.is_alive() or single_load.is_alive():
                    time.sleep(0.5)
                    ids = bulk.accepted[-200:]
                    if ids and len(canceled) < total // 200:  # a few cancels, queued or running
                        r = client.delete(f"/v1/async_request/{rng.choice(ids)}")
                        assert r.status_code in (200, 202, 409), r.text
                        canceled.append(r.status_code)
                    if not memory_mid and len(bulk.accepted) > (total - singles) // 2:
                        memory_mid = _memory(api, api_workers, chaos.fleet, chaos.dispatcher)
            chaos.halt.set()
            chaos.join(15)
            submit_s = time.monotonic() - started
            result = single_load.finish()
            assert not result.unexpected, result.unexpected[:5]
            assert len(result.accepted) == singles and len(bulk.accepted) == total - singles, \
                (len(result.accepted), len(bulk.accepted), bulk.failures[:5], result.statuses)
            drain_s = wait_drained(database_url, 120 + total / 500, procs=chaos.fleet)
            elapsed = time.monotonic() - started
            with psycopg.connect(database_url, autocommit=True) as db:
                deadline = time.monotonic() + 60
                while db.execute("SELECT count(*) FROM asyncinfer.deliveries WHERE state = 'PENDING'").fetchone()[0]:
                    assert time.monotonic() < deadline, "webhooks still pending"
                    time.sleep(0.2)
                sizes = {t: db.execute("SELECT pg_total_relation_size(%s)", (f"asyncinfer.{t}",)).fetchone()[0]
                         for t in TABLES}
                webhooks_owed = {r[0] for r in db.execute(
                    "SELECT r.public_id::text FROM asyncinfer.requests r JOIN asyncinfer.request_inputs i"
                    " ON i.request_id = r.id WHERE i.webhook_endpoint IS NOT NULL"
                    " AND r.state IN ('SUCCEEDED', 'FAILED')").fetchall()}
                reaper_failed = db.execute(  # failed on a lost last lease: their webhook comes from the reaper
                    "SELECT count(*) FROM asyncinfer.requests r JOIN asyncinfer.request_inputs i"
                    " ON i.request_id = r.id WHERE i.webhook_endpoint IS NOT NULL AND r.state = 'FAILED'"
                    " AND EXISTS (SELECT 1 FROM asyncinfer.request_events e WHERE e.request_id = r.id"
                    " AND e.kind = 'lease_lost' AND e.state = 'FAILED')").fetchone()[0]
                not_delivered = db.execute(
                    "SELECT r.public_id::text, d.state::text, d.attempts, d.last_status_code, d.last_error"
                    " FROM asyncinfer.deliveries d JOIN asyncinfer.requests r ON r.id = d.request_id"
                    " WHERE d.state <> 'SUCCEEDED' LIMIT 5").fetchall()
            memory_end = _memory(api, api_workers, chaos.fleet, chaos.dispatcher)
        capacity = sampler.assert_ok()
        outcome = reconcile(database_url, [*result.accepted.values(), *bulk.accepted], exact=True, webhooks=True)
        assert not not_delivered, not_delivered
        assert webhooks_owed <= receiver.request_ids, sorted(webhooks_owed - receiver.request_ids)[:5]
        assert len(chaos.actions) >= 3, chaos.actions
        for name, mem in memory_end.items():  # bounded: no process of the system grows past a few hundred MB
            assert mem.get("VmHWM", 0) < 600_000, (name, mem)
        figures.update(submitted=total, submit_s=round(submit_s, 1), drain_s=round(drain_s, 1),
                       end_to_end_per_s=round(total / elapsed), chaos=chaos.actions,
                       cancels=dict((c, canceled.count(c)) for c in set(canceled)),
                       webhooks_delivered=len(webhooks_owed), webhook_duplicates=receiver.duplicates(),
                       webhooks_of_reaper_failed=reaper_failed,
                       table_bytes=sizes, bytes_per_request={t: round(s / total) for t, s in sizes.items()
                                                             if t.startswith(("request", "deliver"))},
                       rss_kb_mid=memory_mid, rss_kb_end=memory_end, **capacity, **outcome)
    finally:
        chaos.halt.set()
        single_load.stop_event.set()
        receiver.down()


def test_soak_small(database_url: str, procs: Procs, api_factory: Callable[..., ApiServer],
                    figures: dict[str, Any]) -> None:
    _soak(database_url, procs, api_factory, figures, total=5000, rate_per_s=500, chaos_every_s=1.5)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_soak_100k(database_url: str, procs: Procs, api_factory: Callable[..., ApiServer],
                   figures: dict[str, Any]) -> None:
    _soak(database_url, procs, api_factory, figures, total=100_000, rate_per_s=800, chaos_every_s=10.0)
