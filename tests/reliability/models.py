"""Models the reliability tests load by import path (tests.reliability.models:...).

Flaky is the fleet's model: dynamic batching, a little work per batch (so a
kill or a freeze lands mid-batch), and failures of three kinds:

* random: each item fails with probability `fail_rate` (a retryable error,
  so most come back on a retry and a few use up their attempts);
* poison: an input {"poison": true} always fails, not retryable;
* a whole batch raises now and then (`batch_raise_rate`), which makes the
  worker run the items one by one through `predict` (its fallback path).

The input may carry {"sleep_ms": n}: the batch then takes at least that long.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any


class RandomFailure(RuntimeError):
    """A transient model error (retryable, the default)."""


class PoisonInput(ValueError):
    retryable = False


class Flaky:
    def __init__(self, fail_rate: float = 0.1, batch_raise_rate: float = 0.02, batch_sleep_ms: float = 5.0,
                 seed: int | None = None) -> None:
        self.fail_rate = fail_rate
        self.batch_raise_rate = batch_raise_rate
        self.batch_sleep = batch_sleep_ms / 1000.0
        self.random = random.Random(seed if seed is not None else os.getpid())

    def load(self) -> None:
        self.batches = 0

    def _one(self, model_input: Any) -> Any:
        if isinstance(model_input, dict):
            if model_input.get("poison"):
                raise PoisonInput(f"poison input {model_input.get('n')}")
        if self.random.random() < self.fail_rate:
            raise RandomFailure("random model failure")
        return {"ok": model_input.get("n") if isinstance(model_input, dict) else model_input, "pid": os.getpid()}

    def predict(self, model_input: Any) -> Any:
        if isinstance(model_input, dict) and model_input.get("sleep_ms"):
            time.sleep(model_input["sleep_ms"] / 1000.0)
        return self._one(model_input)

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        self.batches += 1
        delay = max([self.batch_sleep] + [x.get("sleep_ms", 0) / 1000.0 for x in inputs if isinstance(x, dict)])
        if delay:
            time.sleep(delay)
        if self.random.random() < self.batch_raise_rate:
            raise RandomFailure("the whole batch failed")
        out: list[Any] = []
        for x in inputs:
            try:
                out.append(self._one(x))
            except Exception as error:  # noqa: BLE001 - an exception instance fails that item alone
                out.append(error)
        return out
