"""Webhook dispatcher throughput against a fast local receiver.

    python bench/dispatcher.py [--requests 5000]

Finishes N requests that each ask for a webhook (the outbox fills in the
finish), then drains the outbox with one Dispatcher and reports deliveries/s.
The receiver is granian serving bench/webhook_receiver.py in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.db.pool import open_pool  # noqa: E402
from app.delivery.dispatcher import Dispatcher  # noqa: E402
from app.delivery.signing import new_secret  # noqa: E402
from app.queue.operations import Outcome, Queue  # noqa: E402
from app.settings import Settings  # noqa: E402
from bench._common import bench_database, machine_line, print_table  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()

    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
         "--loop", "uvloop", "--log-level", "warning", "bench.webhook_receiver:app"],
        cwd=ROOT,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        with bench_database() as (url, version):
            pool = await open_pool(url, min_size=1, max_size=4)
            queue = Queue(pool)
            await queue.add_webhook_secret(new_secret())
            await queue.upsert_model("m", capacity=1_000_000)
            worker = await queue.register_worker("bench", "localhost", 0, ["m"])
            hook = f"http://127.0.0.1:{port}/hook"
            await queue.submit("m", [{"model_input": i, "webhook_endpoint": hook} for i in range(args.requests)])
            while claimed := await queue.claim("m", worker, 1000, 60):
                await queue.finish(worker, [Outcome(r.id, r.attempt, output={"n": r.model_input}) for r in claimed])

            settings = Settings(allow_private_webhooks=True, dispatcher_batch_size=args.batch,
                                dispatcher_concurrency=args.concurrency)
            dispatcher = Dispatcher(queue, settings)
            start = time.perf_counter()
            delivered = 0
            while delivered < args.requests:
                n = await dispatcher.run_once()
                if n == 0:
                    break
                delivered += n
            elapsed = time.perf_counter() - start
            await dispatcher.close()
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT state::text, count(*) FROM asyncinfer.deliveries GROUP BY 1")
                states = dict(await cur.fetchall())
            await pool.close()
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)

    assert states == {"SUCCEEDED": args.requests}, states
    print_table(
        "Webhook dispatcher",
        ["measure", "value"],
        [["deliveries", f"{args.requests:,}"], ["deliveries/s (signed, one dispatcher)", f"{args.requests / elapsed:,.0f}"]],
        [f"machine: {machine_line()}", f"PostgreSQL {version}; batch {args.batch}, concurrency {args.concurrency};"
         " receiver: granian on loopback, 204", f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"],
    )


if __name__ == "__main__":
    asyncio.run(main())
