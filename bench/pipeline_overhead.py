"""Pipeline overhead per step: the time between a step finishing and the
next step starting, with every model served by its own worker process.

    python -m bench.pipeline_overhead [--runs 200] [--loaded-runs 2000] [--fan-out 1000]

A 3-step pipeline of no-op models (echo), one worker process per model.
The overhead of a transition k -> k+1 is read from the event log, on the
database's clock: the `succeeded` event of step k (written by the finish
statement, which also enqueues step k+1 by trigger) to the `claimed` event
of step k+1. It covers the finish's commit, the NOTIFY, the next worker's
wake-up, its claim. Scenarios:
  * idle: one run at a time (each waits for the previous one): pure overhead;
  * loaded: --loaded-runs submitted at once: the transitions then include
    queueing behind other runs' steps (capacity 64 per model); runs/s shown;
  * fan-out: one run whose middle step fans out to --fan-out items and
    gathers them: the gather transition (last item finished -> next step
    claimed) and the whole run's time.
"""

from __future__ import annotations

import argparse
import asyncio
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
from bench.wakeup import percentile  # noqa: E402

MODELS = ("step-a", "step-b", "step-c")
TOML = "".join(f"""
[models.{m}]
class = "worker.models.echo:Echo"
capacity = 64
max_batch_size = 64
max_batch_wait_ms = 0
""" for m in MODELS) + """
[pipelines.abc]
steps = [{ model = "step-a" }, { model = "step-b" }, { model = "step-c" }]

[pipelines.fan]
steps = [{ model = "step-a" }, { model = "step-b", fan_out = "$.items" }, { model = "step-c" }]
"""

# step k's success -> step k+1's claim, per run and transition; for a
# fan-out step, "finished" is its last item's success (the gather).
TRANSITIONS_SQL = """
WITH step_times AS (
    SELECT s.run_id, s.step,
           max(e.at) FILTER (WHERE e.kind = 'succeeded') AS finished,
           min(e.at) FILTER (WHERE e.kind = 'claimed')   AS started
      FROM asyncinfer.pipeline_steps s
      JOIN asyncinfer.request_events e ON e.request_id = s.request_id
     WHERE s.run_id = ANY (%(runs)s)
     GROUP BY s.run_id, s.step
)
SELECT a.step, extract(epoch FROM b.started - a.finished) * 1000
  FROM step_times a JOIN step_times b ON b.run_id = a.run_id AND b.step = a.step + 1
"""

RUN_TIMES_SQL = """
SELECT extract(epoch FROM r.finished_at - r.created_at) * 1000
  FROM asyncinfer.requests r WHERE r.id = ANY (%(runs)s) AND r.state = 'SUCCEEDED'
"""


async def rows_of(queue: Queue, sql: str, runs: list[int]) -> list[tuple[Any, ...]]:
    async with queue.pool.connection() as conn:
        cur = await conn.execute(sql, {"runs": runs})
        return await cur.fetchall()


async def wait_done(queue: Queue, runs: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = (await rows_of(queue, "SELECT count(*) FROM asyncinfer.requests WHERE id = ANY (%(runs)s)"
                                     " AND finished_at IS NULL", runs))[0][0]
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{left} runs not finished after {timeout}s")
        await asyncio.sleep(0.005)


async def submit(queue: Queue, pipeline: str, inputs: list[Any]) -> list[int]:
    submitted = await queue.submit_pipeline(pipeline, [{"model_input": x} for x in inputs])
    return [int(str(s.request_id).replace("-", "")[16:], 16) for s in submitted]


def stats_row(scenario: str, label: str, values: list[float], extra: str = "") -> list[Any]:
    return [scenario, label, len(values), f"{statistics.median(values):.2f}", f"{percentile(values, 95):.2f}",
            f"{percentile(values, 99):.2f}", f"{max(values):.2f}", extra]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="idle scenario: runs, one at a time")
    parser.add_argument("--loaded-runs", type=int, default=2000, help="loaded scenario: runs submitted at once")
    parser.add_argument("--fan-out", type=int, default=1000, help="fan-out scenario: items")
    args = parser.parse_args()
    rows: list[list[Any]] = []
    with bench_database() as (url, version):
        pool = await open_pool(url, min_size=1, max_size=4)
        queue = Queue(pool)
        workers = [BenchWorker(url, TOML, [m]) for m in MODELS]
        try:
            for w in workers:
                await w.ready(queue)
            await asyncio.sleep(0.5)

            warm = await submit(queue, "abc", [0] * 5)
            await wait_done(queue, warm, 30)
            idle: list[int] = []
            for i in range(args.runs):
                [run] = await submit(queue, "abc", [{"i": i}])
                await wait_done(queue, [run], 30)
                idle.append(run)
            transitions = await rows_of(queue, TRANSITIONS_SQL, idle)
            for step in (0, 1):
                rows.append(stats_row("idle", f"step {step} done -> step {step + 1} started",
                                      [float(ms) for s, ms in transitions if s == step]))
            rows.append(stats_row("idle", "whole run (3 steps)",
                                  [float(ms) for (ms,) in await rows_of(queue, RUN_TIMES_SQL, idle)]))

            started = time.perf_counter()
            loaded = await submit(queue, "abc", [{"i": i} for i in range(args.loaded_runs)])
            await wait_done(queue, loaded, 300)
            elapsed = time.perf_counter() - started
            transitions = await rows_of(queue, TRANSITIONS_SQL, loaded)
            rows.append(stats_row("loaded", "step k done -> step k+1 started", [float(ms) for _, ms in transitions],
                                  f"{args.loaded_runs / elapsed:,.0f} runs/s ({3 * args.loaded_runs / elapsed:,.0f}"
                                  " step requests/s)"))

            started = time.perf_counter()
            [fan] = await submit(queue, "fan", [{"items": list(range(args.fan_out))}])
            await wait_done(queue, [fan], 300)
            elapsed = time.perf_counter() - started
            transitions = await rows_of(queue, TRANSITIONS_SQL, [fan])
            gather = [float(ms) for s, ms in transitions if s == 1]
            rows.append(stats_row("fan-out", f"gather of {args.fan_out}: last item done -> next step started",
                                  gather, f"whole run {elapsed * 1000:,.0f} ms"))
        finally:
            for w in workers:
                w.stop()
            await pool.close()
    print_table("Pipeline overhead per step (no-op models, one worker process per model)",
                ["scenario", "measure", "samples", "p50 ms", "p95 ms", "p99 ms", "max ms", "note"], rows,
                [f"machine: {machine_line()}", f"PostgreSQL {version}; echo models, capacity 64, batches of 64, "
                 "a worker process per model; times from the event log (database clock)",
                 f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"])


if __name__ == "__main__":
    asyncio.run(main())
