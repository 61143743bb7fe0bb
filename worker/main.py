"""`asyncinfer worker [--model NAME ...] [--concurrency K] [--config FILE]`.

Serves the named models from the models file (--config, else
ASYNCINFER_MODELS_FILE, else worker/models.toml); without --model, every
enabled model whose `requires` modules are importable. Runs until SIGTERM or
SIGINT, then drains (see worker/process.py). Exit status: 0 after a clean
stop, 1 when a model failed to load, 2 for a bad command line or models file.
"""

from __future__ import annotations

import argparse
import sys

from app.settings import Settings
from worker.config import ConfigError, load_model_configs, load_pipelines, models_file, select_models


def worker_command(args: argparse.Namespace, settings: Settings) -> int:
    path = models_file(getattr(args, "config", None), settings.models_file)
    try:
        configs = load_model_configs(path)
        chosen, notes = select_models(configs, getattr(args, "models", None))
        pipelines = load_pipelines(path)
    except ConfigError as error:
        print(f"asyncinfer worker: {error}", file=sys.stderr)
        return 2
    concurrency = getattr(args, "concurrency", None)
    if concurrency is not None and concurrency < 1:
        print("asyncinfer worker: --concurrency must be >= 1", file=sys.stderr)
        return 2
    for note in notes:
        print(f"asyncinfer worker: {note}", file=sys.stderr)
    if not chosen:
        print(f"asyncinfer worker: no model to serve in {path}", file=sys.stderr)
        return 2

    from app.runtime import run_service
    from worker.process import run_worker

    outcome: dict[str, int] = {}

    async def main(url: str, stop) -> None:  # type: ignore[no-untyped-def]
        outcome["code"] = await run_worker(url, settings, chosen, concurrency, stop, pipelines)

    code = run_service(main, settings)
    return code or outcome.get("code", 0)
