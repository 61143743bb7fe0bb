"""The best-known Python PostgreSQL queues, side by side, same workload, same server, same run.

    python bench/peers.py [--quick] [--pgqueuer-n 20000] [--procrastinate-n 3000] [--rounds 3]

PgQueuer (newest 1.x) and procrastinate (newest 3.x) are pip-installed into
a throwaway virtual environment OUTSIDE the repo ($TMPDIR/asyncinfer-peers-venv
by default, or --venv / ASYNCINFER_PEERS_VENV; created if missing, reused and
`pip install --upgrade`d otherwise), never into the project venv. Each peer is
driven by its own script under bench/peers/, run with that venv's python,
against a fresh database of its own on DATABASE_URL's server (or the embedded
one when DATABASE_URL is unset), with the library's own recommended settings
for throughput (see the drivers' docstrings and the notes printed with the
table). Each driver measures, on the no-op workload:

  1. enqueue N jobs/s, in bulk (--enqueue-batch jobs per call, as
     bench/queue_core.py submits);
  2. drain N with a no-op handler: jobs/s end to end, one worker
     (1 and 2 are repeated --rounds times from empty tables; median shown);
  3. idle wake-up latency p50/p95/p99: the worker idle and listening, one job
     enqueued, from the enqueue's commit (acknowledged to the submitter) to
     the handler's first line; with the worker in its own process, and again
     in the submitter's process.

and prints one JSON line; this script prints the table. `--quick` is the CI
smoke (tiny N, one round, three wake-up samples): it only checks that everything runs.
asyncinfer's own rows come from its own benches: see asyncinfer_rows().
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from app.db.url import with_database  # noqa: E402
from bench._common import machine_line, print_table  # noqa: E402

PEERS_DIR = Path(__file__).resolve().parent / "peers"
RESULT_PREFIX = "PEER_RESULT "  # bench/peers/_driver_common.py
# asyncpg and uvloop: what PgQueuer's own benchmark runs on (its docs measure
# asyncpg at about twice psycopg); procrastinate uses psycopg.
PEER_REQUIREMENTS = ["pgqueuer>=1,<2", "procrastinate>=3,<4", "psycopg[binary]>=3.1", "asyncpg", "uvloop"]
WAKE_MODES = ("process", "inprocess")


# ---------------------------------------------------------------------------
# asyncinfer's own figures: PLUG OURS IN HERE.
# ---------------------------------------------------------------------------
def asyncinfer_rows(quick: bool = False) -> list[dict[str, Any]]:
    """asyncinfer's own rows for the side-by-side table; [] for now.

    Return dicts shaped like the drivers' JSON lines, e.g.
        {"library": "asyncinfer", "version": "0.1.0", "driver": "psycopg 3.2",
         "n": 50000, "enqueue_per_s": ..., "drain_per_s": ...,
         "settings": "one worker process, claim/finish batch 100",
         "wake": {"process": {"wake_samples": 50, "wake_p50_ms": ..., "wake_p95_ms": ..., "wake_p99_ms": ...}}}
    measured in this same run on the same server (bench/queue_core.py, the
    wake-up bench, ...). Rows come first in the table.
    """
    return []


# ---------------------------------------------------------------------------


def default_venv() -> Path:
    return Path(os.environ.get("ASYNCINFER_PEERS_VENV") or Path(tempfile.gettempdir()) / "asyncinfer-peers-venv")


def ensure_venv(venv: Path, install: bool) -> Path:
    """The throwaway venv's python, with the peers installed (newest allowed)."""
    if venv.resolve().is_relative_to(ROOT):
        raise SystemExit(f"{venv}: the peers venv must live outside the repo")
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating the peers venv at {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    else:
        print(f"reusing the peers venv at {venv}", flush=True)
    if install:
        started = time.perf_counter()
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--upgrade",
             *PEER_REQUIREMENTS],
            capture_output=True, text=True,
        )
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"pip install into {venv} failed ({done.returncode})")
        print(f"pip install --upgrade {' '.join(PEER_REQUIREMENTS)}: {time.perf_counter() - started:.1f} s",
              flush=True)
    return python


def venv_versions(python: Path) -> dict[str, str]:
    names = ["pgqueuer", "procrastinate", "psycopg", "asyncpg", "uvloop"]
    code = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    out = subprocess.run([str(python), "-c", code, *names], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


@contextmanager
def server() -> Iterator[str]:
    """DATABASE_URL's server, or the embedded one (as bench._common.bench_database)."""
    base = os.environ.get("DATABASE_URL")
    if base:
        yield base
        return
    from app.db.embedded import EmbeddedPostgres
    from app.settings import get_settings

    data_dir = get_settings().data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    embedded = EmbeddedPostgres(data_dir)
    try:
        yield embedded.start()
    finally:
        embedded.stop()


@contextmanager
def fresh_database(base: str, tag: str) -> Iterator[str]:
    """An empty database of its own for one peer, dropped afterwards."""
    name = f"asyncinfer_peers_{tag}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(base, name)
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_driver(python: Path, script: str, url: str, extra: list[str], timeout: float) -> dict[str, Any]:
    argv = [str(python), str(PEERS_DIR / script), "--url", url, *extra]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=PEERS_DIR)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise RuntimeError(f"{script} failed (exit {done.returncode})")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall_s"] = time.perf_counter() - started
    print(f"{script}: done in {result['wall_s']:.1f} s", flush=True)
    return result


def rate_cell(result: dict[str, Any], what: str) -> str:
    """Median of the rounds, and their range when there were several."""
    rounds = result.get(f"{what}_rounds") or []
    cell = f"{result[f'{what}_per_s']:,.0f}"
    if len(rounds) > 1:
        cell += f" ({min(rounds):,.0f}–{max(rounds):,.0f})"
    return cell


def wake_cell(result: dict[str, Any], mode: str) -> str:
    w = (result.get("wake") or {}).get(mode)
    if not w:
        return "-"
    return f"{w['wake_p50_ms']:.2f} / {w['wake_p95_ms']:.2f} / {w['wake_p99_ms']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny N, 1 round, 3 wake-up samples")
    parser.add_argument("--pgqueuer-n", type=int, default=20_000)
    parser.add_argument("--procrastinate-n", type=int, default=3_000)
    parser.add_argument("--rounds", type=int, default=3, help="enqueue + drain rounds per peer (median shown)")
    parser.add_argument("--enqueue-batch", type=int, default=1000, help="jobs per bulk enqueue call")
    parser.add_argument("--pgqueuer-batch", type=int, default=500, help="PgQueuer QueueManager dequeue batch")
    parser.add_argument("--procrastinate-concurrency", type=int, default=4, help="procrastinate worker concurrency")
    parser.add_argument("--wake-samples", type=int, default=50)
    parser.add_argument("--only", default="pgqueuer,procrastinate", help="comma list of peers to run")
    parser.add_argument("--venv", type=Path, default=default_venv(), help="throwaway venv (outside the repo)")
    parser.add_argument("--no-install", action="store_true", help="reuse the venv as it is, no pip")
    args = parser.parse_args()
    if args.quick:
        args.pgqueuer_n, args.procrastinate_n, args.wake_samples, args.rounds = 500, 200, 3, 1

    python = ensure_venv(args.venv, install=not args.no_install)
    versions = venv_versions(python)
    peers = {
        "pgqueuer": ("pgqueuer_driver.py", args.pgqueuer_n,
                     ["--batch", str(args.pgqueuer_batch)]),
        "procrastinate": ("procrastinate_driver.py", args.procrastinate_n,
                          ["--concurrency", str(args.procrastinate_concurrency)]),
    }
    chosen = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(chosen) - set(peers)
    if unknown:
        raise SystemExit(f"unknown peers: {', '.join(sorted(unknown))}")

    results: list[dict[str, Any]] = []
    failures: list[str] = []
    with server() as base:
        with psycopg.connect(base, autocommit=True) as conn:
            pg_version = conn.execute("SHOW server_version").fetchone()[0]
        results.extend(asyncinfer_rows(quick=args.quick))
        for name in chosen:
            script, n, extra = peers[name]
            common = ["--n", str(n), "--enqueue-batch", str(args.enqueue_batch), "--rounds", str(args.rounds),
                      "--wake-samples", str(args.wake_samples), "--wake-modes", ",".join(WAKE_MODES)]
            try:
                with fresh_database(base, name) as url:
                    results.append(run_driver(python, script, url, common + extra, timeout=600))
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                failures.append(f"{name}: {error}")

    rows = [
        [
            r["library"],
            f"{r['version']} ({r.get('driver', '?')}, {r.get('loop', '?')})",
            f"{r['n']:,}",
            rate_cell(r, "enqueue"),
            rate_cell(r, "drain"),
            wake_cell(r, "process"),
            wake_cell(r, "inprocess"),
        ]
        for r in results
    ]
    rows += [[f.split(":", 1)[0], "FAILED", "-", "-", "-", "-", "-"] for f in failures]
    peer_drains = [max(r.get("drain_rounds") or [r["drain_per_s"]]) for r in results if r["library"] != "asyncinfer"]
    samples = max((w.get("wake_samples", 0) for r in results for w in (r.get("wake") or {}).values()), default=0)
    notes = [
        f"machine: {machine_line()}",
        f"PostgreSQL {pg_version}; one fresh database per library; no-op handler; payload {{\"n\": i}}",
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"peers venv: {args.venv} (Python {results[0]['python'] if results else '?'}); "
        + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"enqueue: {args.enqueue_batch} jobs per bulk call (PgQueuer Queries.enqueue with lists; "
        "procrastinate Task.batch_defer_async); VACUUM ANALYZE before the drain; "
        f"{args.rounds} enqueue + drain round(s) per peer from empty tables: median (min–max)",
        *(f"{r['library']}: {r['settings']}" for r in results),
        "drain: one worker draining N queued jobs, start of the worker to its return with every completion "
        "recorded (PgQueuer drain mode; procrastinate wait=False)",
        f"wake-up: {samples} samples after 3 discarded, 0.15-0.3 s idle between; commit acknowledged to the "
        "submitter -> handler's first line, CLOCK_MONOTONIC across processes",
    ]
    if peer_drains:
        notes.append(f"DESIGN §5 bar for asyncinfer: ≥ 3× the best peer drain here (best round) = "
                     f"{3 * max(peer_drains):,.0f}/s")
    if args.quick:
        notes.append("--quick: smoke run, figures are not meaningful")
    print_table(
        "Peers: PgQueuer and procrastinate on the same no-op workload",
        ["library", "version (driver, loop)", "N", "enqueue/s", "drain jobs/s (end to end)",
         "wake p50/p95/p99 ms (worker own process)", "wake p50/p95/p99 ms (worker in-process)"],
        rows,
        notes,
    )
    if failures:
        for f in failures:
            print(f"FAILED {f}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
