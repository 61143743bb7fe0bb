"""`asyncinfer dispatcher` as its own process: woken by NOTIFY, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from app.queue.operations import Outcome, Queue
from tests.queue.helpers import new_worker


async def test_dispatcher_process_delivers_promptly_and_stops_on_sigterm(queue: Queue, database_url: str, receiver) -> None:
    env = dict(os.environ, DATABASE_URL=database_url, ASYNCINFER_ALLOW_PRIVATE_WEBHOOKS="true",
               ASYNCINFER_POLL_INTERVAL_SECONDS="30")  # only NOTIFY can make it prompt
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "dispatcher"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # wait until it listens
            async with queue.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query ILIKE '%%pg_listening_channels%%' OR (datname = current_database() AND query ILIKE 'LISTEN%%')")
                if (await cur.fetchone())[0]:
                    break
            time.sleep(0.1)
        await queue.upsert_model("m")
        await queue.submit("m", [{"model_input": 1, "webhook_endpoint": receiver.url + "/hook"}])
        worker = await new_worker(queue, ["m"])
        [req] = await queue.claim("m", worker, 1, 30)
        started = time.monotonic()
        await queue.finish(worker, [Outcome(req.id, req.attempt, output="done")])
        receiver.wait_for(1, timeout=10)
        assert time.monotonic() - started < 5  # far below the 30 s poll: the NOTIFY woke it
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, output
