"""/metrics derives recent activity from PostgreSQL: time in queue, inference and
end-to-end quantiles, outcomes, retries and webhook deliveries of the last minutes."""

from __future__ import annotations

import httpx

from app.queue.operations import DeliveryResult, Outcome
from tests.api.helpers import ApiServer, new_model
from tests.api.test_operations import metric


async def test_recent_quantiles_outcomes_retries_and_deliveries(api: ApiServer, admin: httpx.Client,
                                                                user: httpx.Client, api_queue) -> None:
    model = new_model(admin, capacity=10)
    for n in range(4):
        user.post(f"/v1/models/{model}/async_predict",
                  json={"model_input": n, "webhook_endpoint": "https://example.com/hook",
                        "inference_retry_config": {"initial_delay_ms": 0}})
    worker = await api_queue.register_worker("metrics-recent", "localhost", 0, [model])
    claimed = await api_queue.claim(model, worker, 4, 30)
    # one fails once (a retry), then everything finishes: 3 succeed, 1 fails for good
    await api_queue.finish(worker, [Outcome(claimed[0].id, claimed[0].attempt, error="flaky")])
    [again] = await api_queue.claim(model, worker, 1, 30)
    await api_queue.finish(worker, [Outcome(again.id, again.attempt, error="dead", retryable=False)]
                           + [Outcome(r.id, r.attempt, output="ok") for r in claimed[1:]])
    [delivery, *_] = await api_queue.claim_deliveries(10, 60)
    await api_queue.finish_deliveries([DeliveryResult(delivery.id, delivery.attempts, ok=True, status_code=204)])

    with api.client() as client:
        text = client.get("/metrics").text
    assert metric(text, "asyncinfer_recent_finished", model=model, state="SUCCEEDED", window="5m") == 3
    assert metric(text, "asyncinfer_recent_finished", model=model, state="FAILED", window="5m") == 1
    assert metric(text, "asyncinfer_recent_retries", model=model, state="FAILED", window="5m") == 1
    for name in ("time_in_queue", "inference", "end_to_end"):
        for q in ("0.5", "0.95", "0.99"):
            value = metric(text, f"asyncinfer_recent_{name}_seconds", model=model, state="SUCCEEDED",
                           quantile=q, window="5m")
            assert value is not None and 0 <= value < 60
    # the API tests share one database: other tests' deliveries may count too
    assert metric(text, "asyncinfer_recent_deliveries", kind="webhook", state="SUCCEEDED", window="5m") >= 1
    assert metric(text, "asyncinfer_recent_delivery_attempts", kind="webhook", state="SUCCEEDED", window="5m") >= 1
