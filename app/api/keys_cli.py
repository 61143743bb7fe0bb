"""`asyncinfer keys create --name N [--admin] | list | revoke ID`.

`create` prints the new key alone on stdout (so `KEY=$(asyncinfer keys
create --name ci)` works) and what it is on stderr; the key is never shown
again, only its prefix.
"""

from __future__ import annotations

import argparse
import sys

import psycopg

from app.api.keys import ApiKey, create_key_sync, list_keys_sync, revoke_key_sync
from app.db.migrate import migrate
from app.db.url import resolve_database_url
from app.settings import Settings


def _describe(key: ApiKey) -> str:
    role = "admin" if key.is_admin else "user"
    state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M:%S}" if key.revoked_at else "active"
    return f"{key.id:>5}  {key.prefix:<12} {role:<6} {state:<27} {key.created_at:%Y-%m-%d %H:%M:%S}  {key.name}"


def keys_command(args: argparse.Namespace, settings: Settings) -> int:
    url, server = resolve_database_url(settings)
    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            if args.keys_command == "create":
                name = args.name.strip()
                if not 1 <= len(name) <= 200:
                    print("--name: must be 1 to 200 characters", file=sys.stderr)
                    return 2
                key = create_key_sync(conn, name, is_admin=args.admin)
                role = "admin" if key.is_admin else "user"
                print(f"created {role} API key {key.id} ({key.name!r}, prefix {key.prefix}); "
                      "it is shown only now:", file=sys.stderr)
                print(key.key, flush=True)
                return 0
            if args.keys_command == "list":
                print(f"{'id':>5}  {'prefix':<12} {'role':<6} {'state':<27} {'created':<19}  name")
                for key in list_keys_sync(conn):
                    print(_describe(key))
                return 0
            if args.keys_command == "revoke":
                revoked = revoke_key_sync(conn, args.key_id)
                if revoked is None:
                    print(f"no API key with id {args.key_id}", file=sys.stderr)
                    return 1
                print(f"revoked API key {revoked.id} ({revoked.name!r}, prefix {revoked.prefix})")
                return 0
            print(f"unknown keys action {args.keys_command!r}", file=sys.stderr)
            return 2
    finally:
        if server is not None:
            server.stop()
