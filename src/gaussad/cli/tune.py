"""``gaussad tune``: choose settings on synthetic defects made from the training images, then fit."""

from __future__ import annotations

import argparse
import json

from .options import EPILOG, bounded, recursion_option, threshold_options, training_images

DESCRIPTION = (
    "Choose settings without defective images: hold out 20% of TRAIN_DIR's images (seeded), paste one synthetic defect "
    "into a copy of each (a patch of another training image, a scratch, a Perlin-noise blob or a colour spot), fit "
    "every setting of a grid on the rest, rank the settings by the image AUROC of held-out goods against the "
    "synthetic defects (then by pixel AUROC), print the ranking, keep the default settings (measured beside the grid) "
    "unless a setting beats their image AUROC by more than 2 standard errors of the paired difference (pixel AUROC "
    "where image AUROCs tie exactly), refit the choice on all images and write it to MODEL. Grids start from --preset "
    "recommended. small: input size native / ~1.4x / ~1.7x times map grid coarsest (stage2-7) / finest (stage4-7); "
    "sizes: the input sizes only; maps: the map grids only; scores: the global against the fused image score; tiles: "
    "map tiles 1 / 2 / 3 (--map-tiles); brightness: --brightness match against keep; adapt: the pretrained network "
    "against --adapt 5 (fine-tuned on the search's fit part, the epoch kept as --adapt-stop says). The choice is a hint: "
    "synthetic defects do not always rank settings as real ones do (docs/guide/tune.md, EXPERIMENTS.md).")


def add(sub: argparse._SubParsersAction) -> None:
    from ..detector import params
    from ..tools.tune import DEFAULT_BUDGET, GRIDS, MIN_IMAGES

    p = sub.add_parser("tune", help="choose settings on synthetic defects made from the training images, then fit",
                       epilog=EPILOG, description=DESCRIPTION)
    p.add_argument("train_dir", metavar="TRAIN_DIR")
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (written atomically)")
    p.add_argument("--grid", choices=tuple(GRIDS), default="small", help="settings to compare (default %(default)s)")
    p.add_argument("--budget", type=bounded(int, MIN_IMAGES, 10**6), default=DEFAULT_BUDGET, metavar="N",
                   help="training images the search uses at most, drawn with --seed (default %(default)s); the "
                        "final fit uses all")
    threshold_options(p)
    params.add_options(p.add_argument_group("adapt"), ["adapt_stop"])  # which epoch --grid adapt's candidate keeps
    params.add_options(p.add_argument_group("intake"), params.cli_names("intake"))
    p.add_argument("--quiet", action="store_true", help="no progress bars or ranking")
    p.add_argument("--json", action="store_true", help="print the ranking and the chosen settings as JSON")
    recursion_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..detector import params
    from ..intake.files import check_output

    check_output(args.output, "model file")
    settings = params.from_args(args, [*params.cli_names("intake", "threshold"), "adapt_stop"])
    seed = settings.pop("random_state")
    base = {**settings, "preset": "recommended"}
    params.validate({**params.defaults(), **base})
    files, _ = training_images(args.train_dir, args.recursive)
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
