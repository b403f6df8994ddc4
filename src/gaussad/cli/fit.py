"""``gaussad fit``: fit a model on a folder of normal images and write it."""

from __future__ import annotations

import argparse
import json
import sys

from .options import (EPILOG, dask_options, model_options, model_params, recursion_option, threshold_options,
                      training_images)
from .text import calibration_line, fused_line


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a model on a folder of normal images", epilog=EPILOG,
                       description="Fit a model on the images of TRAIN_DIR and its sub-folders (or of its train/good "
                                   "if it is an MVTec category).")
    p.add_argument("train_dir", metavar="TRAIN_DIR")
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (written atomically)")
    model_options(p)
    threshold_options(p)
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="an unreadable image stops the fit (fail, default) or is reported and left out (skip)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    recursion_option(p)
    dask_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..detector import params
    from ..intake.files import check_output, refuse_input_as_output

    # What needs no work first: the output, the settings, the image list; then the model (numpy, the network).
    check_output(args.output, "model file")
    settings = model_params(args, "threshold")
    params.validate({**params.defaults(), **settings})
    files, names = training_images(args.train_dir, args.recursive)
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
    if args.json:
        print(json.dumps(_summary(args, model, brief, name_of)))
    elif not args.quiet:
        _print_summary(args, model, brief)
    return 0


def _summary(args: argparse.Namespace, model, brief: dict, name_of: dict[str, str]) -> dict:
    """``fit --json``'s answer."""
    cal = getattr(model, "calibration_scores_", None)
    rule = brief["threshold"]
    return {"model": str(args.output), "n_images": model.n_samples_, "backbone": model.backbone,
            "precision": model.precision, **({"int8": brief["int8"]} if "int8" in brief else {}),
            **({"adaptation": brief["adaptation"]} if "adaptation" in brief else {}),
            "levels": model.level_names_, "input_size": model.input_size_, "feature_dims": model.feature_dims_,
            "image_score": model.setting("image_score"), "threshold": model.setting("threshold"), "fpr": rule["fpr"],
            **({"fpr_requested": model.fpr} if rule["fpr"] != model.fpr else {}),
            "n_calibration": None if cal is None else int(cal.size),
            "score_threshold": rule.get("score_threshold"), "calibration": brief["calibration"],
            "skipped": [{"path": name_of.get(p, p), "error": m} for p, m in model.skipped_]}


def _print_summary(args: argparse.Namespace, model, brief: dict) -> None:
    rule, calibration = brief["threshold"], brief["calibration"]
    for path, msg in model.skipped_:
        print(f"skipped: {msg}", file=sys.stderr)
    print(f"fitted on {model.n_samples_} images from {args.train_dir} ({len(model.skipped_)} skipped) at "
          f"{model.input_size_} px{' (input_size auto)' if model.setting('input_size') == 'auto' else ''}; "
          f"wrote {args.output}")
    if model.map_tiles_ > 1:
        print(f"anomaly maps from {model.map_tiles_} x {model.map_tiles_} tiles per image (map_tiles="
              f"{model.setting('map_tiles')}; --map-tiles 1 or --preset fast for untiled, faster maps)")
    if "adaptation" in brief:
        a = brief["adaptation"]
        kept = ("the pretrained network (no epoch ranked the held-out defects better)" if not a["kept_epoch"]
                else f"epoch {a['kept_epoch']}")
        figures = ("; held-out AUROC by epoch " + ", ".join(f"{v:.4f}" for v in a["validation_auroc"])
                   if a["stop"] == "validation" else "")
        print(f"adapted the network: {a['run']} of {a['epochs']} epochs run in {a['seconds']:.0f} s, kept {kept}"
              f"{figures}")
    if "int8" in brief:
        print(f"int8 network: format {brief['int8']['format']} (scores alike on every CPU), calibrated on "
              f"{brief['int8']['calibrated_on']}")
    if calibration is not None:
        print(calibration_line(calibration, min(model.calibration_folds, model.n_samples_)))
    if rule["image_score"] == "fused":
        print(fused_line(calibration["fused"], rule["fpr"]))
    else:
        limit = rule.get("score_threshold")
        print(f"threshold {model.setting('threshold')} at target FPR {rule['fpr']:g}: score threshold "
              f"{float('inf') if limit is None else limit:.3f}")
