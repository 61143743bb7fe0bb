"""Shared machinery of the reliability suite: real processes (workers, a
dispatcher, the API), a load generator, a capacity sampler, a webhook
receiver that can go down, and the end-of-scenario reconciliation.

Everything is bounded: every wait has a deadline, every load a request
count and a time limit, every process is stopped by its pid at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg

REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELED", "EXPIRED")

# Short clocks so faults resolve in seconds: a lease of 2 s (renewed every
# 0.67 s), a reaper tick every 0.3 s, a 0.3 s fallback poll.
FAST_ENV = {
    "ASYNCINFER_LEASE_SECONDS": "2",
    "ASYNCINFER_MAINTENANCE_INTERVAL_SECONDS": "0.3",
    "ASYNCINFER_POLL_INTERVAL_SECONDS": "0.3",
    "ASYNCINFER_WORKER_SHUTDOWN_GRACE_SECONDS": "2",
    "ASYNCINFER_LISTEN_HEALTH_CHECK_SECONDS": "1",
    "ASYNCINFER_LOG_LEVEL": "INFO",
}

# A retry config that keeps scenarios fast: 3 attempts, 20 ms doubling to 200 ms.
FAST_RETRY = {"max_attempts": 3, "initial_delay_ms": 20, "max_delay_ms": 200}


def flaky_toml(model: str, capacity: int, max_batch_size: int = 8, fail_rate: float = 0.1,
               batch_sleep_ms: float = 5.0, batch_raise_rate: float = 0.02, concurrency: int | None = None) -> str:
    extra = f"concurrency = {concurrency}\n" if concurrency is not None else ""
    return f"""
[models.{model}]
class = "tests.reliability.models:Flaky"
capacity = {capacity}
max_batch_size = {max_batch_size}
max_batch_wait_ms = 2
execution_timeout_seconds = 30
{extra}
[models.{model}.load_options]
fail_rate = {fail_rate}
batch_sleep_ms = {batch_sleep_ms}
batch_raise_rate = {batch_raise_rate}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes ------------------------------------------------------------------


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a live process, in KiB."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def children(pid: int) -> list[int]:
    """Direct children of a process (from /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    for child in children(pid):
        out.append(child)
        out.extend(descendants(child))
    return out


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGCONT)  # a frozen process cannot act on SIGTERM
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        return self.popen.returncode


class Procs:
    """Worker and dispatcher processes of one test; all stopped at the end."""

    def __init__(self, database_url: str, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.database_url = database_url
        self.log_dir = log_dir
        self.env = {**FAST_ENV, **(env or {})}
        self.all: list[Proc] = []

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"DATABASE_URL": self.database_url, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
        env.update(self.env)
        env.update(extra or {})
        return env

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None) -> Proc:
        log_path = self.log_dir / f"{name}-{len(self.all)}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen([sys.executable, "-m", "app.cli", *argv], cwd=REPO, env=self._env(env),
                                     stdout=log, stderr=subprocess.STDOUT)
        proc = Proc(name, popen, log_path)
        self.all.append(proc)
        return proc

    def worker(self, toml: str, models: Iterable[str], env: dict[str, str] | None = None,
               concurrency: int | None = None) -> Proc:
        config = self.log_dir / f"models-{len(self.all)}.toml"
        config.write_text(toml)
        argv = ["worker", "--config", str(config)]
        for model in models:
            argv += ["--model", model]
        if concurrency is not None:
            argv += ["--concurrency", str(concurrency)]
        return self._start("worker", argv, env)

    def dispatcher(self, env: dict[str, str] | None = None) -> Proc:
        return self._start("dispatcher", ["dispatcher"], env)

    def close(self) -> None:
        for proc in self.all:
            proc.stop(timeout=5)


def wait_workers_healthy(database_url: str, procs: list[Proc], timeout: float = 30.0) -> dict[int, int]:
    """{pid: worker id} once every process has registered and is healthy."""
    pids = [p.pid for p in procs]
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as db:
        while True:
            for p in procs:
                if not p.alive():
                    raise AssertionError(f"{p.name} {p.pid} exited with {p.popen.returncode}:\n{p.log()[-3000:]}")
            rows = db.execute("SELECT pid, id, state FROM asyncinfer.workers WHERE pid = ANY(%s)"
                              " AND state <> 'stopped' ORDER BY id", (pids,)).fetchall()
            healthy = {r[0]: r[1] for r in rows if r[2] == "healthy"}
            if len(healthy) == len(pids):
                return healthy
            if time.monotonic() > deadline:
                raise AssertionError(f"workers not healthy in {timeout}s: {rows}")
            time.sleep(0.05)


def wait_listening(database_url: str, app_prefix: str, count: int, timeout: float = 20.0) -> None:
    """Wait until `count` connections whose application_name starts with app_prefix are connected."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as db:
        while True:
            n = db.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                           " AND application_name LIKE %s", (app_prefix + "%",)).fetchone()[0]
            if n >= count:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} of {count} '{app_prefix}*' connections after {timeout}s")
            time.sleep(0.05)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and its descendants, by pid (children first seen, then
    the parent, then any child it spawned meanwhile). Returns the pids."""
    victims = [pid, *descendants(pid)]
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return victims


# -- the database side ------------------------------------------------------------


def submit_bulk(database_url: str, model: str, items: list[dict[str, Any]], chunk: int = 1000) -> list[str]:
    """Submit through the SQL function (as a bulk client would), in chunks; returns public ids."""
    ids: list[str] = []
    with psycopg.connect(database_url, autocommit=True) as db:
        for start in range(0, len(items), chunk):
            rows = db.execute("SELECT request_id::text FROM asyncinfer.submit_requests(%s, %s::jsonb)",
                              (model, json.dumps(items[start:start + chunk]))).fetchall()
            ids += [r[0] for r in rows]
    return ids


def flaky_items(n: int, start: int = 0, poison_every: int = 97, retry: dict[str, int] | None = None,
                **extra: Any) -> list[dict[str, Any]]:
    """n request bodies for the Flaky model; every poison_every-th input is poison."""
    return [{"model_input": {"n": i, **({"poison": True} if poison_every and i % poison_every == 0 else {})},
             "inference_retry_config": retry or FAST_RETRY, **extra}
            for i in range(start, start + n)]


def counts(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url, autocommit=True) as db:
        return dict(db.execute("SELECT state::text, count(*) FROM asyncinfer.requests GROUP BY 1").fetchall())


def wait_drained(database_url: str, timeout: float, what: str = "queue",
                 procs: list[Proc] | None = None, model: str | None = None) -> float:
    """Wait until no request (of `model`, or at all) is QUEUED or IN_PROGRESS; returns the seconds waited."""
    started = time.monotonic()
    deadline = started + timeout
    last: Any = None
    while True:
        try:
            with psycopg.connect(database_url, autocommit=True, connect_timeout=3) as db:
                while True:
                    last = db.execute("SELECT state::text, count(*) FROM asyncinfer.requests"
                                      " WHERE state IN ('QUEUED', 'IN_PROGRESS')"
                                      " AND (%(m)s::text IS NULL OR model = %(m)s) GROUP BY 1",
                                      {"m": model}).fetchall()
                    if not last:
                        return time.monotonic() - started
                    if time.monotonic() > deadline:
                        logs = "".join(f"\n--- {p.name} {p.pid}\n{p.log()[-2000:]}" for p in procs or [])
                        raise AssertionError(f"{what} not drained in {timeout}s: {last}{logs}")
                    time.sleep(0.1)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class CapacitySampler(threading.Thread):
    """Samples, every `interval`, the IN_PROGRESS rows per model against the
    model's capacity (one statement, one snapshot). Survives a database restart."""

    def __init__(self, database_url: str, interval: float = 0.01) -> None:
        super().__init__(name="capacity-sampler", daemon=True)
        self.database_url = database_url
        self.interval = interval
        self.samples = 0
        self.failed_samples = 0
        self.max_running: Counter[str] = Counter()
        self.capacity: dict[str, int] = {}
        self.violations: list[tuple[str, int, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        query = ("SELECT m.name, m.capacity, (SELECT count(*) FROM asyncinfer.requests r"
                 " WHERE r.model = m.name AND r.state = 'IN_PROGRESS') FROM asyncinfer.models m")
        while not self._halt.is_set():
            try:
                with psycopg.connect(self.database_url, autocommit=True, connect_timeout=2) as db:
                    while not self._halt.is_set():
                        for name, capacity, running in db.execute(query).fetchall():
                            self.capacity[name] = capacity
                            self.max_running[name] = max(self.max_running[name], running)
                            if running > capacity:
                                self.violations.append((name, running, capacity))
                        self.samples += 1
                        self._halt.wait(self.interval)
            except psycopg.Error:
                self.failed_samples += 1
                self._halt.wait(0.1)

    def __enter__(self) -> CapacitySampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def assert_ok(self) -> dict[str, Any]:
        assert self.samples >= 20, f"only {self.samples} capacity samples"
        assert not self.violations, f"capacity exceeded: {self.violations[:10]}"
        return {"samples": self.samples, "max_running": dict(self.max_running), "capacity": dict(self.capacity)}


def reconcile(database_url: str, accepted: Iterable[str] | None = None, *, exact: bool = False,
              webhooks: bool = False) -> dict[str, Any]:
    """The end-of-scenario checks of invariants 1 and 2, on the database:

    * every accepted request exists, and (exact) no other request does;
    * none is half-written: an inputs row and a `submitted` event per request;
    * nothing stuck: no request QUEUED or IN_PROGRESS, every in_flight 0;
    * accepted == terminal, and exactly ONE terminal event per request in
      request_events (no request finished twice), one output row per
      SUCCEEDED/FAILED request;
    * webhooks: a webhook delivery for every finished request that named
      one (however it finished), none left PENDING.
    Returns the figures for the report.
    """
    with psycopg.connect(database_url, autocommit=True) as db:
        by_state = dict(db.execute("SELECT state::text, count(*) FROM asyncinfer.requests GROUP BY 1").fetchall())
        total = sum(by_state.values())
        if accepted is not None:
            accepted = set(accepted)
            found = {r[0] for r in db.execute("SELECT public_id::text FROM asyncinfer.requests"
                                              " WHERE public_id = ANY(%s::uuid[])", (list(accepted),)).fetchall()}
            missing = accepted - found
            assert not missing, f"{len(missing)} accepted requests are missing, e.g. {sorted(missing)[:5]}"
            if exact:
                assert total == len(accepted), f"{total} requests in the database, {len(accepted)} accepted"
        half = db.execute(
            "SELECT count(*) FILTER (WHERE i.request_id IS NULL),"
            "       count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM asyncinfer.request_events e"
            "                        WHERE e.request_id = r.id AND e.kind = 'submitted'))"
            "  FROM asyncinfer.requests r LEFT JOIN asyncinfer.request_inputs i ON i.request_id = r.id").fetchone()
        assert half == (0, 0), f"half-written requests: {half[0]} without inputs, {half[1]} without a submitted event"
        orphans = db.execute("SELECT count(*) FROM asyncinfer.request_inputs i WHERE NOT EXISTS"
                             " (SELECT 1 FROM asyncinfer.requests r WHERE r.id = i.request_id)").fetchone()[0]
        assert orphans == 0, f"{orphans} inputs rows without a request"
        live = {s: n for s, n in by_state.items() if s not in TERMINAL}
        assert not live, f"not terminal: {live}"
        in_flight = db.execute("SELECT name, in_flight FROM asyncinfer.models WHERE in_flight <> 0").fetchall()
        assert not in_flight, f"capacity counters not back to 0: {in_flight}"
        twice = db.execute(
            "SELECT r.public_id::text, count(e.id) FROM asyncinfer.requests r"
            "  LEFT JOIN asyncinfer.request_events e ON e.request_id = r.id"
            "   AND e.state IN ('SUCCEEDED', 'FAILED', 'CANCELED', 'EXPIRED')"
            " GROUP BY r.id HAVING count(e.id) <> 1 LIMIT 10").fetchall()
        assert not twice, f"requests without exactly one terminal event: {twice}"
        outputs = db.execute(
            "SELECT count(*) FROM asyncinfer.requests r WHERE r.state IN ('SUCCEEDED', 'FAILED')"
            " AND NOT EXISTS (SELECT 1 FROM asyncinfer.request_outputs o WHERE o.request_id = r.id)").fetchone()[0]
        assert outputs == 0, f"{outputs} finished requests without an output row"
        events = dict(db.execute("SELECT kind, count(*) FROM asyncinfer.request_events GROUP BY 1").fetchall())
        result: dict[str, Any] = {"requests": total, "by_state": by_state, "events": events}
        if webhooks:
            deliveries = dict(db.execute("SELECT state::text, count(*) FROM asyncinfer.deliveries"
                                         " WHERE kind = 'webhook' GROUP BY 1").fetchall())
            assert not deliveries.get("PENDING"), f"webhooks still pending: {deliveries}"
            unowed = db.execute(
                "SELECT count(*) FROM asyncinfer.requests r JOIN asyncinfer.request_inputs i ON i.request_id = r.id"
                " WHERE i.webhook_endpoint IS NOT NULL AND r.state IN ('SUCCEEDED', 'FAILED') AND NOT EXISTS"
                " (SELECT 1 FROM asyncinfer.deliveries d WHERE d.request_id = r.id AND d.kind = 'webhook')"
            ).fetchone()[0]
            assert unowed == 0, f"{unowed} finished requests with a webhook have no webhook delivery"
            result["webhooks"] = deliveries
        return result


# -- HTTP load ----------------------------------------------------------------------


@dataclass
class LoadResult:
    accepted: dict[str, str] = field(default_factory=dict)  # client tag -> request id (201 or 200)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # transport errors by type
    retry_after: Counter[str] = field(default_factory=Counter)  # Retry-After values seen on 503
    unexpected: list[tuple[int, str]] = field(default_factory=list)
    first_503: float | None = None
    last_503: float | None = None
    first_ok_after_503: float | None = None
    latencies: list[float] = field(default_factory=list)


class SubmitLoad(threading.Thread):
    """`concurrency` clients submitting `total` requests over HTTP, in a
    thread with its own event loop (the test's thread stays free to inject
    faults). Each request carries an idempotency key (its tag); with
    `retry=True` a 503 or a transport error is retried with the same key
    until `deadline_s`, otherwise the outcome is recorded and the client
    moves on (the API-kill scenario)."""

    def __init__(self, base_url: str, key: str, model: str, total: int, concurrency: int = 16,
                 body: Callable[[int], dict[str, Any]] | None = None, retry: bool = True,
                 deadline_s: float = 60.0, rate_per_s: float | None = None, tag: str | None = None) -> None:
        super().__init__(name="submit-load", daemon=True)
        self.base_url = base_url
        self.key = key
        self.model = model
        self.total = total
        self.concurrency = concurrency
        self.body = body or (lambda i: {"model_input": {"n": i}, "inference_retry_config": FAST_RETRY})
        self.retry = retry
        self.deadline_s = deadline_s
        self.rate_per_s = rate_per_s
        self.tag = tag or uuid.uuid4().hex[:8]
        self.result = LoadResult()
        self.stop_event = threading.Event()
        self._next = 0
        self.started_at = 0.0

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self.started_at = time.monotonic()
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, headers={"Authorization": f"Api-Key {self.key}"},
                                     timeout=httpx.Timeout(10.0, connect=2.0), limits=limits) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.concurrency)))

    def _take(self) -> int | None:
        if self._next >= self.total or self.stop_event.is_set():
            return None
        if time.monotonic() - self.started_at > self.deadline_s:
            return None
        i = self._next
        self._next += 1
        return i

    async def _client(self, client: httpx.AsyncClient) -> None:
        r = self.result
        while (i := self._take()) is not None:
            if self.rate_per_s:
                due = self.started_at + i / self.rate_per_s
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            tag = f"{self.tag}-{i}"
            body = {**self.body(i), "idempotency_key": tag}
            while True:
                sent = time.monotonic()
                try:
                    response = await client.post(f"/v1/models/{self.model}/async_predict", json=body)
                except httpx.HTTPError as error:
                    r.errors[type(error).__name__] += 1
                    if self.retry and not self.stop_event.is_set() \
                            and time.monotonic() - self.started_at < self.deadline_s:
                        await asyncio.sleep(0.2)
                        continue
                    break
                now = time.monotonic()
                r.statuses[response.status_code] += 1
                if response.status_code in (200, 201):
                    r.accepted[tag] = response.json()["request_id"]
                    r.latencies.append(now - sent)
                    if r.last_503 is not None and r.first_ok_after_503 is None:
                        r.first_ok_after_503 = now
                    break
                if response.status_code == 503:
                    r.retry_after[response.headers.get("retry-after", "<none>")] += 1
                    r.first_503 = r.first_503 or now
                    r.last_503 = now
                    if self.retry and time.monotonic() - self.started_at < self.deadline_s:
                        await asyncio.sleep(0.2)  # Retry-After says 1 s; a test client may be eager
                        continue
                    break
                r.unexpected.append((response.status_code, response.text[:300]))
                break

    def stop(self, timeout: float = 30.0) -> LoadResult:
        self.stop_event.set()
        self.join(timeout)
        return self.result

    def finish(self, timeout: float = 120.0) -> LoadResult:
        self.join(timeout)
        assert not self.is_alive(), "load generator did not finish"
        return self.result


# -- a webhook receiver that can go down ------------------------------------------


class _ReceiverServer(ThreadingHTTPServer):
    allow_reuse_address = True
    request_queue_size = 1024  # the default listen backlog of 5 drops a dispatcher's burst of connections
    daemon_threads = True


class Receiver:
    """A webhook receiver on a fixed loopback port that can be taken down
    (connection refused) and brought back. Counts deliveries per webhook-id."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.by_id: Counter[str] = Counter()
        self.request_ids: set[str] = set()
        self.calls = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: one call per connection, so down() is down
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                with receiver.lock:
                    receiver.calls += 1
                    receiver.by_id[self.headers.get("webhook-id", "?")] += 1
                    try:
                        receiver.request_ids.add(json.loads(body)["request_id"])
                    except (ValueError, KeyError):
                        pass
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def up(self) -> None:
        assert self._server is None
        server = _ReceiverServer(("127.0.0.1", self.port), self._handler())
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="receiver", daemon=True)
        self._thread.start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def unique(self) -> int:
        with self.lock:
            return len(self.by_id)

    def duplicates(self) -> int:
        with self.lock:
            return sum(n - 1 for n in self.by_id.values())
