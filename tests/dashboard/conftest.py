"""The dashboard under test: a real `asyncinfer serve` process on its own
database (copied from the migrated template), traffic seeded through the
HTTP API and the queue core, and Debian's Chromium driven headless by
Playwright (never `playwright install`: the browser is the system one).

Seeding: requests are submitted over HTTP (with a non-admin key, so the
admin view is seen to cover every key), then claimed and finished through
app.queue.operations.Queue as a worker would. The finished history is then
spread over the last 50 minutes (every timestamp of a request and its events
moved back by the same amount, plus a little extra wait before the start) so
the hour-long charts have something to draw; nothing else is written by hand.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from app.db.pool import open_pool
from app.queue.operations import Outcome, Queue
from tests.api.helpers import ADMIN_KEY, ApiServer, create_database, drop_database, new_key, start_server

CHROMIUM = os.environ.get("ASYNCINFER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@dataclass
class Seeded:
    """What the seeding made, to compare the dashboard against."""

    embed: str  # busy model: queued by priority, two running, failures
    transcribe: str  # quieter model: one expired request, a few queued
    user_key: str  # a non-admin key (it submitted the history)
    worker_id: int  # alive, holds the two running requests
    stale_worker_id: int  # heartbeat 5 minutes old
    failed_ids: list[str] = field(default_factory=list)
    expired_ids: list[str] = field(default_factory=list)
    running_ids: list[str] = field(default_factory=list)
    succeeded: dict[str, int] = field(default_factory=dict)


@pytest.fixture(scope="session")
def dashboard_api(server_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    url = create_database(server_url, template_db)
    server = start_server(url, tmp_path_factory.mktemp("dashboard"))
    try:
        yield server
    finally:
        code = server.stop()
        drop_database(server_url, url)
    assert code == 0, server.log()[-3000:]


@pytest.fixture
def dashboard_admin(dashboard_api: ApiServer) -> Iterator[httpx.Client]:
    with dashboard_api.client(ADMIN_KEY) as client:
        yield client


def _put_model(admin: httpx.Client, prefix: str, capacity: int) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:4]}"
    response = admin.put(f"/v1/models/{name}", json={"capacity": capacity})
    assert response.status_code == 201, response.text
    return name


def _batch(client: httpx.Client, model: str, requests: list[dict[str, object]]) -> list[str]:
    response = client.post(f"/v1/models/{model}/async_predict_batch", json={"requests": requests})
    assert response.status_code == 201, response.text
    return response.json()["request_ids"]


async def _drain(queue: Queue, model: str, worker_id: int, fail_every: int = 0) -> tuple[int, list[str]]:
    """Claim and finish everything queued for `model`; every `fail_every`-th fails for good."""
    succeeded, failed, n = 0, [], 0
    while claimed := await queue.claim(model, worker_id, 50, 60):
        outcomes = []
        for request in claimed:
            n += 1
            if fail_every and n % fail_every == 0:
                outcomes.append(Outcome(request.id, request.attempt, retryable=False,
                                        error={"message": "CUDA error: out of memory", "type": "OutOfMemoryError"}))
                failed.append(str(request.public_id))
            else:
                outcomes.append(Outcome(request.id, request.attempt, output={"embedding": [0.1, 0.2, 0.3]}))
                succeeded += 1
        finished = await queue.finish(worker_id, outcomes)
        assert len(finished) == len(outcomes)
    return succeeded, failed


SPREAD_SQL = """
WITH moved AS (
    SELECT r.id,
           make_interval(secs => random() * 3000)                 AS back,
           make_interval(secs => random() * random() * %(extra)s) AS extra_wait
      FROM asyncinfer.requests r
     WHERE r.model = %(model)s AND r.finished_at IS NOT NULL AND r.state <> 'EXPIRED'
), requests AS (
    UPDATE asyncinfer.requests r
       SET created_at = r.created_at - m.back - m.extra_wait,
           run_at = r.run_at - m.back - m.extra_wait,
           expires_at = r.expires_at - m.back,
           started_at = r.started_at - m.back,
           finished_at = r.finished_at - m.back
      FROM moved m WHERE r.id = m.id
    RETURNING r.id
)
UPDATE asyncinfer.request_events e
   SET at = e.at - m.back
  FROM moved m WHERE e.request_id = m.id
"""


@pytest.fixture(scope="session")
async def seeded(dashboard_api: ApiServer) -> AsyncIterator[Seeded]:
    assert dashboard_api.database_url
    with dashboard_api.client(ADMIN_KEY) as admin:
        embed = _put_model(admin, "embed-minilm", 4)
        transcribe = _put_model(admin, "transcribe", 2)
        _, user_key = new_key(admin, "dashboard-user")
    pool = await open_pool(dashboard_api.database_url, min_size=1, max_size=2, name="asyncinfer-dashboard-test")
    queue = Queue(pool)
    try:
        worker_id = await queue.register_worker("gpu-worker-1", "gpu-host-a", 4242, [embed, transcribe])
        await queue.set_worker_state(worker_id, "healthy")
        stale_worker_id = await queue.register_worker("gpu-worker-2", "gpu-host-b", 4343, [embed])
        seeded = Seeded(embed, transcribe, user_key, worker_id, stale_worker_id)

        with dashboard_api.client(user_key) as user:
            # history: submitted by a non-admin key, run by the worker, spread over the hour
            _batch(user, embed, [{"model_input": {"text": f"doc {i}"}, "priority": i % 3} for i in range(160)])
            seeded.succeeded[embed], seeded.failed_ids = await _drain(queue, embed, worker_id, fail_every=23)
            _batch(user, transcribe, [{"model_input": {"audio": f"a{i}.wav"}, "priority": 1} for i in range(40)])
            seeded.succeeded[transcribe], _ = await _drain(queue, transcribe, worker_id)
        with psycopg.connect(dashboard_api.database_url, autocommit=True) as db:
            db.execute(SPREAD_SQL, {"model": embed, "extra": 8})
            db.execute(SPREAD_SQL, {"model": transcribe, "extra": 30})

            with dashboard_api.client(ADMIN_KEY) as admin:
                # now: two running on the embed model, held by worker 1 ...
                seeded.running_ids = _batch(admin, embed, [{"model_input": {"text": "long"}, "priority": 0}] * 2)
                assert len(await queue.claim(embed, worker_id, 2, 300)) == 2
                # ... and five waiting: two at priority 0, one at 1, two at 2
                _batch(admin, embed, [{"model_input": {"text": f"q{p}"}, "priority": p} for p in (0, 0, 1, 2, 2)])
                # the transcribe model: one request that never started in time, three waiting
                expired = _batch(admin, transcribe, [{"model_input": {"audio": "late.wav"}, "max_time_in_queue_seconds": 10}])
                db.execute("UPDATE asyncinfer.requests SET created_at = now() - interval '40 seconds',"
                           " run_at = now() - interval '40 seconds', expires_at = now() - interval '30 seconds'"
                           " WHERE public_id = %s", (expired[0],))
                for _ in range(50):
                    if (await queue.run_maintenance()).leader:
                        break
                seeded.expired_ids = expired
                _batch(admin, transcribe, [{"model_input": {"audio": f"b{i}.wav"}, "priority": 1} for i in range(3)])
            # the second worker stopped answering five minutes ago
            db.execute("UPDATE asyncinfer.workers SET heartbeat_at = now() - interval '5 minutes', state = 'healthy'"
                       " WHERE id = %s", (stale_worker_id,))
            state = db.execute("SELECT state::text FROM asyncinfer.requests WHERE public_id = %s", (expired[0],)).fetchone()
            assert state == ("EXPIRED",), state
        yield seeded
    finally:
        await pool.close()


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[object]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    playwright = await async_playwright().start()
    try:
        # launch() gives the browser a fresh, temporary user data dir of its own
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()
    finally:
        await playwright.stop()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def touch_worker(api: ApiServer, worker_id: int) -> None:
    """A heartbeat for the seeded worker (it has no loop of its own to renew it)."""
    assert api.database_url
    with psycopg.connect(api.database_url, autocommit=True) as db:
        db.execute("UPDATE asyncinfer.workers SET heartbeat_at = now() WHERE id = %s", (worker_id,))
