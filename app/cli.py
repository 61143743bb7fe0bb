"""`asyncinfer` command line. Each command's work lives in its own module;
this file only parses arguments and dispatches (imports are lazy so `--help`
and light commands start fast)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from app.settings import Settings, get_settings

Handler = Callable[[argparse.Namespace, Settings], int]


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from app.db.migrate import current_revision, migrate
    from app.db.url import resolve_database_url

    url, server = resolve_database_url(settings)
    try:
        migrate(url, args.revision)
        print(f"database at revision {current_revision(url)}")
    finally:
        if server is not None:
            server.stop()
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from app.api.server import serve_command

    return serve_command(args, settings)


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from worker.main import worker_command

    return worker_command(args, settings)


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from app.up import up_command

    return up_command(args, settings)


def _keys(args: argparse.Namespace, settings: Settings) -> int:
    from app.api.keys_cli import keys_command

    return keys_command(args, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncinfer", description="Postgres-centric asynchronous inference.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("migrate", help="upgrade the database schema (the service also migrates on start)")
    p.add_argument("--revision", default="head")
    p.set_defaults(handler=_migrate)

    p = commands.add_parser("serve", help="run the HTTP API")
    p.add_argument("--host", default=None, help="default: ASYNCINFER_HOST")
    p.add_argument("--port", type=int, default=None, help="default: ASYNCINFER_PORT")
    p.add_argument("--workers", type=int, default=None, help="API processes; default: ASYNCINFER_API_WORKERS")
    p.set_defaults(handler=_serve)

    p = commands.add_parser("worker", help="run one worker process for one or more models")
    p.add_argument("--model", action="append", dest="models", metavar="NAME", help="model to serve (repeatable)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight in this process")
    p.add_argument("--config", default=None, help="models file; default: ASYNCINFER_MODELS_FILE")
    p.set_defaults(handler=_worker)

    p = commands.add_parser("up", help="one-command start: database, migrations, API, workers, dispatcher")
    p.add_argument("--config", default=None, help="models file; default: ASYNCINFER_MODELS_FILE")
    p.set_defaults(handler=_up)

    p = commands.add_parser("keys", help="manage API keys")
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = keys.add_parser("create", help="create a key and print it once")
    k.add_argument("--name", required=True)
    k.add_argument("--admin", action="store_true")
    keys.add_parser("list", help="list keys (never their secrets)")
    k = keys.add_parser("revoke", help="revoke a key at once")
    k.add_argument("key_id", type=int)
    p.set_defaults(handler=_keys)

    from app.delivery.cli import add_commands as add_delivery_commands

    add_delivery_commands(commands)

    from app.client.commands import add_commands as add_client_commands

    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = get_settings()
    try:
        return args.handler(args, settings)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
