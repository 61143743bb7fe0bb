"""Authentication, admin-only routes, model administration and API keys
(over HTTP and through `asyncinfer keys`)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.api.helpers import REPO, ApiServer, assert_error, new_key, new_model

ADMIN_ROUTES = [("GET", "/v1/models", None), ("GET", "/v1/models/any", None),
                ("PUT", "/v1/models/any", {"capacity": 1}), ("GET", "/v1/api_keys", None),
                ("POST", "/v1/api_keys", {"name": "x"}), ("DELETE", "/v1/api_keys/1", None)]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_admin_routes_need_an_admin_key(api: ApiServer, user: httpx.Client, method: str, path: str,
                                        body: object) -> None:
    assert_error(user.request(method, path, json=body), 403, "Authorization")
    with api.client() as anonymous:
        response = anonymous.request(method, path, json=body)
        assert_error(response, 401, "Authorization")
        assert response.headers["www-authenticate"] == "Api-Key"


def test_missing_malformed_and_unknown_keys_are_401(api: ApiServer, model: str) -> None:
    for header in (None, "", "Api-Key", "Basic dXNlcjpwdw==", "Api-Key not-a-real-key", "Api-Key " + "k" * 600):
        headers = {"Authorization": header} if header is not None else {}
        with api.client(headers=headers) as client:
            response = client.post(f"/v1/models/{model}/async_predict", json={"model_input": 1})
            assert_error(response, 401, "Authorization")
            assert_error(client.get("/v1/async_request/00000000-0000-0000-0000-000000000001"), 401)


def test_models_are_created_changed_and_listed(admin: httpx.Client) -> None:
    name = new_model(admin, capacity=2)
    model = admin.get(f"/v1/models/{name}").json()
    assert model["name"] == name and model["capacity"] == 2 and model["in_flight"] == 0
    assert model["paused"] is False and model["max_queue_depth"] is None and model["defaults"] == {}

    changed = admin.put(f"/v1/models/{name}", json={
        "paused": True, "max_queue_depth": 100,
        "defaults": {"priority": 2, "max_time_in_queue_seconds": 30, "output_url": "s3://bucket/out/",
                     "inference_retry_config": {"max_attempts": 4, "initial_delay_ms": 50}}})
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["capacity"] == 2 and body["paused"] is True and body["max_queue_depth"] == 100
    assert body["defaults"] == {"priority": 2, "max_time_in_queue_seconds": 30, "output_url": "s3://bucket/out/",
                                "inference_retry_config": {"max_attempts": 4, "initial_delay_ms": 50}}
    # absent fields are kept; null clears
    body = admin.put(f"/v1/models/{name}", json={"capacity": 5, "max_queue_depth": None,
                                                 "defaults": {"priority": None}}).json()
    assert body["capacity"] == 5 and body["paused"] is True and body["max_queue_depth"] is None
    assert body["defaults"] == {"max_time_in_queue_seconds": 30, "output_url": "s3://bucket/out/",
                                "inference_retry_config": {"max_attempts": 4, "initial_delay_ms": 50}}
    body = admin.put(f"/v1/models/{name}", json={"paused": False, "defaults": {"inference_retry_config": None}}).json()
    assert body["paused"] is False and "inference_retry_config" not in body["defaults"]

    names = [m["name"] for m in admin.get("/v1/models").json()["models"]]
    assert name in names and names == sorted(names)
    assert_error(admin.get("/v1/models/never-created"), 404, "model")


@pytest.mark.parametrize(("body", "field"), [
    ({"capacity": -1}, "capacity"),
    ({"capacity": "many"}, "capacity"),
    ({"paused": "yes"}, "paused"),
    ({"max_queue_depth": -5}, "max_queue_depth"),
    ({"defaults": {"priority": 3}}, "defaults.priority"),
    ({"defaults": {"max_time_in_queue_seconds": 1}}, "defaults.max_time_in_queue_seconds"),
    ({"defaults": {"output_url": "ftp://x"}}, "defaults.output_url"),
    ({"defaults": {"inference_retry_config": {"max_delay_ms": -1}}}, "defaults.inference_retry_config.max_delay_ms"),
    ({"capcity": 1}, "capcity"),
])
def test_bad_model_changes_name_the_field(admin: httpx.Client, model: str, body: object, field: str) -> None:
    assert_error(admin.put(f"/v1/models/{model}", json=body), 400, field)


def test_bad_model_names_are_refused(admin: httpx.Client) -> None:
    assert_error(admin.put("/v1/models/has space", json={"capacity": 1}), 400, "model")
    assert_error(admin.put("/v1/models/-dash-first", json={"capacity": 1}), 400, "model")


def test_api_keys_are_created_listed_and_revoked_at_once(api: ApiServer, admin: httpx.Client, model: str) -> None:
    created = admin.post("/v1/api_keys", json={"name": "ci runner"})
    assert created.status_code == 201, created.text
    key = created.json()
    assert key["key"].startswith("ai_") and len(key["key"]) > 40
    assert key["prefix"] == key["key"][:10] and key["is_admin"] is False and key["name"] == "ci runner"
    listed = admin.get("/v1/api_keys").json()["api_keys"]
    mine = next(k for k in listed if k["id"] == key["id"])
    assert "key" not in mine and mine["prefix"] == key["prefix"]
    assert key["key"] not in admin.get("/v1/api_keys").text

    with api.client(key["key"]) as client:
        assert client.post(f"/v1/models/{model}/async_predict", json={"model_input": 1}).status_code == 201
        assert_error(client.get("/v1/models"), 403)  # not an admin
        revoked = admin.delete(f"/v1/api_keys/{key['id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        # cached in the API process a moment ago; the revoke's NOTIFY drops it at once
        assert_error(client.post(f"/v1/models/{model}/async_predict", json={"model_input": 1}), 401)
    assert_error(admin.delete("/v1/api_keys/999999999"), 404, "key_id")
    assert_error(admin.delete("/v1/api_keys/abc"), 400, "key_id")
    assert_error(admin.post("/v1/api_keys", json={"name": ""}), 400, "name")
    assert_error(admin.post("/v1/api_keys", json={"name": "x", "is_admin": "yes"}), 400, "is_admin")


def test_stored_admin_keys_work_like_the_bootstrap_key(api: ApiServer, admin: httpx.Client,
                                                        user: httpx.Client, model: str) -> None:
    _, key = new_key(admin, "ops", is_admin=True)
    request_id = user.post(f"/v1/models/{model}/async_predict", json={"model_input": 1}).json()["request_id"]
    with api.client(key) as ops:
        assert ops.get("/v1/models").status_code == 200
        assert ops.get(f"/v1/async_request/{request_id}").status_code == 200  # admins see every request
        assert ops.delete(f"/v1/async_request/{request_id}").status_code == 200


def run_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DATABASE_URL=database_url, ASYNCINFER_LOG_LEVEL="WARNING")
    return subprocess.run([sys.executable, "-m", "app.cli", "keys", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_keys_cli_creates_lists_and_revokes(api: ApiServer, model: str) -> None:
    assert api.database_url
    created = run_cli(api.database_url, "create", "--name", "from the cli")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("ai_") and "\n" not in key  # the key alone on stdout, once
    assert "shown only now" in created.stderr
    with api.client(key) as client:
        assert client.post(f"/v1/models/{model}/async_predict", json={"model_input": 1}).status_code == 201
        assert_error(client.get("/v1/models"), 403)

        listed = run_cli(api.database_url, "list")
        assert listed.returncode == 0, listed.stderr
        line = next(ln for ln in listed.stdout.splitlines() if "from the cli" in ln)
        assert key[:10] in line and key not in listed.stdout and "active" in line
        key_id = line.split()[0]

        revoked = run_cli(api.database_url, "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        assert_error(client.post(f"/v1/models/{model}/async_predict", json={"model_input": 1}), 401)
    assert "revoked" in run_cli(api.database_url, "list").stdout
    assert run_cli(api.database_url, "revoke", "987654321").returncode == 1

    admin_key = run_cli(api.database_url, "create", "--name", "cli admin", "--admin").stdout.strip()
    with api.client(admin_key) as client:
        assert client.get("/v1/models").status_code == 200
        assert new_model(client)
