"""``gaussad score``: score images with a fitted model, in one process or on a Dask cluster, with heat-map
overlays on request. The scores, decisions and warnings come from the inference pipeline
(:mod:`gaussad.detector.inference`); this module formats them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path, PurePath
from typing import Sequence

from ..errors import GaussadError
from .options import EPILOG, dask_options, recursion_option


def add(sub: argparse._SubParsersAction) -> None:
    from ..detector import params

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
    recursion_option(p)
    dask_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    return _score_here(args, files, names)


def _score_here(args: argparse.Namespace, files: list[Path], names: list[str]) -> int:
    from ..core.drift import shift_warning
    from ..detector import inference, params
    from ..intake.files import check_output

    if args.maps:
        check_output(args.maps, "overlay", folder=True)
    model = _load_checked(args)
    model.set_params(verbose=not (args.quiet or args.json), **params.from_args(args, params.cli_names("intake")))
    method = args.threshold or model.setting("threshold")
    decision = inference.decision(model, args.fpr, method, f"{args.model}: ")  # fails before any image is read
    if decision.get("note") and not args.quiet:
        print(f"note: {decision['note']}", file=sys.stderr)
    fpr = decision["fpr"]
    scored = inference.score(model, files, names, fpr=args.fpr, method=method, with_maps=bool(args.maps),
                             on_error=args.on_error)
    rows = scored.rows
    if args.maps:
        _add_overlays(args, model, [files[i] for i in scored.read], rows, scored.maps)
    errors = [{"path": names[i], "error": msg} for i, msg in scored.skipped]
    warnings, shift = inference.batch_warnings(model, rows, scored.levels, fpr)
    if args.json:
        print(json.dumps({"model": str(args.model), "fpr": fpr,
                          **({"fpr_requested": decision["fpr_requested"]} if "note" in decision else {}),
                          "threshold": method, "image_score": decision["image_score"], "rule": decision["rule"],
                          "score_threshold": decision.get("score_threshold"), "warnings": warnings, "drift": shift,
                          "results": rows, "skipped": errors}))
        return 1 if errors and not rows else 0
    for e in errors:
        print(f"skipped: {e['error']}", file=sys.stderr)
    if not rows:
        raise GaussadError(f"none of the {len(files)} images could be read")
    _print_table(rows, model.level_names_, fpr)
    if not args.quiet:
        print(f"{sum(r['anomalous'] for r in rows)} of {len(rows)} flagged at target FPR {fpr:g} "
              f"({decision['rule']}); {len(errors)} skipped", file=sys.stderr)
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
        if shift["alarm"] and not warnings:
            print(f"warning: {shift_warning(shift)}", file=sys.stderr)
    return 0


def _print_table(rows: list[dict], names: Sequence[str], fpr: float) -> None:
    width = max(len(r["path"]) for r in rows)
    print("  ".join(["path".ljust(width), "score".rjust(8)] + [n.rjust(8) for n in names]
                    + ["p-value".rjust(9), f"decision at target FPR {fpr:g}"]))
    for r in rows:
        cells = [r["path"].ljust(width), f"{r['score']:8.3f}"] + [f"{r['levels'][n]:8.3f}" for n in names]
        cells += [f"{r['pvalue']:9.2e}", f"ANOMALY ({r['evidence']['text']})" if r["anomalous"] else "ok"]
        print("  ".join(cells))


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


def overlay_names(names: Sequence[str]) -> list[str]:
    """Relative overlay file names that mirror the images' names, all distinct: ``good/000.png`` ->
    ``good/000_map.png``. A file given by an absolute path keeps only its file name (``/tmp/x/000.png`` ->
    ``000_map.png``, not ``tmp/x/000_map.png``); ``..`` in a relative name becomes ``up``; a name already taken (the
    same stem twice, ``x.png`` and ``x.jpg``; case-insensitively, for file systems that ignore case) becomes
    ``x_map-2.png``, ``x_map-3.png``, ... A name that would be too long is shortened."""
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


def _add_overlays(args: argparse.Namespace, model, files: list[Path], rows: list[dict], amaps) -> None:
    """Write one heat-map overlay PNG per image into ``args.maps`` (atomically each), named by :func:`overlay_names`,
    drawn by :func:`gaussad.detector.heatmap.render` on the scale of the model's ``map_calibration`` with each row's
    score and decision; each row gets its ``map`` path, or with ``--on-error skip`` None and a ``map_error`` for an
    image that can no longer be read (changed since scoring)."""
    from ..detector.heatmap import heat_scale, render
    from ..errors import ImageError
    from ..intake.files import write_atomic
    from ..intake.images import load_image

    out_dir = Path(args.maps)
    scale = heat_scale(model.state_.map_calibration)
    for src, name, amap, row in zip(files, overlay_names([r["path"] for r in rows]), amaps, rows):
        try:
            image = render(load_image(src, max_pixels=args.max_pixels), amap, scale, row["score"], row["anomalous"])
        except ImageError as exc:
            if args.on_error != "skip":
                raise
            row["map"], row["map_error"] = None, f"no overlay: {exc}"
            continue
        row["map"] = str(write_atomic(out_dir / name, lambda fh, image=image: image.save(fh, format="PNG"), "overlay"))
