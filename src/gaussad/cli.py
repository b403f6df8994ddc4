"""Command-line interface: ``gaussad fit | score | evaluate | backbones | serve``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path, PurePath
from typing import Sequence

# Only what answers --help and argument errors is imported here: numpy, scipy, the model and the network are
# imported by the command that needs them (bench/startup.py measures the start-up).
from . import __version__
from .errors import GaussadError

EPILOG = ("Images: PNG, JPEG, BMP, TIFF, WebP (the first frame of multi-frame files). Grayscale (8/16-bit), palette, "
          "CMYK and RGBA are converted to RGB, transparency composited on black; EXIF orientation is applied.")


def _model_options(p: argparse.ArgumentParser) -> None:
    """The model's options, from the parameter table (:mod:`gaussad.params`)."""
    from . import params

    params.add_options(p.add_argument_group("model"), params.cli_names("model"))
    params.add_options(p.add_argument_group("intake"), params.cli_names("intake"))


def _model_params(args: argparse.Namespace, *groups: str) -> dict:
    from . import params

    return params.from_args(args, params.cli_names("model", "intake", *groups))


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (exit 2) like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _training_images(folder: str, recursive: bool) -> tuple[list[Path], list[str]]:
    """Images of a folder (and its sub-folders when ``recursive``) with their names relative to it; an MVTec-layout
    category means its train/good."""
    from .datasets import is_category
    from .images import find_images

    path = Path(folder)
    return find_images([path / "train" / "good" if is_category(path) else path], recursive)


def _threshold_options(p: argparse.ArgumentParser) -> None:
    from . import params

    params.add_options(p.add_argument_group("threshold (saved in the model; `score` uses it unless told otherwise)"),
                       params.cli_names("threshold"))


def _finite(x: float) -> float | None:
    """JSON has no infinity: an infinite threshold is written as null."""
    return float(x) if math.isfinite(x) else None


def _infinite_note(model, fpr: float) -> str:
    n = model.calibration_scores_.size
    return (f"with {n} calibration scores the conformal threshold at FPR {fpr} is infinite "
            f"(FPR below 1/(n+1) = {1 / (n + 1):.3g}): nothing is flagged; hold out more images")


def cmd_fit(args: argparse.Namespace) -> int:
    from . import params
    from .files import check_output

    # What needs no work first: the output, the settings, the image list; then the model (numpy, the network).
    if os.path.isdir(args.output):  # os.path answers False where Path.is_dir raises (a name too long)
        raise GaussadError(f"{args.output}: is a folder; give the model file's name with -o")
    check_output(args.output, "model")
    settings = _model_params(args, "threshold")
    params.validate({**params.defaults(), **settings})
    files, names = _training_images(args.train_dir, args.recursive)
    from .model import GaussianAD

    model = GaussianAD(**settings, verbose=not (args.quiet or args.json))
    model.fit(files, on_error=args.on_error)
    model.save(args.output)
    name_of = {str(f): n for f, n in zip(files, names)}
    cal = getattr(model, "calibration_scores_", None)
    limit = model.score_threshold()
    summary = {"model": str(args.output), "n_images": model.n_samples_, "backbone": model.backbone,
               "levels": model.level_names_, "input_size": model.input_size_, "feature_dims": model.feature_dims_,
               "threshold": model.threshold, "fpr": model.fpr, "n_calibration": None if cal is None else int(cal.size),
               "score_threshold": _finite(limit),
               "skipped": [{"path": name_of.get(p, p), "error": m} for p, m in model.skipped_]}
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        for path, msg in model.skipped_:
            print(f"skipped: {msg}", file=sys.stderr)
        print(f"fitted on {model.n_samples_} images from {args.train_dir} ({len(model.skipped_)} skipped); "
              f"wrote {args.output}")
        if model.threshold == "conformal" and not math.isfinite(limit):
            print(f"warning: {_infinite_note(model, model.fpr)}", file=sys.stderr)
        else:
            print(f"threshold {model.threshold} at FPR {model.fpr}: score threshold {limit:.3f}"
                  + (f" from {cal.size} held-out images" if model.threshold == "conformal" else ""))
    return 0


RULES = {
    "chi2": "chi-square per level, Bonferroni over levels",
    "hotelling": "Hotelling F law per level, Bonferroni over levels",
    "conformal": "split conformal on the image score",
}


def cmd_score(args: argparse.Namespace) -> int:
    from . import params
    from .files import check_output
    from .images import find_images

    # What needs no work first: the overlay folder and the image list; then the model and the network.
    if args.maps:
        check_output(args.maps, "overlays", folder=True)
    files, names = find_images(args.images, args.recursive)
    import numpy as np

    from .model import load
    from .results import result_rows

    model = load(args.model)
    if args.preset and (model.preset or "paper") != args.preset:
        raise GaussadError(f"{args.model}: fitted with preset {model.preset or 'paper'}, not {args.preset}; "
                           f"refit with --preset {args.preset}")
    model.set_params(verbose=not (args.quiet or args.json), **params.from_args(args, params.cli_names("intake")))
    method = args.threshold or model.threshold
    fpr = model.fpr if args.fpr is None else args.fpr
    limit = model.score_threshold(fpr, method)  # fails early when the rule cannot apply to this model
    skipped: list = []
    if args.maps:
        levels, amaps = model.score_with_maps(files, on_error=args.on_error, skipped=skipped)
    else:
        feats = model.extract_features(files, "score", on_error=args.on_error, skipped=skipped)
    bad = {i for i, _ in skipped}
    kept = [f for i, f in enumerate(files) if i not in bad]
    kept_names = [n for i, n in enumerate(names) if i not in bad]
    if not args.maps:
        levels = model.level_scores_features(feats) if kept else np.zeros((0, len(model.level_names_)))
    decisions, pvalues = model.decide(levels, fpr, method) if kept else ([], [])
    rows = result_rows(kept_names, model.level_names_, levels, decisions, pvalues)
    if args.maps:
        overlays = _write_overlays(args.maps, kept, kept_names, amaps, args.max_pixels)
        for row, path, amap in zip(rows, overlays, amaps):
            row["map"], row["map_max"] = str(path), float(amap.max())
    errors = [{"path": names[i], "error": msg} for i, msg in sorted(skipped)]
    if args.json:
        print(json.dumps({"model": str(args.model), "fpr": fpr, "threshold": method, "rule": RULES[method],
                          "score_threshold": _finite(limit), "results": rows, "skipped": errors}))
        return 1 if errors and not rows else 0
    for e in errors:
        print(f"skipped: {e['error']}", file=sys.stderr)
    if not rows:
        raise GaussadError(f"none of the {len(files)} images could be read")
    names = model.level_names_
    width = max(len(r["path"]) for r in rows)
    print("  ".join(["path".ljust(width), "score".rjust(8)] + [n.rjust(8) for n in names] + ["p-value".rjust(9), "decision"]))
    for r in rows:
        cells = [r["path"].ljust(width), f"{r['score']:8.3f}"] + [f"{r['levels'][n]:8.3f}" for n in names]
        cells += [f"{r['pvalue']:9.2e}", "ANOMALY" if r["anomalous"] else "ok"]
        print("  ".join(cells))
    if not args.quiet:
        if method == "conformal" and not math.isfinite(limit):
            print(f"warning: {_infinite_note(model, fpr)}", file=sys.stderr)
        print(f"{sum(r['anomalous'] for r in rows)} of {len(rows)} flagged at target FPR {fpr} "
              f"({RULES[method]}); {len(errors)} skipped", file=sys.stderr)
    return 0


def overlay_names(names: Sequence[str]) -> list[str]:
    """Relative overlay file names that mirror the images' names, all distinct: ``good/000.png`` ->
    ``good/000_map.png``. The parts of a name that would leave the folder (a root, ``..``) are dropped or become
    ``up``; a name already taken (the same stem twice, ``x.png`` and ``x.jpg``; case-insensitively, for file systems
    that ignore case) becomes ``x_map-2.png``, ``x_map-3.png``, ... A name that would be too long is shortened."""
    used: set[str] = set()
    out = []
    for name in names:
        path = PurePath(name)
        parts = ["up" if p == ".." else p for p in path.parts[1 if path.anchor else 0:-1] if p not in ("", ".")]
        stem = path.stem or "image"
        while len(stem.encode("utf-8", "surrogateescape")) > 230:  # room for "_map-N.png" within 255 bytes
            stem = stem[:-1]
        candidate, k = "/".join(parts + [f"{stem}_map.png"]), 1
        while candidate.casefold() in used:
            k += 1
            candidate = "/".join(parts + [f"{stem}_map-{k}.png"])
        used.add(candidate.casefold())
        out.append(candidate)
    return out


def _write_overlays(folder: str, files: list[Path], names: list[str], amaps, max_pixels: int) -> list[Path]:
    """Write one heat-map overlay PNG per image into ``folder`` (atomically each), named by :func:`overlay_names`;
    returns their paths."""
    from .files import write_atomic
    from .images import load_image
    from .maps import overlay

    out_dir = Path(folder)
    paths = []
    for src, name, amap in zip(files, overlay_names(names), amaps):
        image = overlay(load_image(src, max_pixels=max_pixels), amap)
        paths.append(write_atomic(out_dir / name, lambda fh, image=image: image.save(fh, format="PNG"), "overlay"))
    return paths


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import params
    from .files import check_output, write_atomic

    for path, what in ((args.json, "JSON report"), (args.report, "report")):
        if path:
            check_output(path, what)
    params.validate({**params.defaults(), **_model_params(args)})
    from .evaluate import evaluate, format_markdown, format_table

    report = evaluate(args.root, protocol=args.protocol, verbose=not args.quiet, **_model_params(args))
    if args.json:
        write_atomic(args.json, (json.dumps(report, indent=2) + "\n").encode(), "JSON report")
    if args.report:
        write_atomic(args.report, format_markdown(report).encode(), "report")
    print(format_table(report))
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from .backbones import get_spec, list_backbones

    for name in list_backbones():
        spec = get_spec(name)
        print(f"{name:20s} {spec.input_size:4d} px  {spec.description}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import Limits, run
    except ImportError as exc:
        raise GaussadError(f"gaussad serve needs the service packages ({exc}): pip install 'gaussad[serve]'") from None

    limits = Limits(max_file_bytes=int(args.max_file_mb * 2**20), max_files=args.max_files, max_pixels=args.max_pixels)
    run(args.model_dir, host=args.host, port=args.port, fpr=args.fpr, limits=limits, workers=args.workers,
        log_level=args.log_level)
    return 0


def _recursion_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-recursive", dest="recursive", action="store_false",
                   help="take only the images directly inside a folder, not those of its sub-folders (which are "
                        "walked by default, in sorted order; hidden folders and symbolic-link loops are skipped)")


def build_parser() -> argparse.ArgumentParser:
    from . import params
    parser = _Parser(
        prog="gaussad",
        description="Visual anomaly detection: a Gaussian per level of pretrained EfficientNet features, fitted on normal images only.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"gaussad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="fit a model on a folder of normal images", epilog=EPILOG,
                       description="Fit a model on the images of TRAIN_DIR and its sub-folders (or of its train/good "
                                   "if it is an MVTec category).")
    p.add_argument("train_dir", metavar="TRAIN_DIR")
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (written atomically)")
    _model_options(p)
    _threshold_options(p)
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="an unreadable image stops the fit (fail, default) or is reported and left out (skip)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    _recursion_option(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("score", help="score images with a fitted model", epilog=EPILOG,
                       description="Score images: one row per image with its score, per-level distances, p-value and "
                                   "decision. A folder's images, its sub-folders' included, are named by their path "
                                   "relative to it (good/000.png, crack/000.png); with several folders or files, by "
                                   "that path prefixed with the folder as given.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    params.add_options(p, ("fpr", "threshold"), model_defaults=True)
    params.add_options(p, params.cli_names("intake"))
    p.add_argument("--on-error", choices=("fail", "skip"), default="skip",
                   help="an unreadable image is reported and skipped (skip, default) or stops the run (fail)")
    p.add_argument("--maps", metavar="DIR",
                   help="write a heat-map overlay PNG per image into DIR, mirroring the images' names (good/000.png "
                        "-> DIR/good/000_map.png; repeated names get -2, -3, ...); needs a model fitted with anomaly maps")
    p.add_argument("--preset", choices=("paper", "recommended"),
                   help="check that the model was fitted with this preset (the preset itself is stored in the model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _recursion_option(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", help="image AUROC and threshold error rates on MVTec-layout data",
                       description="Evaluate on ROOT, one category in MVTec layout or a folder of categories: image "
                                   "AUROC, and per threshold method (chi2, hotelling, conformal) and target FPR "
                                   "(0.01, 0.05, 0.1) the realised FPR on test/good and TPR on defective images.")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--protocol", choices=("paper", "full"), default="paper",
                   help="paper: 5-fold KFold(shuffle, seed 0) of train/good, fit on 80%% and calibrate conformal "
                        "thresholds on the held-out 20%%, mean over folds; full: fit on all of train/good, conformal "
                        "calibration from 20%% of it held out before the refit")
    _model_options(p)
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--report", metavar="OUT.md", help="write a Markdown report to OUT.md")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("backbones", help="list the available backbones")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("serve", help="serve the models of a folder over HTTP, with an inspection page",
                       description="Serve every *.gaussad model of MODEL_DIR (named by file stem) over HTTP: "
                                   "GET /health, GET /models, POST /models/NAME/score, POST /models/NAME/map, "
                                   "the inspection page at / and the OpenAPI docs at /docs.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    p.add_argument("--fpr", type=float, help="target false-positive rate of the decisions (default: each model's own)")
    p.add_argument("--workers", type=int, help="threads running the models (default: min(4, CPU count))")
    p.add_argument("--max-file-mb", type=float, default=20.0, help="largest upload per image in MiB (default %(default)s)")
    p.add_argument("--max-files", type=int, default=16, help="most images per request (default %(default)s)")
    p.add_argument("--max-pixels", type=int, default=25_000_000, help="most pixels per image (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level; info logs every request (default %(default)s)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GaussadError as exc:
        print(f"gaussad: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gaussad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
