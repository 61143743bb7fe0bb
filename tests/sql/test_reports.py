"""Each report in sql/reports/ on seeded data, checked against numbers it must produce."""

from __future__ import annotations

import psycopg
import pytest

# One request row, written directly: the seed sets timestamps no live run could.
# Rows are inserted directly (not through submit), so each sets its own public id.
SEED = """
WITH n AS (SELECT nextval('asyncinfer.requests_id_seq') AS id)
INSERT INTO asyncinfer.requests
       (id, public_id, model, state, priority, attempt, max_attempts, initial_delay_ms, max_delay_ms,
        created_at, expires_at, started_at, finished_at, lease_owner, lease_expires_at, run_at)
SELECT n.id, asyncinfer.new_public_id(n.id), %(model)s, %(state)s::asyncinfer.request_state, %(priority)s,
        %(attempt)s, 3, 1000, 5000,
        %(base)s::timestamptz, %(base)s::timestamptz + interval '1 hour',
        %(base)s::timestamptz + make_interval(secs => %(queue_ms)s / 1000.0),
        CASE WHEN %(state)s::text IN ('QUEUED', 'IN_PROGRESS') THEN NULL
             ELSE %(base)s::timestamptz + make_interval(secs => (%(queue_ms)s + %(run_ms)s) / 1000.0) END,
        CASE WHEN %(state)s::text = 'IN_PROGRESS' THEN 1 END,
        CASE WHEN %(state)s::text = 'IN_PROGRESS' THEN now() + interval '1 minute' END,
        %(base)s::timestamptz
  FROM n
RETURNING id
"""


def seed(db: psycopg.Connection, base: str, model: str, state: str = "SUCCEEDED", queue_ms: float | None = 0,
         run_ms: float = 0, priority: int = 1, attempt: int = 1) -> int:
    if queue_ms is None:  # never started
        row = db.execute(
            "WITH n AS (SELECT nextval('asyncinfer.requests_id_seq') AS id)"
            " INSERT INTO asyncinfer.requests (id, public_id, model, state, priority, max_attempts, initial_delay_ms,"
            " max_delay_ms, created_at, expires_at, finished_at, run_at)"
            " SELECT n.id, asyncinfer.new_public_id(n.id), %s, %s::asyncinfer.request_state, %s, 3, 1000, 5000,"
            " %s::timestamptz, %s::timestamptz + interval '1 hour',"
            " CASE WHEN %s::text = 'QUEUED' THEN NULL ELSE now() END, %s::timestamptz FROM n RETURNING id",
            (model, state, priority, base, base, state, base),
        ).fetchone()
        return row[0]
    params = dict(model=model, state=state, priority=priority, attempt=attempt, base=base, queue_ms=queue_ms,
                  run_ms=run_ms)
    return db.execute(SEED, params).fetchone()[0]


@pytest.fixture
def base(db: psycopg.Connection) -> str:
    """Ten minutes past the hour, two hours ago: inside every default window."""
    return db.execute("SELECT (date_trunc('hour', now()) - interval '2 hours' + interval '10 minutes')::text").fetchone()[0]


def parse(output: str) -> list[list[str]]:
    return [line.split("|") for line in output.splitlines() if line]


def test_time_in_queue_percentiles_per_model_and_hour(db, base, run_psql) -> None:
    for ms in (100, 200, 300, 400):
        seed(db, base, "a", queue_ms=ms, run_ms=50)
    seed(db, base, "b", queue_ms=1000)
    rows = parse(run_psql("sql/reports/time_in_queue.sql"))
    assert [r[0] for r in rows] == ["a", "b"]
    model, _hour, started, p50, p95, p99, max_ms = rows[0]
    assert (started, p50, p95, p99, max_ms) == ("4", "250.0", "385.0", "397.0", "400.0")
    assert parse(run_psql("sql/reports/time_in_queue.sql", model="b"))[0][3] == "1000.0"
    assert run_psql("sql/reports/time_in_queue.sql", hours=1) == ""  # outside the window


def test_throughput_per_minute_by_state(db, base, run_psql) -> None:
    for state in ("SUCCEEDED", "SUCCEEDED", "FAILED", "CANCELED"):
        seed(db, base, "a", state=state, queue_ms=0, run_ms=1000)
    rows = parse(run_psql("sql/reports/throughput.sql", minutes=24 * 60))
    assert len(rows) == 1
    assert rows[0][2:] == ["4", "2", "1", "1", "0"]


def test_outcome_rates(db, base, run_psql) -> None:
    ids = [seed(db, base, "a", state=s, attempt=2 if s == "FAILED" else 1)
           for s in ("SUCCEEDED", "SUCCEEDED", "FAILED", "CANCELED")]
    seed(db, base, "a", state="EXPIRED", queue_ms=None)
    db.execute("INSERT INTO asyncinfer.request_events (request_id, kind, state, attempt) VALUES (%s, 'retried', 'QUEUED', 1)",
               (ids[2],))
    [row] = parse(run_psql("sql/reports/outcome_rates.sql"))
    assert row == ["a", "5", "0.4000", "0.2000", "0.2000", "0.2000", "1", "0.2000", "0.2000"]


def test_queue_overview_counts_queued_and_running_against_capacity(db, base, run_psql) -> None:
    db.execute("SELECT asyncinfer.upsert_model('a', 4)")
    db.execute("SELECT asyncinfer.upsert_model('idle', 2)")
    seed(db, base, "a", state="QUEUED", queue_ms=None, priority=0)
    seed(db, base, "a", state="QUEUED", queue_ms=None, priority=0)
    seed(db, base, "a", state="IN_PROGRESS", queue_ms=10, priority=2)
    rows = parse(run_psql("sql/reports/queue_overview.sql"))
    assert [r[:7] for r in rows] == [
        ["a", "0", "2", "0", "0", "4", "f"],
        ["a", "2", "0", "0", "1", "4", "f"],
        ["idle", "", "0", "0", "0", "2", "f"],
    ]
    assert float(rows[0][7]) >= 2 * 3600 - 10 * 60 - 5  # oldest queued: created ~1h50m ago


def test_slowest_requests_ordered_by_total_time(db, base, run_psql) -> None:
    seed(db, base, "a", queue_ms=100, run_ms=100)
    seed(db, base, "a", queue_ms=5000, run_ms=1000)
    seed(db, base, "b", queue_ms=10, run_ms=2000)
    rows = parse(run_psql("sql/reports/slowest_requests.sql", limit=2))
    assert [(r[1], r[4], r[5], r[6]) for r in rows] == [("a", "6000.0", "5000.0", "1000.0"), ("b", "2010.0", "10.0", "2000.0")]


def test_webhook_health(db, base, run_psql) -> None:
    ids = [seed(db, base, "a") for _ in range(4)]
    for request_id, (state, attempts) in zip(ids, [("SUCCEEDED", 1), ("SUCCEEDED", 3), ("FAILED", 8), ("PENDING", 2)]):
        db.execute(
            "INSERT INTO asyncinfer.deliveries (request_id, kind, target, state, attempts, created_at)"
            " VALUES (%s, 'webhook', 'https://e.com/h', %s::asyncinfer.delivery_state, %s, now() - interval '10 minutes')",
            (request_id, state, attempts))
    [row] = parse(run_psql("sql/reports/webhook_health.sql"))
    assert row[:8] == ["a", "webhook", "4", "2", "1", "1", "0.6667", "4.00"]
    assert 595 <= float(row[8]) <= 660


async def test_pipeline_runs_report(queue, db, run_psql) -> None:
    from app.queue.operations import Outcome
    from tests.queue.helpers import new_worker

    await queue.upsert_model("split", capacity=100)
    await queue.upsert_model("embed", capacity=100)
    await queue.upsert_pipeline("docs", [{"model": "split"}, {"model": "embed", "fan_out": "$"}])
    runs = await queue.submit_pipeline("docs", [{"model_input": 1}, {"model_input": 2}, {"model_input": 3}])
    worker = await new_worker(queue, ["split", "embed"])
    claimed = await queue.claim("split", worker, 10, 30)
    await queue.finish(worker, [Outcome(c.id, c.attempt, output=[c.model_input, c.model_input]) for c in claimed[:2]]
                       + [Outcome(claimed[2].id, claimed[2].attempt, error={"message": "no"}, retryable=False)])
    items = await queue.claim("embed", worker, 10, 30)
    await queue.finish(worker, [Outcome(c.id, c.attempt, output=c.model_input) for c in items])
    assert {r[0] for r in db.execute("SELECT state::text FROM asyncinfer.requests WHERE public_id = ANY(%s)",
                                     ([r.request_id for r in runs],))} == {"SUCCEEDED", "FAILED"}
    [row] = parse(run_psql("sql/reports/pipeline_runs.sql"))
    pipeline, total, succeeded, failed, canceled, expired, avg_steps = row[:7]
    assert (pipeline, total, succeeded, failed, canceled, expired) == ("docs", "3", "2", "1", "0", "0")
    assert float(avg_steps) == pytest.approx(5 / 3, abs=0.01)  # two runs ran 2 steps, one failed at its first
    p50, p95, share = (float(x) for x in row[7:10])
    assert 0 <= p50 <= p95 and 0 <= share <= 1
    assert parse(run_psql("sql/reports/pipeline_runs.sql", hours=0)) == []
