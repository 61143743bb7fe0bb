"""Real worker processes (`python -m app.cli worker ...`) against the test database."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.worker.helpers import BASE_MODELS, REPO, Spawn, WorkerProc


@pytest.fixture
def spawn(database_url: str, tmp_path: Path) -> Iterator[Spawn]:
    """spawn(models, extra_toml="", env={}, concurrency=None) -> a running worker process."""
    procs: list[WorkerProc] = []

    def start(models: list[str], extra_toml: str = "", env: dict[str, str] | None = None,
              concurrency: int | None = None, base: str = BASE_MODELS) -> WorkerProc:
        config = tmp_path / f"models-{len(procs)}.toml"
        config.write_text(base + "\n" + extra_toml)
        log_path = tmp_path / f"worker-{len(procs)}.log"
        full_env = dict(os.environ)
        full_env.update({
            "DATABASE_URL": database_url,
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "ASYNCINFER_POLL_INTERVAL_SECONDS": "0.3",
            "ASYNCINFER_MAINTENANCE_INTERVAL_SECONDS": "0.3",
            "ASYNCINFER_WORKER_SHUTDOWN_GRACE_SECONDS": "5",
        })
        full_env.update(env or {})
        argv = [sys.executable, "-m", "app.cli", "worker", "--config", str(config)]
        for name in models:
            argv += ["--model", name]
        if concurrency is not None:
            argv += ["--concurrency", str(concurrency)]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
        worker = WorkerProc(proc, log_path, models)
        procs.append(worker)
        return worker

    yield start
    for worker in procs:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait(timeout=10)

