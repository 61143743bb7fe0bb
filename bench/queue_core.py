"""Queue core throughput: submit, claim and finish through the SQL functions.

    python bench/queue_core.py [--requests 50000] [--batch 100]

Measures, on one fresh database:
  1. bulk submit (submit_requests, --submit-batch items per statement);
  2. claim + finish cycle through app.queue.Queue (two round trips per batch,
     one Python process, no-op model) — what a worker does;
  3. the pure-SQL ceiling of the same cycle: one statement per batch that
     claims and finishes inside PostgreSQL, no Python objects per request.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from app.db.pool import open_pool  # noqa: E402
from app.queue.operations import Outcome, Queue  # noqa: E402
from bench._common import bench_database, machine_line, print_table  # noqa: E402

PURE_SQL_CYCLE = """
SELECT count(*) FROM asyncinfer.finish_requests(%(worker)s, (
    SELECT coalesce(jsonb_agg(jsonb_build_object('id', c.id, 'attempt', c.attempt, 'output', c.model_input)), '[]')
      FROM asyncinfer.claim_requests(%(model)s, %(worker)s, %(batch)s, 30) c))
"""


async def submit_all(queue: Queue, model: str, total: int, batch: int) -> float:
    start = time.perf_counter()
    for offset in range(0, total, batch):
        await queue.submit(model, [{"model_input": {"n": n}} for n in range(offset, min(total, offset + batch))])
    return total / (time.perf_counter() - start)


async def drain_python(queue: Queue, model: str, worker: int, batch: int, total: int) -> float:
    start, done = time.perf_counter(), 0
    while done < total:
        claimed = await queue.claim(model, worker, batch, 30)
        if not claimed:
            break
        finished = await queue.finish(worker, [Outcome(r.id, r.attempt, output=r.model_input) for r in claimed])
        done += len(finished)
    assert done == total, f"drained {done} of {total}"
    return total / (time.perf_counter() - start)


def drain_pure_sql(url: str, model: str, worker: int, batch: int, total: int) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        start, done = time.perf_counter(), 0
        while done < total:
            n = conn.execute(PURE_SQL_CYCLE, {"worker": worker, "model": model, "batch": batch}).fetchone()[0]
            if n == 0:
                break
            done += n
        assert done == total, f"drained {done} of {total}"
        return total / (time.perf_counter() - start)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--submit-batch", type=int, default=1000)
    args = parser.parse_args()

    with bench_database() as (url, version):
        pool = await open_pool(url, min_size=1, max_size=2)
        queue = Queue(pool)
        await queue.upsert_model("noop-py", capacity=1_000_000)
        await queue.upsert_model("noop-sql", capacity=1_000_000)
        worker = await queue.register_worker("bench", "localhost", 0, ["noop-py", "noop-sql"])

        submit_rate = await submit_all(queue, "noop-py", args.requests, args.submit_batch)
        await submit_all(queue, "noop-sql", args.requests, args.submit_batch)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE asyncinfer.requests")
        python_rate = await drain_python(queue, "noop-py", worker, args.batch, args.requests)
        await pool.close()
        sql_rate = drain_pure_sql(url, "noop-sql", worker, args.batch, args.requests)

    print_table(
        "Queue core: claim + finish in batches",
        ["measure", "requests/s"],
        [
            [f"bulk submit ({args.submit_batch} per statement)", f"{submit_rate:,.0f}"],
            [f"claim+finish via Queue (Python, batch {args.batch})", f"{python_rate:,.0f}"],
            [f"claim+finish pure SQL (one statement, batch {args.batch})", f"{sql_rate:,.0f}"],
        ],
        [
            f"machine: {machine_line()}",
            f"PostgreSQL {version}; {args.requests:,} requests per measure; no-op model",
            f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        ],
    )


if __name__ == "__main__":
    asyncio.run(main())
