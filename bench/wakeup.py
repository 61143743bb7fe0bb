"""Idle wake-up latency: commit of a submit -> the model's predict starting,
with the worker in its own process (DESIGN §5: p50 <= 2 ms, p99 <= 5 ms).

    python bench/wakeup.py [--samples 300] [--workers 1]

The worker serves a model whose predict records time.time() (same machine,
same clock) as its first act; its fallback poll is set to 60 s, so only the
NOTIFY can wake it. Each sample: wait 20-60 ms (the worker is idle again,
blocked in its wait), submit one request in its own statement and
transaction, note the time the submit returned. Reported:
  * submit returned -> predict start: the commit happened before the reply,
    so this is at most the true commit -> start (by the reply's transit);
  * submit sent -> predict start: at least the true figure (it includes the
    INSERT itself).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.db.pool import open_pool  # noqa: E402
from app.queue.operations import Queue  # noqa: E402
from bench._common import bench_database, machine_line, print_table  # noqa: E402
from bench.batching import BenchWorker  # noqa: E402


class Stamp:
    """The bench's model: when did predict start?"""

    def predict(self, model_input: Any) -> dict[str, float]:
        return {"started_at": time.time()}


class AsyncStamp:
    async def predict(self, model_input: Any) -> dict[str, float]:
        return {"started_at": time.time()}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


async def measure(queue: Queue, url: str, model: str, class_path: str, samples: int, workers: int) -> list[list[Any]]:
    toml = f'[models.{model}]\nclass = "{class_path}"\ncapacity = {workers}\nmax_batch_size = 1\n'
    procs = [BenchWorker(url, toml, [model], env={"ASYNCINFER_POLL_INTERVAL_SECONDS": "60"}) for _ in range(workers)]
    try:
        for proc in procs:
            await proc.ready(queue)
        await asyncio.sleep(0.5)
        submitted: list[tuple[Any, float, float]] = []
        for i in range(samples + 10):
            await asyncio.sleep(random.uniform(0.02, 0.06))
            sent = time.time()
            [s] = await queue.submit(model, [{"model_input": {"i": i}}])
            returned = time.time()
            if i >= 10:  # warm-up: prepared statements, thread start
                submitted.append((s.request_id, sent, returned))
        await asyncio.sleep(0.5)
        async with queue.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT r.public_id, o.output FROM asyncinfer.requests r JOIN asyncinfer.request_outputs o"
                " ON o.request_id = r.id WHERE r.model = %s AND r.state = 'SUCCEEDED'", (model,))
            started = {row[0]: row[1]["started_at"] for row in await cur.fetchall()}
    finally:
        for proc in procs:
            proc.stop()
    missing = [rid for rid, _, _ in submitted if rid not in started]
    if missing:
        raise RuntimeError(f"{len(missing)} requests did not finish")
    after = [(started[rid] - returned) * 1000 for rid, _, returned in submitted]
    before = [(started[rid] - sent) * 1000 for rid, sent, _ in submitted]
    rows = []
    for label, values in (("submit returned -> predict start", after), ("submit sent -> predict start", before)):
        rows.append([model, label, len(values), f"{statistics.median(values):.2f}", f"{percentile(values, 95):.2f}",
                     f"{percentile(values, 99):.2f}", f"{max(values):.2f}"])
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1, help="idle worker processes listening")
    args = parser.parse_args()
    rows: list[list[Any]] = []
    with bench_database() as (url, version):
        pool = await open_pool(url, min_size=1, max_size=2)
        queue = Queue(pool)
        try:
            rows += await measure(queue, url, "stamp", "bench.wakeup:Stamp", args.samples, args.workers)
            rows += await measure(queue, url, "stamp-async", "bench.wakeup:AsyncStamp", args.samples, args.workers)
        finally:
            await pool.close()
    print_table("Idle wake-up: submit commit -> predict start (worker in its own process)",
                ["model", "measure", "samples", "p50 ms", "p95 ms", "p99 ms", "max ms"], rows,
                [f"machine: {machine_line()}", f"PostgreSQL {version}; {args.workers} idle worker process(es), "
                 "fallback poll 60 s (only NOTIFY wakes them); stamp: sync predict in a thread, stamp-async: "
                 "async predict", f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"])


if __name__ == "__main__":
    asyncio.run(main())
