"""echo: the output is the input."""

from __future__ import annotations

from typing import Any


class Echo:
    def load(self) -> None:
        pass

    def predict(self, model_input: Any) -> Any:
        return model_input

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)


EchoModel = Echo  # the same class under the name some configs use
