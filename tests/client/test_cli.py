"""The CLI against a running API server and a real worker process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.helpers import ADMIN_KEY, REPO, ApiServer, start_server

MODELS = """
[models.echo]
class = "worker.models.echo:EchoModel"
capacity = 4

[pipelines.echo-twice]
steps = [{ model = "echo" }, { model = "echo", input = { again = "$" } }]
"""


@pytest.fixture
def stack(database_url: str, tmp_path: Path) -> Iterator[ApiServer]:
    """API server + one echo worker on a fresh database."""
    server = start_server(database_url, tmp_path)
    models = tmp_path / "models.toml"
    models.write_text(MODELS)
    env = dict(os.environ, DATABASE_URL=database_url, ASYNCINFER_MODELS_FILE=str(models),
               ASYNCINFER_LOG_LEVEL="WARNING")
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--model", "echo"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        with server.client(ADMIN_KEY) as admin:  # the worker registers the model when it starts
            while admin.get("/v1/models/echo").status_code != 200:
                assert worker.poll() is None and time.monotonic() < deadline, "worker did not start"
                time.sleep(0.1)
        yield server
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        server.stop()


def cli(server: ApiServer, *args: str, key: str = ADMIN_KEY) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ASYNCINFER_URL=server.base_url, ASYNCINFER_API_KEY=key, COLUMNS="120")
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_submit_wait_writes_outputs_in_input_order(stack: ApiServer, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.jsonl"
    lines = [json.dumps({"text": f"line {i}"}) for i in range(250)]
    lines.append(json.dumps({"model_input": "a full body", "priority": 0}))
    inputs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "outputs.jsonl"
    done = cli(stack, "submit", "echo", "--input-file", str(inputs), "--batch-size", "100", "--wait",
               "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "submitted" in done.stderr and "finished" in done.stderr  # the two progress bars
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["output"] for r in results] == [{"text": f"line {i}"} for i in range(250)] + ["a full body"]
    assert {r["status"] for r in results} == {"SUCCEEDED"}
    # status of one of them
    status = cli(stack, "status", results[0]["request_id"])
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED"


def test_queue_models_cancel_and_errors(stack: ApiServer, tmp_path: Path) -> None:
    assert cli(stack, "models", "pause", "echo").returncode == 0
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("1\n2\n3\n")
    submitted = cli(stack, "submit", "echo", "--input-file", str(inputs))
    assert submitted.returncode == 0, submitted.stderr
    ids = submitted.stdout.split()
    assert len(ids) == 3
    table = cli(stack, "queue", "echo")
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() + table.stderr.splitlines() if "echo" in line)
    assert " 3 " in row and "yes" in row  # 3 queued, paused
    canceled = cli(stack, "cancel", ids[0])
    assert canceled.returncode == 0 and json.loads(canceled.stdout)["status"] == "CANCELED"
    again = cli(stack, "cancel", ids[0])
    assert again.returncode == 1 and again.stderr.startswith("error: HTTP 409")
    assert len(again.stderr.strip().splitlines()) == 1  # one clear line
    capacity = cli(stack, "models", "set-capacity", "echo", "7")
    assert json.loads(capacity.stdout)["capacity"] == 7
    listing = cli(stack, "models", "list")
    assert "echo" in listing.stdout + listing.stderr
    assert cli(stack, "models", "resume", "echo").returncode == 0
    bad = cli(stack, "status", "not-a-request-id")
    assert bad.returncode == 1 and bad.stderr.startswith("error: HTTP 4")
    wrong_key = cli(stack, "queue", "echo", key="nope-" + "x" * 20)
    assert wrong_key.returncode == 1 and "401" in wrong_key.stderr


def test_submit_runs_of_a_pipeline(stack: ApiServer, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(20)))
    out = tmp_path / "outputs.jsonl"
    done = cli(stack, "submit", "echo-twice", "--pipeline", "--input-file", str(inputs), "--wait",
               "--output", str(out))
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["output"] for r in results] == [{"again": {"n": i}} for i in range(20)]
