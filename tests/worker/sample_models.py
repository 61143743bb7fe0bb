"""Models the worker tests load by import path (tests.worker.sample_models:...)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("sample.model")


class BatchRecorder:
    """Sync predict_batch; each output says how big its batch was and which
    process ran it. {"sleep": s} in an input makes the batch take s seconds."""

    def load(self) -> None:
        self.batches = 0

    def predict_batch(self, inputs: list[Any]) -> list[dict[str, Any]]:
        self.batches += 1
        delay = max((x.get("sleep", 0) for x in inputs if isinstance(x, dict)), default=0)
        if delay:
            time.sleep(delay)
        return [{"batch_size": len(inputs), "batch": self.batches, "pid": os.getpid(), "input": x} for x in inputs]


class PartlyBad:
    """predict_batch fails the whole batch when one input is bad; predict
    fails only the bad one (the worker falls back to it)."""

    def predict(self, model_input: dict[str, Any]) -> dict[str, Any]:
        if model_input.get("bad"):
            raise ValueError(f"bad input {model_input['n']}")
        return {"n": model_input["n"], "via": "predict"}

    def predict_batch(self, inputs: list[dict[str, Any]]) -> list[Any]:
        if any(x.get("bad") for x in inputs):
            raise ValueError("one bad input in the batch")
        return [{"n": x["n"], "via": "predict_batch"} for x in inputs]


class Boom:
    """Logs, prints, then raises."""

    def load(self) -> None:
        pass

    def predict(self, model_input: Any) -> Any:
        log.warning("about to fail on %s", model_input)
        print(f"printed before failing on {model_input}")
        raise ValueError(f"kaboom {model_input}")


class BadLoad:
    def load(self) -> None:
        raise RuntimeError("weights missing at /nowhere/model.bin")

    def predict(self, model_input: Any) -> Any:
        return model_input


class Blocking:
    """A sync predict that blocks its thread (time.sleep), as model code does."""

    def load(self) -> None:
        pass

    def predict(self, model_input: dict[str, Any]) -> dict[str, Any]:
        time.sleep(model_input["seconds"])
        return {"slept": model_input["seconds"], "pid": os.getpid()}


class Stamp:
    """Records when predict started (wall clock, same machine as the test)."""

    def predict(self, model_input: Any) -> dict[str, Any]:
        return {"started_at": time.time()}
