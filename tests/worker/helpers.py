"""Helpers for the worker tests: worker processes and watching requests move
through the database."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.queue.operations import Queue

REPO = Path(__file__).resolve().parents[2]

# What the tests' models file declares by default (tests add their own).
BASE_MODELS = """
[models.echo]
class = "worker.models.echo:Echo"
capacity = 8
max_batch_size = 1

[models.sleep]
class = "worker.models.sleep:Sleep"
capacity = 4
"""


@dataclass
class WorkerProc:
    proc: subprocess.Popen[bytes]
    log_path: Path
    models: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.pid} still running after {timeout}s:\n{self.output()[-4000:]}")


Spawn = Callable[..., WorkerProc]


async def wait_until(check: Callable[[], Awaitable[Any]], timeout: float, what: str,
                     interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


async def fetch(queue: Queue, query: str, *params: Any) -> list[tuple[Any, ...]]:
    async with queue.pool.connection() as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


async def worker_rows(queue: Queue, *pids: int) -> list[tuple[Any, ...]]:
    return await fetch(queue, "SELECT id, pid, state, detail, heartbeat_at FROM asyncinfer.workers"
                              " WHERE pid = ANY(%s) ORDER BY id", list(pids))


async def wait_ready(queue: Queue, *workers: WorkerProc, timeout: float = 30.0, state: str = "healthy") -> list[int]:
    """Wait until every process has registered and reached `state`; returns their worker ids."""
    pids = [w.pid for w in workers]

    async def check() -> list[int] | None:
        for w in workers:
            if w.proc.poll() is not None:
                raise AssertionError(f"worker {w.pid} exited with {w.proc.returncode}:\n{w.output()[-4000:]}")
        rows = await worker_rows(queue, *pids)
        if len(rows) == len(pids) and all(r[2] == state for r in rows):
            return [r[0] for r in rows]
        return None

    return await wait_until(check, timeout, f"workers {pids} to be {state}")


async def request_row(queue: Queue, public_id: Any) -> tuple[Any, ...]:
    rows = await fetch(queue, "SELECT r.state::text, r.attempt, o.output, o.error, r.lease_owner"
                              " FROM asyncinfer.requests r LEFT JOIN asyncinfer.request_outputs o"
                              " ON o.request_id = r.id WHERE r.public_id = %s", public_id)
    return rows[0]


async def wait_state(queue: Queue, public_id: Any, states: set[str] | str, timeout: float = 15.0) -> tuple[Any, ...]:
    wanted = {states} if isinstance(states, str) else states

    async def check() -> tuple[Any, ...] | None:
        row = await request_row(queue, public_id)
        return row if row[0] in wanted else None

    return await wait_until(check, timeout, f"request {public_id} to reach {sorted(wanted)}")


async def events(queue: Queue, public_id: Any) -> list[tuple[Any, ...]]:
    """(kind, state, attempt, worker_id, detail) in order."""
    return await fetch(queue, "SELECT e.kind, e.state::text, e.attempt, e.worker_id, e.detail"
                              " FROM asyncinfer.request_events e JOIN asyncinfer.requests r ON r.id = e.request_id"
                              " WHERE r.public_id = %s ORDER BY e.id", public_id)


def terminate(worker: WorkerProc, timeout: float = 20.0) -> int:
    worker.signal(signal.SIGTERM)
    return worker.wait(timeout)
