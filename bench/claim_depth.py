"""Claim latency against queue depth: is a claim as cheap with 1M queued as with 10k?

    python bench/claim_depth.py [--depths 10000,100000,1000000] [--samples 50]

For each depth: fill the queue (bulk submit inside PostgreSQL), VACUUM
ANALYZE, then time `claim_requests(100)` + `finish_requests` cycles, keeping
the depth roughly constant. Reports claim latency p50/p95 per depth and the
ratio to the smallest depth (DESIGN §5 bar: within 1.5x from 10k to 1M).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench._common import bench_database, machine_line, print_table  # noqa: E402

FILL = """
SELECT count(*) FROM asyncinfer.submit_requests(%(model)s,
    (SELECT jsonb_agg(jsonb_build_object('model_input', jsonb_build_object('n', g), 'priority', g %% 3,
                                         'max_time_in_queue_seconds', 259200))
       FROM generate_series(1, %(n)s) g))
"""
CLAIM = "SELECT id, attempt FROM asyncinfer.claim_requests(%(model)s, %(worker)s, %(batch)s, 30)"
FINISH = "SELECT count(*) FROM asyncinfer.finish_requests(%(worker)s, %(results)s::jsonb)"


def measure(conn: psycopg.Connection, model: str, worker: int, batch: int, samples: int) -> list[float]:
    timings = []
    for _ in range(samples):
        start = time.perf_counter()
        rows = conn.execute(CLAIM, {"model": model, "worker": worker, "batch": batch}).fetchall()
        timings.append((time.perf_counter() - start) * 1000)
        results = "[" + ",".join(f'{{"id":{i},"attempt":{a}}}' for i, a in rows) + "]"
        conn.execute(FINISH, {"worker": worker, "results": results})
    return timings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", default="10000,100000,1000000")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]

    rows = []
    with bench_database() as (url, version):
        with psycopg.connect(url, autocommit=True) as conn:
            base = None
            for depth in depths:
                model = f"depth-{depth}"
                conn.execute("SELECT asyncinfer.upsert_model(%s, 1000000)", (model,))
                worker = conn.execute("SELECT asyncinfer.register_worker('bench', 'h', 0, ARRAY[%s])",
                                      (model,)).fetchone()[0]
                fill_start = time.perf_counter()
                for offset in range(0, depth, 50_000):
                    conn.execute(FILL, {"model": model, "n": min(50_000, depth - offset)})
                fill_s = time.perf_counter() - fill_start
                conn.execute("VACUUM ANALYZE asyncinfer.requests")
                measure(conn, model, worker, args.batch, 5)  # warm caches and plans
                timings = measure(conn, model, worker, args.batch, args.samples)
                p50 = statistics.median(timings)
                p95 = statistics.quantiles(timings, n=20)[18]
                base = base or p50
                rows.append([f"{depth:,}", f"{p50:.2f}", f"{p95:.2f}", f"{p50 / base:.2f}x", f"{depth / fill_s:,.0f}"])
                # drop this depth's rows before the next, so depths do not add up
                conn.execute("SELECT asyncinfer.purge_queue(%s)", (model,))

    print_table(
        f"Claim latency vs queue depth (claim of {args.batch})",
        ["queued", "claim p50 ms", "claim p95 ms", "p50 vs first", "fill req/s"],
        rows,
        [f"machine: {machine_line()}", f"PostgreSQL {version}; {args.samples} claims per depth, each followed by a finish",
         f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"],
    )


if __name__ == "__main__":
    main()
