"""`asyncinfer dispatcher` and `asyncinfer webhooks ...`."""

from __future__ import annotations

import argparse
import asyncio

from app.settings import Settings


def dispatcher_command(args: argparse.Namespace, settings: Settings) -> int:
    from app.delivery.dispatcher import run_dispatcher
    from app.runtime import run_service

    return run_service(lambda url, stop: run_dispatcher(url, settings, stop), settings)


async def _with_queue(settings: Settings, action):  # type: ignore[no-untyped-def]
    from app.db.pool import open_pool
    from app.db.url import resolve_database_url
    from app.queue.operations import Queue

    url, server = resolve_database_url(settings)
    try:
        pool = await open_pool(url, min_size=1, max_size=1, name="asyncinfer-cli")
        try:
            return await action(Queue(pool))
        finally:
            await pool.close()
    finally:
        if server is not None:
            server.stop()


def webhooks_command(args: argparse.Namespace, settings: Settings) -> int:
    from app.delivery.signing import new_secret

    action = args.webhooks_command
    if action == "secret-create":
        secret = new_secret()
        secret_id = asyncio.run(_with_queue(settings, lambda q: q.add_webhook_secret(secret)))
        print(f"secret {secret_id}: {secret}")
        print("Shown once. Every active secret signs every webhook; revoke the old one after rotating receivers.")
        return 0
    if action == "secret-revoke":
        done = asyncio.run(_with_queue(settings, lambda q: q.revoke_webhook_secret(args.secret_id)))
        print(f"secret {args.secret_id} revoked" if done else f"secret {args.secret_id}: not found or already revoked")
        return 0 if done else 1
    if action == "redeliver":
        if bool(args.request_id) == bool(args.model):
            print("error: give exactly one of --request-id or --model")
            return 2
        if args.request_id:
            count = asyncio.run(_with_queue(settings, lambda q: q.redeliver_request(args.request_id, args.kind)))
        else:
            count = asyncio.run(_with_queue(settings, lambda q: q.redeliver_failed(args.model)))
        print(f"{count} deliveries queued again")
        return 0
    raise AssertionError(action)


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = commands.add_parser("dispatcher", help="deliver outputs: signed webhooks and object storage")
    p.set_defaults(handler=dispatcher_command)

    p = commands.add_parser("webhooks", help="webhook secrets and redelivery")
    sub = p.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    sub.add_parser("secret-create", help="create a signing secret and print it once")
    r = sub.add_parser("secret-revoke", help="stop signing with a secret")
    r.add_argument("secret_id", type=int)
    r = sub.add_parser("redeliver", help="deliver again: one request, or all FAILED deliveries of a model")
    r.add_argument("--request-id")
    r.add_argument("--model")
    r.add_argument("--kind", choices=["webhook", "storage"], default=None)
    p.set_defaults(handler=webhooks_command)
