"""Plumbing shared by the peer drivers (run with the throwaway venv's python).

Only the standard library here: the drivers import this next to the peer
library, never anything from the asyncinfer tree.

Wake-up latency, as the drivers measure it: the worker is idle and
listening; the submitter enqueues one job (one statement, autocommit) and
reads CLOCK_MONOTONIC (system-wide on Linux, so comparable across processes)
as soon as the call returns, i.e. once the commit is acknowledged; the
handler's first statement reads the same clock. latency = handler start -
commit acknowledged (at most the true commit -> start, by the reply's
transit), as bench/wakeup.py defines it for asyncinfer; `from_sent_*` is
from the call of enqueue instead (at least the true figure), and
`enqueue_rtt_ms_p50` the enqueue round trip.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

RESULT_PREFIX = "PEER_RESULT "
WAKE_LINE = "WAKE"


def percentile(samples: list[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100), as bench/wakeup.py computes it."""
    ordered = sorted(samples)
    k = (len(ordered) - 1) * p / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def emit(result: dict[str, Any]) -> None:
    """The one JSON line bench/peers.py collects."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def report_wake(seq: str) -> None:
    """Called first thing in a wake-up handler: `WAKE <seq> <monotonic_ns>`."""
    now = time.monotonic_ns()
    sys.stdout.write(f"{WAKE_LINE} {seq} {now}\n")
    sys.stdout.flush()


def run(main: Awaitable[Any] | Callable[[], Awaitable[Any]]) -> Any:
    """uvloop when the venv has it (both peers depend on it or accept it), else asyncio."""
    coro = main() if callable(main) else main
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def loop_name() -> str:
    try:
        import uvloop

        return f"uvloop {uvloop.__version__}"
    except ImportError:
        return "asyncio"


class WakeSource:
    """Where handler-start stamps come from: a worker subprocess's stdout, or
    an in-process queue fed by the same handler."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.local: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    async def spawn(self, argv: list[str]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, env=env, limit=1 << 20
        )

    def local_wake(self, seq: str) -> None:
        self.local.put_nowait((seq, time.monotonic_ns()))

    async def next(self, timeout: float) -> tuple[str, int]:
        if self.proc is None:
            return await asyncio.wait_for(self.local.get(), timeout)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no wake-up from the worker process")
            line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            if not line:
                raise RuntimeError(f"worker process exited ({await self.proc.wait()})")
            parts = line.decode(errors="replace").split()
            if len(parts) == 3 and parts[0] == WAKE_LINE:
                return parts[1], int(parts[2])
            # anything else the worker prints (logs) is passed through to stderr
            sys.stderr.write(line.decode(errors="replace"))

    async def stop(self, timeout: float = 20) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def measure_wakeup(
    enqueue_one: Callable[[str], Awaitable[Any]],
    source: WakeSource,
    samples: int,
    warmup: int = 3,
    gap_s: tuple[float, float] = (0.15, 0.3),
) -> dict[str, Any]:
    """`samples` sequential wake-ups, after `warmup` discarded ones (which also
    prove the worker is up and listening). Between samples the worker is left
    idle for a random gap longer than the peers' own flush timers (0.1 s)."""
    latencies: list[float] = []
    from_sent: list[float] = []
    rtts: list[float] = []
    for i in range(warmup + samples):
        await asyncio.sleep(random.uniform(*gap_s) if i >= warmup else 0.05)
        seq = f"{i}"
        before = time.monotonic_ns()
        await enqueue_one(seq)
        committed = time.monotonic_ns()
        got, started = await source.next(timeout=60 if i == 0 else 15)
        if got != seq:
            raise RuntimeError(f"wake-up for job {got}, expected {seq}")
        if i >= warmup:
            latencies.append((started - committed) / 1e6)
            from_sent.append((started - before) / 1e6)
            rtts.append((committed - before) / 1e6)
    return {
        "wake_samples": samples,
        "wake_p50_ms": percentile(latencies, 50),
        "wake_p95_ms": percentile(latencies, 95),
        "wake_p99_ms": percentile(latencies, 99),
        "wake_max_ms": max(latencies),
        "from_sent_p50_ms": percentile(from_sent, 50),
        "from_sent_p99_ms": percentile(from_sent, 99),
        "enqueue_rtt_ms_p50": percentile(rtts, 50),
    }
