"""procrastinate on the no-op workload of bench/peers.py.

Run by bench/peers.py with the throwaway venv's python (procrastinate is
never installed in the project venv):

    python bench/peers/procrastinate_driver.py --url URL --n 3000

Settings: procrastinate's own async worker (App.run_worker_async) with
--concurrency async jobs in parallel (default 4: the steadiest of a
1/2/4/8/16/32 sweep on the 2-core machine, ~450/s against 300-480 for the
others; 8 and more did no better; its default is 1), a PsycopgConnector pool
sized concurrency + 4 so jobs never wait on a connection (its default pool is 4),
LISTEN/NOTIFY on (its default), jobs kept after completion (its default,
delete_jobs="never"), uvloop as the event loop. procrastinate fetches one job
per query and finishes one job per query; that is its design, not a setting.

Enqueue and drain run --rounds times (empty tables each time); the median
and every round are reported.

1. enqueue: N jobs through Task.batch_defer_async (one INSERT per
   --enqueue-batch jobs);
2. drain: one worker, wait=False (it stops once the queue is empty and its
   running jobs are done), no-op async task; timed from run_worker_async()
   until it returns;
3. wake-up: a worker idle and listening in its own process and/or in this
   one (--wake-modes process,inprocess); one job at a time, see
   _driver_common.

Prints one JSON line (PEER_RESULT ...).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import statistics
import sys
import time
from typing import Any

import procrastinate
import psycopg
from _driver_common import WakeSource, emit, loop_name, measure_wakeup, report_wake, run

LOCAL_WAKE: WakeSource | None = None


def make_app(url: str, concurrency: int) -> tuple[procrastinate.App, Any, Any]:
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=url, min_size=2, max_size=concurrency + 4)
    )

    @app.task(name="noop")
    async def noop(n: int) -> None:
        return None

    @app.task(name="wake")
    async def wake(seq: str) -> None:
        if LOCAL_WAKE is not None:
            LOCAL_WAKE.local_wake(seq)
        else:
            report_wake(seq)

    return app, noop, wake


async def worker_main(args: argparse.Namespace) -> None:
    app, _, _ = make_app(args.url, args.concurrency)
    async with app.open_async():
        # installs its own SIGTERM/SIGINT handlers: a graceful stop
        await app.run_worker_async(concurrency=args.concurrency, name="wake-worker")


async def enqueue_all(noop: Any, n: int, batch: int) -> float:
    start = time.perf_counter()
    for offset in range(0, n, batch):
        await noop.batch_defer_async(*({"n": i} for i in range(offset, min(n, offset + batch))))
    return n / (time.perf_counter() - start)


async def wakeup(args: argparse.Namespace, mode: str, app: procrastinate.App, wake: Any) -> dict[str, object]:
    global LOCAL_WAKE
    source = WakeSource()
    task = None
    LOCAL_WAKE = None
    if mode == "process":
        await source.spawn(
            [sys.executable, __file__, "--role", "worker", "--url", args.url, "--concurrency", str(args.concurrency)]
        )
    else:
        LOCAL_WAKE = source
        task = asyncio.create_task(
            app.run_worker_async(concurrency=args.concurrency, install_signal_handlers=False, name="wake-worker")
        )

    async def enqueue_one(seq: str) -> None:
        await wake.defer_async(seq=seq)

    try:
        return await measure_wakeup(enqueue_one, source, args.wake_samples)
    finally:
        await source.stop()
        if task is not None:
            task.cancel()  # procrastinate turns a cancel into a graceful stop
            try:
                await asyncio.wait_for(task, 20)
            except asyncio.CancelledError:
                pass


async def count(url: str, sql: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(sql)
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def main(args: argparse.Namespace) -> None:
    app, noop, wake = make_app(args.url, args.concurrency)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        enqueue_rates: list[float] = []
        drain_rates: list[float] = []
        for round_ in range(args.rounds):
            async with await psycopg.AsyncConnection.connect(args.url, autocommit=True) as conn:
                if round_:  # each round starts from empty tables, as the first does
                    await conn.execute("TRUNCATE procrastinate_jobs CASCADE")
                enqueue_rates.append(await enqueue_all(noop, args.n, args.enqueue_batch))
                await conn.execute("VACUUM ANALYZE")  # as bench/queue_core.py does before its drain
                server = (await (await conn.execute("SHOW server_version")).fetchone())[0]  # type: ignore[index]

            start = time.perf_counter()
            await app.run_worker_async(concurrency=args.concurrency, wait=False, install_signal_handlers=False)
            drain_rates.append(args.n / (time.perf_counter() - start))
            succeeded = await count(
                args.url, "SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'noop' AND status = 'succeeded'"
            )
            if succeeded != args.n:
                raise RuntimeError(f"drained {succeeded} of {args.n}")

        wake_figures = {mode: await wakeup(args, mode, app, wake) for mode in args.wake_modes if args.wake_samples > 0}
    emit(
        {
            "library": "procrastinate",
            "version": importlib.metadata.version("procrastinate"),
            "driver": f"psycopg {importlib.metadata.version('psycopg')}",
            "loop": loop_name(),
            "python": sys.version.split()[0],
            "server_version": server,
            "n": args.n,
            "enqueue_batch": args.enqueue_batch,
            "rounds": args.rounds,
            "enqueue_per_s": statistics.median(enqueue_rates),
            "drain_per_s": statistics.median(drain_rates),
            "enqueue_rounds": enqueue_rates,
            "drain_rounds": drain_rates,
            "settings": f"worker concurrency={args.concurrency}, pool {args.concurrency + 4}, listen_notify on",
            "wake": wake_figures,
        }
    )


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["bench", "worker"], default="bench")
    p.add_argument("--url", required=True)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=4, help="worker concurrency (async jobs in parallel)")
    p.add_argument("--enqueue-batch", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3, help="enqueue + drain rounds (median reported)")
    p.add_argument("--wake-samples", type=int, default=50)
    p.add_argument("--wake-modes", type=lambda v: v.split(","), default=["process", "inprocess"],
                   help="comma list of process (worker in its own process) and inprocess")
    return p.parse_args()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # "App is instantiated in the main Python module": harmless here, every task has an explicit name
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
    ARGS = parse()
    run(worker_main(ARGS) if ARGS.role == "worker" else main(ARGS))
