"""``gaussad export``: write the whole detector as one ONNX graph."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..intake.files import check_output, refuse_input_as_output, write_atomic

    check_output(args.output, "ONNX file")
    refuse_input_as_output(args.output, [args.model], "ONNX file")
    from ..detector.model import load
    from ..tools.export import export_detector

    model = load(args.model)
    data, notes = export_detector(model, maps=args.maps)
    write_atomic(args.output, data, "ONNX graph")
    if not args.quiet:
        print(f"wrote {args.output} ({len(data) / 2**20:.1f} MiB): uint8 images (N, H, W, 3) -> score, levels "
              f"({', '.join(model.level_names_)}), pvalue, anomalous under "
              f"{'fused' if model.setting('image_score') == 'fused' else model.setting('threshold')} at "
              f"FPR {model.fpr}" + (", map" if args.maps else ""))
        for note in notes:
            print(f"note: {note}")
    return 0
