"""The psql recipes in sql/admin/ keep the invariants the API keeps."""

from __future__ import annotations

import psycopg
import pytest

from app.queue.operations import Outcome, Queue
from tests.queue.helpers import in_flight, new_worker, states


async def test_cancel_recipe_cancels_queued_and_flags_running(queue: Queue, db: psycopg.Connection, run_psql) -> None:
    await queue.upsert_model("m", capacity=1)
    queued, running = await queue.submit("m", [{"model_input": 1, "priority": 2}, {"model_input": 2, "priority": 0}])
    worker = await new_worker(queue, ["m"])
    [claimed] = await queue.claim("m", worker, 1, 30)
    assert run_psql("sql/admin/cancel_request.sql", request_id=queued.request_id) == "CANCELED|f|t"
    assert run_psql("sql/admin/cancel_request.sql", request_id=running.request_id) == "IN_PROGRESS|t|t"
    [done] = await queue.finish(worker, [Outcome(claimed.id, claimed.attempt, output="x")])
    assert done.state == "CANCELED"
    assert states(db) == {"CANCELED": 2} and in_flight(db, "m") == 0


async def test_requeue_recipe_rescues_a_stuck_request_and_fences_its_worker(
    queue: Queue, db: psycopg.Connection, run_psql
) -> None:
    await queue.upsert_model("m", capacity=1)
    [sub] = await queue.submit("m", [{"model_input": 1}])
    stuck = await new_worker(queue, ["m"], "stuck")
    [req] = await queue.claim("m", stuck, 1, 3600)
    assert run_psql("sql/admin/requeue_request.sql", request_id=sub.request_id) == "QUEUED"
    assert in_flight(db, "m") == 0
    healthy = await new_worker(queue, ["m"], "healthy")
    [again] = await queue.claim("m", healthy, 1, 30)
    assert again.attempt == req.attempt + 1
    assert await queue.finish(stuck, [Outcome(req.id, req.attempt, output="late")]) == []
    assert [f.state for f in await queue.finish(healthy, [Outcome(again.id, again.attempt, output="ok")])] == [
        "SUCCEEDED"
    ]


async def test_requeue_recipe_refuses_terminal_requests(queue: Queue, run_psql) -> None:
    await queue.upsert_model("m")
    [sub] = await queue.submit("m", [{"model_input": 1}])
    await queue.cancel(sub.request_id)
    with pytest.raises(AssertionError, match="terminal"):
        run_psql("sql/admin/requeue_request.sql", request_id=sub.request_id)


async def test_capacity_pause_resume_recipes(queue: Queue, db: psycopg.Connection, run_psql) -> None:
    await queue.upsert_model("m", capacity=1)
    await queue.submit("m", [{"model_input": i} for i in range(5)])
    worker = await new_worker(queue, ["m"])
    assert run_psql("sql/admin/set_capacity.sql", model="m", capacity=3) == "m|3|0|f"
    assert len(await queue.claim("m", worker, 10, 30)) == 3
    assert run_psql("sql/admin/pause_model.sql", model="m") == "m|3|3|t"
    assert run_psql("sql/admin/set_capacity.sql", model="m", capacity=5) == "m|5|3|t"
    assert await queue.claim("m", worker, 10, 30) == []
    assert run_psql("sql/admin/resume_model.sql", model="m") == "m|5|3|f"
    assert len(await queue.claim("m", worker, 10, 30)) == 2
    with pytest.raises(AssertionError, match="capacity: must be"):
        run_psql("sql/admin/set_capacity.sql", model="m", capacity=-1)


async def test_purge_and_reconcile_and_maintenance_recipes(queue: Queue, db: psycopg.Connection, run_psql) -> None:
    await queue.upsert_model("m", capacity=2)
    await queue.submit("m", [{"model_input": i} for i in range(6)])
    worker = await new_worker(queue, ["m"])
    await queue.claim("m", worker, 2, 30)
    assert run_psql("sql/admin/purge_queue.sql", model="m") == "4"
    assert states(db) == {"CANCELED": 4, "IN_PROGRESS": 2}
    db.execute("UPDATE asyncinfer.models SET in_flight = 0 WHERE name = 'm'")
    assert run_psql("sql/admin/reconcile_capacity.sql") == "m|0|2"
    assert in_flight(db, "m") == 2
    assert run_psql("sql/admin/run_maintenance.sql") == "t|0|0|0|0"


async def test_pipeline_recipes_declare_show_and_cancel(queue: Queue, db: psycopg.Connection, run_psql) -> None:
    await queue.upsert_model("split", capacity=1)
    await queue.upsert_model("embed", capacity=2)
    steps = '[{"model": "split"}, {"model": "embed", "fan_out": "$.chunks"}]'
    assert run_psql("sql/admin/upsert_pipeline.sql", name="docs", steps=steps).startswith("docs|2|")
    with pytest.raises(AssertionError, match=r"steps\[0\]\.fan_out"):
        run_psql("sql/admin/upsert_pipeline.sql", name="bad", steps='[{"model": "split", "fan_out": "nope"}]')
    [run] = await queue.submit_pipeline("docs", [{"model_input": 1}])
    worker = await new_worker(queue, ["split", "embed"])
    [claimed] = await queue.claim("split", worker, 1, 30)
    await queue.finish(worker, [Outcome(claimed.id, claimed.attempt, output={"chunks": ["a", "b", "c"]})])
    await queue.claim("embed", worker, 10, 30)  # two of the three items run (capacity 2)
    rows = [line.split("|") for line in run_psql("sql/admin/pipeline_status.sql", request_id=run.request_id).splitlines()]
    assert [r[:10] for r in rows] == [["0", "split", "f", "1", "0", "0", "1", "0", "0", "0"],
                                      ["1", "embed", "t", "3", "1", "2", "0", "0", "0", "0"]]
    # cancel from psql: the queued item ends CANCELED at once, and with it the run; the running items are told to stop
    assert run_psql("sql/admin/cancel_request.sql", request_id=run.request_id) == "CANCELED|t|t"
    assert db.execute("SELECT count(*) FROM asyncinfer.requests WHERE model = 'embed' AND cancel_requested"
                      ).fetchone() == (2,)
    held = [(r[0], r[1]) for r in db.execute(
        "SELECT id, attempt FROM asyncinfer.requests WHERE model = 'embed' AND state = 'IN_PROGRESS'").fetchall()]
    await queue.finish(worker, [Outcome(i, a, canceled=True) for i, a in held])
    assert db.execute("SELECT state::text FROM asyncinfer.requests WHERE public_id = %s",
                      (run.request_id,)).fetchone() == ("CANCELED",)
    assert states(db) == {"SUCCEEDED": 1, "CANCELED": 4}  # the run, split, and the three items
    assert in_flight(db, "embed") == 0
