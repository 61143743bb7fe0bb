"""Hot-table size under retention: run N requests through, prune as the
maintenance tick does, and report table + index sizes as it goes.

    python bench/retention.py [--requests 1000000] [--chunk 50000]

Each chunk: submit (inside PostgreSQL), claim + finish in batches of 1 000,
then `prune_finished` with zero retention in batches (what the maintenance
tick does with ASYNCINFER_*_RETENTION_HOURS passed) and let autovacuum run
with the per-table settings of the schema. Sizes are read with
pg_total_relation_size after each checkpoint; bounded means they stop
growing once freed space is reused.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench._common import bench_database, machine_line, print_table  # noqa: E402

TABLES = ["requests", "request_inputs", "request_outputs", "request_events", "deliveries"]
FILL = """
SELECT count(*) FROM asyncinfer.submit_requests('m',
    (SELECT jsonb_agg(jsonb_build_object('model_input', jsonb_build_object('n', g))) FROM generate_series(1, %s) g))
"""
CYCLE = """
SELECT count(*) FROM asyncinfer.finish_requests(%(worker)s, (
    SELECT coalesce(jsonb_agg(jsonb_build_object('id', c.id, 'attempt', c.attempt, 'output', c.model_input)), '[]')
      FROM asyncinfer.claim_requests('m', %(worker)s, 1000, 30) c))
"""


def sizes(conn: psycopg.Connection) -> dict[str, int]:
    return {t: conn.execute("SELECT pg_total_relation_size(%s)", (f"asyncinfer.{t}",)).fetchone()[0] for t in TABLES}


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=50_000)
    args = parser.parse_args()
    rows = []
    start = time.perf_counter()
    with bench_database() as (url, version):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT asyncinfer.upsert_model('m', 1000000)")
            worker = conn.execute("SELECT asyncinfer.register_worker('bench', 'h', 0, '{m}')").fetchone()[0]
            rows.append(["0", *(mib(v) for v in sizes(conn).values()), "0"])
            done = 0
            checkpoints = {args.chunk, args.requests // 4, args.requests // 2, args.requests}
            while done < args.requests:
                n = min(args.chunk, args.requests - done)
                conn.execute(FILL, (n,))
                while conn.execute(CYCLE, {"worker": worker}).fetchone()[0]:
                    pass
                while conn.execute(
                    "SELECT requests_deleted FROM asyncinfer.prune_finished(interval '0', interval '0', 10000)"
                ).fetchone()[0]:
                    pass
                done += n
                # What autovacuum does on its own with the schema's per-table settings; the
                # bench runs chunks faster than its naptime, so it vacuums explicitly.
                conn.execute("VACUUM asyncinfer.requests, asyncinfer.request_inputs,"
                             " asyncinfer.request_outputs, asyncinfer.request_events, asyncinfer.deliveries")
                if done in checkpoints:
                    live = conn.execute("SELECT count(*) FROM asyncinfer.requests").fetchone()[0]
                    rows.append([f"{done:,}", *(mib(v) for v in sizes(conn).values()), str(live)])
    elapsed = time.perf_counter() - start
    print_table(
        f"Retention: {args.requests:,} requests through the queue, sizes in MiB (table + indexes + TOAST)",
        ["requests done", *TABLES, "rows left"],
        rows,
        [f"machine: {machine_line()}", f"PostgreSQL {version}; chunks of {args.chunk:,}; prune with zero retention"
         f" and VACUUM after each chunk; {args.requests / elapsed:,.0f} requests/s overall",
         f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"],
    )


if __name__ == "__main__":
    main()
