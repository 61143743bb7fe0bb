"""Finish, retry, leases, fencing, reaping, cancel: QUEUED -> ... -> one terminal state."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from app.queue.operations import Outcome, Queue
from tests.queue.helpers import age_request, in_flight, new_worker, states


def events(db: psycopg.Connection, request_id: int) -> list[tuple]:
    return db.execute(
        "SELECT kind, state::text, attempt, detail FROM asyncinfer.request_events WHERE request_id = %s ORDER BY id",
        (request_id,),
    ).fetchall()


async def test_success_stores_output_and_frees_capacity(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=2)
    await queue.submit("m", [{"model_input": {"x": 1}}])
    worker = await new_worker(queue, ["m"])
    [req] = await queue.claim("m", worker, 2, 30)
    assert in_flight(db, "m") == 1
    [done] = await queue.finish(worker, [Outcome(req.id, req.attempt, output={"y": 2})])
    assert done.state == "SUCCEEDED"
    assert in_flight(db, "m") == 0
    assert db.execute("SELECT output FROM asyncinfer.request_outputs WHERE request_id = %s", (req.id,)).fetchone() == (
        {"y": 2},
    )
    assert [e[0] for e in events(db, req.id)] == ["submitted", "claimed", "succeeded"]


async def test_retry_backoff_doubles_until_capped_then_fails(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=1)
    config = {"max_attempts": 4, "initial_delay_ms": 100, "max_delay_ms": 250}
    await queue.submit("m", [{"model_input": 1, "inference_retry_config": config}])
    worker = await new_worker(queue, ["m"])
    seen_states = []
    for attempt in range(1, 5):
        [req] = await queue.claim("m", worker, 1, 30)
        assert req.attempt == attempt
        [done] = await queue.finish(worker, [Outcome(req.id, req.attempt, error={"message": f"boom {attempt}"})])
        seen_states.append(done.state)
        if done.state == "QUEUED":
            assert await queue.claim("m", worker, 1, 30) == []  # backoff holds it back
            age_request(db, req.id, run_now=True)
    assert seen_states == ["QUEUED", "QUEUED", "QUEUED", "FAILED"]
    delays = [e[3]["retry_in_ms"] for e in events(db, req.id) if e[0] == "retried"]
    assert delays == [100, 200, 250]
    assert db.execute("SELECT error FROM asyncinfer.request_outputs WHERE request_id = %s", (req.id,)).fetchone() == (
        {"message": "boom 4"},
    )
    assert in_flight(db, "m") == 0


async def test_non_retryable_error_fails_at_once(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=1)
    await queue.submit("m", [{"model_input": 1}])
    worker = await new_worker(queue, ["m"])
    [req] = await queue.claim("m", worker, 1, 30)
    [done] = await queue.finish(worker, [Outcome(req.id, req.attempt, error={"message": "bad input"}, retryable=False)])
    assert done.state == "FAILED"


async def test_mixed_batch_finishes_each_row_by_its_outcome(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=10)
    await queue.submit("m", [{"model_input": i} for i in range(3)])
    worker = await new_worker(queue, ["m"])
    a, b, c = await queue.claim("m", worker, 3, 30)
    finished = await queue.finish(
        worker,
        [
            Outcome(a.id, a.attempt, output="ok"),
            Outcome(b.id, b.attempt, error="x", retryable=False),
            Outcome(c.id, c.attempt, error="y"),
        ],
    )
    assert {f.id: f.state for f in finished} == {a.id: "SUCCEEDED", b.id: "FAILED", c.id: "QUEUED"}
    assert in_flight(db, "m") == 0


async def test_stale_worker_cannot_finish_after_losing_its_lease(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=1)
    await queue.submit("m", [{"model_input": 1}])
    stale, fresh = await new_worker(queue, ["m"], "stale"), await new_worker(queue, ["m"], "fresh")
    [old] = await queue.claim("m", stale, 1, 30)
    age_request(db, old.id, lease_expired=True)
    assert (await queue.run_maintenance()).reaped == 1
    age_request(db, old.id, run_now=True)
    [new] = await queue.claim("m", fresh, 1, 30)
    assert new.id == old.id and new.attempt == 2

    # The frozen worker wakes up: its renewal reports the loss, its finish is refused.
    assert await queue.renew_leases(stale, [(old.id, old.attempt)], 30) == {}
    assert await queue.finish(stale, [Outcome(old.id, old.attempt, output="late")]) == []
    # Same owner but an old attempt is refused too (fencing by attempt, not only by owner).
    assert await queue.finish(fresh, [Outcome(new.id, old.attempt, output="old attempt")]) == []
    [done] = await queue.finish(fresh, [Outcome(new.id, new.attempt, output="fresh")])
    assert done.state == "SUCCEEDED"
    assert await queue.finish(fresh, [Outcome(new.id, new.attempt, output="twice")]) == []
    finishes = [e for e in events(db, old.id) if e[0] in ("succeeded", "failed", "canceled", "expired")]
    assert len(finishes) == 1
    assert db.execute("SELECT output FROM asyncinfer.request_outputs WHERE request_id = %s", (old.id,)).fetchone() == (
        "fresh",
    )


async def test_reaper_requeues_with_backoff_then_fails_when_attempts_are_used(
    queue: Queue, db: psycopg.Connection
) -> None:
    await queue.upsert_model("m", capacity=1)
    await queue.submit("m", [{"model_input": 1, "inference_retry_config": {"max_attempts": 2, "initial_delay_ms": 0}}])
    worker = await new_worker(queue, ["m"])
    [req] = await queue.claim("m", worker, 1, lease_seconds=0.05)
    await asyncio.sleep(0.1)
    reaped = await queue.run_maintenance()
    assert reaped.reaped == 1
    assert states(db) == {"QUEUED": 1} and in_flight(db, "m") == 0
    [req] = await queue.claim("m", worker, 1, lease_seconds=0.05)
    await asyncio.sleep(0.1)
    await queue.run_maintenance()
    assert states(db) == {"FAILED": 1} and in_flight(db, "m") == 0
    error = db.execute("SELECT error FROM asyncinfer.request_outputs WHERE request_id = %s", (req.id,)).fetchone()[0]
    assert error["type"] == "lease_lost"
    assert [e[0] for e in events(db, req.id)] == ["submitted", "claimed", "lease_lost", "claimed", "lease_lost"]


async def test_renewal_keeps_a_lease_alive_and_reports_only_held_ids(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=3)
    await queue.submit("m", [{"model_input": i} for i in range(2)])
    worker = await new_worker(queue, ["m"])
    a, b = await queue.claim("m", worker, 2, lease_seconds=0.3)
    for _ in range(4):  # renew past several lease lengths
        await asyncio.sleep(0.1)
        held = await queue.renew_leases(worker, [(a.id, a.attempt), (b.id, b.attempt), (999, 1)], 0.3)
        assert held == {a.id: False, b.id: False}
    assert (await queue.run_maintenance()).reaped == 0
    assert states(db) == {"IN_PROGRESS": 2}


async def test_cancel_queued_request_ends_canceled_at_once(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=1)
    [sub] = await queue.submit("m", [{"model_input": 1}])
    result = await queue.cancel(sub.request_id)
    assert (result.state, result.changed) == ("CANCELED", True)
    again = await queue.cancel(sub.request_id)
    assert (again.state, again.changed) == ("CANCELED", False)
    worker = await new_worker(queue, ["m"])
    assert await queue.claim("m", worker, 1, 30) == []


async def test_cancel_in_progress_tells_the_worker_and_ends_canceled(
    queue: Queue, db: psycopg.Connection, database_url: str
) -> None:
    await queue.upsert_model("m", capacity=1)
    [sub] = await queue.submit("m", [{"model_input": 1}])
    worker = await new_worker(queue, ["m"])
    [req] = await queue.claim("m", worker, 1, 30)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listener:
        await listener.execute("LISTEN asyncinfer_cancel")
        result = await queue.cancel(sub.request_id)
        assert (result.state, result.cancel_requested, result.changed) == ("IN_PROGRESS", True, True)
        notes = [n.payload async for n in listener.notifies(timeout=0.5)]
    assert notes == [f"{worker}:{req.id}:{req.attempt}"]
    assert await queue.renew_leases(worker, [(req.id, req.attempt)], 30) == {req.id: True}
    # Even an output reported after the cancel ends the request CANCELED.
    [done] = await queue.finish(worker, [Outcome(req.id, req.attempt, output="too late")])
    assert done.state == "CANCELED"
    assert in_flight(db, "m") == 0
    assert db.execute("SELECT count(*) FROM asyncinfer.request_outputs").fetchone()[0] == 0


async def test_cancel_of_in_progress_request_whose_worker_died_ends_canceled(
    queue: Queue, db: psycopg.Connection
) -> None:
    await queue.upsert_model("m", capacity=1)
    [sub] = await queue.submit("m", [{"model_input": 1}])
    worker = await new_worker(queue, ["m"])
    [req] = await queue.claim("m", worker, 1, 30)
    await queue.cancel(sub.request_id)
    age_request(db, req.id, lease_expired=True)
    await queue.run_maintenance()
    assert states(db) == {"CANCELED": 1} and in_flight(db, "m") == 0


async def test_cancel_is_scoped_to_the_owning_api_key(queue: Queue) -> None:
    await queue.upsert_model("m")
    [sub] = await queue.submit("m", [{"model_input": 1}], api_key_id=1)
    assert await queue.cancel(sub.request_id, api_key_id=2) is None
    assert (await queue.cancel(sub.request_id, api_key_id=1)).state == "CANCELED"


async def test_worker_leaving_cleanly_gives_its_requests_back(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=5)
    await queue.submit("m", [{"model_input": i} for i in range(3)])
    worker = await new_worker(queue, ["m"])
    await queue.claim("m", worker, 3, 30)
    assert await queue.release_worker(worker) == 3
    assert states(db) == {"QUEUED": 3} and in_flight(db, "m") == 0
    assert db.execute("SELECT state FROM asyncinfer.workers WHERE id = %s", (worker,)).fetchone() == ("stopped",)


async def test_maintenance_runs_on_one_node_at_a_time(queue: Queue, database_url: str) -> None:
    with psycopg.connect(database_url) as holder:  # another node, mid-tick
        holder.execute("SELECT pg_advisory_xact_lock(hashtext('asyncinfer.maintenance'))")
        assert (await queue.run_maintenance()).leader is False
    assert (await queue.run_maintenance()).leader is True


async def test_reconcile_repairs_a_drifted_counter(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=5)
    await queue.submit("m", [{"model_input": i} for i in range(2)])
    worker = await new_worker(queue, ["m"])
    await queue.claim("m", worker, 2, 30)
    db.execute("UPDATE asyncinfer.models SET in_flight = 5 WHERE name = 'm'")  # a careless admin
    assert await queue.reconcile_capacity() == [("m", 5, 2)]
    assert in_flight(db, "m") == 2


async def test_counter_cannot_go_negative(db: psycopg.Connection, queue: Queue) -> None:
    await queue.upsert_model("m")
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE asyncinfer.models SET in_flight = -1 WHERE name = 'm'")


async def test_retention_prunes_old_finished_requests_and_outputs_only(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=10)
    await queue.submit("m", [{"model_input": i} for i in range(4)])
    worker = await new_worker(queue, ["m"])
    a, b, c, _queued = await queue.claim("m", worker, 4, 30)
    await queue.finish(worker, [Outcome(x.id, x.attempt, output=x.model_input) for x in (a, b, c)])
    db.execute("UPDATE asyncinfer.requests SET finished_at = now() - interval '3 hours' WHERE id = %s", (a.id,))
    db.execute("UPDATE asyncinfer.request_outputs SET created_at = now() - interval '2 hours' WHERE request_id IN (%s, %s)",
               (a.id, b.id))
    assert await queue.prune_finished(request_retention_seconds=2.5 * 3600, output_retention_seconds=3600) == (1, 1)
    remaining = {r[0] for r in db.execute("SELECT id FROM asyncinfer.requests")}
    assert a.id not in remaining and {b.id, c.id} <= remaining
    assert db.execute("SELECT count(*) FROM asyncinfer.request_events WHERE request_id = %s", (a.id,)).fetchone()[0] == 0
    assert [r[0] for r in db.execute("SELECT request_id FROM asyncinfer.request_outputs ORDER BY 1")] == [c.id]
    assert states(db) == {"SUCCEEDED": 2, "IN_PROGRESS": 1}


async def test_operator_views(queue: Queue, db: psycopg.Connection) -> None:
    await queue.upsert_model("m", capacity=2)
    await queue.submit("m", [{"model_input": i, "priority": i % 3} for i in range(5)])
    worker = await new_worker(queue, ["m"])
    [req, _] = await queue.claim("m", worker, 2, 30)
    overview = db.execute(
        "SELECT capacity, in_flight, queued, queued_p0, queued_p1, queued_p2, in_progress FROM asyncinfer.queue_overview"
    ).fetchone()
    assert overview == (2, 2, 3, 0, 2, 1, 2)  # the two priority-0 requests run
    assert db.execute("SELECT alive, held_leases FROM asyncinfer.workers_overview WHERE id = %s", (worker,)).fetchone() == (
        True, 2)
    assert db.execute("SELECT count(*) FROM asyncinfer.stuck_requests").fetchone()[0] == 0
    age_request(db, req.id, lease_expired=True)
    assert db.execute("SELECT request_id, reason FROM asyncinfer.stuck_requests").fetchall() == [
        (db.execute("SELECT public_id FROM asyncinfer.requests WHERE id = %s", (req.id,)).fetchone()[0], "lease expired")
    ]


async def test_retry_runnable_now_wakes_other_workers(queue: Queue, database_url: str) -> None:
    await queue.upsert_model("m", capacity=5)
    await queue.submit("m", [{"model_input": 1, "inference_retry_config": {"initial_delay_ms": 0}}])
    worker = await new_worker(queue, ["m"])
    [req] = await queue.claim("m", worker, 1, 30)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listener:
        await listener.execute("LISTEN asyncinfer_queue")
        await queue.finish(worker, [Outcome(req.id, req.attempt, error="flaky")])
        notes = [n.payload async for n in listener.notifies(timeout=0.3)]
    assert notes == ["submit:m:1"]


async def test_a_row_locked_by_another_session_is_skipped_not_waited_for(
    queue: Queue, db: psycopg.Connection, database_url: str
) -> None:
    await queue.upsert_model("m", capacity=3)
    await queue.submit("m", [{"model_input": i} for i in range(3)])
    worker = await new_worker(queue, ["m"])
    claimed = await queue.claim("m", worker, 3, 30)
    locked = claimed[0]
    with psycopg.connect(database_url) as admin:  # an admin's open transaction holding one running row
        admin.execute("SELECT 1 FROM asyncinfer.requests WHERE id = %s FOR UPDATE", (locked.id,))
        renewed = await asyncio.wait_for(
            queue.renew_leases(worker, [(c.id, c.attempt) for c in claimed], 30), timeout=5)
        assert renewed == {c.id: False for c in claimed}  # the locked one is still ours, not lost
        finished = await asyncio.wait_for(
            queue.finish(worker, [Outcome(c.id, c.attempt, output=c.model_input) for c in claimed]), timeout=5)
        assert {(f.id, f.state) for f in finished} == {
            (locked.id, None), (claimed[1].id, "SUCCEEDED"), (claimed[2].id, "SUCCEEDED")}
        admin.rollback()
    [again] = await queue.finish(worker, [Outcome(locked.id, locked.attempt, output=0)])
    assert again.state == "SUCCEEDED"
    assert states(db) == {"SUCCEEDED": 3} and in_flight(db, "m") == 0
    # a refused outcome (not this worker's any more) is still simply absent
    assert await queue.finish(worker, [Outcome(locked.id, locked.attempt, output=0)]) == []
