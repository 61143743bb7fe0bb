"""`asyncinfer up`: the whole service from one command.

Starts (or reuses) the database — the embedded PostgreSQL when DATABASE_URL
is unset — migrates it, then supervises child processes: the API, one
worker per configured model and the webhook dispatcher. A child that dies is
restarted with backoff; Ctrl-C or SIGTERM stops every child (SIGTERM, then
SIGKILL after a grace period) and then the database.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.db.migrate import migrate
from app.db.url import resolve_database_url
from app.logs import configure_logging
from app.settings import Settings

log = logging.getLogger("asyncinfer.up")

GRACE_SECONDS = 30.0
MAX_RESTARTS_PER_MINUTE = 5


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(self.argv, env=env)
        log.info("started %s (pid %s)", self.name, self.process.pid)


def local_admin_key(data_dir: Path) -> str:
    """A stable admin key for local use, kept in the data directory (0600)."""
    path = data_dir / "admin.key"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "ai_admin_" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def children_for(models: list[str]) -> list[Child]:
    cli = [sys.executable, "-m", "app.cli"]
    kids = [Child("api", [*cli, "serve"]), Child("dispatcher", [*cli, "dispatcher"])]
    kids += [Child(f"worker[{name}]", [*cli, "worker", "--model", name]) for name in models]
    return kids


def up_command(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings)
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    url, server = resolve_database_url(settings)
    kids: list[Child] = []
    try:
        migrate(url)
        from worker.config import load_model_configs, models_file, select_models

        config_path = models_file(args.config, settings.models_file)
        chosen, notes = select_models(load_model_configs(config_path), None)
        for note in notes:
            log.info("model %s", note)
        models = [config.name for config in chosen]
        admin_key = os.environ.get("ASYNCINFER_ADMIN_KEY") or local_admin_key(settings.data_dir)
        env = dict(os.environ, DATABASE_URL=url, ASYNCINFER_ADMIN_KEY=admin_key)
        env["ASYNCINFER_MODELS_FILE"] = str(config_path)

        kids = children_for(models)
        for kid in kids:
            kid.start(env)
        print(f"asyncinfer is up: http://{settings.host}:{settings.port}  (models: {', '.join(models) or 'none'})",
              flush=True)
        print(f"admin API key: {admin_key}", flush=True)
        print(f"database: {url}", flush=True)

        while not stopping:
            time.sleep(0.2)
            for kid in kids:
                assert kid.process is not None
                code = kid.process.poll()
                if code is None or stopping:
                    continue
                now = time.monotonic()
                kid.restarts = [t for t in kid.restarts if now - t < 60] + [now]
                if len(kid.restarts) > MAX_RESTARTS_PER_MINUTE:
                    log.error("%s keeps dying (exit %s); stopping everything", kid.name, code)
                    return 1
                log.warning("%s exited with %s; restarting", kid.name, code)
                time.sleep(min(2 ** len(kid.restarts) * 0.1, 5))
                kid.start(env)
        return 0
    finally:
        stop_children(kids)
        if server is not None:
            server.stop()


def stop_children(kids: list[Child]) -> None:
    running = [k for k in kids if k.process is not None and k.process.poll() is None]
    for kid in running:
        kid.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    deadline = time.monotonic() + GRACE_SECONDS
    for kid in running:
        assert kid.process is not None
        try:
            kid.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", kid.name, GRACE_SECONDS)
            kid.process.kill()
            kid.process.wait()
