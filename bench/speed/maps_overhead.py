"""Cost of anomaly maps: scoring time with maps vs without, same images, same model, one run; the recommended
preset's scoring throughput (with its maps) against the paper preset's (issue 14: at least 0.25x); and the fused image
score's (``image_score='fused'``: every score needs the map peak, so the banks and the tiles, but no upsampled map)
against the global score's, the price of making it a preset's score.

    python -m bench.speed.maps_overhead --data ../shared/data/mvtec_ad/bottle [--map-tiles K] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gaussad import GaussianAD
from gaussad.tools.datasets import load_category


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.speed.maps_overhead", description=__doc__)
    parser.add_argument("--data", required=True, help="one category in MVTec layout")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--map-tiles", type=lambda t: t if t == "auto" else int(t), default=None,
                        help="the recommended model's map_tiles (default: the preset's, auto; paper unchanged)")
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    cat = load_category(args.data)
    model = GaussianAD(backbone=args.backbone, preset="recommended", map_tiles=args.map_tiles).fit(cat.train_files)
    no_maps = GaussianAD(backbone=args.backbone, preset="recommended", map_levels=[]).fit(cat.train_files)
    paper = GaussianAD(backbone=args.backbone, preset="paper").fit(cat.train_files)
    fused = GaussianAD(backbone=args.backbone, preset="recommended", map_tiles=args.map_tiles,
                       image_score="fused").fit(cat.train_files)
    files = cat.test_files
    no_maps.level_scores(files[:8])  # warm-up: backbones built, caches filled
    model.score_with_maps(files[:8])
    paper.level_scores(files[:8])
    fused.score_samples(files[:8])
    plain = best_of(lambda: no_maps.level_scores(files), args.repeats)
    with_maps = best_of(lambda: model.score_with_maps(files), args.repeats)
    paper_s = best_of(lambda: paper.level_scores(files), args.repeats)
    global_s = best_of(lambda: model.score_samples(files), args.repeats)
    fused_s = best_of(lambda: fused.score_samples(files), args.repeats)
    result = {
        "data": str(Path(args.data)),
        "n_images": len(files),
        "map_tiles": model.map_tiles_,
        "score_img_s": len(files) / plain,
        "score_with_maps_img_s": len(files) / with_maps,
        "maps_cost_ratio": with_maps / plain,
        "paper_img_s": len(files) / paper_s,
        "recommended_vs_paper": paper_s / with_maps,
        "global_score_img_s": len(files) / global_s,
        "fused_score_img_s": len(files) / fused_s,
        "fused_vs_global": global_s / fused_s,
    }
    print(f"{len(files)} images: score {result['score_img_s']:.1f} img/s, score+maps {result['score_with_maps_img_s']:.1f} img/s, "
          f"maps cost x{result['maps_cost_ratio']:.2f}; paper preset {result['paper_img_s']:.1f} img/s, recommended "
          f"(with maps, map_tiles {model.map_tiles_}) at {result['recommended_vs_paper']:.2f}x its throughput; "
          f"score_samples: global {result['global_score_img_s']:.1f} img/s, fused {result['fused_score_img_s']:.1f} img/s "
          f"({result['fused_vs_global']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
