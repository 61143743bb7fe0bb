"""Real embedded PostgreSQL 18 (no mocks): start, persistence, reuse, SIGTERM, no orphans, TCP."""

from __future__ import annotations

import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psycopg
import pytest

from app.db.embedded import EmbeddedPostgres

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# A child process that owns the server: prints the postmaster pid, then sleeps until killed.
CHILD = textwrap.dedent(
    """
    import pathlib, sys, time
    from app.db.embedded import EmbeddedPostgres, stop_on_sigterm
    stop_on_sigterm()
    data_dir = pathlib.Path(sys.argv[1])
    pg = EmbeddedPostgres(data_dir)
    pg.start()
    assert pg.owned
    pid = int((data_dir / "pg18" / "postmaster.pid").read_text().split()[0])
    print(pid, flush=True)
    time.sleep(300)
    """
)


def _alive(pid: int) -> bool:
    # A reparented postmaster may linger as a zombie if PID 1 does not reap: that counts as gone.
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _postmaster_pid(data_dir: pathlib.Path) -> int:
    return int((data_dir / "pg18" / "postmaster.pid").read_text().split()[0])


def _spawn_owner(data_dir: pathlib.Path) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    ready, _, _ = select.select([child.stdout], [], [], 60)
    line = child.stdout.readline() if ready else ""
    if not line.strip():
        child.kill()
        _, err = child.communicate()
        pytest.fail(f"child did not report a postmaster pid:\n{err}")
    pid = int(line)
    assert _alive(pid)
    return child, pid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.embedded
def test_start_connect_version(tmp_path: pathlib.Path) -> None:
    with EmbeddedPostgres(tmp_path) as pg:
        assert pg.owned
        assert pg.start() == pg.url  # idempotent
        with psycopg.connect(pg.url) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            assert conn.execute("SHOW fsync").fetchone()[0] == "on"
            assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        assert version.startswith("18"), version
        if os.geteuid() == 0:  # postgres refuses root; the module must have switched user
            status = pathlib.Path(f"/proc/{_postmaster_pid(tmp_path)}/status").read_text()
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uid_line.split()[1] != "0"
    assert not pg.owned
    pg.stop()  # idempotent


@pytest.mark.embedded
def test_data_survives_restart(tmp_path: pathlib.Path) -> None:
    with EmbeddedPostgres(tmp_path) as pg:
        first_pid = _postmaster_pid(tmp_path)
        with psycopg.connect(pg.url) as conn:
            conn.execute("CREATE TABLE jobs (id int PRIMARY KEY, payload text)")
            conn.execute("INSERT INTO jobs VALUES (1, 'hello')")
    assert _wait_gone(first_pid, 5)

    with EmbeddedPostgres(tmp_path) as pg2:
        assert pg2.owned
        with psycopg.connect(pg2.url) as conn:
            assert conn.execute("SELECT payload FROM jobs WHERE id = 1").fetchone() == ("hello",)


@pytest.mark.embedded
def test_second_instance_reuses_running_server(tmp_path: pathlib.Path) -> None:
    with EmbeddedPostgres(tmp_path) as first:
        pid = _postmaster_pid(tmp_path)
        second = EmbeddedPostgres(tmp_path)
        assert second.start() == first.url
        assert not second.owned
        with psycopg.connect(second.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        second.stop()
        assert _alive(pid)
        with psycopg.connect(first.url) as conn:  # still serving
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert _wait_gone(pid, 5)


@pytest.mark.embedded
def test_sigterm_stops_server(tmp_path: pathlib.Path) -> None:
    child, pid = _spawn_owner(tmp_path)
    try:
        child.send_signal(signal.SIGTERM)
        child.wait(30)
        assert child.returncode == 143, child.stderr.read()
        assert _wait_gone(pid), "postmaster survived SIGTERM of its owner"
        assert "database system is shut down" in (tmp_path / "pg18.log").read_text()
    finally:
        child.kill()
        child.wait()
        if _alive(pid):
            os.kill(pid, signal.SIGQUIT)


@pytest.mark.embedded
def test_no_orphan_after_sigkill(tmp_path: pathlib.Path) -> None:
    child, pid = _spawn_owner(tmp_path)
    try:
        child.kill()
        child.wait(10)
        assert _wait_gone(pid), "postmaster orphaned after SIGKILL of its owner"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGQUIT)


@pytest.mark.embedded
def test_tcp_port(tmp_path: pathlib.Path) -> None:
    port = _free_port()
    with EmbeddedPostgres(tmp_path, port=port) as pg:
        assert f"port={port}" in pg.url
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres") as conn:
            assert conn.execute("SELECT inet_server_port()").fetchone() == (port,)
