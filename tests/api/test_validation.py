"""Bad input gets a 4xx naming the field and the rule, in one error shape. Never a 500."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from tests.api.helpers import ApiServer, assert_error, new_model, start_server

OK = {"model_input": {"text": "hi"}}

CASES = [
    # (body, field, words the rule must contain)
    ({**OK, "priority": 3}, "priority", "between 0 and 2"),
    ({**OK, "priority": -1}, "priority", "between 0 and 2"),  # -1 is reserved for real-time calls
    ({**OK, "priority": "high"}, "priority", "integer"),
    ({**OK, "priority": 1.5}, "priority", "integer"),
    ({**OK, "priority": True}, "priority", "integer"),
    ({**OK, "priority": 10**30}, "priority", "between 0 and 2"),
    ({**OK, "max_time_in_queue_seconds": 9}, "max_time_in_queue_seconds", "between 10 and 259200"),
    ({**OK, "max_time_in_queue_seconds": 259201}, "max_time_in_queue_seconds", "between 10 and 259200"),
    ({**OK, "inference_retry_config": {"max_attempts": 0}}, "inference_retry_config.max_attempts", "between 1 and 10"),
    ({**OK, "inference_retry_config": {"max_attempts": 11}}, "inference_retry_config.max_attempts", "between 1 and 10"),
    ({**OK, "inference_retry_config": {"initial_delay_ms": -1}}, "inference_retry_config.initial_delay_ms",
     "between 0 and 10000"),
    ({**OK, "inference_retry_config": {"initial_delay_ms": 10001}}, "inference_retry_config.initial_delay_ms",
     "between 0 and 10000"),
    ({**OK, "inference_retry_config": {"max_delay_ms": 60001}}, "inference_retry_config.max_delay_ms",
     "between 0 and 60000"),
    ({**OK, "inference_retry_config": {"tries": 2}}, "inference_retry_config.tries", "unknown field"),
    ({**OK, "inference_retry_config": 3}, "inference_retry_config", "object"),
    ({**OK, "webhook_endpoint": "ftp://example.com/x"}, "webhook_endpoint", "http"),
    ({**OK, "webhook_endpoint": "not a url"}, "webhook_endpoint", "http"),
    ({**OK, "webhook_endpoint": "http://user:pw@example.com/"}, "webhook_endpoint", "credentials"),
    ({**OK, "webhook_endpoint": ""}, "webhook_endpoint", "URL"),
    ({**OK, "webhook_endpoint": "http://x/" + "a" * 3000}, "webhook_endpoint", "2048"),
    ({**OK, "output_url": "http://example.com/out"}, "output_url", "s3:// or file://"),
    ({**OK, "output_url": "s3://"}, "output_url", "bucket"),
    ({**OK, "idempotency_key": ""}, "idempotency_key", "1 to 256"),
    ({**OK, "idempotency_key": "k" * 257}, "idempotency_key", "1 to 256"),
    ({**OK, "idempotency_key": 5}, "idempotency_key", "string"),
    ({**OK, "metadata": [1, 2]}, "metadata", "object"),
    ({**OK, "metadata": "tag"}, "metadata", "object"),
    ({**OK, "metadata": {"blob": "x" * 20000}}, "metadata", "bytes"),
    ({"priority": 1}, "model_input", "required"),
    ({"model_input": None}, "model_input", "null"),
    ({**OK, "priorty": 0}, "priorty", "unknown field"),
    ([OK], "body", "object"),
    ("just a string", "body", "object"),
]


@pytest.mark.parametrize(("body", "field", "words"), CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_bad_async_predict_bodies_name_field_and_rule(user: httpx.Client, model: str, body: object,
                                                     field: str, words: str) -> None:
    response = user.post(f"/v1/models/{model}/async_predict", json=body)
    error = assert_error(response, 400, field)
    assert words in error["errors"][0]["rule"], error  # type: ignore[index]


RAW_CASES = [
    (b'{"model_input": 1', "body", "valid JSON"),
    (b'{"model_input": 1} trailing', "body", "valid JSON"),
    (b"", "body", "empty"),
    (b'{"model_input": NaN}', "body", "valid JSON"),
    (b'{"model_input": "\xff\xfe"}', "body", "UTF-8"),
    (b'{"model_input": "a\\u0000b"}', "body", "\\u0000"),
    (b'{"model_input": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body", "nested too deeply"),
    (b'{"model_input": 1, "priority": 1e400}', "priority", "between 0 and 2"),
]


@pytest.mark.parametrize(("raw", "field", "words"), RAW_CASES, ids=[f"raw-{i}" for i in range(len(RAW_CASES))])
def test_malformed_bodies_are_refused_not_crashed(user: httpx.Client, model: str, raw: bytes, field: str,
                                                  words: str) -> None:
    response = user.post(f"/v1/models/{model}/async_predict", content=raw,
                         headers={"content-type": "application/json"})
    error = assert_error(response, 400, field)
    assert words in error["errors"][0]["rule"], error  # type: ignore[index]


def test_values_postgresql_refuses_are_a_400(user: httpx.Client, model: str) -> None:
    # valid JSON that jsonb cannot store: an exponent below numeric's range (Python reads 0.0)
    response = user.post(f"/v1/models/{model}/async_predict", content=b'{"model_input": 1e-999999}',
                         headers={"content-type": "application/json"})
    assert_error(response, 400)
    # still fine: deep but not too deep, big but storable
    ok = user.post(f"/v1/models/{model}/async_predict",
                   content=b'{"model_input": ' + b"[" * 100 + b"1" + b"]" * 100 + b', "metadata": {"n": 1e300}}',
                   headers={"content-type": "application/json"})
    assert ok.status_code == 201, ok.text


def test_wrong_or_missing_content_type_is_415(user: httpx.Client, model: str) -> None:
    body = json.dumps(OK)
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        response = user.post(f"/v1/models/{model}/async_predict", content=body, headers=headers)
        assert_error(response, 415, "content-type")
    ok = user.post(f"/v1/models/{model}/async_predict", content=body,
                   headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 201, ok.text


def test_oversize_body_is_413(user: httpx.Client, model: str, api_db) -> None:
    big = b'{"model_input": "' + b"x" * (256 * 1024) + b'"}'
    assert_error(user.post(f"/v1/models/{model}/async_predict", content=big,
                           headers={"content-type": "application/json"}), 413, "body")
    # without a content-length (chunked): counted as it streams
    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
    assert_error(user.post(f"/v1/models/{model}/async_predict", content=chunks(),
                           headers={"content-type": "application/json"}), 413, "body")
    assert_error(user.post(f"/v1/models/{model}/predict", content=big,
                           headers={"content-type": "application/json"}), 413, "body")
    count = api_db.execute("SELECT count(*) FROM asyncinfer.requests WHERE model = %s", (model,)).fetchone()[0]
    assert count == 0


def test_unknown_model_is_404_naming_the_model(user: httpx.Client) -> None:
    for name in ("no-such-model", "bad name!", "x" * 200):
        assert_error(user.post(f"/v1/models/{name}/async_predict", json=OK), 404, "model")
        assert_error(user.post(f"/v1/models/{name}/async_predict_batch", json={"requests": [OK]}), 404, "model")
        assert_error(user.get(f"/v1/models/{name}/async_queue_status"), 404, "model")
        assert_error(user.post(f"/v1/models/{name}/predict", json=OK), 404, "model")


def test_unknown_route_wrong_method_and_bad_ids_use_the_error_shape(user: httpx.Client) -> None:
    assert_error(user.get("/v1/nothing-here"), 404, "path")
    assert_error(user.patch("/v1/async_request/00000000-0000-0000-0000-000000000001"), 405, "method")
    assert_error(user.get("/v1/async_request/not-a-uuid"), 400, "request_id")
    assert_error(user.delete("/v1/async_request/12345"), 400, "request_id")
    assert_error(user.get("/v1/async_request/00000000-0000-0000-0000-000000000001/events?limit=0"), 400, "limit")
    assert_error(user.get("/v1/async_request/00000000-0000-0000-0000-000000000001"), 404, "request_id")


def test_random_junk_never_gets_a_5xx(user: httpx.Client, model: str) -> None:
    """A small fuzzer: every field gets values of every JSON type and odd sizes."""
    rng = random.Random(1234)
    junk: list[object] = [None, True, False, 0, -1, 1, 2, 3, 2**63, -(2**63) - 1, 1e308, -0.0, 0.5, "",
                          "x" * 300, "http://", "s3://b/k", "file:///tmp/x", "http://127.0.0.1:1/",
                          [], [1], {}, {"a": None}, {"max_attempts": "3"}, "\u202e\ud7ff"]
    fields = ["model_input", "priority", "max_time_in_queue_seconds", "inference_retry_config", "webhook_endpoint",
              "output_url", "idempotency_key", "metadata", "extra"]
    statuses = set()
    for _ in range(150):
        body = {f: rng.choice(junk) for f in rng.sample(fields, rng.randint(0, len(fields)))}
        response = user.post(f"/v1/models/{model}/async_predict", json=body)
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert_error(response, response.status_code)
        statuses.add(response.status_code)
    assert 400 in statuses


@pytest.fixture(scope="module")
def strict_api(api_database: str, tmp_path_factory: pytest.TempPathFactory):
    """A server with the production default: no private webhook targets."""
    server = start_server(api_database, tmp_path_factory.mktemp("strict"), allow_private_webhooks="false")
    yield server
    assert server.stop() == 0, server.log()[-3000:]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.1.2.3/hook", "http://192.168.0.10/hook",
    "http://169.254.169.254/latest/meta-data", "http://[::1]/hook", "https://[fe80::1]/hook", "http://0.0.0.0/",
    "http://[::ffff:127.0.0.1]/hook",
])
def test_private_webhook_targets_are_refused_unless_allowed(strict_api: ApiServer, admin: httpx.Client,
                                                            url: str) -> None:
    model = new_model(admin)
    with strict_api.client(strict_api.admin_key) as client:
        response = client.post(f"/v1/models/{model}/async_predict", json={**OK, "webhook_endpoint": url})
        error = assert_error(response, 400, "webhook_endpoint")
        assert "private, loopback or link-local" in error["errors"][0]["rule"]  # type: ignore[index]
        # the same in bulk, naming the item
        response = client.post(f"/v1/models/{model}/async_predict_batch",
                               json={"requests": [OK, {**OK, "webhook_endpoint": url}]})
        assert_error(response, 400, "requests[1].webhook_endpoint")
        # a public address is accepted
        ok = client.post(f"/v1/models/{model}/async_predict",
                         json={**OK, "webhook_endpoint": "https://93.184.216.34/hook"})
        assert ok.status_code == 201, ok.text
