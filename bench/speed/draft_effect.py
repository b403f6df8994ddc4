"""Effect of JPEG draft decoding (reduced-scale DCT decode) on image AUROC and on decoding speed.

    python -m bench.speed.draft_effect --data CATEGORY [--quality 95] [--protocol paper] [--json OUT]

Draft mode only applies to JPEGs at least twice the network input on both sides. The category's images are
re-encoded once as JPEG (at ``--quality``) into a temporary folder; the copy is then evaluated with full
decoding and with draft decoding, everything else equal, and both decodes are timed on all cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image


def jpeg_copy(src: Path, dst: Path, quality: int) -> Path:
    """The category's train/good and test/* images re-encoded as JPEG under ``dst``, same layout."""
    files = sorted(p for sub in ("train", "test") for p in (src / sub).rglob("*") if p.is_file())
    for p in files:
        out = dst / p.relative_to(src).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(p) as img:
            img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(out, quality=quality)
    return dst


def main(argv: list[str] | None = None) -> int:
    from gaussad.tools.datasets import find_categories
    from gaussad.intake.engine import cpu_count
    from gaussad.tools.evaluate import evaluate_category
    from gaussad.intake.features import FeatureExtractor
    from gaussad.intake.images import load_image

    p = argparse.ArgumentParser(prog="python -m bench.speed.draft_effect", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="an MVTec-layout category")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the copy (default %(default)s)")
    p.add_argument("--protocol", choices=("paper", "full"), default="paper")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)

    src = find_categories(args.data)[0]
    result = {"data": args.data, "jpeg_quality": args.quality, "protocol": args.protocol, "backbone": args.backbone}
    with tempfile.TemporaryDirectory() as tmp:
        cat = find_categories(jpeg_copy(src.root, Path(tmp) / src.name, args.quality))[0]
        files = cat.train_files + cat.test_files
        size = FeatureExtractor(args.backbone).input_size
        result["input_size"] = size
        result["image_size"] = list(load_image(files[0]).size)
        result["decoded_size_with_draft"] = list(load_image(files[0], draft=size).size)
        for draft in (False, True):
            fe = FeatureExtractor(args.backbone, draft=draft)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(cpu_count()) as pool:
                list(pool.map(fe.prepare, files))
            decode_img_s = len(files) / (time.perf_counter() - t0)
            feats = fe.extract(cat.train_files), fe.extract(cat.test_files)
            report = evaluate_category(cat, feats, {"backbone": args.backbone}, args.protocol)
            key = "draft" if draft else "full"
            result[f"{key}_image_auroc"] = report["image_auroc"]
            result[f"{key}_level_aurocs"] = report["level_aurocs"]
            result[f"{key}_decode_img_s"] = decode_img_s
    result["auroc_change"] = result["draft_image_auroc"] - result["full_image_auroc"]
    print(f"{args.data} as JPEG q{args.quality} ({result['image_size'][0]}x{result['image_size'][1]} px, input "
          f"{result['input_size']} px, decoded at {result['decoded_size_with_draft'][0]} px with draft), "
          f"protocol {args.protocol}:\n"
          f"  full decode   AUROC {result['full_image_auroc']:.4f}  decode {result['full_decode_img_s']:.1f} img/s\n"
          f"  draft decode  AUROC {result['draft_image_auroc']:.4f}  decode {result['draft_decode_img_s']:.1f} img/s\n"
          f"  AUROC change  {result['auroc_change']:+.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
