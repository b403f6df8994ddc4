"""``gaussad keys``: add, remove or list the service's API keys."""

from __future__ import annotations

import argparse
import sys

from ..errors import GaussadError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="manage the service's API keys",
                       description="Add, remove or list API keys of `gaussad serve --keys FILE`. A new key is printed "
                                   "once; the file keeps only its SHA-256 hash, its name and its role.")
    p.add_argument("action", choices=("add", "remove", "list"))
    p.add_argument("name", nargs="?", metavar="NAME", help="the key's name (add, remove)")
    p.add_argument("--role", choices=("score", "admin"), default="score",
                   help="score: score images, read results, mark them; admin: also update and roll back models "
                        "(default %(default)s)")
    p.add_argument("--keys", required=True, metavar="FILE", help="the keys file (created by the first add)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..service.keys import KeyStore

    if args.action != "list" and not args.name:
        raise GaussadError(f"gaussad keys {args.action}: give the key's NAME")
    store = KeyStore.load(args.keys, missing_ok=args.action == "add")
    if args.action == "add":
        key = store.add(args.name, args.role)
        store.save()
        print(key)
        print(f"key {args.name!r} ({args.role}) added to {args.keys}; it is shown only this once", file=sys.stderr)
    elif args.action == "remove":
        store.remove(args.name)
        store.save()
        print(f"key {args.name!r} removed from {args.keys}", file=sys.stderr)
    else:
        for e in store.entries:
            print(f"{e.name}\t{e.role}\t{e.sha256[:12]}")
    return 0
