"""torch-mlp: a small torch classifier with deterministic weights.

Input {"features": [input_dim numbers]} (or the bare list); output
{"label": int, "probabilities": [classes floats]}. The weights come from a
fixed seed (built on the CPU, then moved), so every process and device
serves the same function. CUDA when available (device "auto"), else CPU;
inference mode; predict_batch runs one forward pass per batch.
"""

from __future__ import annotations

from typing import Any


class BadInput(ValueError):
    retryable = False


class TorchMLP:
    def __init__(self, device: str = "cpu", input_dim: int = 64, hidden: int = 2048, depth: int = 3,
                 classes: int = 10, seed: int = 0, decimals: int = 6) -> None:
        self.device = device
        self.input_dim = input_dim
        self.hidden = hidden
        self.depth = depth
        self.classes = classes
        self.seed = seed
        self.decimals = decimals
        self.net: Any = None

    def load(self) -> None:
        import torch
        from torch import nn

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            layers: list[nn.Module] = [nn.Linear(self.input_dim, self.hidden), nn.GELU()]
            for _ in range(self.depth - 1):
                layers += [nn.Linear(self.hidden, self.hidden), nn.GELU()]
            layers.append(nn.Linear(self.hidden, self.classes))
            net = nn.Sequential(*layers)
        self.net = net.eval().to(self.device)
        self.predict_batch([{"features": [0.0] * self.input_dim}])  # warm up (allocator, kernels)

    def _features(self, item: Any) -> list[float]:
        features = item.get("features") if isinstance(item, dict) else item
        if not isinstance(features, list) or len(features) != self.input_dim:
            got = f"{len(features)} values" if isinstance(features, list) else type(features).__name__
            raise BadInput(f"features: must be a list of {self.input_dim} numbers, got {got}")
        return features

    def predict(self, model_input: Any) -> dict[str, Any]:
        return self.predict_batch([model_input])[0]

    def predict_batch(self, inputs: list[Any]) -> list[dict[str, Any]]:
        import torch

        try:
            x = torch.tensor([self._features(item) for item in inputs], dtype=torch.float32)
        except (TypeError, ValueError) as error:
            if isinstance(error, BadInput):
                raise
            raise BadInput(f"features: must be numbers ({error})") from None
        with torch.inference_mode():
            probs = torch.softmax(self.net(x.to(self.device, non_blocking=True)), dim=-1)
            labels = probs.argmax(dim=-1).tolist()
            rounded = probs.double().round(decimals=self.decimals).cpu().tolist()
        return [{"label": label, "probabilities": p} for label, p in zip(labels, rounded)]
