"""Claim: capacity across concurrent workers, order, deadlines, pause."""

from __future__ import annotations

import asyncio
import random

import psycopg

from app.queue.operations import Outcome, Queue
from tests.queue.helpers import in_flight, new_worker, states


async def test_capacity_never_exceeded_by_8_concurrent_claimers(queue: Queue, db: psycopg.Connection) -> None:
    capacity, total = 3, 300
    await queue.upsert_model("gpu", capacity=capacity)
    await queue.submit("gpu", [{"model_input": i} for i in range(total)])
    done = 0
    samples: list[int] = []
    stop = asyncio.Event()

    async def claimer(n: int) -> None:
        nonlocal done
        worker = await new_worker(queue, ["gpu"], f"w{n}")
        while done < total:
            batch = await queue.claim("gpu", worker, random.randint(1, 3), lease_seconds=30)
            if not batch:
                await asyncio.sleep(0.001)
                continue
            await asyncio.sleep(random.random() * 0.005)
            finished = await queue.finish(worker, [Outcome(r.id, r.attempt, output=r.model_input) for r in batch])
            assert len(finished) == len(batch)
            done += len(finished)

    async def sampler() -> None:
        async with await psycopg.AsyncConnection.connect(queue.pool.conninfo, autocommit=True) as conn:
            while not stop.is_set():
                cur = await conn.execute("SELECT count(*) FROM asyncinfer.requests WHERE state = 'IN_PROGRESS'")
                samples.append((await cur.fetchone())[0])
                await asyncio.sleep(0)

    sampling = asyncio.create_task(sampler())
    await asyncio.wait_for(asyncio.gather(*[claimer(n) for n in range(8)]), timeout=60)
    stop.set()
    await sampling

    assert states(db) == {"SUCCEEDED": total}
    assert in_flight(db, "gpu") == 0
    assert samples and max(samples) <= capacity
    # Proof from the event log: replay claims (+1) and finishes (-1) in time order.
    running = peak = 0
    for (kind,) in db.execute(
        "SELECT kind FROM asyncinfer.request_events WHERE kind IN ('claimed', 'succeeded') ORDER BY at, id"
    ):
        running += 1 if kind == "claimed" else -1
        peak = max(peak, running)
    assert peak <= capacity
    assert peak == capacity, "the test should drive the model to its capacity"


async def test_priority_first_then_fifo_within_a_level(queue: Queue) -> None:
    await queue.upsert_model("m", capacity=100)
    submitted = await queue.submit(
        "m", [{"model_input": i, "priority": p} for i, p in enumerate([2, 1, 0, 2, 1, 0, 1])]
    )
    worker = await new_worker(queue, ["m"])
    claimed = []
    for _ in range(7):  # one at a time: the order of hand-out is the contract
        claimed += await queue.claim("m", worker, 1, lease_seconds=30)
    order = [c.model_input for c in claimed]
    assert order == [2, 5, 1, 4, 6, 0, 3]
    assert {c.public_id for c in claimed} == {s.request_id for s in submitted}


async def test_claim_takes_no_more_than_free_capacity(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=4)
    await queue.submit("m", [{"model_input": i} for i in range(10)])
    w1, w2 = await new_worker(queue, ["m"], "a"), await new_worker(queue, ["m"], "b")
    assert len(await queue.claim("m", w1, 3, 30)) == 3
    assert len(await queue.claim("m", w2, 3, 30)) == 1
    assert await queue.claim("m", w2, 3, 30) == []
    assert in_flight(db, "m") == 4


async def test_paused_model_hands_out_nothing(queue: Queue) -> None:
    await queue.upsert_model("m", capacity=5)
    await queue.submit("m", [{"model_input": 1}])
    worker = await new_worker(queue, ["m"])
    await queue.pause_model("m")
    assert await queue.claim("m", worker, 5, 30) == []
    await queue.resume_model("m")
    assert len(await queue.claim("m", worker, 5, 30)) == 1


async def test_request_past_queue_deadline_expires_instead_of_running(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=5)
    late, fresh = await queue.submit("m", [{"model_input": "late"}, {"model_input": "fresh"}])
    db.execute(
        "UPDATE asyncinfer.requests SET created_at = now() - interval '1 hour',"
        " expires_at = now() - interval '50 minutes' WHERE public_id = %s",
        (late.request_id,),
    )
    worker = await new_worker(queue, ["m"])
    claimed = await queue.claim("m", worker, 5, 30)
    assert [c.model_input for c in claimed] == ["fresh"]
    row = db.execute(
        "SELECT state::text, finished_at IS NOT NULL FROM asyncinfer.requests WHERE public_id = %s",
        (late.request_id,),
    ).fetchone()
    assert row == ("EXPIRED", True)
    assert in_flight(db, "m") == 1


async def test_maintenance_sweep_expires_deep_queue(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=0)  # nothing runs: only the sweep can expire
    await queue.submit("m", [{"model_input": i} for i in range(20)])
    db.execute(
        "UPDATE asyncinfer.requests SET created_at = now() - interval '1 hour',"
        " expires_at = now() - interval '1 minute' WHERE id <= 15"
    )
    result = await queue.run_maintenance()
    assert result.leader and result.expired == 15
    assert states(db) == {"EXPIRED": 15, "QUEUED": 5}


async def test_delayed_request_is_not_claimed_before_run_at(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=5)
    await queue.submit("m", [{"model_input": 1}])
    db.execute("UPDATE asyncinfer.requests SET run_at = now() + interval '1 hour'")
    worker = await new_worker(queue, ["m"])
    assert await queue.claim("m", worker, 5, 30) == []
