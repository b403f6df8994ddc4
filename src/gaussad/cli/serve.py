"""``gaussad serve``: serve the models of a folder over HTTP, with an inspection page."""

from __future__ import annotations

import argparse

from ..errors import GaussadError
from .options import bounded, table_value


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the models of a folder over HTTP, with an inspection page",
                       description="Serve every *.gaussad model of MODEL_DIR (named by file stem) over HTTP: "
                                   "GET /health, GET /models, POST /models/NAME/score, POST /models/NAME/map, "
                                   "the results log (GET /results, /results.csv, POST /results/ID/label), feedback "
                                   "(POST /models/NAME/update and /rollback, admin keys), GET /metrics (Prometheus), "
                                   "the inspection page at / and the OpenAPI docs at /docs.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=bounded(int, 1, 65535), default=8000, help="port to listen on (default %(default)s)")
    p.add_argument("--fpr", type=table_value("fpr", float),
                   help="target false-positive rate of the decisions (default: each model's own)")
    p.add_argument("--workers", type=bounded(int, 1, 256), help="threads running the models (default: min(4, CPU count))")
    p.add_argument("--max-file-mb", type=bounded(float, 1 / 1024, 4096), default=20.0,
                   help="largest upload per image in MiB (default %(default)s)")
    p.add_argument("--max-files", type=bounded(int, 1, 1024), default=16,
                   help="most images per request (default %(default)s)")
    p.add_argument("--max-pixels", type=bounded(int, 1, 2**31), default=25_000_000,
                   help="most pixels per image (default %(default)s)")
    p.add_argument("--max-pixels-in-flight", type=bounded(int, 1, 2**40), default=100_000_000, metavar="N",
                   help="decoded pixels in flight across the service; a request that finds no room within 2 s is "
                        "answered 503 with Retry-After (default %(default)s, about 300 MB)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level; info logs every request (default %(default)s)")
    p.add_argument("--keys", metavar="FILE", help="require API keys from this file (`gaussad keys add`): requests "
                   "carry 'Authorization: Bearer KEY'; 401 without a valid key, 403 for a role that may not do this")
    p.add_argument("--insecure", action="store_true",
                   help="allow listening on a non-loopback address without --keys")
    p.add_argument("--db", default="results.sqlite", metavar="URL",
                   help="results log: a SQLite file or a SQLAlchemy URL, e.g. postgresql+pg8000://user@host/db; "
                        "'none' turns it off (default %(default)s, in the folder serve starts in; serve logs the path)")
    p.add_argument("--keep-images", metavar="DIR",
                   help="keep every scored image in DIR (named by SHA-256); needed to apply feedback to a model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from ..service.app import Limits, run as serve
    except ImportError as exc:
        raise GaussadError(f"gaussad serve needs the service packages ({exc}): pip install 'gaussad[serve]'") from None

    limits = Limits(max_file_bytes=int(args.max_file_mb * 2**20), max_files=args.max_files, max_pixels=args.max_pixels,
                    max_pixels_in_flight=args.max_pixels_in_flight)
    db = None if args.db.lower() in ("", "none", "off") else args.db
    serve(args.model_dir, host=args.host, port=args.port, fpr=args.fpr, limits=limits, workers=args.workers,
          log_level=args.log_level, keys_file=args.keys, insecure=args.insecure, db=db, keep_images=args.keep_images)
    return 0
