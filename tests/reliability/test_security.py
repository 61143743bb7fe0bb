"""Security: key isolation, hashed keys, immediate revocation, admin-only
routes, webhook SSRF refusal (literal addresses, host names that resolve to
private addresses, DNS that changes between check and call), no secrets or
inputs in any log, SQL injection through every free-text input."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import re
import socket
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest

from app.api.validation import UrlChecker
from app.api.errors import ApiError
from app.delivery.dispatcher import Dispatcher
from app.queue.operations import DueDelivery
from app.settings import Settings
from tests.api.helpers import ApiServer, assert_error, new_key, new_model
from tests.reliability.helpers import Procs, Receiver, flaky_toml, wait_drained, wait_workers_healthy

ADMIN_ROUTES = [
    ("GET", "/v1/models", None), ("GET", "/v1/models/{model}", None), ("PUT", "/v1/models/{model}", {"capacity": 1}),
    ("POST", "/v1/api_keys", {"name": "x"}), ("GET", "/v1/api_keys", None), ("DELETE", "/v1/api_keys/1", None),
    ("POST", "/v1/async_request/{rid}/redeliver", None), ("POST", "/v1/models/{model}/redeliver_failed", None),
    ("POST", "/v1/webhook_secrets", None), ("GET", "/v1/webhook_secrets", None),
    ("DELETE", "/v1/webhook_secrets/1", None),
]


@pytest.fixture(scope="module")
def admin(shared_api: ApiServer) -> Any:
    with shared_api.client(shared_api.admin_key) as client:
        yield client


def test_a_key_sees_only_its_own_requests(shared_api: ApiServer, admin: httpx.Client) -> None:
    model = new_model(admin)
    _, alice_key = new_key(admin, "alice")
    _, bob_key = new_key(admin, "bob")
    with shared_api.client(alice_key) as alice, shared_api.client(bob_key) as bob:
        rid = alice.post(f"/v1/models/{model}/async_predict", json={"model_input": "alice's"}).json()["request_id"]
        assert alice.get(f"/v1/async_request/{rid}").status_code == 200
        for method, path in (("GET", ""), ("GET", "/output"), ("GET", "/events"), ("DELETE", "")):
            assert_error(bob.request(method, f"/v1/async_request/{rid}{path}"), 404, "request_id")
        # bob's idempotency key equal to alice's is a different request, not hers
        a = alice.post(f"/v1/models/{model}/async_predict", json={"model_input": 1, "idempotency_key": "same"})
        b = bob.post(f"/v1/models/{model}/async_predict", json={"model_input": 2, "idempotency_key": "same"})
        assert a.status_code == b.status_code == 201 and a.json() != b.json()
        assert alice.get(f"/v1/async_request/{rid}").json()["status"] == "QUEUED"  # bob's cancel did nothing
        assert admin.get(f"/v1/async_request/{rid}").status_code == 200  # an admin sees all


def test_keys_are_stored_hashed_never_raw(shared_api: ApiServer, admin: httpx.Client) -> None:
    created = admin.post("/v1/api_keys", json={"name": "hashed"}).json()
    key = created["key"]
    assert len(key) >= 40 and created["prefix"] == key[:10]
    listed = admin.get("/v1/api_keys").json()["api_keys"]
    assert all("key" not in k for k in listed) and key not in str(listed)
    assert shared_api.database_url
    with psycopg.connect(shared_api.database_url, autocommit=True) as db:
        row = db.execute("SELECT key_hash, prefix FROM asyncinfer.api_keys WHERE id = %s", (created["id"],)).fetchone()
        assert bytes(row[0]) == hashlib.sha256(key.encode()).digest() and row[1] == key[:10]
        tables = [r[0] for r in db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'asyncinfer'"
            " AND table_type = 'BASE TABLE'").fetchall()]
        rest = key[10:]  # past the shown prefix: nowhere in any row of any table
        for table in tables:
            n = db.execute(f"SELECT count(*) FROM asyncinfer.{table} t WHERE t::text LIKE %s",  # noqa: S608
                           (f"%{rest}%",)).fetchone()[0]
            assert n == 0, f"the raw key appears in asyncinfer.{table}"


def test_revoked_key_is_refused_at_once(shared_api: ApiServer, admin: httpx.Client,
                                        figures: dict[str, Any]) -> None:
    """Keys are cached 60 s in this API process; revocation through the API
    and through psql (NOTIFY only) both take effect on the next call."""
    model = new_model(admin)
    through_api_id, through_api = new_key(admin, "revoke-api")
    through_sql_id, through_sql = new_key(admin, "revoke-sql")
    with shared_api.client(through_api) as a, shared_api.client(through_sql) as s:
        for client in (a, s):  # cached now
            assert client.post(f"/v1/models/{model}/async_predict", json={"model_input": 1}).status_code == 201
        assert admin.delete(f"/v1/api_keys/{through_api_id}").status_code == 200
        assert_error(a.post(f"/v1/models/{model}/async_predict", json={"model_input": 1}), 401, "Authorization")
        assert shared_api.database_url
        with psycopg.connect(shared_api.database_url, autocommit=True) as db:
            db.execute("SELECT * FROM asyncinfer.revoke_api_key(%s)", (through_sql_id,))
        revoked_at = time.monotonic()
        while True:
            status = s.get(f"/v1/models/{model}/async_queue_status").status_code
            if status == 401:
                break
            assert status == 200 and time.monotonic() - revoked_at < 2, status
            time.sleep(0.005)
        figures["psql_revoke_effective_ms"] = round((time.monotonic() - revoked_at) * 1000, 1)


def test_admin_routes_refuse_other_keys(shared_api: ApiServer, admin: httpx.Client) -> None:
    model = new_model(admin)
    _, user_key = new_key(admin, "not-admin")
    rid = str(uuid.uuid4())
    with shared_api.client(user_key) as user, shared_api.client() as anonymous, \
            shared_api.client("ai_" + "x" * 43) as forged:
        for method, path, body in ADMIN_ROUTES:
            path = path.format(model=model, rid=rid)
            assert_error(user.request(method, path, json=body), 403, "Authorization")
            assert_error(anonymous.request(method, path, json=body), 401, "Authorization")
            assert_error(forged.request(method, path, json=body), 401, "Authorization")
        # a user key cannot mint an admin key
        assert_error(user.post("/v1/api_keys", json={"name": "escalate", "is_admin": True}), 403, "Authorization")


# -- webhook SSRF ------------------------------------------------------------------------


def _private_names() -> list[str]:
    """Host names (not IP literals) that resolve to a private/loopback address
    here without any network: localhost spellings, and every name of
    /etc/hosts that maps to one (this machine's own host name among them)."""
    names = ["localhost", "LOCALHOST", "localhost.", "LocalHost"]
    try:
        for line in Path("/etc/hosts").read_text().splitlines():
            fields = line.split("#", 1)[0].split()
            if len(fields) >= 2:
                try:
                    ip = ipaddress.ip_address(fields[0])
                except ValueError:
                    continue
                if not ip.is_global:
                    names += [n for n in fields[1:] if n not in names and "." not in n.rstrip(".") or n == "localhost"]
    except OSError:
        pass
    host = socket.gethostname()
    try:
        if not all(ipaddress.ip_address(i[4][0].split("%")[0]).is_global for i in socket.getaddrinfo(host, 80)):
            names.append(host)
    except OSError:
        pass
    return sorted(set(names))


LITERALS = ["127.0.0.1", "127.1", "0x7f.0.0.1", "0177.0.0.1", "2130706433", "0", "0.0.0.0", "10.0.0.5",
            "172.16.3.4", "192.168.1.1", "169.254.169.254", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
            "[0:0:0:0:0:0:0:1]", "[fe80::1]", "[fd00::1]", "[::]", "224.0.0.1"]


def test_webhook_targets_on_private_addresses_are_refused(shared_api: ApiServer, admin: httpx.Client,
                                                          figures: dict[str, Any]) -> None:
    model = new_model(admin)
    names = _private_names()
    refused = []
    for host in [*LITERALS, *names]:
        for url in (f"http://{host}/hook", f"https://{host}:8443/x?y=1"):
            response = admin.post(f"/v1/models/{model}/async_predict", json={"model_input": 1, "webhook_endpoint": url})
            assert_error(response, 400, "webhook_endpoint")
            refused.append(host)
    for url in ("file:///etc/passwd", "gopher://localhost:70/", "http://user:pw@example.com/", "http:///x",
                "javascript:alert(1)", "http://[::1/"):
        assert_error(admin.post(f"/v1/models/{model}/async_predict",
                                json={"model_input": 1, "webhook_endpoint": url}), 400, "webhook_endpoint")
    figures.update(refused_hosts=len(set(refused)), private_names=names)


def test_webhook_to_shared_address_space_is_refused(shared_api: ApiServer, admin: httpx.Client) -> None:
    model = new_model(admin)
    response = admin.post(f"/v1/models/{model}/async_predict",
                          json={"model_input": 1, "webhook_endpoint": "http://100.100.100.200/latest/meta-data/"})
    assert_error(response, 400, "webhook_endpoint")


class _Resolver:
    """A custom resolver for this process: `names` map to fixed addresses,
    in turn (a list), the last one repeating; everything else fails. It
    replaces socket.getaddrinfo, which asyncio's loop.getaddrinfo (the API's
    and the dispatcher's checks) and httpx's connect both call."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.calls: list[tuple[str, str]] = []

    def __call__(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,  # noqa: A002
                 flags: int = 0) -> list[Any]:
        host = host.decode() if isinstance(host, bytes) else host
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answers = self.names[host]
        address = answers.pop(0) if len(answers) > 1 else answers[0]
        self.calls.append((host, address))
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port or 80)))]


class _NoSecrets:
    async def active_webhook_secrets(self) -> list[str]:
        return []


def _delivery(target: str) -> DueDelivery:
    return DueDelivery(id=1, kind="webhook", target=target, attempts=1, request_id=UUID(int=1), model="m",
                       state="SUCCEEDED", finished_at=datetime.now(UTC), output={"x": 1}, error=None,
                       stored_url=None, output_url=None, metadata=None)


async def test_host_name_resolving_to_a_private_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hooks.internal.test` resolves (custom resolver) to 10.0.0.5, and
    `loop.internal.test` to 127.0.0.1 where a receiver listens: the submit
    check refuses both, and so does the dispatcher's check before the call
    (a request written past the API, or a name whose DNS changed since)."""
    receiver = Receiver()
    receiver.up()
    try:
        resolver = _Resolver({"hooks.internal.test": ["10.0.0.5"], "loop.internal.test": ["127.0.0.1"],
                              "public.test": ["93.184.216.34"]})
        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        checker = UrlChecker(allow_private=False)
        for host in ("hooks.internal.test", "loop.internal.test"):
            with pytest.raises(ApiError) as refused:
                await checker.webhook(f"http://{host}:{receiver.port}/hook", "webhook_endpoint")
            assert refused.value.status_code == 400 and "resolves to" in refused.value.detail
        await checker.webhook("http://public.test/hook", "webhook_endpoint")  # a public name passes
        dispatcher = Dispatcher(_NoSecrets(), Settings(allow_private_webhooks=False))  # type: ignore[arg-type]
        try:
            result = await dispatcher._post(_delivery(f"http://loop.internal.test:{receiver.port}/hook"))
        finally:
            await dispatcher.close()
        assert not result.ok and result.retry_in_seconds is None and "127.0.0.1" in (result.error or "")
        await asyncio.sleep(0.1)
        assert receiver.calls == 0
    finally:
        receiver.down()


async def test_dns_rebinding_between_check_and_call_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = Receiver()
    receiver.up()
    try:
        resolver = _Resolver({"rebind.test": ["93.184.216.34", "127.0.0.1"]})
        monkeypatch.setattr(socket, "getaddrinfo", resolver)
        dispatcher = Dispatcher(_NoSecrets(), Settings(allow_private_webhooks=False))  # type: ignore[arg-type]
        try:
            result = await dispatcher._post(_delivery(f"http://rebind.test:{receiver.port}/hook"))
        finally:
            await dispatcher.close()
        await asyncio.sleep(0.1)
        assert resolver.calls, "the custom resolver was not consulted"
        assert receiver.calls == 0, f"the webhook reached 127.0.0.1 ({result}; lookups {resolver.calls})"
        assert not result.ok and "127.0.0.1" in (result.error or ""), result
    finally:
        receiver.down()


# -- logs -------------------------------------------------------------------------------


def test_no_secrets_or_inputs_in_logs(shared_api: ApiServer, admin: httpx.Client, tmp_path: Path,
                                      figures: dict[str, Any]) -> None:
    """A full round (keys, a webhook secret, submits with secret inputs and
    metadata, model failures, retries, webhooks, bad keys) with INFO logs on
    the API, a worker and the dispatcher: none of the secrets, inputs or
    metadata appears in any log; request ids do (the logs stay useful)."""
    assert shared_api.database_url
    marker = uuid.uuid4().hex
    input_secret, meta_secret = f"INPUT-SECRET-{marker}", f"META-SECRET-{marker}"
    token = f"tok{marker}"
    with psycopg.connect(shared_api.database_url, autocommit=True) as db:
        db.execute("SELECT asyncinfer.upsert_model('log-flaky', 4)")
    key_id, key = new_key(admin, "logs")
    secret = admin.post("/v1/webhook_secrets").json()["secret"]
    wrong_key = f"ai_wrong{marker}"
    procs = Procs(shared_api.database_url, tmp_path, {"ASYNCINFER_LOG_LEVEL": "INFO",
                                                      "ASYNCINFER_ALLOW_PRIVATE_WEBHOOKS": "true"})
    receiver = Receiver()
    receiver.up()
    log_before = len(shared_api.log())
    try:
        worker = procs.worker(flaky_toml("log-flaky", capacity=4, fail_rate=0.5), ["log-flaky"])
        dispatcher = procs.dispatcher()
        wait_workers_healthy(shared_api.database_url, [worker])
        ids = []
        with shared_api.client(key) as client, shared_api.client(wrong_key) as wrong:
            for i in range(40):
                body = {"model_input": {"n": i, "secret": input_secret, **({"poison": True} if i % 7 == 0 else {})},
                        "metadata": {"secret": meta_secret}, "idempotency_key": f"idem-{marker}-{i}",
                        "inference_retry_config": {"max_attempts": 2, "initial_delay_ms": 0}}
                response = client.post("/v1/models/log-flaky/async_predict", json=body)
                assert response.status_code == 201, response.text
                ids.append(response.json()["request_id"])
            assert wrong.get("/v1/models/log-flaky/async_queue_status").status_code == 401
            assert client.post("/v1/models/log-flaky/async_predict_batch", json={"requests": [
                {"model_input": {"secret": input_secret}, "webhook_endpoint": "http://10.1.2.3/?token=" + token}
            ]}).status_code == 400
        # webhooks for a few (the receiver is on loopback: allowed for this dispatcher only)
        with psycopg.connect(shared_api.database_url, autocommit=True) as db:
            db.execute("SELECT * FROM asyncinfer.submit_requests('log-flaky', %s::jsonb)", (
                f'[{{"model_input": {{"secret": "{input_secret}"}}, "metadata": {{"s": "{meta_secret}"}},'
                f' "webhook_endpoint": "{receiver.url}/hook?token={token}"}}]',))
        wait_drained(shared_api.database_url, 30, procs=[worker], model="log-flaky")
        deadline = time.monotonic() + 15
        while receiver.calls < 1:
            assert time.monotonic() < deadline, dispatcher.log()[-2000:]
            time.sleep(0.05)
        worker.stop()
        dispatcher.stop()
    finally:
        procs.close()
        receiver.down()
    logs = {"api": shared_api.log()[log_before:], "worker": worker.log(), "dispatcher": dispatcher.log()}
    for name, text in logs.items():
        for label, needle in (("API key", key), ("API key body", key[10:]), ("admin key", shared_api.admin_key),
                              ("wrong key", wrong_key), ("webhook secret", secret),
                              ("webhook secret body", secret.removeprefix("whsec_")), ("input", input_secret),
                              ("metadata", meta_secret), ("webhook token", token), ("idempotency key", marker)):
            assert needle not in text, f"{label} found in the {name} log"
    assert any(rid in logs["worker"] for rid in ids), "the worker log carries no request id at all"
    figures.update(log_bytes={k: len(v) for k, v in logs.items()},
                   warnings={k: len(re.findall(r" WARNING ", v)) for k, v in logs.items()})


# -- SQL injection ---------------------------------------------------------------------------


INJECTIONS = ["'; DROP TABLE asyncinfer.requests; --", "x' OR '1'='1", "\\'; SELECT pg_sleep(5); --",
              "$$; DROP SCHEMA asyncinfer CASCADE; $$", "m\"; DELETE FROM asyncinfer.models; --",
              "Robert'); DROP TABLE asyncinfer.api_keys;--", "%' AND 1=(SELECT 1 FROM pg_sleep(3)) --",
              "1; COPY (SELECT '') TO PROGRAM 'touch /tmp/pwned'"]


def test_sql_injection_through_names_metadata_and_keys(shared_api: ApiServer, admin: httpx.Client,
                                                       figures: dict[str, Any]) -> None:
    assert shared_api.database_url
    model = new_model(admin)
    _, key = new_key(admin, "injector")
    with psycopg.connect(shared_api.database_url, autocommit=True) as db:
        before = {t: db.execute(f"SELECT count(*) FROM asyncinfer.{t}").fetchone()[0]  # noqa: S608
                  for t in ("models", "api_keys")}
    started = time.monotonic()
    with shared_api.client(key) as client:
        for text in INJECTIONS:
            quoted = httpx.URL("/v1/models/").join(text.replace("/", "%2F")).raw_path.decode()
            for method, path in (("POST", f"/v1/models/{text}/async_predict"),
                                 ("GET", f"/v1/models/{text}/async_queue_status")):
                response = client.request(method, path, json={"model_input": 1})
                assert response.status_code in (400, 404), (path, response.status_code, response.text)
            response = admin.put(f"/v1/models/{text}", json={"capacity": 1})
            assert response.status_code in (400, 404), (quoted, response.text)
            assert admin.post(f"/v1/models/{text}/redeliver_failed").status_code in (200, 400, 404)
            assert_error(admin.post(f"/v1/async_request/{uuid.uuid4()}/redeliver", params={"kind": text}), 400, "kind")
            # stored verbatim, as data
            body = {"model_input": {"q": text}, "metadata": {text: text}, "idempotency_key": text}
            first = client.post(f"/v1/models/{model}/async_predict", json=body)
            again = client.post(f"/v1/models/{model}/async_predict", json=body)
            assert first.status_code == 201 and again.status_code == 200, (first.text, again.text)
            assert first.json() == again.json()
            rid = first.json()["request_id"]
            with psycopg.connect(shared_api.database_url, autocommit=True) as db:
                stored = db.execute(
                    "SELECT i.model_input, i.metadata, r.idempotency_key FROM asyncinfer.requests r"
                    " JOIN asyncinfer.request_inputs i ON i.request_id = r.id WHERE r.public_id = %s", (rid,)
                ).fetchone()
            assert stored == ({"q": text}, {text: text}, text)
            assert_error(admin.post("/v1/api_keys", json={"name": text, "is_admin": text}), 400, "is_admin")
            assert admin.post("/v1/api_keys", json={"name": text}).json()["name"] == text.strip()
    elapsed = time.monotonic() - started
    assert elapsed < 10, "an injected pg_sleep ran"
    with psycopg.connect(shared_api.database_url, autocommit=True) as db:
        after = {t: db.execute(f"SELECT count(*) FROM asyncinfer.{t}").fetchone()[0]  # noqa: S608
                 for t in ("models", "api_keys")}
        assert db.execute("SELECT count(*) FROM asyncinfer.requests").fetchone()[0] > 0
    assert after["models"] == before["models"]
    assert after["api_keys"] == before["api_keys"] + len(INJECTIONS)
    assert not Path("/tmp/pwned").exists()
    figures.update(injection_strings=len(INJECTIONS), seconds=round(elapsed, 2))
