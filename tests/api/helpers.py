"""Helpers for the HTTP API tests: a real `asyncinfer serve` process, a tiny
in-test worker loop over the Queue class, and the error-shape assertion."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg

from app.db.url import with_database
from app.queue.operations import ClaimedRequest, Outcome, Queue

ADMIN_KEY = "test-admin-key-" + "k" * 24
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ApiServer:
    base_url: str
    database_url: str | None
    process: subprocess.Popen[bytes]
    log_path: Path
    admin_key: str = ADMIN_KEY

    def client(self, key: str | None = None, headers: dict[str, str] | None = None,
               **kwargs: object) -> httpx.Client:
        headers = {**({"Authorization": f"Api-Key {key}"} if key else {}), **(headers or {})}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]

    def async_client(self, key: str | None = None, **kwargs: object) -> httpx.AsyncClient:
        headers = {"Authorization": f"Api-Key {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"server ignored SIGTERM for {timeout}s:\n{self.log()[-3000:]}") from None
        return self.process.returncode


def start_server(database_url: str | None, log_dir: Path, ready_timeout: float = 60, **settings: str) -> ApiServer:
    """`python -m app.cli serve` on a free port; returns once /readyz answers 200."""
    port = free_port()
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update({
        "ASYNCINFER_ADMIN_KEY": ADMIN_KEY,
        "ASYNCINFER_ALLOW_PRIVATE_WEBHOOKS": "true",
        "ASYNCINFER_LOG_LEVEL": "WARNING",
        "ASYNCINFER_DB_POOL_SIZE": "4",
    })
    env.update({f"ASYNCINFER_{k.upper()}": v for k, v in settings.items()})
    log_path = log_dir / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                                   env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    server = ApiServer(f"http://127.0.0.1:{port}", database_url, process, log_path)
    deadline = time.monotonic() + ready_timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(server.base_url + "/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"server not ready in {ready_timeout}s:\n{server.log()[-3000:]}")
        time.sleep(0.1)


def create_database(server_url: str, template: str) -> str:
    name = f"asyncinfer_api_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return with_database(server_url, name)


def drop_database(server_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_model(admin: httpx.Client, capacity: int = 1, **fields: object) -> str:
    name = f"m-{uuid.uuid4().hex[:10]}"
    response = admin.put(f"/v1/models/{name}", json={"capacity": capacity, **fields})
    assert response.status_code == 201, response.text
    return name


def new_key(admin: httpx.Client, name: str = "user", **fields: object) -> tuple[int, str]:
    response = admin.post("/v1/api_keys", json={"name": name, **fields})
    assert response.status_code == 201, response.text
    return response.json()["id"], response.json()["key"]


Handler = Callable[[ClaimedRequest], Outcome | Awaitable[Outcome]]


@dataclass
class FakeWorker:
    """A tiny claim/finish loop over the Queue class: the worker process is
    another package; the API only needs something that runs requests."""

    queue: Queue
    model: str
    handler: Handler
    per_item_seconds: float = 0.0
    batch: int = 1
    poll_seconds: float = 0.002
    worker_id: int = 0
    handled: list[ClaimedRequest] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def start(self) -> FakeWorker:
        self.worker_id = await self.queue.register_worker("api-test-worker", "localhost", os.getpid(), [self.model])
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while not self._stop.is_set():
            claimed = await self.queue.claim(self.model, self.worker_id, self.batch, 30)
            if not claimed:
                await asyncio.sleep(self.poll_seconds)
                continue
            outcomes = []
            for request in claimed:
                if self.per_item_seconds:
                    await asyncio.sleep(self.per_item_seconds)
                outcome = self.handler(request)
                if asyncio.iscoroutine(outcome):
                    outcome = await outcome
                outcomes.append(outcome)
                self.handled.append(request)
            await self.queue.finish(self.worker_id, outcomes)  # type: ignore[arg-type]

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


def echo(request: ClaimedRequest) -> Outcome:
    return Outcome(request.id, request.attempt, output={"echo": request.model_input})


def assert_error(response: httpx.Response, status: int, field_name: str | None = None) -> dict[str, object]:
    """The one error shape: status_code, detail, errors [{field, rule}] naming the field."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status_code"] == status
    assert isinstance(body["detail"], str) and body["detail"]
    assert isinstance(body["errors"], list)
    for error in body["errors"]:
        assert set(error) == {"field", "rule"} and error["field"] and error["rule"]
    if field_name is not None:
        assert [e["field"] for e in body["errors"]] == [field_name], body
    return body

