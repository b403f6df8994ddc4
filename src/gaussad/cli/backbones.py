"""``gaussad backbones``: list the feature networks the registry knows."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backbones", help="list the available backbones")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..intake.backbones import get_spec, list_backbones

    for name in list_backbones():
        spec = get_spec(name)
        print(f"{name:20s} {spec.input_size:4d} px  {spec.description}")
    return 0
