"""Health, readiness, /metrics, the OpenAPI document, a database outage
(503, never 500) and `asyncinfer serve` on the embedded PostgreSQL."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from app.db.migrate import head_revision
from tests.api.helpers import ADMIN_KEY, ApiServer, assert_error, create_database, drop_database, new_model, start_server


def test_healthz_and_readyz(api: ApiServer, api_db) -> None:
    with api.client() as client:  # no key needed
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "schema_revision": head_revision(), "head_revision": head_revision()}
        # a database behind this build's schema is not ready
        api_db.execute("UPDATE public.alembic_version SET version_num = '0001'")
        try:
            body = assert_error(client.get("/readyz"), 503, "database")
            assert body["schema_revision"] == "0001"
        finally:
            api_db.execute("UPDATE public.alembic_version SET version_num = %s", (head_revision(),))
        assert client.get("/readyz").status_code == 200


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.index("}") + 1]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


async def test_metrics_report_queue_depth_and_capacity(api: ApiServer, admin: httpx.Client, user: httpx.Client,
                                                       api_queue) -> None:
    model = new_model(admin, capacity=4, max_queue_depth=1000)
    for priority in (0, 2, 2):
        user.post(f"/v1/models/{model}/async_predict", json={"model_input": 1, "priority": priority})
    worker = await api_queue.register_worker("metrics-test", "localhost", 0, [model])
    await api_queue.claim(model, worker, 1, 30)
    with api.client() as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "asyncinfer_queue_depth", model=model, priority="2", state="QUEUED") == 2
    assert metric(text, "asyncinfer_queue_depth", model=model, priority="0", state="IN_PROGRESS") == 1
    assert metric(text, "asyncinfer_queue_depth", model=model, priority="0", state="QUEUED") is None
    assert metric(text, "asyncinfer_model_capacity", model=model) == 4
    assert metric(text, "asyncinfer_model_in_flight", model=model) == 1
    assert metric(text, "asyncinfer_model_max_queue_depth", model=model) == 1000
    assert metric(text, "asyncinfer_model_paused", model=model) == 0
    wait = metric(text, "asyncinfer_queue_head_wait_seconds", model=model, priority="2")
    assert wait is not None and wait >= 0
    assert metric(text, "asyncinfer_workers", state="alive") >= 1
    assert metric(text, "asyncinfer_api_listen_connected") == 1
    assert metric(text, "asyncinfer_api_submitted_total", model=model) == 3
    assert "# TYPE asyncinfer_queue_depth gauge" in text and text.endswith("\n")


def test_openapi_document_describes_every_route(api: ApiServer) -> None:
    with api.client() as client:
        assert client.get("/schema").status_code == 200
        spec = client.get("/schema/openapi.json").json()
    paths = spec["paths"]
    expected = {
        ("post", "/v1/models/{model}/async_predict"), ("post", "/v1/models/{model}/async_predict_batch"),
        ("get", "/v1/async_request/{request_id}"), ("delete", "/v1/async_request/{request_id}"),
        ("get", "/v1/async_request/{request_id}/output"), ("get", "/v1/async_request/{request_id}/events"),
        ("get", "/v1/models/{model}/async_queue_status"), ("post", "/v1/models/{model}/predict"),
        ("get", "/v1/models"), ("get", "/v1/models/{model}"), ("put", "/v1/models/{model}"),
        ("post", "/v1/api_keys"), ("get", "/v1/api_keys"), ("delete", "/v1/api_keys/{key_id}"),
        ("get", "/metrics"), ("get", "/healthz"), ("get", "/readyz"),
    }
    assert expected <= {(m, p) for p, item in paths.items() for m in item}
    submit = paths["/v1/models/{model}/async_predict"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/AsyncPredictBody")
    assert {"201", "400", "401", "404", "413", "415", "429", "503"} <= set(submit["responses"])
    body = spec["components"]["schemas"]["AsyncPredictBody"]
    assert body["required"] == ["model_input"] and body["additionalProperties"] is False
    priority = body["properties"]["priority"]["anyOf"][0]
    assert (priority["minimum"], priority["maximum"]) == (0, 2)
    assert spec["components"]["schemas"]["ErrorBody"]["required"] == ["status_code", "detail", "errors"]
    assert "ApiKey" in spec["components"]["securitySchemes"]
    events = paths["/v1/async_request/{request_id}/events"]["get"]
    assert {"after", "limit", "request_id"} <= {p["name"] for p in events["parameters"]}


def test_database_outage_is_503_with_retry_after(server_url: str, template_db: str, tmp_path: Path) -> None:
    url = create_database(server_url, template_db)
    server = start_server(url, tmp_path, db_timeout_seconds="1", retry_after_seconds="7")
    try:
        with server.client(ADMIN_KEY) as client:
            model = new_model(client)
            assert client.post(f"/v1/models/{model}/async_predict", json={"model_input": 1}).status_code == 201
            drop_database(server_url, url)  # terminates every connection; reconnects fail
            for method, path, body in (
                ("POST", f"/v1/models/{model}/async_predict", {"model_input": 1}),
                ("POST", f"/v1/models/{model}/async_predict_batch", {"requests": [{"model_input": 1}]}),
                ("GET", "/v1/async_request/00000000-0000-0000-0000-000000000001", None),
                ("GET", f"/v1/models/{model}/async_queue_status", None),
                ("GET", "/readyz", None),
            ):
                started = time.monotonic()
                response = client.request(method, path, json=body)
                assert_error(response, 503)
                assert response.headers["retry-after"] == "7"
                assert time.monotonic() - started < 5
            assert client.get("/healthz").status_code == 200  # the process itself is fine
    finally:
        drop_database(server_url, url)
        assert server.stop() == 0, server.log()[-3000:]


@pytest.mark.embedded
def test_serve_without_database_url_runs_embedded_postgres_and_stops_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    os.environ.pop("ASYNCINFER_DATA_DIR", None)
    server = start_server(None, tmp_path, ready_timeout=120, data_dir=str(data_dir))
    try:
        with server.client(ADMIN_KEY) as client:
            model = new_model(client)
            response = client.post(f"/v1/models/{model}/async_predict", json={"model_input": "hello"})
            assert response.status_code == 201, response.text
        pidfile = next(data_dir.rglob("postmaster.pid"))
        postmaster = int(pidfile.read_text().split()[0])
        os.kill(postmaster, 0)  # running
    finally:
        code = server.stop()
    assert code == 0, server.log()[-3000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(postmaster, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("embedded PostgreSQL still running after serve stopped")
    # and the data survived: a second start finds the request
    server = start_server(None, tmp_path, ready_timeout=120, data_dir=str(data_dir))
    try:
        with server.client(ADMIN_KEY) as client:
            status = client.get(f"/v1/async_request/{response.json()['request_id']}")
            assert status.status_code == 200 and status.json()["status"] == "QUEUED"
    finally:
        assert server.stop() == 0


def test_sigterm_stops_the_server_cleanly(api_database: str, tmp_path: Path) -> None:
    server = start_server(api_database, tmp_path)
    with psycopg.connect(api_database, autocommit=True) as db:
        def api_connections() -> int:
            return db.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'asyncinfer-api'"
                              " AND datname = current_database()").fetchone()[0]
        assert api_connections() >= 1
        before = api_connections()
        started = time.monotonic()
        assert server.stop() == 0, server.log()[-3000:]
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 5
        while api_connections() > before - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert api_connections() < before  # its pool was closed, not left to time out


def test_openapi_path_parameters_are_typed(api: ApiServer) -> None:
    with api.client() as client:
        spec = client.get("/schema/openapi.json").json()
    params = {p["name"]: p["schema"] for p in spec["paths"]["/v1/async_request/{request_id}"]["get"]["parameters"]}
    assert params["request_id"] == {"type": "string", "format": "uuid"}
    params = {p["name"]: p["schema"] for p in spec["paths"]["/v1/api_keys/{key_id}"]["delete"]["parameters"]}
    assert params["key_id"]["type"] == "integer"
