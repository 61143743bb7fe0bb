"""The models file: which models a worker can serve and how.

One TOML table per model, named by the model (the name requests use):

    [models.my-model]
    class = "my_package.my_module:MyModel"   # required: "module.path:ClassName"
    capacity = 4                    # requests IN_PROGRESS at once, over all workers (upserted on start)
    concurrency = 4                 # requests in flight in one process (default: see below)
    max_batch_size = 32             # predict_batch models: largest batch
    max_batch_wait_ms = 5           # predict_batch models: wait at most this for a batch to fill
    execution_timeout_seconds = 600 # one predict / predict_batch call; then a retryable error
    device = "auto"                 # "auto" (cuda when available, else cpu) | "cpu" | "cuda" | "cuda:N"
    requires = ["torch"]            # modules that must be importable (else `up` skips the model)
    enabled = true                  # false: `up` and a bare `asyncinfer worker` skip it

    [models.my-model.load_options]  # keyword arguments for the class's constructor
    checkpoint = "/models/v3"

Default concurrency: 2 x max_batch_size for a batching model (one batch runs
while the next one forms), else min(capacity, 64).

Pipelines chain models; every worker declares the file's pipelines in the
database on start (asyncinfer.upsert_pipeline checks them):

    [pipelines.audio-to-label]
    steps = [
      { model = "transcribe" },
      { model = "embed", input = { text = "$.text" } },   # a JSON path into the previous output
      { model = "classify", fan_out = "$.chunks" },        # one request per list element, gathered
    ]
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODELS_FILE = Path(__file__).resolve().parent / "models.toml"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # the models.name CHECK in the schema
_CLASS = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
_KEYS = {
    "class", "capacity", "concurrency", "max_batch_size", "max_batch_wait_ms", "execution_timeout_seconds",
    "device", "load_options", "requires", "enabled",
}
MAX_DEFAULT_CONCURRENCY = 64


class ConfigError(ValueError):
    """The models file is wrong; the message names the file, the model and the field."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    class_path: str
    capacity: int = 1
    concurrency: int | None = None
    max_batch_size: int = 32
    max_batch_wait_ms: float = 5.0
    execution_timeout_seconds: float = 600.0
    device: str = "auto"
    load_options: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    enabled: bool = True

    def effective_concurrency(self, batching: bool, override: int | None = None) -> int:
        """Requests this model may have in flight in one process."""
        if override is not None:
            return max(1, override)
        if self.concurrency is not None:
            return self.concurrency
        if batching:
            return 2 * self.max_batch_size
        return max(1, min(self.capacity, MAX_DEFAULT_CONCURRENCY))

    def missing_requirements(self) -> list[str]:
        """Modules named in `requires` that cannot be imported here."""
        missing = []
        for module in self.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(module)
        return missing


def _number(where: str, key: str, value: Any, *, integer: bool, minimum: float, exclusive: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{where}: {key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < minimum or (exclusive and value == minimum):
        raise ConfigError(f"{where}: {key} must be {'>' if exclusive else '>='} {minimum}, got {value!r}")
    return value


def parse_model(name: str, table: Any, source: str = "<config>") -> ModelConfig:
    where = f"{source}: [models.{name}]"
    if not _NAME.match(name):
        raise ConfigError(f"{where}: the model name must match {_NAME.pattern}")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
    class_path = table.get("class")
    if not isinstance(class_path, str) or not _CLASS.match(class_path):
        raise ConfigError(f"{where}: class must be \"package.module:ClassName\", got {class_path!r}")
    kwargs: dict[str, Any] = {"name": name, "class_path": class_path}
    if "capacity" in table:
        kwargs["capacity"] = _number(where, "capacity", table["capacity"], integer=True, minimum=0)
    if "concurrency" in table:
        kwargs["concurrency"] = _number(where, "concurrency", table["concurrency"], integer=True, minimum=1)
    if "max_batch_size" in table:
        kwargs["max_batch_size"] = _number(where, "max_batch_size", table["max_batch_size"], integer=True, minimum=1)
    if "max_batch_wait_ms" in table:
        kwargs["max_batch_wait_ms"] = float(
            _number(where, "max_batch_wait_ms", table["max_batch_wait_ms"], integer=False, minimum=0))
    if "execution_timeout_seconds" in table:
        kwargs["execution_timeout_seconds"] = float(_number(
            where, "execution_timeout_seconds", table["execution_timeout_seconds"], integer=False, minimum=0,
            exclusive=True))
    if "device" in table:
        device = table["device"]
        if not isinstance(device, str) or not _DEVICE.match(device):
            raise ConfigError(f"{where}: device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
        kwargs["device"] = device
    if "load_options" in table:
        if not isinstance(table["load_options"], dict):
            raise ConfigError(f"{where}: load_options must be a table")
        kwargs["load_options"] = dict(table["load_options"])
    if "requires" in table:
        requires = table["requires"]
        if not isinstance(requires, list) or not all(isinstance(m, str) and m for m in requires):
            raise ConfigError(f"{where}: requires must be a list of module names")
        kwargs["requires"] = tuple(requires)
    if "enabled" in table:
        if not isinstance(table["enabled"], bool):
            raise ConfigError(f"{where}: enabled must be true or false")
        kwargs["enabled"] = table["enabled"]
    return ModelConfig(**kwargs)


def _load_toml(text: str, source: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from error
    unknown = sorted(set(data) - {"models", "pipelines"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; "
                          "models go in [models.<name>], pipelines in [pipelines.<name>]")
    return data


def parse_pipelines(text: str, source: str = "<config>") -> dict[str, list[dict[str, Any]]]:
    """The [pipelines.<name>] tables: name -> steps. The shape is checked
    here; paths and templates are checked by the database on declaration."""
    pipelines = _load_toml(text, source).get("pipelines", {})
    if not isinstance(pipelines, dict):
        raise ConfigError(f"{source}: pipelines must be a table of [pipelines.<name>] tables")
    out: dict[str, list[dict[str, Any]]] = {}
    for name, table in pipelines.items():
        where = f"{source}: [pipelines.{name}]"
        if not _NAME.match(name):
            raise ConfigError(f"{where}: the pipeline name must match {_NAME.pattern}")
        if not isinstance(table, dict) or set(table) != {"steps"}:
            raise ConfigError(f"{where}: must hold exactly one key, steps = [{{ model = ... }}, ...]")
        steps = table["steps"]
        if not isinstance(steps, list) or not steps or not all(isinstance(st, dict) for st in steps):
            raise ConfigError(f"{where}: steps must be a non-empty list of {{ model = ..., input = ..., fan_out = ... }}")
        for index, step in enumerate(steps):
            unknown = sorted(set(step) - {"model", "input", "fan_out"})
            if unknown or not isinstance(step.get("model"), str):
                raise ConfigError(f"{where}: steps[{index}] needs model = \"<name>\" and may have input, fan_out"
                                  + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        out[name] = steps
    return out


def load_pipelines(path: str | Path | None = None) -> dict[str, list[dict[str, Any]]]:
    file = Path(path) if path is not None else DEFAULT_MODELS_FILE
    try:
        return parse_pipelines(file.read_text(), str(file))
    except OSError as error:
        raise ConfigError(f"{file}: cannot read the models file: {error}") from error


def parse_model_configs(text: str, source: str = "<config>") -> dict[str, ModelConfig]:
    data = _load_toml(text, source)
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{source}: models must be a table of [models.<name>] tables")
    return {name: parse_model(name, table, source) for name, table in models.items()}


def load_model_configs(path: str | Path | None = None) -> dict[str, ModelConfig]:
    """All models declared in a models file (default: worker/models.toml), by name."""
    file = Path(path) if path is not None else DEFAULT_MODELS_FILE
    try:
        text = file.read_text()
    except OSError as error:
        raise ConfigError(f"{file}: cannot read the models file: {error}") from error
    return parse_model_configs(text, str(file))


def models_file(config_arg: str | None, settings_file: Path | None) -> Path:
    """--config, else ASYNCINFER_MODELS_FILE, else the shipped worker/models.toml."""
    if config_arg:
        return Path(config_arg)
    if settings_file is not None:
        return Path(settings_file)
    return DEFAULT_MODELS_FILE


def select_models(configs: dict[str, ModelConfig], names: list[str] | None) -> tuple[list[ModelConfig], list[str]]:
    """The models to serve: the named ones (each must exist), or every enabled
    one whose requirements are met. Returns (configs, notes about skipped ones)."""
    if names:
        unknown = [n for n in names if n not in configs]
        if unknown:
            raise ConfigError(f"unknown model(s) {', '.join(unknown)}; the models file declares: "
                              f"{', '.join(sorted(configs)) or 'none'}")
        return [configs[n] for n in dict.fromkeys(names)], []
    chosen, notes = [], []
    for config in configs.values():
        if not config.enabled:
            notes.append(f"{config.name}: disabled in the models file")
            continue
        missing = config.missing_requirements()
        if missing:
            notes.append(f"{config.name}: skipped, cannot import {', '.join(missing)}")
            continue
        chosen.append(config)
    return chosen, notes
