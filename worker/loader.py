"""Import, construct and load a model class: any class with `load()` and
`predict(model_input)` (sync or async), optionally `predict_batch(inputs)`.

Construction: `Class(**load_options)`, plus `device=<resolved device>` when
the constructor takes a `device` parameter (or **kwargs) and load_options
does not set one. `load()` is optional; it runs in a thread when sync.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from typing import Any

from worker.config import ModelConfig


@dataclass
class LoadedModel:
    config: ModelConfig
    instance: Any
    predict: Any | None
    predict_async: bool
    predict_batch: Any | None
    predict_batch_async: bool
    device: str | None

    @property
    def batching(self) -> bool:
        """predict_batch opts into dynamic batching; with max_batch_size 1 a
        model that also has predict runs one request per call instead."""
        if self.predict_batch is None:
            return False
        return self.config.max_batch_size > 1 or self.predict is None


def resolve_device(device: str) -> str:
    """'auto': 'cuda' when torch is importable and sees a GPU, else 'cpu'."""
    if device != "auto":
        return device
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def import_class(class_path: str) -> type:
    module_name, _, attr = class_path.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{class_path} is not a class")
    return target


def _accepts_device(cls: type) -> bool:
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "device" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def construct(config: ModelConfig) -> LoadedModel:
    """Import and construct (no load() yet); raises what the model raises."""
    cls = import_class(config.class_path)
    kwargs = dict(config.load_options)
    device = None
    if "device" in kwargs:
        device = str(kwargs["device"])
    elif _accepts_device(cls):
        device = resolve_device(config.device)
        kwargs["device"] = device
    instance = cls(**kwargs)
    predict = getattr(instance, "predict", None)
    predict_batch = getattr(instance, "predict_batch", None)
    if not callable(predict):
        predict = None
    if not callable(predict_batch):
        predict_batch = None
    if predict is None and predict_batch is None:
        raise TypeError(f"{config.class_path} has neither predict(model_input) nor predict_batch(inputs)")
    return LoadedModel(
        config=config,
        instance=instance,
        predict=predict,
        predict_async=predict is not None and _is_async(predict),
        predict_batch=predict_batch,
        predict_batch_async=predict_batch is not None and _is_async(predict_batch),
        device=device,
    )


def load_is_async(instance: Any) -> bool:
    load = getattr(instance, "load", None)
    return load is not None and _is_async(load)
