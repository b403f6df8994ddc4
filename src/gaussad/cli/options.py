"""The options that several commands share, and the argparse types that check a value as the parameter table does.

Only what answers ``--help`` and argument errors is imported here: numpy, scipy, the model and the network are
imported by the command that needs them (bench/speed/startup.py measures the start-up).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import GaussadError

EPILOG = ("Images: PNG, JPEG, BMP, TIFF, WebP (the first frame of multi-frame files). Grayscale (8/16-bit), palette, "
          "CMYK and RGBA are converted to RGB, transparency composited on black; EXIF orientation is applied.")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (exit 2) like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def model_options(p: argparse.ArgumentParser) -> None:
    """The model's options, from the parameter table (:mod:`gaussad.detector.params`)."""
    from ..detector import params

    params.add_options(p.add_argument_group("model"), params.cli_names("model"))
    params.add_options(p.add_argument_group("intake"), params.cli_names("intake"))


def model_params(args: argparse.Namespace, *groups: str) -> dict:
    """The model's settings given on the command line (and those of ``groups``), by parameter name."""
    from ..detector import params

    return params.from_args(args, params.cli_names("model", "intake", *groups))


def threshold_options(p: argparse.ArgumentParser) -> None:
    from ..detector import params

    params.add_options(p.add_argument_group("threshold (saved in the model; `score` uses it unless told otherwise)"),
                       params.cli_names("threshold"))


def recursion_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-recursive", dest="recursive", action="store_false",
                   help="take only the images directly inside a folder, not those of its sub-folders (which are "
                        "walked by default, in sorted order; hidden folders and symbolic-link loops are skipped)")


def dask_options(p: argparse.ArgumentParser) -> None:
    from ..tools.distributed import DEFAULT_PARTITION

    p.add_argument("--dask", metavar="ADDRESS",
                   help="run on a Dask cluster: a scheduler address (tcp://host:8786), or local[:N] for a local "
                        "cluster of N worker processes started and stopped here (needs gaussad[dask])")
    p.add_argument("--partition-size", type=bounded(int, 1, 1_000_000), default=DEFAULT_PARTITION, metavar="N",
                   help="images per Dask task (default %(default)s): bounds each worker's memory")


def bounded(kind: type, lo: float, hi: float):
    """An argparse type: a finite ``kind`` (int or float) in [lo, hi]."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not (lo <= value <= hi):  # also refuses nan
            raise argparse.ArgumentTypeError(f"expected a value in {lo:g}..{hi:g}, got {text!r}")
        return value

    return parse


def table_value(name: str, kind: type):
    """An argparse type checked by the parameter table's rule for ``name``."""
    from ..detector import params

    def parse(text: str):
        try:
            value = kind(text)
            params.check_value(name, value)
        except (ValueError, GaussadError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return parse


def training_images(folder: str, recursive: bool) -> tuple[list[Path], list[str]]:
    """Images of a folder (and its sub-folders when ``recursive``) with their names relative to it; an MVTec-layout
    category means its train/good."""
    from ..tools.datasets import is_category
    from ..intake.images import find_images

    path = Path(folder)
    if not path.exists():
        raise GaussadError(f"{folder}: no such folder (give a folder of good images, or an MVTec category)")
    return find_images([path / "train" / "good" if is_category(path) else path], recursive)


def finite(x: float | None) -> float | None:
    """JSON has no infinity: an infinite (or absent) threshold is written as null."""
    return float(x) if x is not None and math.isfinite(x) else None

