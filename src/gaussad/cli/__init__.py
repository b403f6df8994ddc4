"""Command-line interface: ``gaussad fit | tune | score | export | evaluate | backbones | serve | keys``.

One module per command (``add`` puts its options on the parser, ``run`` runs it), the shared options in
:mod:`~gaussad.cli.options`; the commands format what the detector and the tools answer, and decide nothing
themselves.
"""

from __future__ import annotations

import sys
from typing import Sequence

from ..errors import GaussadError
from .parser import build_parser
from .score import overlay_names

__all__ = ["main", "build_parser", "overlay_names"]


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that clean-up (temporary files) runs as for Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    else:
        previous = None
    try:
        return args.func(args)
    except GaussadError as exc:
        print(f"gaussad: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gaussad: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("gaussad: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

