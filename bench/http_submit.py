"""HTTP submit throughput: single `async_predict` and bulk `async_predict_batch`
against ONE API process (`asyncinfer serve`, one granian worker) on loopback.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.http_submit
    python -m bench.http_submit --seconds 10 --connections 64 --bulk-size 10000

A fresh migrated database is created (and dropped) on DATABASE_URL's server
(embedded PostgreSQL when unset). The client is a small keep-alive HTTP/1.1
loop on raw asyncio protocols (uvloop): N connections, each sends a request
and waits for the whole answer before the next one (no pipelining). It runs
on the same machine and competes for the same cores as the server and
PostgreSQL, so the figures are a floor for the server alone; the CPU used by
the API process and by PostgreSQL is printed next to them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from importlib.metadata import version

import psycopg
import uvloop

from bench._common import bench_database, machine_line, print_table

ADMIN_KEY = "bench-admin-key-" + "x" * 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: object = None, key: str = ADMIN_KEY) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Api-Key {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children that were waited for."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def postgres_cpu_seconds() -> float:
    """CPU of every postgres process on this machine (the server under test)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() not in ("postgres", "postmaster"):
                    continue
            total += cpu_seconds(int(entry))
        except OSError:
            continue
    return total


@dataclass
class Stats:
    ok: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)


class Conn(asyncio.Protocol):
    """One keep-alive connection sending the same request over and over."""

    def __init__(self, request: bytes, stats: Stats, stop_at: float, record_from: float,
                 done: asyncio.Future[None]) -> None:
        self.request = request
        self.stats = stats
        self.stop_at = stop_at
        self.record_from = record_from
        self.done = done
        self.buf = bytearray()
        self.started = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        self.buf.clear()
        self.started = time.perf_counter()
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15: head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None]) if at >= 0 else 0
        if len(self.buf) < end + 4 + length:
            return
        now = time.perf_counter()
        status = int(head[9:12])
        if now >= self.record_from:
            self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1
            if 200 <= status < 300:
                self.stats.ok += 1
                self.stats.latencies.append(now - self.started)
            else:
                self.stats.errors += 1
        if now >= self.stop_at:
            assert self.transport is not None
            self.transport.close()
            return
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def drive(port: int, request: bytes, connections: int, seconds: float, warmup: float) -> tuple[Stats, float]:
    loop = asyncio.get_running_loop()
    stats = Stats()
    start = time.perf_counter()
    record_from = start + warmup
    stop_at = record_from + seconds
    waits = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(lambda d=done: Conn(request, stats, stop_at, record_from, d), "127.0.0.1", port)
        waits.append(done)
    await asyncio.gather(*waits)
    return stats, time.perf_counter() - record_from


def build_request(path: str, body: bytes, key: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Api-Key {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per phase")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections, single submits")
    parser.add_argument("--bulk-size", type=int, default=10_000, help="items per bulk call")
    parser.add_argument("--bulk-connections", type=int, default=2)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with bench_database() as (url, pg_version):
        port = free_port()
        env = dict(os.environ, DATABASE_URL=url, ASYNCINFER_ADMIN_KEY=ADMIN_KEY, ASYNCINFER_API_WORKERS="1",
                   ASYNCINFER_LOG_LEVEL="WARNING")
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if http("GET", base + "/readyz")[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server did not become ready")
                time.sleep(0.2)
            assert http("PUT", base + "/v1/models/bench", {"capacity": 1})[0] in (200, 201)
            status, created = http("POST", base + "/v1/api_keys", {"name": "bench"})
            assert status == 201, created
            key = created["key"]  # type: ignore[index]
            workers = children_of(server.pid)
            api_pid = workers[0] if workers else server.pid

            rows: list[list[object]] = []
            single_body = json.dumps({"model_input": {"text": "the quick brown fox jumps over the lazy dog"},
                                      "metadata": {"source": "bench"}}).encode()
            item = {"model_input": {"text": "the quick brown fox jumps over the lazy dog"}}
            bulk_body = json.dumps({"requests": [item] * args.bulk_size}).encode()
            phases = [
                ("single async_predict", build_request("/v1/models/bench/async_predict", single_body, key),
                 args.connections, 1),
                (f"bulk async_predict_batch ({args.bulk_size}/call)",
                 build_request("/v1/models/bench/async_predict_batch", bulk_body, key),
                 args.bulk_connections, args.bulk_size),
            ]
            for name, request, connections, per_call in phases:
                api_cpu0, pg_cpu0, wall0 = cpu_seconds(api_pid), postgres_cpu_seconds(), time.perf_counter()
                stats, elapsed = uvloop.run(drive(port, request, connections, args.seconds, args.warmup))
                wall = time.perf_counter() - wall0
                api_cores = (cpu_seconds(api_pid) - api_cpu0) / wall
                pg_cores = (postgres_cpu_seconds() - pg_cpu0) / wall
                rate = stats.ok * per_call / elapsed
                rows.append([
                    name, connections, f"{rate:,.0f}", f"{stats.ok / elapsed:,.0f}",
                    f"{pct(stats.latencies, 0.5):.1f}", f"{pct(stats.latencies, 0.99):.1f}", stats.errors,
                    f"{api_cores:.2f}", f"{api_cores / rate * 1e6:.0f}" if rate else "-", f"{pg_cores:.2f}",
                ])
            with psycopg.connect(url) as conn:
                queued = conn.execute("SELECT count(*) FROM asyncinfer.requests").fetchone()[0]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)

    notes = [
        machine_line(),
        f"PostgreSQL {pg_version}; Litestar {version('litestar')}, granian {version('granian')}, "
        f"psycopg {version('psycopg')}, msgspec {version('msgspec')}, uvloop {version('uvloop')}, "
        f"{platform.python_implementation()} {platform.python_version()}",
        f"one API process (granian, 1 worker, uvloop); client, server and PostgreSQL share the machine; "
        f"{args.seconds:g} s measured after {args.warmup:g} s warm-up per phase; {queued:,} rows inserted in all",
        "cores: CPU used by the API worker process / by all postgres processes on the machine, over the phase's "
        "wall time; µs/request: the API process's CPU per accepted request (what one free core would sustain)",
        f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
        "(anything above ~1.5 means other work competed for the 2 cores)",
    ]
    print_table("HTTP submit throughput (bench/http_submit.py)",
                ["phase", "conns", "requests/s", "calls/s", "p50 ms", "p99 ms", "errors", "API cores",
                 "API CPU µs/request", "PG cores"],
                rows, notes)


if __name__ == "__main__":
    main()
