"""sleep: waits {"seconds": x} (or a bare number), then answers.

Async, so a cancel or a timeout stops it at once and no thread is held.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any


class BadInput(ValueError):
    retryable = False  # the same input fails the same way: do not retry


class Sleep:
    def __init__(self, max_seconds: float = 86_400.0) -> None:
        self.max_seconds = max_seconds

    def load(self) -> None:
        pass

    async def predict(self, model_input: Any) -> dict[str, Any]:
        seconds = model_input.get("seconds", 1.0) if isinstance(model_input, dict) else model_input
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
            raise BadInput(f"seconds: must be a number, got {seconds!r}")
        if not 0 <= seconds <= self.max_seconds:
            raise BadInput(f"seconds: must be between 0 and {self.max_seconds:g}, got {seconds!r}")
        started = time.time()
        await asyncio.sleep(seconds)
        return {"slept": seconds, "started_at": started}


SleepModel = Sleep  # the same class under the name some configs use
