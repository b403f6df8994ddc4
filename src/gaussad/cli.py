"""Command-line interface: ``gaussad fit | score | evaluate | backbones | serve``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .errors import GaussadError

EPILOG = ("Images: PNG, JPEG, BMP, TIFF, WebP (the first frame of multi-frame files). Grayscale (8/16-bit), palette, "
          "CMYK and RGBA are converted to RGB, transparency composited on black; EXIF orientation is applied.")


def _model_options(p: argparse.ArgumentParser) -> None:
    from .gaussian import ESTIMATORS

    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="efficientnet-lite0", help="feature network (see `gaussad backbones`; default %(default)s)")
    g.add_argument("--weights", help="local weights file for the backbone (.pth/.pt state dict or .safetensors); required for efficientnet-b0..b7 and the ResNets")
    g.add_argument("--levels", help="comma-separated levels by name or index (stem,stage1..stage7,head = 0..8); default all 9")
    g.add_argument("--input-size", type=int, help="input size S in pixels: the side of the square input, or with "
                   "--resize aspect the side of a square of the same area (default: the backbone's native size)")
    g.add_argument("--estimator", default="ledoit-wolf", choices=ESTIMATORS, help="covariance estimator or baseline (default %(default)s)")
    g.add_argument("--reduction", default="none", choices=("none", "pca", "npca"),
                   help="pca keeps the high-variance components, npca the low-variance ones (default %(default)s)")
    g.add_argument("--variance", type=float, default=0.99, help="explained-variance threshold for pca/npca (default %(default)s)")
    g.add_argument("--preset", choices=("paper", "recommended"),
                   help="paper: the paper's recipe (default); recommended: the backbone's own input normalisation, "
                        "aspect-kept resize, and nearest-neighbour anomaly maps from stage2-stage7 (see README for "
                        "the figures)")
    g.add_argument("--normalize", choices=("imagenet", "native"),
                   help="input normalisation: ImageNet mean/std as the paper, or the backbone's own training "
                        "normalisation (EfficientNet-Lite: (x-127)/128); default from --preset")
    g.add_argument("--resize", choices=("square", "aspect"),
                   help="square: plain resize to S x S as the paper; aspect: keep the image's proportions at about "
                        "S x S pixels (sides multiples of 32); default from --preset")
    g.add_argument("--map-levels",
                   help="comma-separated levels for anomaly maps, or 'none'; default from --preset")
    g.add_argument("--map-method", choices=("gaussian", "nearest"),
                   help="anomaly-map scoring: one Gaussian per level shared by all positions, or the distance to the "
                        "nearest location of a memory bank of training locations; default from --preset")
    g.add_argument("--map-pool", type=_positive_int, metavar="K",
                   help="average location vectors over K x K neighbourhoods before scoring them (odd K; 1 = off); "
                        "default from --preset")
    g.add_argument("--map-coreset", type=float, default=0.1, metavar="F",
                   help="fraction of the training locations kept in each memory bank (greedy k-centre coreset; "
                        "nearest maps only; default %(default)s)")
    g.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default %(default)s)")
    _max_pixels_option(g)
    _engine_option(g)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _max_pixels_option(p) -> None:
    from .images import DEFAULT_MAX_PIXELS

    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse image files with more pixels than N, checked before decoding "
                        "(decompression-bomb guard; default %(default)s)")


def _engine_option(p) -> None:
    from .engine import ENGINES

    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="inference engine: onnxruntime (the network exported once to ONNX, cached under "
                        "$GAUSSAD_CACHE or ~/.cache/gaussad), torch (eager), or auto = onnxruntime when installed "
                        "(default %(default)s); both give the same scores")


def _model_params(args: argparse.Namespace) -> dict:
    return {
        "backbone": args.backbone,
        "weights": args.weights,
        "levels": [s.strip() for s in args.levels.split(",") if s.strip()] if args.levels else None,
        "input_size": args.input_size,
        "estimator": args.estimator,
        "reduction": None if args.reduction == "none" else args.reduction,
        "variance": args.variance,
        "normalize": args.normalize,
        "resize": args.resize,
        "map_levels": _map_levels(args.map_levels),
        "map_method": args.map_method,
        "map_pool": args.map_pool,
        "map_coreset": args.map_coreset,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "max_pixels": args.max_pixels,
        "engine": args.engine,
    }


def _map_levels(text: str | None) -> list[str] | None:
    """CLI text -> map levels: None keeps the preset's, 'none' turns maps off."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    return [s.strip() for s in text.split(",") if s.strip()]


def _training_images(folder: str) -> list[Path]:
    """Images of a folder; an MVTec-layout category means its train/good."""
    from .datasets import is_category
    from .images import list_images

    path = Path(folder)
    return list_images(path / "train" / "good" if is_category(path) else path)


def _threshold_options(p: argparse.ArgumentParser) -> None:
    from .threshold import METHODS

    g = p.add_argument_group("threshold (saved in the model; `score` uses it unless told otherwise)")
    g.add_argument("--threshold", default="chi2", choices=METHODS,
                   help="decision rule: chi2 per level (the paper), hotelling (finite-sample F law per level) or "
                        "conformal (quantile of held-out normal scores, needs --calibration); default %(default)s")
    g.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate (default %(default)s)")
    g.add_argument("--calibration", type=float, metavar="FRACTION",
                   help="hold out this fraction of the images (e.g. 0.2) to compute conformal calibration scores "
                        "with a model fitted on the rest, then refit on all images")
    g.add_argument("--seed", type=int, default=0, help="seed of the random calibration split (default %(default)s)")


def _finite(x: float) -> float | None:
    """JSON has no infinity: an infinite threshold is written as null."""
    return float(x) if np.isfinite(x) else None


def _infinite_note(model, fpr: float) -> str:
    n = model.calibration_scores_.size
    return (f"with {n} calibration scores the conformal threshold at FPR {fpr} is infinite "
            f"(FPR below 1/(n+1) = {1 / (n + 1):.3g}): nothing is flagged; hold out more images")


def cmd_fit(args: argparse.Namespace) -> int:
    from .model import GaussianAD

    if Path(args.output).is_dir():
        raise GaussadError(f"{args.output}: is a folder; give the model file's name with -o")
    files = _training_images(args.train_dir)
    model = GaussianAD(**_model_params(args), threshold=args.threshold, fpr=args.fpr, calibration=args.calibration,
                       random_state=args.seed, verbose=not (args.quiet or args.json))
    model.fit(files, on_error=args.on_error)
    model.save(args.output)
    cal = getattr(model, "calibration_scores_", None)
    limit = model.score_threshold()
    summary = {"model": str(args.output), "n_images": model.n_samples_, "backbone": model.backbone,
               "levels": model.level_names_, "input_size": model.input_size_, "feature_dims": model.feature_dims_,
               "threshold": model.threshold, "fpr": model.fpr, "n_calibration": None if cal is None else int(cal.size),
               "score_threshold": _finite(limit),
               "skipped": [{"path": p, "error": m} for p, m in model.skipped_]}
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        for path, msg in model.skipped_:
            print(f"skipped: {msg}", file=sys.stderr)
        print(f"fitted on {model.n_samples_} images from {args.train_dir} ({len(model.skipped_)} skipped); "
              f"wrote {args.output}")
        if model.threshold == "conformal" and not np.isfinite(limit):
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
    from .images import expand_sources
    from .persistence import load

    model = load(args.model)
    if args.preset and (model.preset or "paper") != args.preset:
        raise GaussadError(f"{args.model}: fitted with preset {model.preset or 'paper'}, not {args.preset}; "
                           f"refit with --preset {args.preset}")
    model.verbose = not (args.quiet or args.json)
    model.batch_size = args.batch_size
    model.max_pixels = args.max_pixels
    method = args.threshold or model.threshold
    fpr = model.fpr if args.fpr is None else args.fpr
    limit = model.score_threshold(fpr, method)  # fails early when the rule cannot apply to this model
    model.engine = args.engine
    files = expand_sources(args.images)
    skipped: list = []
    if args.maps:
        levels, amaps = model.score_with_maps(files, on_error=args.on_error, skipped=skipped)
    else:
        feats = model.extract_features(files, "score", on_error=args.on_error, skipped=skipped)
    bad = {i for i, _ in skipped}
    kept = [f for i, f in enumerate(files) if i not in bad]
    if not args.maps:
        levels = model.level_scores_features(feats) if kept else np.zeros((0, len(model.level_names_)))
    decisions, pvalues = model.decide(levels, fpr, method) if kept else ([], [])
    scores = levels.mean(axis=1)
    rows = [
        {"path": str(f), "score": float(s), "levels": dict(zip(model.level_names_, map(float, lv))),
         "pvalue": float(p), "anomalous": bool(d)}
        for f, s, lv, p, d in zip(kept, scores, levels, pvalues, decisions)
    ]
    if args.maps:
        for row, path, amap in zip(rows, _write_overlays(args.maps, kept, amaps, args.max_pixels), amaps):
            row["map"], row["map_max"] = str(path), float(amap.max())
    errors = [{"path": str(files[i]), "error": msg} for i, msg in skipped]
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
        if method == "conformal" and not np.isfinite(limit):
            print(f"warning: {_infinite_note(model, fpr)}", file=sys.stderr)
        print(f"{sum(r['anomalous'] for r in rows)} of {len(rows)} flagged at target FPR {fpr} "
              f"({RULES[method]}); {len(errors)} skipped", file=sys.stderr)
    return 0


def _write_overlays(folder: str, files: list[Path], amaps: np.ndarray, max_pixels: int) -> list[Path]:
    """Write one heat-map overlay PNG per image into ``folder`` (atomically each); returns their paths."""
    import os
    import tempfile

    from .images import load_image
    from .maps import overlay
    from .persistence import publish

    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    paths = []
    for i, (src, amap) in enumerate(zip(files, amaps)):
        name = f"{Path(src).stem}_map.png"
        if name in used:
            name = f"{Path(src).stem}_{i}_map.png"
        used.add(name)
        target = out_dir / name
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".png", dir=out_dir)
        os.close(fd)
        overlay(load_image(src, max_pixels=max_pixels), amap).save(tmp, format="PNG")
        publish(tmp, target)
        paths.append(target)
    return paths


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_markdown, format_table

    report = evaluate(args.root, protocol=args.protocol, verbose=not args.quiet, **_model_params(args))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.report:
        Path(args.report).write_text(format_markdown(report))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gaussad",
        description="Visual anomaly detection: a Gaussian per level of pretrained EfficientNet features, fitted on normal images only.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"gaussad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="fit a model on a folder of normal images", epilog=EPILOG,
                       description="Fit a model on the images of TRAIN_DIR (or its train/good if it is an MVTec category).")
    p.add_argument("train_dir", metavar="TRAIN_DIR")
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (written atomically)")
    _model_options(p)
    _threshold_options(p)
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="an unreadable image stops the fit (fail, default) or is reported and left out (skip)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("score", help="score images with a fitted model", epilog=EPILOG,
                       description="Score images: one row per image with its score, per-level distances, p-value and decision.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--fpr", type=float, help="target false-positive rate of the decision (default: the model's)")
    p.add_argument("--threshold", choices=("chi2", "hotelling", "conformal"),
                   help="decision rule (default: the model's); conformal needs a model fitted with --calibration")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default %(default)s)")
    _max_pixels_option(p)
    _engine_option(p)
    p.add_argument("--on-error", choices=("fail", "skip"), default="skip",
                   help="an unreadable image is reported and skipped (skip, default) or stops the run (fail)")
    p.add_argument("--maps", metavar="DIR",
                   help="write a heat-map overlay PNG per image into DIR (needs a model fitted with anomaly maps)")
    p.add_argument("--preset", choices=("paper", "recommended"),
                   help="check that the model was fitted with this preset (the preset itself is stored in the model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
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
