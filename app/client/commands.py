"""CLI commands that talk to a running API: submit, status, cancel, queue, models.

Errors print one line and exit non-zero; results print as JSON or a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from app.client.http import ApiError, Client
from app.settings import Settings

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELED", "EXPIRED", "WEBHOOK_FAILED"}
STATUS_CONCURRENCY = 16


def read_inputs(path: Path, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One request per JSONL line: an object with `model_input` is a whole
    async_predict body; any other JSON value is the model input itself."""
    bodies = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON: {error.msg}") from None
            body = value if isinstance(value, dict) and "model_input" in value else {"model_input": value}
            bodies.append({**extra, **body})
    return bodies


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


async def _submit(client: Client, args: argparse.Namespace, console: Console) -> int:
    extra: dict[str, Any] = {}
    if args.priority is not None:
        extra["priority"] = args.priority
    if args.webhook:
        extra["webhook_endpoint"] = args.webhook
    bodies = read_inputs(Path(args.input_file), extra)
    ids: list[str] = []
    with _progress(console) as progress:
        task = progress.add_task("submitted", total=len(bodies))
        for start in range(0, len(bodies), args.batch_size):
            chunk = bodies[start:start + args.batch_size]
            ids += await client.submit_batch(args.model, chunk, pipeline=args.pipeline)
            progress.update(task, advance=len(chunk))
        if not args.wait:
            progress.stop()
            for request_id in ids:
                print(request_id)
            return 0
        results = await _wait(client, ids, progress)
    out = Path(args.output)
    with out.open("w") as f:
        for request_id in ids:
            f.write(json.dumps(results[request_id]) + "\n")
    counts: dict[str, int] = {}
    for result in results.values():
        counts[result["status"]] = counts.get(result["status"], 0) + 1
    console.print(f"wrote {len(ids)} results to {out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0 if counts.get("SUCCEEDED", 0) == len(ids) else 1


async def _wait(client: Client, ids: list[str], progress: Progress) -> dict[str, dict[str, Any]]:
    """Poll until every request is terminal; then fetch outputs, in input order."""
    task = progress.add_task("finished", total=len(ids))
    pending = list(ids)
    results: dict[str, dict[str, Any]] = {}
    limit = asyncio.Semaphore(STATUS_CONCURRENCY)

    async def check(request_id: str) -> None:
        async with limit:
            status = await client.status(request_id)
            if status["status"] not in TERMINAL:
                return
            result: dict[str, Any] = {"request_id": request_id, "status": status["status"]}
            if status["status"] in ("SUCCEEDED", "WEBHOOK_FAILED"):
                result["output"] = (await client.output(request_id)).get("output")
            elif status.get("error") is not None:
                result["error"] = status["error"]
            results[request_id] = result
            progress.update(task, advance=1)

    while pending:
        await asyncio.gather(*(check(r) for r in pending))
        pending = [r for r in pending if r not in results]
        if pending:
            await asyncio.sleep(0.5)
    return results


async def _queue(client: Client, args: argparse.Namespace, console: Console) -> int:
    models = [args.model] if args.model else [m["name"] for m in await client.models()]
    table = Table("model", "queued", "p0", "p1", "p2", "real-time", "in progress", "capacity", "paused",
                  "oldest queued s")
    for name in models:
        q = await client.queue_status(name)
        by = q.get("queued_by_priority", {})
        oldest = q.get("oldest_queued_age_seconds")
        table.add_row(name, str(q["num_queued_requests"]), str(by.get("0", 0)), str(by.get("1", 0)),
                      str(by.get("2", 0)), str(by.get("-1", 0)), str(q["num_in_progress_requests"]),
                      str(q["capacity"]), "yes" if q.get("paused") else "no",
                      f"{oldest:.1f}" if oldest is not None else "-")
    console.print(table)
    return 0


async def _models(client: Client, args: argparse.Namespace, console: Console) -> int:
    if args.models_command == "list":
        table = Table("model", "capacity", "in flight", "paused", "max queue depth")
        for m in await client.models():
            table.add_row(m["name"], str(m["capacity"]), str(m["in_flight"]), "yes" if m["paused"] else "no",
                          str(m["max_queue_depth"]) if m["max_queue_depth"] is not None else "-")
        console.print(table)
        return 0
    changes: dict[str, Any] = {
        "set-capacity": lambda: {"capacity": args.capacity},
        "pause": lambda: {"paused": True},
        "resume": lambda: {"paused": False},
    }[args.models_command]()
    model = await client.update_model(args.model, changes)
    print(json.dumps({k: model.get(k) for k in ("name", "capacity", "in_flight", "paused")}))
    return 0


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    console = Console(stderr=True)
    base_url = args.url or os.environ.get("ASYNCINFER_URL") or f"http://{settings.host}:{settings.port}"
    api_key = args.api_key or os.environ.get("ASYNCINFER_API_KEY") or settings.admin_key
    client = Client(base_url, api_key)
    try:
        if args.command == "submit":
            return await _submit(client, args, console)
        if args.command == "status":
            print(json.dumps(await client.status(args.request_id), indent=2))
            return 0
        if args.command == "cancel":
            print(json.dumps(await client.cancel(args.request_id)))
            return 0
        if args.command == "queue":
            return await _queue(client, args, console)
        if args.command == "models":
            return await _models(client, args, console)
        raise AssertionError(args.command)
    finally:
        await client.close()


def client_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(_run(args, settings))
    except (ApiError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def connection(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--url", help="API base URL (default: ASYNCINFER_URL, else http://HOST:PORT)")
        p.add_argument("--api-key", help="API key (default: ASYNCINFER_API_KEY, else ASYNCINFER_ADMIN_KEY)")
        p.set_defaults(handler=client_command)
        return p

    p = connection(commands.add_parser("submit", help="submit requests from a JSONL file, with a progress bar"))
    p.add_argument("model", help="the model (or, with --pipeline, the pipeline) to submit to")
    p.add_argument("--pipeline", action="store_true", help="MODEL names a pipeline: start one run per line")
    p.add_argument("--input-file", required=True, help="one request per line (see README)")
    p.add_argument("--batch-size", type=int, default=1000, help="requests per bulk call")
    p.add_argument("--priority", type=int, choices=[0, 1, 2])
    p.add_argument("--webhook", help="webhook_endpoint for every request")
    p.add_argument("--wait", action="store_true", help="wait for results and write them in input order")
    p.add_argument("--output", default="outputs.jsonl", help="results file for --wait")

    p = connection(commands.add_parser("status", help="a request's status"))
    p.add_argument("request_id")
    p = connection(commands.add_parser("cancel", help="cancel a request"))
    p.add_argument("request_id")
    p = connection(commands.add_parser("queue", help="queue status per model (a table)"))
    p.add_argument("model", nargs="?")

    p = connection(commands.add_parser("models", help="list models, set capacity, pause, resume (admin key)"))
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    sub.add_parser("list")
    s = sub.add_parser("set-capacity")
    s.add_argument("model")
    s.add_argument("capacity", type=int)
    for action in ("pause", "resume"):
        sub.add_parser(action).add_argument("model")
