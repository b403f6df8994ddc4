"""The command line's parser: one sub-command per module of this package, each adding its own options."""

from __future__ import annotations

import argparse

from ..version import __version__
from . import backbones, evaluate, export, fit, keys, score, serve, tune
from .options import EPILOG, Parser

COMMANDS = (fit, tune, score, export, evaluate, backbones, serve, keys)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gaussad",
        description="Visual anomaly detection: a Gaussian per level of pretrained EfficientNet features, fitted on normal images only.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"gaussad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add(sub)
    return parser
