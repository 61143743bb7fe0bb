"""Pipelines in the queue core: each step a request of its model, step k+1
enqueued in the transaction that ends step k, one terminal state per run."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
import pytest

from app.queue.errors import InvalidParameter, UnknownModel, WrongState
from app.queue.operations import Outcome, Queue
from tests.queue.helpers import age_request, in_flight, new_worker


def parent(db: psycopg.Connection, public_id: UUID) -> tuple[Any, ...]:
    """(state, cancel_requested, output, error) of a run."""
    return db.execute(
        "SELECT r.state::text, r.cancel_requested, o.output, o.error FROM asyncinfer.requests r"
        " LEFT JOIN asyncinfer.request_outputs o ON o.request_id = r.id WHERE r.public_id = %s",
        (public_id,),
    ).fetchone()


def steps(db: psycopg.Connection, public_id: UUID) -> list[tuple[int, int, str, str]]:
    """(step, item, model, state) of every step request of a run."""
    return db.execute(
        "SELECT s.step, s.item, r.model, r.state::text FROM asyncinfer.pipeline_steps s"
        " JOIN asyncinfer.requests r ON r.id = s.request_id"
        " WHERE s.run_id = asyncinfer.request_id_of(%s) ORDER BY s.step, s.item",
        (public_id,),
    ).fetchall()


async def run_step(queue: Queue, worker: int, model: str, output: Any = None, error: Any = None,
                   retryable: bool = True) -> list[Any]:
    """Claim everything runnable of a model and finish it all the same way; returns the inputs."""
    claimed = await queue.claim(model, worker, 10_000, 30)
    assert claimed, f"nothing runnable on {model}"
    await queue.finish(worker, [
        Outcome(c.id, c.attempt, output=output(c.model_input) if callable(output) else output, error=error,
                retryable=retryable) for c in claimed])
    return [c.model_input for c in claimed]


@pytest.fixture
async def models(queue: Queue) -> None:
    for name in ("transcribe", "embed", "classify"):
        await queue.upsert_model(name, capacity=100)


STEPS = [
    {"model": "transcribe"},
    {"model": "embed", "input": {"text": "$.text", "lang": "$input.lang"}},
    {"model": "classify", "input": {"vector": "$.vector", "label": "$$literal"}},
]


async def test_three_steps_run_in_order_and_deliver_once(queue: Queue, db: psycopg.Connection, models: None) -> None:
    await queue.upsert_pipeline("audio", STEPS)
    [run] = await queue.submit_pipeline("audio", [{
        "model_input": {"audio": "a.wav", "lang": "fr"}, "webhook_endpoint": "https://hooks.example/x",
        "priority": 0, "metadata": {"team": "t1"}}])
    worker = await new_worker(queue, ["transcribe", "embed", "classify"])
    assert parent(db, run.request_id)[0] == "IN_PROGRESS"
    assert await queue.claim("embed", worker, 10, 30) == []  # only step 0 exists yet

    assert await run_step(queue, worker, "transcribe", {"text": "bonjour"}) == [{"audio": "a.wav", "lang": "fr"}]
    assert await run_step(queue, worker, "embed", {"vector": [1, 2]}) == [{"text": "bonjour", "lang": "fr"}]
    assert parent(db, run.request_id)[0] == "IN_PROGRESS"
    assert await run_step(queue, worker, "classify", {"label": "greeting"}) == [
        {"vector": [1, 2], "label": "$literal"}]

    assert parent(db, run.request_id) == ("SUCCEEDED", False, {"label": "greeting"}, None)
    assert [s[2:] for s in steps(db, run.request_id)] == [
        ("transcribe", "SUCCEEDED"), ("embed", "SUCCEEDED"), ("classify", "SUCCEEDED")]
    # steps inherit priority, metadata and key; only the run has a webhook
    rows = db.execute(
        "SELECT r.priority, r.deliver, i.metadata, i.webhook_endpoint FROM asyncinfer.requests r"
        " JOIN asyncinfer.request_inputs i ON i.request_id = r.id WHERE r.parent_id IS NOT NULL").fetchall()
    assert rows == [(0, False, {"team": "t1"}, None)] * 3
    deliveries = db.execute("SELECT kind, target FROM asyncinfer.deliveries").fetchall()
    assert deliveries == [("webhook", "https://hooks.example/x")]
    kinds = [k for (k,) in db.execute(
        "SELECT kind FROM asyncinfer.request_events WHERE request_id = asyncinfer.request_id_of(%s) ORDER BY id",
        (run.request_id,))]
    assert kinds == ["submitted", "step_queued", "step_queued", "step_queued", "succeeded"]
    for model in ("transcribe", "embed", "classify"):
        assert in_flight(db, model) == 0


async def test_fan_out_of_1000_items_gathers_in_order(queue: Queue, db: psycopg.Connection, models: None) -> None:
    await queue.upsert_pipeline("docs", [
        {"model": "transcribe"},
        {"model": "embed", "fan_out": "$.chunks", "input": {"chunk": "$", "doc": "$input.doc"}},
        {"model": "classify"},
    ])
    [run] = await queue.submit_pipeline("docs", [{"model_input": {"doc": "d1"}}])
    worker = await new_worker(queue, ["transcribe", "embed", "classify"])
    await run_step(queue, worker, "transcribe", {"chunks": list(range(1000))})
    assert len(steps(db, run.request_id)) == 1 + 1000

    claimed = await queue.claim("embed", worker, 2000, 30)
    assert len(claimed) == 100  # the model's capacity holds for fan-out items too
    done = 0
    while claimed:
        # finish out of order: reversed, in two halves
        half = len(claimed) // 2
        for part in (claimed[half:][::-1], claimed[:half][::-1]):
            await queue.finish(worker, [Outcome(c.id, c.attempt, output=c.model_input["chunk"] * 2) for c in part])
        done += len(claimed)
        assert parent(db, run.request_id)[0] == "IN_PROGRESS"
        if done < 1000:
            assert await queue.claim("classify", worker, 10, 30) == []  # gather waits for the last item
        claimed = await queue.claim("embed", worker, 2000, 30)
    assert done == 1000
    [gathered] = await run_step(queue, worker, "classify", lambda x: {"n": len(x), "head": x[:3]})
    assert gathered == [i * 2 for i in range(1000)]
    assert parent(db, run.request_id)[:3] == ("SUCCEEDED", False, {"n": 1000, "head": [0, 2, 4]})


async def test_failing_middle_step_fails_the_run_naming_the_step(
    queue: Queue, db: psycopg.Connection, models: None
) -> None:
    await queue.upsert_pipeline("audio", STEPS)
    [run] = await queue.submit_pipeline("audio", [{
        "model_input": {"lang": "en"}, "webhook_endpoint": "https://hooks.example/x",
        "inference_retry_config": {"max_attempts": 2, "initial_delay_ms": 0}}])
    worker = await new_worker(queue, ["transcribe", "embed", "classify"])
    await run_step(queue, worker, "transcribe", {"text": "hi"})
    await run_step(queue, worker, "embed", error={"message": "cuda oom"})  # attempt 1: retried
    assert parent(db, run.request_id)[0] == "IN_PROGRESS"
    await run_step(queue, worker, "embed", error={"message": "cuda oom"})  # attempt 2 of 2: FAILED
    state, _, output, error = parent(db, run.request_id)
    assert state == "FAILED" and output is None
    step_id = db.execute("SELECT public_id FROM asyncinfer.requests WHERE model = 'embed'").fetchone()[0]
    assert error["type"] == "step_failed" and error["step"] == 1 and error["model"] == "embed"
    assert error["request_id"] == str(step_id) and error["error"] == {"message": "cuda oom"}
    assert [s[2:] for s in steps(db, run.request_id)] == [("transcribe", "SUCCEEDED"), ("embed", "FAILED")]
    assert db.execute("SELECT kind FROM asyncinfer.deliveries").fetchall() == [("webhook",)]


async def test_cancel_while_a_step_is_queued_ends_the_run_at_once(
    queue: Queue, db: psycopg.Connection, models: None
) -> None:
    await queue.upsert_pipeline("audio", STEPS)
    [run] = await queue.submit_pipeline("audio", [{"model_input": {}}])
    worker = await new_worker(queue, ["transcribe", "embed"])
    await run_step(queue, worker, "transcribe", {"text": "x"})
    result = await queue.cancel(run.request_id)
    assert (result.state, result.changed) == ("CANCELED", True)
    assert parent(db, run.request_id)[0] == "CANCELED"
    assert [s[2:] for s in steps(db, run.request_id)] == [("transcribe", "SUCCEEDED"), ("embed", "CANCELED")]
    assert await queue.claim("embed", worker, 10, 30) == []
    again = await queue.cancel(run.request_id)
    assert (again.state, again.changed) == ("CANCELED", False)


async def test_cancel_while_a_step_runs_stops_the_run_after_that_step(
    queue: Queue, db: psycopg.Connection, models: None
) -> None:
    await queue.upsert_pipeline("audio", STEPS)
    [run] = await queue.submit_pipeline("audio", [{"model_input": {}}])
    worker = await new_worker(queue, ["transcribe", "embed"])
    [claimed] = await queue.claim("transcribe", worker, 10, 30)
    result = await queue.cancel(run.request_id)
    assert (result.state, result.cancel_requested, result.changed) == ("IN_PROGRESS", True, True)
    renewed = await queue.renew_leases(worker, [(claimed.id, claimed.attempt)], 30)
    assert renewed == {claimed.id: True}  # the worker is told to stop
    # it finishes anyway: the step ends CANCELED (a cancel was pending), and so does the run
    await queue.finish(worker, [Outcome(claimed.id, claimed.attempt, output={"text": "late"})])
    assert parent(db, run.request_id)[0] == "CANCELED"
    assert [s[2:] for s in steps(db, run.request_id)] == [("transcribe", "CANCELED")]
    assert in_flight(db, "transcribe") == 0


async def test_a_failed_fan_out_item_stops_its_siblings(queue: Queue, db: psycopg.Connection, models: None) -> None:
    await queue.upsert_model("embed", capacity=2)
    await queue.upsert_pipeline("fan", [{"model": "embed", "fan_out": "$"}])
    [run] = await queue.submit_pipeline("fan", [{"model_input": [1, 2, 3, 4],
                                                 "inference_retry_config": {"max_attempts": 1}}])
    worker = await new_worker(queue, ["embed"])
    first, second = await queue.claim("embed", worker, 10, 30)
    await queue.finish(worker, [Outcome(first.id, first.attempt, error={"message": "bad"}, retryable=False)])
    assert parent(db, run.request_id)[0] == "FAILED"
    assert [s[3] for s in steps(db, run.request_id)] == ["FAILED", "IN_PROGRESS", "CANCELED", "CANCELED"]
    assert db.execute("SELECT cancel_requested FROM asyncinfer.requests WHERE id = %s",
                      (second.id,)).fetchone() == (True,)
    # the sibling's late success changes nothing of the run
    await queue.finish(worker, [Outcome(second.id, second.attempt, output=2)])
    assert parent(db, run.request_id)[0] == "FAILED"
    assert in_flight(db, "embed") == 0


async def test_lost_lease_on_a_step_is_retried_then_the_run_goes_on(
    queue: Queue, db: psycopg.Connection, models: None
) -> None:
    await queue.upsert_pipeline("audio", STEPS[:2])
    [run] = await queue.submit_pipeline("audio", [{"model_input": {}}])
    dead = await new_worker(queue, ["transcribe"], name="dead")
    [claimed] = await queue.claim("transcribe", dead, 10, 30)
    age_request(db, claimed.id, lease_expired=True)
    await queue.run_maintenance()
    age_request(db, claimed.id, run_now=True)
    alive = await new_worker(queue, ["transcribe", "embed"], name="alive")
    await run_step(queue, alive, "transcribe", {"text": "t"})
    # the dead worker's late finish is refused: the run does not advance twice
    assert await queue.finish(dead, [Outcome(claimed.id, claimed.attempt, output={"text": "zombie"})]) == []
    assert await run_step(queue, alive, "embed", "e") == [{"text": "t", "lang": None}]
    assert parent(db, run.request_id)[:3] == ("SUCCEEDED", False, "e")
    assert len(steps(db, run.request_id)) == 2


async def test_expired_steps_end_the_run(queue: Queue, db: psycopg.Connection, models: None) -> None:
    await queue.upsert_pipeline("audio", STEPS)
    first, second = await queue.submit_pipeline("audio", [{"model_input": 1}, {"model_input": 2}])
    worker = await new_worker(queue, ["transcribe", "embed"])
    step0_of_first = db.execute("SELECT id FROM asyncinfer.requests WHERE parent_id = asyncinfer.request_id_of(%s)",
                                (first.request_id,)).fetchone()[0]
    db.execute("UPDATE asyncinfer.requests SET created_at = now() - interval '1 minute',"
               " expires_at = now() - interval '50 seconds' WHERE id = %s", (step0_of_first,))
    await run_step(queue, worker, "transcribe", {"text": "2"})  # expires the first run's step 0, runs the second's
    assert parent(db, first.request_id)[0] == "EXPIRED"  # nothing of it ever ran
    db.execute("UPDATE asyncinfer.requests SET created_at = now() - interval '1 minute',"
               " expires_at = now() - interval '50 seconds' WHERE model = 'embed'")
    await queue.run_maintenance()
    state, _, _, error = parent(db, second.request_id)
    assert state == "FAILED" and error["type"] == "step_expired" and error["step"] == 1


async def test_admin_purge_of_a_step_model_in_psql_ends_its_runs(
    queue: Queue, db: psycopg.Connection, models: None
) -> None:
    await queue.upsert_pipeline("audio", STEPS)
    runs = await queue.submit_pipeline("audio", [{"model_input": i} for i in range(3)])
    assert db.execute("SELECT asyncinfer.purge_queue('transcribe')").fetchone() == (3,)
    assert {parent(db, r.request_id)[0] for r in runs} == {"CANCELED"}


async def test_fan_out_edge_cases(queue: Queue, db: psycopg.Connection, models: None) -> None:
    await queue.upsert_pipeline("fan", [{"model": "transcribe", "fan_out": "$.items"}, {"model": "embed"}])
    empty, scalar = await queue.submit_pipeline("fan", [{"model_input": {"items": []}},
                                                         {"model_input": {"items": 5}}])
    worker = await new_worker(queue, ["embed"])
    # an empty list skips the step: the next one gets []
    assert await run_step(queue, worker, "embed", "done") == [[]]
    assert parent(db, empty.request_id)[:3] == ("SUCCEEDED", False, "done")
    state, _, _, error = parent(db, scalar.request_id)
    assert state == "FAILED" and error["type"] == "fan_out_not_a_list"


async def test_parent_rows_are_never_claimed_requeued_or_counted(
    queue: Queue, db: psycopg.Connection, models: None
) -> None:
    await queue.upsert_pipeline("audio", STEPS)
    [run] = await queue.submit_pipeline("audio", [{"model_input": 1}])
    with pytest.raises(WrongState, match="pipeline run"):
        await queue.requeue(run.request_id)
    await queue.run_maintenance()
    assert await queue.reconcile_capacity() == []
    assert parent(db, run.request_id)[0] == "IN_PROGRESS"
    assert db.execute("SELECT count(*) FROM asyncinfer.stuck_requests").fetchone() == (0,)  # a run is not stuck
    with pytest.raises(psycopg.errors.CheckViolation):  # a parent never holds a lease
        db.execute("UPDATE asyncinfer.requests SET lease_owner = 1, lease_expires_at = now()"
                   " WHERE public_id = %s", (run.request_id,))
    # a step can be requeued like any request; the run waits for it
    step = db.execute("SELECT public_id FROM asyncinfer.requests WHERE parent_id IS NOT NULL").fetchone()[0]
    assert await queue.requeue(step) == "QUEUED"


async def test_submit_rules(queue: Queue, db: psycopg.Connection, models: None) -> None:
    with pytest.raises(UnknownModel, match="unknown pipeline"):
        await queue.submit_pipeline("nope", [{"model_input": 1}])
    with pytest.raises(UnknownModel, match=r"model ghost: unknown model \(pipeline inline, steps\[1\]\)"):
        await queue.submit_pipeline("inline", [{"model_input": 1}], steps=[{"model": "embed"}, {"model": "ghost"}])
    with pytest.raises(InvalidParameter, match=r"steps\[0\]\.input: \"\$nope\" is not a JSON path"):
        await queue.upsert_pipeline("p", [{"model": "embed", "input": {"a": ["$nope"]}}])
    with pytest.raises(InvalidParameter, match=r"steps\[0\]\.fan_out: must be a JSON path"):
        await queue.upsert_pipeline("p", [{"model": "embed", "fan_out": 3}])
    with pytest.raises(InvalidParameter, match=r"steps: must be an array of 1 to 32 steps"):
        await queue.upsert_pipeline("p", [])
    # idempotent submit: one run per key
    await queue.upsert_pipeline("audio", STEPS)
    a = await queue.submit_pipeline("audio", [{"model_input": 1, "idempotency_key": "k"}])
    b = await queue.submit_pipeline("audio", [{"model_input": 2, "idempotency_key": "k"}])
    assert a[0].request_id == b[0].request_id and (a[0].created, b[0].created) == (True, False)
    assert db.execute("SELECT count(*) FROM asyncinfer.pipeline_runs").fetchone() == (1,)
    # inline pipelines run the same way
    [inline] = await queue.submit_pipeline("adhoc", [{"model_input": "x"}], steps=[{"model": "classify"}])
    worker = await new_worker(queue, ["classify"])
    await run_step(queue, worker, "classify", "y")
    assert parent(db, inline.request_id)[:3] == ("SUCCEEDED", False, "y")


async def test_queue_depth_of_the_first_step_applies(queue: Queue, db: psycopg.Connection, models: None) -> None:
    from app.queue.errors import QueueFull

    await queue.upsert_model("transcribe", max_queue_depth=2)
    await queue.upsert_pipeline("audio", STEPS)
    await queue.submit_pipeline("audio", [{"model_input": 1}, {"model_input": 2}])
    with pytest.raises(QueueFull):
        await queue.submit_pipeline("audio", [{"model_input": 3}])


async def test_retention_prunes_run_bookkeeping(queue: Queue, db: psycopg.Connection, models: None) -> None:
    await queue.upsert_pipeline("one", [{"model": "embed"}])
    await queue.submit_pipeline("one", [{"model_input": 1}])
    worker = await new_worker(queue, ["embed"])
    await run_step(queue, worker, "embed", 2)
    db.execute("UPDATE asyncinfer.requests SET finished_at = finished_at - interval '8 days'")
    assert (await queue.prune_finished(7 * 86400, 7 * 86400))[0] == 2
    for table in ("requests", "pipeline_runs", "pipeline_steps"):
        assert db.execute(f"SELECT count(*) FROM asyncinfer.{table}").fetchone() == (0,)


async def test_a_run_whose_step_vanished_is_ended_by_maintenance(
    queue: Queue, db: psycopg.Connection, models: None
) -> None:
    await queue.upsert_pipeline("audio", STEPS)
    stalled, healthy = await queue.submit_pipeline("audio", [{"model_input": 1}, {"model_input": 2}])
    db.execute("UPDATE asyncinfer.requests SET created_at = now() - interval '1 minute',"
               " expires_at = now() + interval '5 minutes' WHERE parent_id IS NULL")
    # an admin deletes a step row by hand: nothing would ever move its run
    db.execute("DELETE FROM asyncinfer.requests WHERE parent_id = asyncinfer.request_id_of(%s)", (stalled.request_id,))
    result = await queue.run_maintenance()
    assert result.reconciled == 1
    state, _, _, error = parent(db, stalled.request_id)
    assert state == "FAILED" and error["type"] == "pipeline_stalled" and error["step"] == 0
    assert parent(db, healthy.request_id)[0] == "IN_PROGRESS"  # its step is still queued
    assert (await queue.run_maintenance()).reconciled == 0


async def test_stored_steps_stay_valid_whoever_writes_them(queue: Queue, db: psycopg.Connection, models: None) -> None:
    """Advancing relies on valid steps: a raw UPDATE at psql cannot store bad ones."""
    await queue.upsert_pipeline("audio", STEPS)
    await queue.submit_pipeline("audio", [{"model_input": 1}])
    for table, where in (("pipelines", "name = 'audio'"), ("pipeline_runs", "true")):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"steps\[0\]\.fan_out"):
            db.execute(f"UPDATE asyncinfer.{table} SET steps = '[{{\"model\": \"embed\", \"fan_out\": \"$[\"}}]'"
                       f" WHERE {where}")
