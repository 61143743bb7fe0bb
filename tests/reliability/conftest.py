"""Fixtures of the reliability suite (see helpers.py for the machinery).

Each scenario gets a fresh database (the `database_url` fixture of
tests/conftest.py), its own worker / dispatcher / API processes, and a
figures dict that is printed at the end of the test (`-s` shows it) and
appended to $RELIABILITY_FIGURES (a JSON-lines file) when that is set, so a
full run can fill the table in RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.helpers import ApiServer, create_database, drop_database, start_server
from tests.reliability.helpers import Procs, descendants, kill_tree, pid_alive


def _kill_leftover_api_workers(pids: list[int]) -> None:
    """SIGKILL the granian workers of a stopped server that are still ours (pids are reused)."""
    for pid in pids:
        try:
            if pid_alive(pid) and b"app.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def procs(database_url: str, tmp_path: Path) -> Iterator[Procs]:
    group = Procs(database_url, tmp_path)
    yield group
    group.close()


@pytest.fixture
def api_factory(tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    """start(database_url, **settings) -> a real `asyncinfer serve` process, stopped (or killed) at the end."""
    servers: list[tuple[ApiServer, list[int]]] = []

    def start(database_url: str, **settings: str) -> ApiServer:
        settings.setdefault("log_level", "INFO")
        server = start_server(database_url, tmp_path, **settings)
        # granian's worker processes, known now: a SIGKILLed main orphans them (test_process_faults)
        servers.append((server, descendants(server.process.pid)))
        return server

    yield start
    for server, workers in servers:
        if server.process.poll() is None:
            try:
                server.stop(timeout=10)
            except AssertionError:
                pass
        kill_tree(server.process.pid)
        _kill_leftover_api_workers(workers)


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Measured outcomes of a scenario, reported at its end."""
    found: dict[str, Any] = {}
    started = time.monotonic()
    yield found
    found["wall_s"] = round(time.monotonic() - started, 1)
    line = json.dumps({"test": request.node.nodeid, **found}, default=str, sort_keys=True)
    print(f"\nFIGURES {line}")
    path = os.environ.get("RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="session")
def shared_db(server_url: str, template_db: str) -> Iterator[str]:
    url = create_database(server_url, template_db)
    yield url
    drop_database(server_url, url)


@pytest.fixture(scope="session")
def shared_api(shared_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """One API process for the bad-input and security tests, configured as in
    production where it matters: private webhook targets refused, keys
    cached for a minute (so revocation must come by NOTIFY), INFO logs."""
    server = start_server(shared_db, tmp_path_factory.mktemp("reliability-api"), allow_private_webhooks="false",
                          api_key_cache_seconds="60", predict_timeout_seconds="1",
                          predict_max_timeout_seconds="2", max_batch_items="100", log_level="INFO")
    workers = descendants(server.process.pid)
    yield server
    try:
        server.stop(timeout=10)
    finally:
        _kill_leftover_api_workers(workers)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow` scenarios (the 100 000-request soak, the heavier fault runs) are
    deselected by pyproject's `addopts = "-m 'not slow'"`; should that be
    overridden (`-o addopts=`), they are skipped here unless `-m slow` or
    RELIABILITY_SLOW=1 asks for them. CI runs the un-marked run of every
    scenario within its budget."""
    if "slow" in (config.option.markexpr or "") or os.environ.get("RELIABILITY_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or RELIABILITY_SLOW=1")
    for item in items:
        if item.get_closest_marker("slow") is not None and "tests/reliability/" in item.nodeid:
            item.add_marker(skip)
