"""Command-line interface: ``gaussad fit | tune | score | export | evaluate | backbones | serve | keys``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path, PurePath
from typing import Sequence

# Only what answers --help and argument errors is imported here: numpy, scipy, the model and the network are
# imported by the command that needs them (bench/startup.py measures the start-up).
from ..version import __version__
from ..errors import GaussadError

EPILOG = ("Images: PNG, JPEG, BMP, TIFF, WebP (the first frame of multi-frame files). Grayscale (8/16-bit), palette, "
          "CMYK and RGBA are converted to RGB, transparency composited on black; EXIF orientation is applied.")


def _model_options(p: argparse.ArgumentParser) -> None:
    """The model's options, from the parameter table (:mod:`gaussad.detector.params`)."""
    from ..detector import params

    params.add_options(p.add_argument_group("model"), params.cli_names("model"))
    params.add_options(p.add_argument_group("intake"), params.cli_names("intake"))


def _model_params(args: argparse.Namespace, *groups: str) -> dict:
    from ..detector import params

    return params.from_args(args, params.cli_names("model", "intake", *groups))


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (exit 2) like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _training_images(folder: str, recursive: bool) -> tuple[list[Path], list[str]]:
    """Images of a folder (and its sub-folders when ``recursive``) with their names relative to it; an MVTec-layout
    category means its train/good."""
    from ..tools.datasets import is_category
    from ..intake.images import find_images

    path = Path(folder)
    if not path.exists():
        raise GaussadError(f"{folder}: no such folder (give a folder of good images, or an MVTec category)")
    return find_images([path / "train" / "good" if is_category(path) else path], recursive)


def _threshold_options(p: argparse.ArgumentParser) -> None:
    from ..detector import params

    params.add_options(p.add_argument_group("threshold (saved in the model; `score` uses it unless told otherwise)"),
                       params.cli_names("threshold"))


def _finite(x: float) -> float | None:
    """JSON has no infinity: an infinite threshold is written as null."""
    return float(x) if math.isfinite(x) else None


def cmd_fit(args: argparse.Namespace) -> int:
    from ..detector import params
    from ..intake.files import check_output, refuse_input_as_output

    # What needs no work first: the output, the settings, the image list; then the model (numpy, the network).
    check_output(args.output, "model file")
    settings = _model_params(args, "threshold")
    params.validate({**params.defaults(), **settings})
    files, names = _training_images(args.train_dir, args.recursive)
    refuse_input_as_output(args.output, files, "model file")
    from ..detector.model import GaussianAD

    model = GaussianAD(**settings, verbose=not (args.quiet or args.json))
    if args.dask:
        from ..tools import distributed

        distributed.check_fit(model, len(files))  # before any cluster starts
        with distributed.connect(args.dask) as client:
            distributed.fit(model, files, client, args.partition_size, args.on_error)
    else:
        model.fit(files, on_error=args.on_error)
    brief = model.summary()
    if brief["threshold"].get("note") and not args.quiet:  # said before the model is written
        print(f"note: {brief['threshold']['note']}", file=sys.stderr)
    model.save(args.output)
    name_of = {str(f): n for f, n in zip(files, names)}
    cal = getattr(model, "calibration_scores_", None)
    fused = model.rule().fused
    limit = math.nan if fused else model.score_threshold()
    fpr = brief["threshold"]["fpr"]
    calibration = brief["calibration"]
    summary = {"model": str(args.output), "n_images": model.n_samples_, "backbone": model.backbone,
               "precision": model.precision, **({"int8": brief["int8"]} if "int8" in brief else {}),
               "levels": model.level_names_, "input_size": model.input_size_, "feature_dims": model.feature_dims_,
               "image_score": model.setting("image_score"), "threshold": model.setting("threshold"), "fpr": fpr,
               **({"fpr_requested": model.fpr} if fpr != model.fpr else {}),
               "n_calibration": None if cal is None else int(cal.size),
               "score_threshold": _finite(limit), "calibration": calibration,
               "skipped": [{"path": name_of.get(p, p), "error": m} for p, m in model.skipped_]}
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        for path, msg in model.skipped_:
            print(f"skipped: {msg}", file=sys.stderr)
        print(f"fitted on {model.n_samples_} images from {args.train_dir} ({len(model.skipped_)} skipped) at "
              f"{model.input_size_} px{' (input_size auto)' if model.setting('input_size') == 'auto' else ''}; "
              f"wrote {args.output}")
        if model.map_tiles_ > 1:
            print(f"anomaly maps from {model.map_tiles_} x {model.map_tiles_} tiles per image (map_tiles="
                  f"{model.setting('map_tiles')}; --map-tiles 1 or --preset fast for untiled, faster maps)")
        if "int8" in brief:
            print(f"int8 network: format {brief['int8']['format']} (scores alike on every CPU), calibrated on "
                  f"{brief['int8']['calibrated_on']}")
        if calibration is not None:
            print(_calibration_line(calibration, min(model.calibration_folds, model.n_samples_)))
        if fused:
            print(_fused_line(calibration["fused"], fpr))
        else:
            print(f"threshold {model.setting('threshold')} at target FPR {fpr:g}: score threshold {limit:.3f}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from ..detector import params
    from ..intake.files import check_output

    check_output(args.output, "model file")
    settings = params.from_args(args, params.cli_names("intake", "threshold"))
    seed = settings.pop("random_state")
    base = {**settings, "preset": "recommended"}
    params.validate({**params.defaults(), **base})
    files, _ = _training_images(args.train_dir, args.recursive)
    from ..tools.tune import as_flags, candidates, format_ranking, tune

    candidates(args.grid, base)  # a bad grid fails before any work
    result = tune(files, grid=args.grid, budget=args.budget, base=base, seed=seed, verbose=not (args.quiet or args.json))
    result.model.save(args.output)
    if args.json:
        print(json.dumps({"model": str(args.output), "n_images": len(files), "grid": args.grid, "seed": seed,
                          **result.to_json()}))
    elif not args.quiet:
        print(format_ranking(result))
        flags = "the default" if result.chosen["default"] else as_flags(result.chosen["settings"])
        print(f"chose: {flags} ({result.choice}); refitted on {len(files)} images from {args.train_dir}; wrote "
              f"{args.output} ({result.seconds:.0f} s)")
    return 0


def _fused_line(c: dict, fpr: float) -> str:
    """One line on a fused image score's calibration (:func:`gaussad.detector.decision.calibration_summary`) and the target
    FPR it decides at."""
    return (f"fused image score: {' and '.join(c['evidence'])} against {min(c['n_scores'])} out-of-fold scores of "
            f"the training images; flags p-value <= target FPR {fpr:g} (the smallest these images support: "
            f"{c['min_fpr']:.3g})")


CALIBRATIONS = {"cv": "out-of-fold scores (cross-conformal, {folds} folds)", "split": "held-out images (split conformal)",
                "calibrate": "images given to calibrate()", None: "calibration scores"}


def _calibration_line(c: dict, folds: int | None = None) -> str:
    """One line on a model's calibration scores (:func:`gaussad.detector.decision.calibration_summary`)."""
    limit = "infinite (nothing flagged)" if c["score_threshold"] is None else f"{c['score_threshold']:.3f}"
    return (f"calibration: {c['n_scores']} {CALIBRATIONS[c['method']].format(folds=folds or 'K')}; finite conformal "
            f"threshold for FPR >= {c['min_fpr']:.3g}; conformal score threshold at FPR {c['fpr']}: {limit}")


RULES = {
    "chi2": "chi-square per level, Bonferroni over levels",
    "hotelling": "Hotelling F law per level, Bonferroni over levels",
    "conformal": "split conformal on the image score",
    "fused": "full-conformal Fisher combination of the global score and the map peak",
}


def cmd_score(args: argparse.Namespace) -> int:
    from ..detector import params
    from ..intake.files import check_output, refuse_input_as_output
    from ..intake.images import find_images

    # What needs no work first: the overlay folder and the image list; then the model and the network.
    if args.maps:
        check_output(args.maps, "overlays", folder=True)
    if bool(args.dask) != bool(args.out):
        raise GaussadError("--dask and --out go together: a distributed run writes its results to --out")
    if args.dask:
        from ..tools import distributed

        distributed.output_format(args.out)
        if args.maps:
            raise GaussadError("--maps is not available with --dask; score the images to overlay without it")
    files, names = find_images(args.images, args.recursive)
    if args.dask:
        refuse_input_as_output(args.out, [args.model, *files], "results file")
        return _score_distributed(args, files, names)
    from ..detector import inference
    from ..detector.decision import fpr_note
    from ..core.drift import drift, shift_warning, unlike_training

    if args.maps:
        check_output(args.maps, "overlay", folder=True)
    model = _load_checked(args)
    model.set_params(verbose=not (args.quiet or args.json), **params.from_args(args, params.cli_names("intake")))
    method = args.threshold or model.setting("threshold")
    rule = inference.rule_for(model, args.fpr, method, f"{args.model}: ")  # fails before any image is read
    if (note := fpr_note(rule, model.state_)) and not args.quiet:
        print(f"note: {note}", file=sys.stderr)
    fpr = rule.target_fpr(model.state_)
    limit = math.nan if rule.fused else model.score_threshold(fpr, method)
    scored = inference.score(model, files, names, fpr=args.fpr, method=method, with_maps=bool(args.maps),
                             on_error=args.on_error)
    rows, skipped, levels = scored.rows, scored.skipped, scored.levels
    if args.maps:
        kept = [files[i] for i in scored.read]
        written = _write_overlays(args.maps, kept, [r["path"] for r in rows], scored.maps, args.max_pixels,
                                  args.on_error, rows, model.state_.map_calibration)
        for row, (path, error) in zip(rows, written):
            row["map"] = None if path is None else str(path)
            if error is not None:
                row["map_error"] = error
    errors = [{"path": names[i], "error": msg} for i, msg in skipped]
    shift = drift([r["anomalous"] for r in rows], [r["pvalue"] for r in rows], fpr)
    warnings = [w for w in [unlike_training(levels.mean(axis=1), model.state_.calibration_scores)] if w]
    if args.json:
        print(json.dumps({"model": str(args.model), "fpr": fpr, **({"fpr_requested": rule.fpr} if note else {}),
                          "threshold": method, "image_score": rule.image_score,
                          "rule": RULES["fused" if rule.fused else method], "score_threshold": _finite(limit),
                          "warnings": warnings, "drift": shift, "results": rows, "skipped": errors}))
        return 1 if errors and not rows else 0
    for e in errors:
        print(f"skipped: {e['error']}", file=sys.stderr)
    if not rows:
        raise GaussadError(f"none of the {len(files)} images could be read")
    names = model.level_names_
    width = max(len(r["path"]) for r in rows)
    print("  ".join(["path".ljust(width), "score".rjust(8)] + [n.rjust(8) for n in names]
                    + ["p-value".rjust(9), f"decision at target FPR {fpr:g}"]))
    for r in rows:
        cells = [r["path"].ljust(width), f"{r['score']:8.3f}"] + [f"{r['levels'][n]:8.3f}" for n in names]
        cells += [f"{r['pvalue']:9.2e}", f"ANOMALY ({r['evidence']['text']})" if r["anomalous"] else "ok"]
        print("  ".join(cells))
    if not args.quiet:
        print(f"{sum(r['anomalous'] for r in rows)} of {len(rows)} flagged at target FPR {fpr:g} "
              f"({RULES['fused' if rule.fused else method]}); {len(errors)} skipped", file=sys.stderr)
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
        if shift["alarm"] and not warnings:
            print(f"warning: {shift_warning(shift)}", file=sys.stderr)
    return 0


def _load_checked(args: argparse.Namespace):
    """The model of ``score`` (one process or --dask), refused when ``--preset`` names another than it was fitted
    with."""
    from ..detector.model import load

    model = load(args.model)
    if args.preset and model.setting("preset") != args.preset:
        raise GaussadError(f"{args.model}: fitted with preset {model.setting('preset')}, not {args.preset}; "
                           f"refit with --preset {args.preset}")
    return model


def _score_distributed(args: argparse.Namespace, files: list[Path], names: list[str]) -> int:
    from ..tools import distributed

    _load_checked(args)  # a bad model file or preset fails before any cluster starts
    with distributed.connect(args.dask) as client:
        summary = distributed.score(args.model, files, names, args.out, client, args.fpr, args.threshold,
                                    args.partition_size, args.on_error, progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        print(f"scored {summary['rows']} images into {args.out}: {summary['parts']} parts, {summary['parts_reused']} "
              f"kept from an earlier run; {summary['skipped_now']} unreadable (rows with an error)", file=sys.stderr)
    return 0


def _dask_options(p: argparse.ArgumentParser) -> None:
    from ..tools.distributed import DEFAULT_PARTITION

    p.add_argument("--dask", metavar="ADDRESS",
                   help="run on a Dask cluster: a scheduler address (tcp://host:8786), or local[:N] for a local "
                        "cluster of N worker processes started and stopped here (needs gaussad[dask])")
    p.add_argument("--partition-size", type=_bounded(int, 1, 1_000_000), default=DEFAULT_PARTITION, metavar="N",
                   help="images per Dask task (default %(default)s): bounds each worker's memory")


def overlay_names(names: Sequence[str]) -> list[str]:
    """Relative overlay file names that mirror the images' names, all distinct: ``good/000.png`` ->
    ``good/000_map.png``. A file given by an absolute path keeps only its file name (``/tmp/x/000.png`` ->
    ``000_map.png``, not ``tmp/x/000_map.png``); ``..`` in a relative name becomes ``up``; a name already taken (the same stem twice, ``x.png`` and ``x.jpg``; case-insensitively, for file systems
    that ignore case) becomes ``x_map-2.png``, ``x_map-3.png``, ... A name that would be too long is shortened."""
    used: set[str] = set()
    out = []
    for name in names:
        path = PurePath(name)
        parts = [] if path.anchor else ["up" if p == ".." else p for p in path.parts[:-1] if p not in ("", ".")]
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


def _write_overlays(folder: str, files: list[Path], names: list[str], amaps, max_pixels: int, on_error: str,
                    rows: list[dict], map_calibration) -> list[tuple[Path | None, str | None]]:
    """Write one heat-map overlay PNG per image into ``folder`` (atomically each), named by :func:`overlay_names`,
    drawn by :func:`gaussad.detector.heatmap.render` on the scale of the model's ``map_calibration`` with each row's score and
    decision; returns (path, None) per image, or with ``on_error="skip"`` (None, message) for an image that can no
    longer be read (changed since scoring)."""
    from ..errors import ImageError
    from ..intake.files import write_atomic
    from ..detector.heatmap import heat_scale, render
    from ..intake.images import load_image

    out_dir = Path(folder)
    scale = heat_scale(map_calibration)
    paths = []
    for src, name, amap, row in zip(files, overlay_names(names), amaps, rows):
        try:
            image = render(load_image(src, max_pixels=max_pixels), amap, scale, row["score"], row["anomalous"])
        except ImageError as exc:
            if on_error != "skip":
                raise
            paths.append((None, f"no overlay: {exc}"))
            continue
        paths.append((write_atomic(out_dir / name, lambda fh, image=image: image.save(fh, format="PNG"), "overlay"),
                      None))
    return paths


def cmd_export(args: argparse.Namespace) -> int:
    from ..intake.files import check_output, refuse_input_as_output, write_atomic

    check_output(args.output, "ONNX file")
    refuse_input_as_output(args.output, [args.model], "ONNX file")
    from ..tools.export import export_detector
    from ..detector.model import load

    model = load(args.model)
    data, notes = export_detector(model, maps=args.maps)
    write_atomic(args.output, data, "ONNX graph")
    if not args.quiet:
        rule = model.rule()
        print(f"wrote {args.output} ({len(data) / 2**20:.1f} MiB): uint8 images (N, H, W, 3) -> score, levels "
              f"({', '.join(model.level_names_)}), pvalue, anomalous under {'fused' if rule.fused else rule.method} at "
              f"FPR {rule.fpr}" + (", map" if args.maps else ""))
        for note in notes:
            print(f"note: {note}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..detector import params
    from ..intake.files import check_output, write_atomic

    for path, what in ((args.json, "JSON report"), (args.report, "report"), (args.html, "HTML report")):
        if path:
            check_output(path, what)
    params.validate({**params.defaults(), **_model_params(args)})
    from ..tools.evaluate import evaluate, format_markdown, format_table

    if args.html:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise GaussadError("--html needs matplotlib: pip install 'gaussad[report]'") from None
    details: dict | None = {} if args.html else None
    report = evaluate(args.root, protocol=args.protocol, verbose=not args.quiet, details=details, **_model_params(args))
    # Each output on its own, the plain ones first: a failure drawing the HTML report loses no other output.
    if args.json:
        write_atomic(args.json, (json.dumps(report, indent=2) + "\n").encode(), "JSON report")
    if args.report:
        write_atomic(args.report, format_markdown(report).encode(), "report")
    if args.html:
        from ..tools.report import render_html

        write_atomic(args.html, render_html(report, details).encode(), "HTML report")
    print(format_table(report))
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from ..intake.backbones import get_spec, list_backbones

    for name in list_backbones():
        spec = get_spec(name)
        print(f"{name:20s} {spec.input_size:4d} px  {spec.description}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..service.serve import Limits, run
    except ImportError as exc:
        raise GaussadError(f"gaussad serve needs the service packages ({exc}): pip install 'gaussad[serve]'") from None

    limits = Limits(max_file_bytes=int(args.max_file_mb * 2**20), max_files=args.max_files, max_pixels=args.max_pixels,
                    max_pixels_in_flight=args.max_pixels_in_flight)
    db = None if args.db.lower() in ("", "none", "off") else args.db
    run(args.model_dir, host=args.host, port=args.port, fpr=args.fpr, limits=limits, workers=args.workers,
        log_level=args.log_level, keys_file=args.keys, insecure=args.insecure, db=db, keep_images=args.keep_images)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
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


def _bounded(kind: type, lo: float, hi: float):
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


def _table_value(name: str, kind: type):
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


def _recursion_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-recursive", dest="recursive", action="store_false",
                   help="take only the images directly inside a folder, not those of its sub-folders (which are "
                        "walked by default, in sorted order; hidden folders and symbolic-link loops are skipped)")


def build_parser() -> argparse.ArgumentParser:
    from ..detector import params
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
    _dask_options(p)
    p.set_defaults(func=cmd_fit)

    from ..tools.tune import DEFAULT_BUDGET, GRIDS, MIN_IMAGES

    p = sub.add_parser("tune", help="choose settings on synthetic defects made from the training images, then fit",
                       epilog=EPILOG,
                       description="Choose settings without defective images: hold out 20% of TRAIN_DIR's images "
                                   "(seeded), paste one synthetic defect into a copy of each (a patch of another "
                                   "training image, a scratch, a Perlin-noise blob or a colour spot), fit every "
                                   "setting of a grid on the rest, rank the settings by the image AUROC of held-out "
                                   "goods against the synthetic defects (then by pixel AUROC), print the ranking, "
                                   "keep the default settings (measured beside the grid) unless a setting beats "
                                   "their image AUROC by more than 2 standard errors of the paired difference (pixel "
                                   "AUROC where image AUROCs tie exactly), refit the choice "
                                   "on all images and write it to MODEL. Grids start from --preset "
                                   "recommended. small: input size native / ~1.4x / ~1.7x times map grid coarsest "
                                   "(stage2-7) / finest (stage4-7); sizes: the input sizes only; maps: the map "
                                   "grids only; scores: the global against the fused image score; tiles: map "
                                   "tiles 1 / 2 / 3 (--map-tiles). The choice is "
                                   "a hint: synthetic defects do not always rank settings as real ones do (README, "
                                   "EXPERIMENTS.md).")
    p.add_argument("train_dir", metavar="TRAIN_DIR")
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (written atomically)")
    p.add_argument("--grid", choices=tuple(GRIDS), default="small", help="settings to compare (default %(default)s)")
    p.add_argument("--budget", type=_bounded(int, MIN_IMAGES, 10**6), default=DEFAULT_BUDGET, metavar="N",
                   help="training images the search uses at most, drawn with --seed (default %(default)s); the "
                        "final fit uses all")
    _threshold_options(p)
    params.add_options(p.add_argument_group("intake"), params.cli_names("intake"))
    p.add_argument("--quiet", action="store_true", help="no progress bars or ranking")
    p.add_argument("--json", action="store_true", help="print the ranking and the chosen settings as JSON")
    _recursion_option(p)
    p.set_defaults(func=cmd_tune)

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
                        "-> DIR/good/000_map.png; repeated names get -2, -3, ...): heat only above the largest map peak of the "
                        "model's good training images, a colour bar, score and decision under the image; needs a "
                        "model fitted with anomaly maps")
    p.add_argument("--preset", choices=tuple(params.PRESETS),
                   help="check that the model was fitted with this preset (the preset itself is stored in the model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    p.add_argument("--json", action="store_true", help="print the results as JSON (with --out: a summary)")
    p.add_argument("--out", metavar="OUT",
                   help="with --dask: write the results to OUT.parquet (a folder of Parquet parts), OUT.jsonl or "
                        "OUT.csv, one part per partition, each written atomically; a rerun skips finished parts")
    _recursion_option(p)
    _dask_options(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("export", help="write the whole detector as one ONNX graph (no Python needed to run it)",
                       description="Write MODEL as one ONNX graph: uint8 RGB images (N, H, W, 3), any H and W, resized "
                                   "inside the graph as gaussad resizes, to the image score, the distance per level, "
                                   "the p-value and the decision under the model's own threshold method and target "
                                   "FPR (calibration scores embedded; a fused image score, the default preset's, with "
                                   "both calibrations and the anomaly map its peak needs). The model's settings are "
                                   "in the graph's metadata.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="ONNX file to write (written atomically)")
    p.add_argument("--maps", action="store_true",
                   help="also output the anomaly map (N, S, S), as gaussad score computes it (nearest-neighbour map "
                        "models, e.g. --preset recommended); always there for a fused image score")
    p.add_argument("--quiet", action="store_true", help="no summary")
    p.set_defaults(func=cmd_export)

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
    p.add_argument("--html", metavar="OUT.html",
                   help="write a self-contained HTML report (ROC curves, score histograms with the thresholds, AUROC per "
                        "level, the most anomalous good and least anomalous defective images; needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("backbones", help="list the available backbones")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("serve", help="serve the models of a folder over HTTP, with an inspection page",
                       description="Serve every *.gaussad model of MODEL_DIR (named by file stem) over HTTP: "
                                   "GET /health, GET /models, POST /models/NAME/score, POST /models/NAME/map, "
                                   "the results log (GET /results, /results.csv, POST /results/ID/label), feedback "
                                   "(POST /models/NAME/update and /rollback, admin keys), GET /metrics (Prometheus), "
                                   "the inspection page at / and the OpenAPI docs at /docs.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=_bounded(int, 1, 65535), default=8000, help="port to listen on (default %(default)s)")
    p.add_argument("--fpr", type=_table_value("fpr", float),
                   help="target false-positive rate of the decisions (default: each model's own)")
    p.add_argument("--workers", type=_bounded(int, 1, 256), help="threads running the models (default: min(4, CPU count))")
    p.add_argument("--max-file-mb", type=_bounded(float, 1 / 1024, 4096), default=20.0,
                   help="largest upload per image in MiB (default %(default)s)")
    p.add_argument("--max-files", type=_bounded(int, 1, 1024), default=16,
                   help="most images per request (default %(default)s)")
    p.add_argument("--max-pixels", type=_bounded(int, 1, 2**31), default=25_000_000,
                   help="most pixels per image (default %(default)s)")
    p.add_argument("--max-pixels-in-flight", type=_bounded(int, 1, 2**40), default=100_000_000, metavar="N",
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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="manage the service's API keys",
                       description="Add, remove or list API keys of `gaussad serve --keys FILE`. A new key is printed "
                                   "once; the file keeps only its SHA-256 hash, its name and its role.")
    p.add_argument("action", choices=("add", "remove", "list"))
    p.add_argument("name", nargs="?", metavar="NAME", help="the key's name (add, remove)")
    p.add_argument("--role", choices=("score", "admin"), default="score",
                   help="score: score images, read results, mark them; admin: also update and roll back models "
                        "(default %(default)s)")
    p.add_argument("--keys", required=True, metavar="FILE", help="the keys file (created by the first add)")
    p.set_defaults(func=cmd_keys)
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
