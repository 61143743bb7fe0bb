"""Bad input (invariant 8): a 4xx naming field and rule, never a 5xx.

* schemathesis against /schema/openapi.json of a running server: examples,
  coverage, fuzzing and stateful phases with a bounded number of examples
  per operation, checked for zero server errors and for answers matching
  the document (status codes, content types, bodies);
* hand-made abuse: oversize bodies (announced and streamed), deep nesting,
  invalid UTF-8, NUL, huge numbers, unknown fields, wrong types, header
  abuse on a raw socket. After all of it the server is still up and clean.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.api.helpers import ApiServer, assert_error, new_key
from tests.reliability.helpers import Procs, wait_workers_healthy

MAX_EXAMPLES = int(os.environ.get("RELIABILITY_FUZZ_EXAMPLES", "12"))


def _schemathesis(api: ApiServer, tmp_path: Path, checks: str, *filters: str, timeout: float = 150) -> str:
    argv = [sys.executable, "-m", "schemathesis.cli", "run", f"{api.base_url}/schema/openapi.json",
            "-H", f"Authorization: Api-Key {api.admin_key}", "--checks", checks,
            "--max-examples", str(MAX_EXAMPLES), "--seed", "20261129", "--workers", "1", "--no-shrink",
            "--request-timeout", "10", "--suppress-health-check", "all", "--output-truncate", "true",
            "--report", "junit", "--report-dir", str(tmp_path), *filters]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-8000:]
    return output


def test_schemathesis_no_server_errors_and_answers_match_the_schema(shared_api: ApiServer, tmp_path: Path,
                                                                    figures: dict[str, Any]) -> None:
    log_before = len(shared_api.log())
    out = _schemathesis(shared_api, tmp_path, "not_a_server_error,status_code_conformance,"
                        "content_type_conformance,response_schema_conformance")
    generated = sum(int(n) for n in re.findall(r"(\d+) generated", out))
    assert generated > 200, out[-3000:]
    log = shared_api.log()[log_before:]
    assert "unhandled error" not in log and "Traceback" not in log, log[-5000:]
    assert shared_api.process.poll() is None
    figures.update(cases_generated=generated, max_examples=MAX_EXAMPLES, server_errors=0)


def test_openapi_documents_every_answer(shared_api: ApiServer) -> None:
    """Every route documents its 401 (and 403 when admin-only): the fuzzer
    holds each answer to the document, so an undocumented one fails it."""
    spec = httpx.get(shared_api.base_url + "/schema/openapi.json").json()
    missing = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if path in ("/healthz", "/readyz", "/metrics") or method not in ("get", "post", "put", "delete"):
                continue
            codes = set(operation.get("responses", {}))
            wanted = {"401"} | ({"403"} if "admin" in operation.get("tags", []) else set())
            if not wanted <= codes:
                missing.append(f"{method.upper()} {path}: documents {sorted(codes)}, lacks {sorted(wanted - codes)}")
    assert not missing, "\n".join(missing)


# -- hand-made abuse -------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(shared_api: ApiServer) -> tuple[ApiServer, str, str]:
    with shared_api.client(shared_api.admin_key) as admin:
        model = "bad-input"
        assert admin.put(f"/v1/models/{model}", json={"capacity": 1}).status_code in (200, 201)
        _, key = new_key(admin, "bad-input")
    return shared_api, model, key


JSON_HEADERS = {"content-type": "application/json"}
BIG = b"9" * 5000


BODIES: list[tuple[str, bytes, int, str | None]] = [
    # (case, body, status, field)
    ("empty", b"", 400, "body"),
    ("not json", b"{model_input: 1}", 400, "body"),
    ("truncated", b'{"model_input": [1, 2', 400, "body"),
    ("array not object", b"[1, 2, 3]", 400, "body"),
    ("invalid utf-8", b'{"model_input": "\xff\xfe\xfa"}', 400, "body"),
    ("overlong utf-8", b'{"model_input": "\xc0\xaf"}', 400, "body"),
    ("lone surrogate escape", b'{"model_input": "\\ud800"}', 400, "body"),
    ("NUL escape", b'{"model_input": {"a": "x\\u0000y"}}', 400, "body"),
    ("NUL in key", b'{"model_input": {"\\u0000": 1}}', 400, "body"),
    ("nested 10 000 arrays", b'{"model_input": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400, "body"),
    ("nested 5 000 objects", b'{"model_input": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}", 400, "body"),
    ("nested metadata", b'{"model_input": 1, "metadata": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}", 400, "body"),
    ("NaN", b'{"model_input": NaN}', 400, "body"),
    ("Infinity", b'{"model_input": Infinity}', 400, "body"),
    ("huge priority", b'{"model_input": 1, "priority": ' + BIG + b"}", 400, "priority"),
    ("negative priority", b'{"model_input": 1, "priority": -1}', 400, "priority"),
    ("float priority", b'{"model_input": 1, "priority": 1.5}', 400, "priority"),
    ("bool priority", b'{"model_input": 1, "priority": true}', 400, "priority"),
    ("huge queue time", b'{"model_input": 1, "max_time_in_queue_seconds": 1e308}', 400, "max_time_in_queue_seconds"),
    ("huge attempts", b'{"model_input": 1, "inference_retry_config": {"max_attempts": 18446744073709551616}}',
     400, "inference_retry_config.max_attempts"),
    ("unknown field", b'{"model_input": 1, "priorty": 0}', 400, "priorty"),
    ("unknown nested field", b'{"model_input": 1, "inference_retry_config": {"max_attempt": 2}}',
     400, "inference_retry_config.max_attempt"),
    ("null input", b'{"model_input": null}', 400, "model_input"),
    ("missing input", b'{"priority": 1}', 400, "model_input"),
    ("metadata not object", b'{"model_input": 1, "metadata": [1]}', 400, "metadata"),
    ("metadata too big", b'{"model_input": 1, "metadata": {"a": "' + b"x" * 20_000 + b'"}}', 400, "metadata"),
    ("idempotency key too long", b'{"model_input": 1, "idempotency_key": "' + b"k" * 257 + b'"}', 400,
     "idempotency_key"),
    ("empty idempotency key", b'{"model_input": 1, "idempotency_key": ""}', 400, "idempotency_key"),
    ("webhook not a URL", b'{"model_input": 1, "webhook_endpoint": "not a url"}', 400, "webhook_endpoint"),
    ("webhook huge", b'{"model_input": 1, "webhook_endpoint": "https://e.com/' + b"a" * 3000 + b'"}', 400,
     "webhook_endpoint"),
    ("output_url scheme", b'{"model_input": 1, "output_url": "ftp://x/y"}', 400, "output_url"),
    ("oversize body", b'{"model_input": "' + b"a" * 300_000 + b'"}', 413, "body"),
]


@pytest.mark.parametrize(("case", "body", "status", "field"), BODIES, ids=[b[0] for b in BODIES])
def test_bad_body_is_a_4xx_naming_the_field(target: tuple[ApiServer, str, str], case: str, body: bytes, status: int,
                                           field: str | None) -> None:
    api, model, key = target
    with api.client(key) as client:
        response = client.post(f"/v1/models/{model}/async_predict", content=body, headers=JSON_HEADERS)
        assert_error(response, status, field)


def test_huge_but_valid_numbers_are_accepted_where_any_json_is(target: tuple[ApiServer, str, str]) -> None:
    """model_input and metadata are any JSON: big numbers PostgreSQL's numeric
    holds are stored as sent (1e308, 4 000 digits, tiny exponents)."""
    api, model, key = target
    with api.client(key) as client:
        for raw in (b"1e308", b"-1e-300", b"9" * 4000, b"123456789012345678901234567890.5"):
            response = client.post(f"/v1/models/{model}/async_predict",
                                   content=b'{"model_input": ' + raw + b', "metadata": {"n": ' + raw + b"}}",
                                   headers=JSON_HEADERS)
            assert response.status_code == 201, (raw[:20], response.text)


def test_bad_batches_name_the_item(target: tuple[ApiServer, str, str]) -> None:
    api, model, key = target
    url = f"/v1/models/{model}/async_predict_batch"
    with api.client(key) as client:
        ok = {"model_input": 1}
        assert_error(client.post(url, json={"requests": [ok, ok, ok, {"model_input": 1, "priority": 9}]}),
                     400, "requests[3].priority")
        assert_error(client.post(url, json={"requests": [ok, {"model_input": None}]}), 400, "requests[1].model_input")
        assert_error(client.post(url, json={"requests": [ok, 5]}), 400, "requests[1]")
        assert_error(client.post(url, json={"requests": []}), 400, "requests")
        assert_error(client.post(url, json={"requests": [ok] * 101}), 400, "requests")
        assert_error(client.post(url, json={"requests": [ok], "extra": 1}), 400, "extra")


def test_other_routes_refuse_bad_parameters(target: tuple[ApiServer, str, str]) -> None:
    api, model, key = target
    with api.client(key) as client, api.client(api.admin_key) as admin:
        assert_error(client.get("/v1/async_request/not-a-uuid"), 400, "request_id")
        assert_error(client.get("/v1/async_request/" + "0" * 5000), 400, "request_id")
        rid = "00000000-0000-0000-0000-000000000001"
        assert_error(client.get(f"/v1/async_request/{rid}/events?limit=0"), 400, "limit")
        assert_error(client.get(f"/v1/async_request/{rid}/events?after=1;DROP"), 400, "after")
        assert_error(client.get(f"/v1/async_request/{rid}/events?after=" + "9" * 400), 400, "after")
        assert_error(client.post(f"/v1/models/{model}/predict?timeout_seconds=nan", json=1), 400, "timeout_seconds")
        assert_error(client.post(f"/v1/models/{model}/predict?timeout_seconds=1e999", json=1), 400,
                     "timeout_seconds")
        assert_error(admin.put(f"/v1/models/{model}", json={"capacity": -1}), 400, "capacity")
        assert_error(admin.put(f"/v1/models/{model}", json={"capacity": 10**30}), 400, "capacity")
        assert_error(admin.put(f"/v1/models/{model}", json={"max_queue_depth": 10**12}), 400, None)
        assert_error(admin.put(f"/v1/models/{model}", json={"defaults": {"priority": 7}}), 400, "defaults.priority")
        assert_error(admin.delete("/v1/api_keys/" + "9" * 30), 400, "key_id")
        assert_error(admin.post("/v1/api_keys", json={"name": "x" * 201}), 400, "name")
        assert_error(admin.post("/v1/api_keys", json={"name": "k", "rate_limit_per_second": -1}), 400,
                     "rate_limit_per_second")
        assert_error(client.post(f"/v1/models/{model}/async_predict", content=b'{"model_input":1}',
                                 headers={"content-type": "text/plain"}), 415, "content-type")
        assert_error(client.patch(f"/v1/models/{model}/async_predict"), 405, "method")
        assert_error(client.get("/v1/nothing/here"), 404, "path")


def _raw(api: ApiServer, data: bytes, timeout: float = 5.0) -> bytes:
    host, port = api.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


def test_header_abuse_never_gets_a_5xx(target: tuple[ApiServer, str, str], figures: dict[str, Any]) -> None:
    api, model, key = target
    auth = f"Authorization: Api-Key {key}\r\n".encode()
    body = b'{"model_input": 1}'

    def post(headers: bytes, payload: bytes = body) -> bytes:
        return (f"POST /v1/models/{model}/async_predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
                + headers + b"\r\n" + payload)

    cases: dict[str, bytes] = {
        "500 headers": post(auth + b"".join(b"X-H%d: v\r\n" % i for i in range(500))
                            + b"Content-Type: application/json\r\nContent-Length: 18\r\n"),
        "70 kB header": post(auth + b"X-Big: " + b"a" * 70_000 + b"\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 18\r\n"),
        "negative length": post(auth + b"Content-Type: application/json\r\nContent-Length: -5\r\n"),
        "two lengths": post(auth + b"Content-Type: application/json\r\nContent-Length: 18\r\nContent-Length: 4\r\n"),
        "huge length": post(auth + b"Content-Type: application/json\r\nContent-Length: " + b"9" * 30 + b"\r\n"),
        "length and chunked": post(auth + b"Content-Type: application/json\r\nContent-Length: 18\r\n"
                                   b"Transfer-Encoding: chunked\r\n", b"12\r\n" + body + b"\r\n0\r\n\r\n"),
        "chunked past the limit": post(auth + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
                                       b"".join(b"10000\r\n" + b"a" * 65536 + b"\r\n" for _ in range(6))
                                       + b"0\r\n\r\n"),
        "bad chunk size": post(auth + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
                               b"zz\r\n" + body + b"\r\n0\r\n\r\n"),
        "control char in header": post(auth + b"X-A: a\x01b\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 18\r\n"),
        "non-ascii key": post(b"Authorization: Api-Key \xff\xfe\x80\xc3\xa9\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 18\r\n"),
        "10 kB key": post(b"Authorization: Api-Key " + b"k" * 10_000 + b"\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 18\r\n"),
        "basic auth": post(b"Authorization: Basic dXNlcjpwYXNz\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 18\r\n"),
        "bearer admin key?": post(b"Authorization: Bearer nope\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 18\r\n"),
        "scheme only": post(b"Authorization: Api-Key\r\nContent-Type: application/json\r\nContent-Length: 18\r\n"),
        "content-type junk": post(auth + b"Content-Type: application/json; charset=\xff\r\nContent-Length: 18\r\n"),
        "request line garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
        "HTTP/0.9": b"GET /healthz\r\n\r\n",
        "absolute URI": b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n" + auth
                        + b"Connection: close\r\n\r\n",
        "path traversal": b"GET /v1/async_request/..%2f..%2fetc%2fpasswd HTTP/1.1\r\nHost: x\r\n" + auth
                          + b"Connection: close\r\n\r\n",
    }
    seen: dict[str, str] = {}
    for name, data in cases.items():
        answer = _raw(api, data)
        status = answer.split(b"\r\n", 1)[0].decode("latin-1")
        seen[name] = status or "<closed>"
        code = re.match(r"HTTP/1\.[01] (\d{3})", status)
        assert code is None or not code.group(1).startswith("5"), (name, answer[:500])
        assert api.process.poll() is None, name
    # The server still answers normally, and a slow partial body does not wedge it.
    with socket.create_connection(api.base_url.removeprefix("http://").split(":")) as slow:  # type: ignore[arg-type]
        slow.sendall(post(auth + b"Content-Type: application/json\r\nContent-Length: 100\r\n", b'{"mod'))
        with api.client(key) as client:
            assert client.post(f"/v1/models/{model}/async_predict", json={"model_input": 2}).status_code == 201
    figures.update(header_cases=seen)


def test_huge_numbers_are_refused_at_the_door_and_fail_alone_past_it(
        database_url: str, procs: Procs, api_factory: Callable[..., ApiServer]) -> None:
    """A number PostgreSQL stores but Python cannot hold (an integer of 5000
    digits, 1e5000): the API refuses it (400 naming the field); one that gets
    in another way (SQL, psql) fails its own request and no batch-mate."""
    api = api_factory(database_url)
    with api.client(api.admin_key) as admin:
        assert admin.put("/v1/models/echo", json={"capacity": 8}).status_code == 201
    once = {"max_attempts": 1}
    with api.client(api.admin_key) as client:
        for literal, field in ((b"9" * 5000, "model_input"), (b"1e5000", "model_input"),
                               (b'{"a": [-1E400]}', "model_input")):
            refused = client.post("/v1/models/echo/async_predict", headers=JSON_HEADERS,
                                  content=b'{"model_input": ' + literal + b"}")
            assert_error(refused, 400, field)
        refused = client.post(
            "/v1/models/echo/async_predict_batch", headers=JSON_HEADERS,
            content=b'{"requests": [{"model_input": 1}, {"model_input": 1e999}]}')
        assert_error(refused, 400, "requests[1].model_input")
        assert_error(client.post("/v1/models/echo/async_predict", headers=JSON_HEADERS,
                                 content=b'{"model_input": 1, "metadata": {"n": ' + b"7" * 4400 + b"}}"),
                     400, "metadata")
        assert_error(client.post("/v1/models/echo/predict", headers=JSON_HEADERS, content=b"[1e5000]"), 400, "body")
        # big but representable numbers pass
        fine = client.post("/v1/models/echo/async_predict", headers=JSON_HEADERS,
                           content=b'{"model_input": [1e300, ' + b"9" * 400 + b"]}")
        assert fine.status_code == 201, fine.text
    # Past the API (an admin's SQL): the poison sits between innocent batch-mates.
    items = [{"model_input": i, "inference_retry_config": once} for i in range(4)]
    with psycopg.connect(database_url, autocommit=True) as db:
        ids = [r[0] for r in db.execute("SELECT request_id::text FROM asyncinfer.submit_requests('echo', %s::jsonb)",
                                        (json.dumps(items[:2]),))]
        [poison] = [r[0] for r in db.execute(
            "SELECT request_id::text FROM asyncinfer.submit_requests('echo', ('{\"model_input\": ' || repeat('9', 5000)"
            " || ', \"inference_retry_config\": {\"max_attempts\": 1}}')::jsonb)")]
        ids += [r[0] for r in db.execute("SELECT request_id::text FROM asyncinfer.submit_requests('echo', %s::jsonb)",
                                         (json.dumps(items[2:]),))]
    worker = procs.worker('[models.echo]\nclass = "worker.models.echo:Echo"\ncapacity = 8\nmax_batch_size = 8\n',
                          ["echo"])
    wait_workers_healthy(database_url, [worker])
    deadline = time.monotonic() + 20
    with psycopg.connect(database_url, autocommit=True) as db:
        while True:
            states = dict(db.execute("SELECT public_id::text, state::text FROM asyncinfer.requests"
                                     " WHERE public_id = ANY(%s::uuid[])", (ids + [poison],)).fetchall())
            if all(s in ("SUCCEEDED", "FAILED") for s in states.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        error = db.execute("SELECT o.error FROM asyncinfer.request_outputs o JOIN asyncinfer.requests r"
                           " ON r.id = o.request_id WHERE r.public_id = %s", (poison,)).fetchone()[0]
    assert states.pop(poison) == "FAILED"
    assert error["type"] == "invalid_input" and "model_input" in error["message"]
    assert set(states.values()) == {"SUCCEEDED"}, states
