"""PgQueuer on the no-op workload of bench/peers.py.

Run by bench/peers.py with the throwaway venv's python (PgQueuer is never
installed in the project venv):

    python bench/peers/pgqueuer_driver.py --url URL --n 20000

Settings are PgQueuer's own advice for throughput: the asyncpg driver (its
benchmark docs measure it at about twice psycopg), uvloop (what its
tools/benchmark.py runs on), one QueueManager dequeuing in batches of
--batch (500), default durability (logged tables), no concurrency limits.

Enqueue and drain run --rounds times (empty tables each time); the median
and every round are reported.

1. enqueue: N jobs through Queries.enqueue with lists (one INSERT per
   --enqueue-batch jobs), on one connection;
2. drain: one QueueManager, mode=drain, no-op async entrypoint; timed from
   run() until it returns, i.e. every job dequeued, run and its completion
   logged (the status buffers are flushed on exit); dequeue_timeout 1 s
   instead of 30 s only caps an idle wait, so a missed notice at the very
   end cannot add 30 s (none was seen: it returns ~20 ms after the last job);
3. wake-up: a QueueManager idle and listening (continuous mode, same batch
   size) in its own process and/or in this one (--wake-modes
   process,inprocess); one job at a time, see _driver_common.

Prints one JSON line (PEER_RESULT ...).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import signal
import statistics
import sys
import time
from datetime import timedelta

import asyncpg
from _driver_common import WakeSource, emit, loop_name, measure_wakeup, report_wake, run
from pgqueuer import AsyncpgDriver, Queries, QueueManager
from pgqueuer.models import Job
from pgqueuer.types import QueueExecutionMode

NOOP = "noop"
WAKE = "wake"


def payload(n: int) -> bytes:
    # the same small JSON document the other peers and asyncinfer's benches carry
    return b'{"n": %d}' % n


async def enqueue_all(url: str, n: int, batch: int) -> float:
    conn = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(conn))
        start = time.perf_counter()
        for offset in range(0, n, batch):
            k = min(batch, n - offset)
            await queries.enqueue([NOOP] * k, [payload(i) for i in range(offset, offset + k)], [0] * k)
        return n / (time.perf_counter() - start)
    finally:
        await conn.close()


async def drain_all(url: str, n: int, batch: int) -> tuple[float, int]:
    conn = await asyncpg.connect(url)
    try:
        qm = QueueManager(Queries(AsyncpgDriver(conn)))
        done = 0

        @qm.entrypoint(NOOP)
        async def noop(job: Job) -> None:
            nonlocal done
            done += 1

        start = time.perf_counter()
        await qm.run(batch_size=batch, mode=QueueExecutionMode.drain, dequeue_timeout=timedelta(seconds=1))
        elapsed = time.perf_counter() - start
        if done != n:
            raise RuntimeError(f"drained {done} of {n}")
        settings = qm.queries.qbe.settings  # type: ignore[attr-defined]
        left = await conn.fetchval(f"SELECT count(*) FROM {settings.queue_table}")
        logged = await conn.fetchval(
            f"SELECT count(*) FROM {settings.queue_table_log} WHERE status = 'successful' AND entrypoint = $1",
            NOOP,
        )
        if left != 0 or logged != n:
            raise RuntimeError(f"after drain: {left} jobs left in the queue table, {logged} of {n} logged successful")
        return n / elapsed, done
    finally:
        await conn.close()


async def wake_worker(url: str, batch: int, local: WakeSource | None = None) -> QueueManager:
    """A QueueManager with the wake entrypoint, not yet running."""
    conn = await asyncpg.connect(url)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint(WAKE)
    async def wake(job: Job) -> None:
        seq = (job.payload or b"").decode()
        if local is not None:
            local.local_wake(seq)
        else:
            report_wake(seq)

    return qm


async def worker_main(args: argparse.Namespace) -> None:
    qm = await wake_worker(args.url, args.batch)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, qm.shutdown.set)
    await qm.run(batch_size=args.batch)


async def wakeup(args: argparse.Namespace, mode: str) -> dict[str, object]:
    source = WakeSource()
    task = None
    qm = None
    if mode == "process":
        await source.spawn([sys.executable, __file__, "--role", "worker", "--url", args.url, "--batch", str(args.batch)])
    else:
        qm = await wake_worker(args.url, args.batch, local=source)
        task = asyncio.create_task(qm.run(batch_size=args.batch))
    conn = await asyncpg.connect(args.url)
    try:
        queries = Queries(AsyncpgDriver(conn))

        async def enqueue_one(seq: str) -> None:
            await queries.enqueue(WAKE, seq.encode())

        return await measure_wakeup(enqueue_one, source, args.wake_samples)
    finally:
        await conn.close()
        await source.stop()
        if qm is not None and task is not None:
            qm.shutdown.set()
            await asyncio.wait_for(task, 20)


async def main(args: argparse.Namespace) -> None:
    install = await asyncpg.connect(args.url)
    try:
        queries = Queries(AsyncpgDriver(install))
        await queries.install()
        settings = queries.qbe.settings
        server = await install.fetchval("SHOW server_version")
    finally:
        await install.close()

    enqueue_rates: list[float] = []
    drain_rates: list[float] = []
    for round_ in range(args.rounds):
        admin = await asyncpg.connect(args.url)
        try:
            if round_:  # each round starts from empty tables, as the first does
                await admin.execute(f"TRUNCATE {settings.queue_table_log}, {settings.statistics_table}")
            enqueue_rates.append(await enqueue_all(args.url, args.n, args.enqueue_batch))
            await admin.execute("VACUUM ANALYZE")  # as bench/queue_core.py does before its drain
        finally:
            await admin.close()
        drain_rates.append((await drain_all(args.url, args.n, args.batch))[0])
    wake = {mode: await wakeup(args, mode) for mode in args.wake_modes if args.wake_samples > 0}
    emit(
        {
            "library": "PgQueuer",
            "version": importlib.metadata.version("pgqueuer"),
            "driver": f"asyncpg {importlib.metadata.version('asyncpg')}",
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
            "settings": f"QueueManager batch_size={args.batch}, durable tables, drain mode",
            "wake": wake,
        }
    )


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["bench", "worker"], default="bench")
    p.add_argument("--url", required=True)
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500, help="QueueManager dequeue batch size")
    p.add_argument("--enqueue-batch", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3, help="enqueue + drain rounds (median reported)")
    p.add_argument("--wake-samples", type=int, default=50)
    p.add_argument("--wake-modes", type=lambda v: v.split(","), default=["process", "inprocess"],
                   help="comma list of process (worker in its own process) and inprocess")
    return p.parse_args()


if __name__ == "__main__":
    ARGS = parse()
    run(worker_main(ARGS) if ARGS.role == "worker" else main(ARGS))
