"""GET /v1/dashboard/summary and the page's static files, over HTTP against
the real server: admin only, numbers that agree with the seeded traffic and
with the API's own queue status."""

from __future__ import annotations

import httpx

from tests.api.helpers import ApiServer, assert_error
from tests.dashboard.conftest import Seeded, touch_worker


def _model(summary: dict, name: str) -> dict:
    found = [m for m in summary["models"] if m["model"] == name]
    assert len(found) == 1, [m["model"] for m in summary["models"]]
    return found[0]


def test_summary_needs_an_admin_key(dashboard_api: ApiServer, seeded: Seeded) -> None:
    with dashboard_api.client() as anonymous:
        assert_error(anonymous.get("/v1/dashboard/summary"), 401, "Authorization")
    with dashboard_api.client("ai_not-a-real-key") as unknown:
        assert_error(unknown.get("/v1/dashboard/summary"), 401, "Authorization")
    with dashboard_api.client(seeded.user_key) as user:
        body = assert_error(user.get("/v1/dashboard/summary"), 403, "Authorization")
        # the 403 says why and carries no data
        assert set(body) == {"status_code", "detail", "errors"}
        assert seeded.embed not in user.get("/v1/dashboard/summary").text


def test_summary_matches_the_seeded_traffic(dashboard_api: ApiServer, dashboard_admin: httpx.Client,
                                            seeded: Seeded) -> None:
    touch_worker(dashboard_api, seeded.worker_id)
    response = dashboard_admin.get("/v1/dashboard/summary")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    s = response.json()
    assert s["window_seconds"] == 3600
    assert s["throughput_bucket_seconds"] == 60 and s["time_in_queue_bucket_seconds"] == 300

    embed = _model(s, seeded.embed)
    status = dashboard_admin.get(f"/v1/models/{seeded.embed}/async_queue_status").json()
    # seeded: 2 at priority 0, 1 at 1, 2 at 2; the page test adds one at priority 1 (either order)
    assert embed["queued"] == status["num_queued_requests"] in (5, 6)
    assert embed["queued_by_priority"] == status["queued_by_priority"]
    assert embed["queued_by_priority"] == {"-1": 0, "0": 2, "1": embed["queued"] - 4, "2": 2}
    assert embed["in_progress"] == status["num_in_progress_requests"] == 2
    assert embed["capacity"] == 4 and embed["in_flight"] == 2 and embed["paused"] is False
    assert embed["oldest_queued_age_seconds"] is not None and embed["oldest_queued_age_seconds"] >= 0
    assert embed["last_hour"] == {"succeeded": seeded.succeeded[seeded.embed], "failed": len(seeded.failed_ids),
                                  "expired": 0, "canceled": 0}
    assert len(seeded.failed_ids) == 6

    # throughput: 60 one-minute buckets whose sums are the hour's counts
    tp = embed["throughput"]
    assert len(tp["t"]) == 60 and all(b - a == 60 for a, b in zip(tp["t"], tp["t"][1:]))
    assert sum(tp["succeeded"]) == embed["last_hour"]["succeeded"]
    assert sum(tp["failed"]) == len(seeded.failed_ids)
    assert sum(1 for n in tp["succeeded"] if n) > 10  # the history is spread over the hour
    finished = seeded.succeeded[seeded.embed] + len(seeded.failed_ids)
    assert embed["throughput_per_minute"] == round(finished / 60, 3)

    # time in queue: 12 five-minute buckets, p50 <= p95 where anything started
    tq = embed["time_in_queue"]
    assert len(tq["t"]) == 12 and all(b - a == 300 for a, b in zip(tq["t"], tq["t"][1:]))
    filled = [(p50, p95) for p50, p95, n in zip(tq["p50_ms"], tq["p95_ms"], tq["started"]) if n]
    assert len(filled) >= 5
    assert all(p50 is not None and p95 is not None and 0 <= p50 <= p95 for p50, p95 in filled)
    assert all(p is None for p, n in zip(tq["p50_ms"], tq["started"]) if not n)
    # the running requests started within the window count too
    assert sum(tq["started"]) >= 2

    transcribe = _model(s, seeded.transcribe)
    assert transcribe["queued"] == 3 and transcribe["queued_by_priority"]["1"] == 3
    assert transcribe["last_hour"]["expired"] == 1
    assert transcribe["last_hour"]["succeeded"] == seeded.succeeded[seeded.transcribe] == 40

    workers = {w["id"]: w for w in s["workers"]}
    alive = workers[seeded.worker_id]
    assert alive["alive"] is True and alive["held_leases"] == 2 and alive["name"] == "gpu-worker-1"
    assert alive["heartbeat_age_seconds"] < 60
    stale = workers[seeded.stale_worker_id]
    assert stale["alive"] is False and stale["heartbeat_age_seconds"] >= 290 and stale["held_leases"] == 0

    failures = {f["request_id"]: f for f in s["recent_failures"]}
    assert set(seeded.failed_ids) <= set(failures)
    assert set(seeded.expired_ids) <= set(failures)
    one = failures[seeded.failed_ids[0]]
    assert one["state"] == "FAILED" and one["model"] == seeded.embed and "out of memory" in one["error"]
    assert failures[seeded.expired_ids[0]]["state"] == "EXPIRED"
    finished_at = [f["finished_at"] for f in s["recent_failures"]]
    assert finished_at == sorted(finished_at, reverse=True)

    totals = s["totals"]
    assert totals["queued"] == sum(m["queued"] for m in s["models"])
    assert totals["failed_last_hour"] == sum(m["last_hour"]["failed"] for m in s["models"])
    assert totals["workers_alive"] >= 1 and totals["workers_unresponsive"] >= 1
    assert totals["stuck_requests"] == len(s["stuck_requests"]) == 0


def test_summary_is_in_the_openapi_document(dashboard_api: ApiServer) -> None:
    with dashboard_api.client() as client:
        spec = client.get("/schema/openapi.json").json()
    operation = spec["paths"]["/v1/dashboard/summary"]["get"]
    assert {"200", "401", "403"} <= set(operation["responses"])
    assert "/dashboard" not in spec["paths"]


def test_page_and_static_files(dashboard_api: ApiServer) -> None:
    with dashboard_api.client() as client:  # the shell needs no key: it holds no data
        page = client.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "/dashboard/static/dashboard.js" in page.text
        for name, media_type in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css"),
                                 ("uPlot.iife.min.js", "text/javascript"), ("uPlot.min.css", "text/css"),
                                 ("uPlot.LICENSE.txt", "text/plain")):
            response = client.get(f"/dashboard/static/{name}")
            assert response.status_code == 200, name
            assert response.headers["content-type"].startswith(media_type), name
        assert_error(client.get("/dashboard/static/nothing.js"), 404)
        assert client.get("/dashboard/static/..%2Fqueries.py").status_code == 404
