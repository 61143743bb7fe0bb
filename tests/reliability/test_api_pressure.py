"""The API's database pool under pressure (4 connections per API process in
these tests).

* Slow HTTP clients (slowloris: bodies trickled a byte at a time, headers
  never finished) hold no database connection: a body is read in full
  before any query, keys come from the cache. Normal traffic is unaffected.
* Requests that wait on a row lock do hold one: a request row locked by an
  idle-in-transaction psql session plus a few cancels of it pin the whole
  pool; the API then answers 503 + Retry-After (never a 500) until the
  session ends, and recovers at once after.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg
import pytest

from tests.api.helpers import ApiServer, new_key
from tests.reliability.helpers import Procs, SubmitLoad, flaky_toml, reconcile, wait_drained, wait_workers_healthy

MODEL = "flaky"


def _api_connections(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as db:
        return db.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                          " AND application_name = 'asyncinfer-api'").fetchone()[0]


def test_slow_http_clients_hold_no_database_connection(database_url: str, procs: Procs,
                                                       api_factory: Callable[..., ApiServer],
                                                       figures: dict[str, Any]) -> None:
    api = api_factory(database_url)
    with api.client(api.admin_key) as admin:
        assert admin.put(f"/v1/models/{MODEL}", json={"capacity": 8}).status_code == 201
        _, key = new_key(admin, "pressure")
    worker = procs.worker(flaky_toml(MODEL, capacity=8, fail_rate=0.0, batch_sleep_ms=1), [MODEL])
    wait_workers_healthy(database_url, [worker])
    host, port = api.base_url.removeprefix("http://").split(":")
    head = (f"POST /v1/models/{MODEL}/async_predict HTTP/1.1\r\nHost: x\r\nAuthorization: Api-Key {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n").encode()
    stop = threading.Event()
    slow: list[socket.socket] = []
    for i in range(150):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(head + b'{"model_input": "' if i % 3 else head[:40])  # a trickled body, or headers never done
        slow.append(s)

    def trickle() -> None:
        while not stop.wait(0.25):
            for s in slow:
                try:
                    s.sendall(b"a")
                except OSError:
                    pass

    dripper = threading.Thread(target=trickle, daemon=True)
    dripper.start()
    try:
        time.sleep(0.5)
        load = SubmitLoad(api.base_url, key, MODEL, total=1000, concurrency=16, deadline_s=60)
        load.start()
        with httpx.Client(base_url=api.base_url, headers={"Authorization": f"Api-Key {key}"}, timeout=10) as c:
            reads = 0
            while load.is_alive():
                ids = list(load.result.accepted.values())[-20:]
                with ThreadPoolExecutor(16) as pool:
                    codes = list(pool.map(lambda rid: c.get(f"/v1/async_request/{rid}").status_code, ids))
                assert set(codes) <= {200}, codes
                reads += len(codes)
        result = load.finish()
        connections = _api_connections(database_url)
    finally:
        stop.set()
        dripper.join(5)
        for s in slow:
            s.close()
    assert len(result.accepted) == 1000 and set(result.statuses) == {201}, result.statuses
    latencies = sorted(result.latencies)
    p99 = latencies[int(len(latencies) * 0.99)]
    assert p99 < 2.0, p99
    assert connections <= 4
    wait_drained(database_url, 30, procs=[worker])
    outcome = reconcile(database_url, result.accepted.values(), exact=True)
    figures.update(slow_connections=len(slow), submits=1000, status_reads=reads,
                   submit_p50_ms=round(latencies[len(latencies) // 2] * 1000, 1), submit_p99_ms=round(p99 * 1000, 1),
                   api_db_connections=connections, **outcome)


def _pinned(database_url: str, api_factory: Callable[..., ApiServer]
            ) -> tuple[ApiServer, str, str, psycopg.Connection, ThreadPoolExecutor, list[Any]]:
    """An API with a pool of 4, a request whose row an open psql session holds, and 8 cancels of it in flight."""
    api = api_factory(database_url, db_timeout_seconds="1", retry_after_seconds="1")
    with api.client(api.admin_key) as admin:
        assert admin.put(f"/v1/models/{MODEL}", json={"capacity": 1}).status_code == 201
        _, key = new_key(admin, "pinned")
    rid, session = _locked_request(api, key, database_url)
    pool, futures = _cancels(api, key, rid, 8)
    return api, key, rid, session, pool, futures


def _locked_request(api: ApiServer, key: str, database_url: str) -> tuple[str, psycopg.Connection]:
    with api.client(key) as client:
        rid = client.post(f"/v1/models/{MODEL}/async_predict", json={"model_input": 1}).json()["request_id"]
    session = psycopg.connect(database_url)  # psql, mid-transaction: BEGIN; SELECT ... FOR UPDATE;
    session.execute("SELECT id FROM asyncinfer.requests WHERE public_id = %s FOR UPDATE", (rid,))
    return rid, session


def _cancels(api: ApiServer, key: str, rid: str, n: int) -> tuple[ThreadPoolExecutor, list[Any]]:
    pool = ThreadPoolExecutor(n)
    futures = [pool.submit(httpx.delete, f"{api.base_url}/v1/async_request/{rid}",
                           headers={"Authorization": f"Api-Key {key}"}, timeout=30) for _ in range(n)]
    return pool, futures


def test_requests_waiting_on_a_lock_pin_the_pool_then_recover(database_url: str,
                                                              api_factory: Callable[..., ApiServer],
                                                              figures: dict[str, Any]) -> None:
    api, key, rid, session, pool, futures = _pinned(database_url, api_factory)
    try:
        time.sleep(1.5)
        with api.client(key) as client:
            statuses = []
            for i in range(5):
                r = client.post(f"/v1/models/{MODEL}/async_predict", json={"model_input": i})
                statuses.append(r.status_code)
                assert r.status_code in (201, 503), r.text
                if r.status_code == 503:
                    assert r.headers["retry-after"] == "1"
            status_read = client.get(f"/v1/async_request/{rid}").status_code
    finally:
        session.rollback()
        released = time.monotonic()
        session.close()
    cancel_codes = [f.result().status_code for f in futures]
    pool.shutdown()
    with api.client(key) as client:
        after = client.post(f"/v1/models/{MODEL}/async_predict", json={"model_input": "after"})
    recovered_ms = (time.monotonic() - released) * 1000
    assert after.status_code == 201
    assert set(cancel_codes) <= {200, 409, 503}, cancel_codes
    assert 500 not in statuses and status_read in (200, 503)
    figures.update(pool_size=4, cancels_waiting=8, submits_while_pinned=statuses,
                   status_read_while_pinned=status_read, cancel_answers=cancel_codes,
                   recovered_ms=round(recovered_ms, 1))


def test_unrelated_submits_are_served_while_cancels_wait_on_a_lock(database_url: str,
                                                                    api_factory: Callable[..., ApiServer]) -> None:
    api, key, rid, session, pool, futures = _pinned(database_url, api_factory)
    try:
        time.sleep(1.5)
        with api.client(key) as client:
            statuses = [client.post(f"/v1/models/{MODEL}/async_predict", json={"model_input": i}).status_code
                        for i in range(3)]
    finally:
        session.rollback()
        session.close()
        cancels = [f.result() for f in futures]
        pool.shutdown()
    assert statuses == [201, 201, 201], statuses
    # the cancels that met the held row gave up after the lock timeout (503, retry later); any
    # that came after the session ended were served (200, then 409: already canceled)
    answers = [(r.status_code, r.headers.get("retry-after")) for r in cancels]
    assert answers.count((503, "1")) >= 4 and set(answers) <= {(503, "1"), (200, None), (409, None)}, answers
