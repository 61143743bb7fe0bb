"""Database faults under load.

* PostgreSQL restarted under load: the suite's own embedded PostgreSQL 18
  (never the machine's server) is stopped for a few seconds while clients
  submit over HTTP and a fleet works. The API answers 503 with Retry-After
  meanwhile and recovers without a restart; workers and the dispatcher
  reconnect (their LISTEN connections too) and keep going.
* A long idle-in-transaction session against the database while the queue
  keeps moving; what degrades is measured.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from app.db.embedded import EmbeddedPostgres
from app.db.migrate import migrate
from app.db.url import with_database
from tests.api.helpers import ApiServer, new_key
from tests.reliability.helpers import (
    FAST_RETRY,
    CapacitySampler,
    Procs,
    Receiver,
    flaky_items,
    flaky_toml,
    reconcile,
    submit_bulk,
    wait_drained,
    wait_listening,
    wait_workers_healthy,
    SubmitLoad,
)

MODEL = "flaky"


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, str]]:
    """An embedded PostgreSQL 18 of this test alone (Unix socket only), with a migrated database."""
    server = EmbeddedPostgres(tmp_path / "pg")
    url = server.start()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE asyncinfer")
        db_url = with_database(url, "asyncinfer")
        migrate(db_url)
        yield server, db_url
    finally:
        server.stop()


def _probe(url: str, path: str, key: str | None = None, method: str = "GET",
           json: Any = None) -> tuple[int, str | None]:
    headers = {"Authorization": f"Api-Key {key}"} if key else {}
    try:
        r = httpx.request(method, url + path, headers=headers, json=json, timeout=10)
        return r.status_code, r.headers.get("retry-after")
    except httpx.HTTPError as error:
        return -1, type(error).__name__


def test_postgres_restart_under_load(own_postgres: tuple[EmbeddedPostgres, str], tmp_path: Path,
                                     api_factory: Callable[..., ApiServer], figures: dict[str, Any]) -> None:
    _restart_under_load(own_postgres, tmp_path, api_factory, figures, outage_s=3.0, total=2000)


@pytest.mark.slow
def test_postgres_away_for_longer_under_load(own_postgres: tuple[EmbeddedPostgres, str], tmp_path: Path,
                                             api_factory: Callable[..., ApiServer], figures: dict[str, Any]) -> None:
    _restart_under_load(own_postgres, tmp_path, api_factory, figures, outage_s=20.0, total=6000)


def _restart_under_load(own_postgres: tuple[EmbeddedPostgres, str], tmp_path: Path,
                        api_factory: Callable[..., ApiServer], figures: dict[str, Any], outage_s: float,
                        total: int) -> None:
    server, url = own_postgres
    env = {"ASYNCINFER_LEASE_SECONDS": "5", "ASYNCINFER_DELIVERY_LEASE_SECONDS": "3",
           "ASYNCINFER_WEBHOOK_RETRY_SCHEDULE_SECONDS": "[0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]",
           "ASYNCINFER_ALLOW_PRIVATE_WEBHOOKS": "true"}
    procs = Procs(url, tmp_path, env)
    receiver = Receiver()
    receiver.up()
    try:
        api = api_factory(url, db_timeout_seconds="1", retry_after_seconds="1", api_key_cache_seconds="1")
        with api.client(api.admin_key) as admin:
            assert admin.put(f"/v1/models/{MODEL}", json={"capacity": 8}).status_code == 201
            _, key = new_key(admin, "load")
        toml = flaky_toml(MODEL, capacity=8, fail_rate=0.05, batch_sleep_ms=5)
        fleet = [procs.worker(toml, [MODEL]) for _ in range(2)]
        dispatcher = procs.dispatcher()
        wait_workers_healthy(url, fleet)
        wait_listening(url, "asyncinfer-listen", 3)  # two workers and the dispatcher


        def body(i: int) -> dict[str, Any]:
            item: dict[str, Any] = {"model_input": {"n": i}, "inference_retry_config": FAST_RETRY}
            if i % 4 == 0:
                item["webhook_endpoint"] = f"{receiver.url}/hook"
            return item

        load = SubmitLoad(api.base_url, key, MODEL, total, concurrency=8, body=body, rate_per_s=250,
                          deadline_s=90 + outage_s * 2)
        with CapacitySampler(url) as sampler:
            load.start()
            deadline = time.monotonic() + 30
            while len(load.result.accepted) < total // 4:
                assert time.monotonic() < deadline and load.is_alive(), load.result
                time.sleep(0.05)
            accepted_before = len(load.result.accepted)
            server.stop()
            stopped_at = time.monotonic()
            time.sleep(1.0)
            ready_down = _probe(api.base_url, "/readyz")
            some_id = next(iter(load.result.accepted.values()))
            probes = {  # every route that needs the database: 503 + Retry-After, never a 500
                "status": (f"/v1/async_request/{some_id}", key, "GET", None),
                "events": (f"/v1/async_request/{some_id}/events", key, "GET", None),
                "queue_status": (f"/v1/models/{MODEL}/async_queue_status", key, "GET", None),
                "cancel": (f"/v1/async_request/{some_id}", key, "DELETE", None),
                "predict": (f"/v1/models/{MODEL}/predict", key, "POST", {"n": 1}),
                "batch": (f"/v1/models/{MODEL}/async_predict_batch", key, "POST", {"requests": [{"model_input": 1}]}),
                "models": ("/v1/models", api.admin_key, "GET", None),
                "metrics": ("/metrics", None, "GET", None),
            }
            with ThreadPoolExecutor(len(probes)) as pool:
                futures = {name: pool.submit(_probe, api.base_url, *args) for name, args in probes.items()}
                down = {name: f.result() for name, f in futures.items()}
            healthz_down = _probe(api.base_url, "/healthz")
            time.sleep(max(0.0, outage_s - (time.monotonic() - stopped_at)))
            server.start()
            back_at = time.monotonic()
            outage_s = back_at - stopped_at
            result = load.finish(timeout=120)
            assert len(result.accepted) == total, (len(result.accepted), result.statuses, result.errors)
            drain_s = wait_drained(url, 90, procs=fleet + [dispatcher])
            deadline = time.monotonic() + 60
            with psycopg.connect(url, autocommit=True) as db:
                while db.execute("SELECT count(*) FROM asyncinfer.deliveries WHERE state = 'PENDING'").fetchone()[0]:
                    assert time.monotonic() < deadline, "webhooks still pending 60 s after the restart"
                    time.sleep(0.2)
        # The API answered 503 with Retry-After while the database was away, never a 500 ...
        assert result.statuses[503] > 0, result.statuses
        assert set(result.retry_after) == {"1"}, result.retry_after
        assert not result.unexpected, result.unexpected[:5]
        assert ready_down[0] == 503, ready_down
        assert all(answer == (503, "1") for answer in down.values()), down
        assert healthz_down[0] == 200
        # ... and recovered by itself: same processes, ready again, listening again.
        assert api.process.poll() is None
        assert _probe(api.base_url, "/readyz")[0] == 200
        assert all(p.alive() for p in [*fleet, dispatcher]), [p.log()[-2000:] for p in [*fleet, dispatcher]]
        wait_listening(url, "asyncinfer-listen", 3)
        wait_listening(url, "asyncinfer-api-listen", 1)
        assert result.first_ok_after_503 is not None and result.last_503 is not None
        recovered_s = result.first_ok_after_503 - back_at

        capacity = sampler.assert_ok()
        outcome = reconcile(url, result.accepted.values(), exact=True, webhooks=True)
        hooked = {rid for tag, rid in result.accepted.items() if int(tag.rsplit("-", 1)[1]) % 4 == 0}
        with psycopg.connect(url, autocommit=True) as db:
            finished_hooked = {r[0] for r in db.execute(
                "SELECT r.public_id::text FROM asyncinfer.requests r JOIN asyncinfer.deliveries d"
                " ON d.request_id = r.id AND d.kind = 'webhook' WHERE d.state = 'SUCCEEDED'").fetchall()}
        assert hooked <= finished_hooked
        assert hooked <= receiver.request_ids, f"{len(hooked - receiver.request_ids)} webhooks never arrived"
        figures.update(submitted=total, accepted_before_stop=accepted_before, outage_s=round(outage_s, 1),
                       http_statuses=dict(result.statuses), transport_errors=dict(result.errors),
                       retry_after=dict(result.retry_after), readyz_while_down=ready_down[0],
                       routes_while_down={k: v[0] for k, v in down.items()},
                       first_201_after_postgres_back_s=round(recovered_s, 2), drain_s=round(drain_s, 1),
                       webhooks_delivered=len(hooked), webhook_duplicates=receiver.duplicates(),
                       capacity_samples_failed=sampler.failed_samples, **capacity, **outcome)
    finally:
        procs.close()
        receiver.down()


def _finished(db: psycopg.Connection) -> int:
    return db.execute("SELECT count(*) FROM asyncinfer.requests WHERE finished_at IS NOT NULL").fetchone()[0]


def _dead_tuples(db: psycopg.Connection) -> tuple[int, int]:
    db.execute("VACUUM asyncinfer.requests")
    row = db.execute("SELECT n_dead_tup, pg_total_relation_size('asyncinfer.requests')"
                     " FROM pg_stat_user_tables WHERE relid = 'asyncinfer.requests'::regclass").fetchone()
    return row[0], row[1]


def test_idle_in_transaction_session(database_url: str, procs: Procs, figures: dict[str, Any]) -> None:
    """Three psql sessions left open in a transaction while the queue works:

    1. `BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM requests;`
       holds a snapshot: the queue keeps moving, but VACUUM cannot remove the
       dead row versions it leaves (the hot table bloats until it ends);
    2. `BEGIN; SELECT ... FROM requests WHERE id = X FOR UPDATE;` on a queued
       request: claims skip it (SKIP LOCKED), everything else runs, X waits
       (a lock on a RUNNING request holds back that request's finish only: see the test below);
    3. `BEGIN; SELECT asyncinfer.set_capacity('flaky', 12);` never committed
       holds the model's row lock: claims AND finishes of that model wait
       (the model stalls) until the transaction ends; then it all resumes
       with no request lost or finished twice.
    """
    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute("SELECT asyncinfer.upsert_model(%s, 12)", (MODEL,))
    toml = flaky_toml(MODEL, capacity=12, fail_rate=0.05, batch_sleep_ms=5)
    fleet = [procs.worker(toml, [MODEL]) for _ in range(2)]
    wait_workers_healthy(database_url, fleet)
    snapshot = psycopg.connect(database_url)
    row_lock = psycopg.connect(database_url)
    model_lock = psycopg.connect(database_url)
    with CapacitySampler(database_url) as sampler, psycopg.connect(database_url, autocommit=True) as db:
        try:
            snapshot.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            snapshot.execute("SELECT count(*) FROM asyncinfer.requests").fetchone()
            # Phase 1 (and 2): the locked request is the oldest, so every claim meets it; the
            # model is paused meanwhile so that no worker takes it before the lock does.
            db.execute("SELECT asyncinfer.pause_model(%s)", (MODEL,))
            accepted = submit_bulk(database_url, MODEL, flaky_items(1, start=0, poison_every=0))
            locked = db.execute("SELECT id FROM asyncinfer.requests ORDER BY id LIMIT 1").fetchone()[0]
            row_lock.execute("SELECT id FROM asyncinfer.requests WHERE id = %s FOR UPDATE", (locked,))
            accepted += submit_bulk(database_url, MODEL, flaky_items(1500, start=1))
            started = time.monotonic()
            db.execute("SELECT asyncinfer.resume_model(%s)", (MODEL,))
            deadline = time.monotonic() + 60
            while _finished(db) < 1500:
                assert time.monotonic() < deadline, "the queue stopped behind an idle transaction"
                time.sleep(0.05)
            phase1_rate = 1500 / (time.monotonic() - started)
            state = db.execute("SELECT state::text FROM asyncinfer.requests WHERE id = %s", (locked,)).fetchone()[0]
            assert state == "QUEUED"  # skipped, not stuck in a claim
            dead_held, size_held = _dead_tuples(db)

            # Phase 3: an uncommitted set_capacity holds the model's row.
            accepted += submit_bulk(database_url, MODEL, flaky_items(1000, start=1501))
            time.sleep(0.3)
            model_lock.execute("SELECT asyncinfer.set_capacity(%s, 12)", (MODEL,))
            time.sleep(0.3)  # whatever was already past the lock lands
            before = _finished(db)
            time.sleep(2.5)
            during = _finished(db) - before
            model_lock.commit()
            stall_released = time.monotonic()
            deadline = time.monotonic() + 60
            while _finished(db) < 2500:
                assert time.monotonic() < deadline, "the model did not resume after the lock was released"
                time.sleep(0.05)
            resumed_s = time.monotonic() - stall_released
        finally:
            snapshot.rollback()
            row_lock.rollback()
            model_lock.rollback()
            for conn in (snapshot, row_lock, model_lock):
                conn.close()
        drain_s = wait_drained(database_url, 30, procs=fleet)
        dead_after, size_after = _dead_tuples(db)
    assert during <= 12, f"{during} requests finished while the model row was locked"
    assert dead_held > dead_after
    capacity = sampler.assert_ok()
    outcome = reconcile(database_url, accepted, exact=True)
    figures.update(submitted=len(accepted), phase1_per_s=round(phase1_rate), locked_request_waited=True,
                   dead_tuples_while_held=dead_held, dead_tuples_after=dead_after,
                   requests_bytes_while_held=size_held, requests_bytes_after=size_after,
                   finished_during_model_lock=during, resumed_s=round(resumed_s, 2), drain_s=round(drain_s, 1),
                   **capacity, **outcome)


def test_a_lock_on_one_running_request_stalls_only_that_request(database_url: str, procs: Procs) -> None:
    """`BEGIN; SELECT * FROM asyncinfer.requests WHERE public_id = '...' FOR UPDATE;` left open on a RUNNING
    request: that request's finish must wait, its worker's other requests must not."""
    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute("SELECT asyncinfer.upsert_model(%s, 4)", (MODEL,))
    toml = flaky_toml(MODEL, capacity=4, max_batch_size=1, fail_rate=0.0, batch_raise_rate=0.0)
    worker = procs.worker(toml, [MODEL])
    wait_workers_healthy(database_url, [worker])
    session = psycopg.connect(database_url)
    try:
        with psycopg.connect(database_url, autocommit=True) as db:
            [slow] = submit_bulk(database_url, MODEL, [{"model_input": {"n": 0, "sleep_ms": 500}}])
            deadline = time.monotonic() + 10
            while db.execute("SELECT state::text FROM asyncinfer.requests WHERE public_id = %s",
                             (slow,)).fetchone()[0] != "IN_PROGRESS":
                assert time.monotonic() < deadline
                time.sleep(0.005)
            session.execute("SELECT id FROM asyncinfer.requests WHERE public_id = %s FOR UPDATE", (slow,))
            while "outcomes wait for rows another session holds" not in worker.log():
                assert time.monotonic() < deadline, "the slow request's finish never met the lock"
                time.sleep(0.01)
            others = submit_bulk(database_url, MODEL, [{"model_input": {"n": i}} for i in range(1, 21)])
            time.sleep(4.0)  # two leases
            states = dict(db.execute("SELECT state::text, count(*) FROM asyncinfer.requests"
                                     " WHERE public_id = ANY(%s::uuid[]) GROUP BY 1", (others,)).fetchall())
    finally:
        session.rollback()
        session.close()
    wait_drained(database_url, 30, procs=[worker])
    assert states == {"SUCCEEDED": 20}, states
    with psycopg.connect(database_url, autocommit=True) as db:  # and the held one was recorded once released
        assert db.execute("SELECT state::text FROM asyncinfer.requests WHERE public_id = %s",
                          (slow,)).fetchone() == ("SUCCEEDED",)
