"""Models the pipeline tests chain (loaded by import path).

Stage appends its name to the input's `trail`, so a run's output shows
which steps ran, in which order, each exactly once. An input may ask a
stage to fail ({"fail_at": name}: a non-retryable error) or to take time
({"sleep_ms": n}). Double doubles a number (the fan-out test's item model).
"""

from __future__ import annotations

import time
from typing import Any


class StageFailure(ValueError):
    retryable = False


class Stage:
    def __init__(self, name: str) -> None:
        self.name = name

    def load(self) -> None:
        pass

    def predict(self, model_input: Any) -> Any:
        if model_input.get("fail_at") == self.name:
            raise StageFailure(f"{self.name} refuses this input")
        if model_input.get("sleep_at") == self.name:
            time.sleep(model_input.get("sleep_ms", 0) / 1000.0)
        return {**model_input, "trail": [*model_input.get("trail", []), self.name]}


class Double:
    def load(self) -> None:
        pass

    def predict(self, model_input: Any) -> Any:
        return model_input * 2

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        return [x * 2 for x in inputs]
