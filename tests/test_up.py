"""`asyncinfer up` on a machine with no PostgreSQL configured: the embedded
server, migrations, API, worker and dispatcher from one command, a request
served end to end, and a clean stop on SIGTERM (no postgres left behind)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.embedded

MODELS = """
[models.echo]
class = "worker.models.echo:EchoModel"
capacity = 4
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postmaster_pid(data_dir: Path) -> int | None:
    pid_file = data_dir / "pg18" / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


def test_up_serves_a_request_end_to_end_and_stops_cleanly(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(MODELS)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCINFER_", "DATABASE_URL", "PG"))}
    env.update(ASYNCINFER_DATA_DIR=str(tmp_path / "data"), ASYNCINFER_PORT=str(port),
               ASYNCINFER_MODELS_FILE=str(models), ASYNCINFER_POLL_INTERVAL_SECONDS="0.5")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        key = None
        deadline = time.monotonic() + 120
        while key is None and time.monotonic() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
            if match := re.search(r"admin API key: (\S+)", line):
                key = match.group(1)
        assert key, "".join(lines)
        headers = {"Authorization": f"Api-Key {key}"}
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
            while time.monotonic() < deadline:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            created = client.post("/v1/models/echo/async_predict", json={"model_input": {"hello": "world"}})
            assert created.status_code == 201, created.text
            request_id = created.json()["request_id"]
            status = None
            while time.monotonic() < deadline:
                status = client.get(f"/v1/async_request/{request_id}").json()
                if status["status"] in ("SUCCEEDED", "FAILED"):
                    break
                time.sleep(0.1)
            assert status and status["status"] == "SUCCEEDED", status
            output = client.get(f"/v1/async_request/{request_id}/output")
            assert output.status_code == 200 and output.json() == {"hello": "world"} or \
                output.json().get("output") == {"hello": "world"}, output.text
        pid = postmaster_pid(tmp_path / "data")
        assert pid is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            rest = proc.communicate()[0]
        lines.append(rest or "")
    assert proc.returncode == 0, "".join(lines)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"postmaster {pid} still running after up stopped")
