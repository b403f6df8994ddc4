"""Streaming coreset against one-pass greedy selection, on location vectors extracted once (recommended preset).

The tile set's 37,450 locations per map level fit in one streaming buffer (``CHUNK`` rows), where streaming is one
greedy pass; to see what a 20,000-image fit (15 buffers per level) does, the buffer is shrunk here to ``--pending``
rows (4,096: 8 flushes over the 609 fit images). Variants per bank:

- ``one pass``: one greedy pass over every location (today's banks on the tile set);
- ``independent chunks``: each chunk of ``--pending`` rows keeps its own share, with no deduplication across chunks
  (the one-process fit past ``CHUNK`` rows before streaming);
- ``streaming``: chunks selected against the running bank (:class:`gaussad.core.bank.StreamingCoreset`), at ``--pending``
  and a quarter of it;
- ``streaming 2x + final pass``: a streaming coreset at twice the fraction, then one greedy pass over its members
  down to the bank's size (2 x the memory).

Figures as ``bench.experiments.map_variants``: ``synth`` (80 % of train/good fit, the other 20 % scored as they are and with a
synthetic defect), then with ``--test`` the real test set (maps fitted on all of train/good). Also the covering
radius of the fit locations (exact distances, relative to the one-pass bank's) and the selection time.

    python -m bench.experiments.coreset --data ../shared/data/magnetic_tile [--test] [--pending 4096]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

from gaussad import GaussianAD
from gaussad.core import maps
from gaussad.detector import params
from gaussad.core.bank import NearestBank, StreamingCoreset, greedy_coreset, nearest_distances
from gaussad.tools.datasets import load_category
from gaussad.tools.evaluate import hit_rate, load_masks, roc_auc
from gaussad.detector.state import prepare_maps

from bench.common import extract, split_masks, synthetic_split


def location_vectors(model: GaussianAD, per_image: list) -> tuple[list[np.ndarray], np.ndarray]:
    """Per bank, the location vectors of ``per_image`` (raw maps) as the model's fit gathers them; their image ids."""
    vectors: list[list] = []
    ids = []
    s = params.resolved(model.get_params())
    for idx, fm in maps.shape_groups(per_image):
        prepared = prepare_maps(fm, s["map_method"], s["map_pool"], s["map_grid"])
        vectors = vectors or [[] for _ in prepared]
        for out, f in zip(vectors, prepared):
            out.append(maps.patch_vectors(f, np.float32))
        ids.append(np.repeat(np.asarray(idx), prepared[0].shape[2] * prepared[0].shape[3]))
    return [np.concatenate(v) for v in vectors], np.concatenate(ids)


def one_pass(x, ids, f, pending, seed, oversample):
    return NearestBank.from_members(*_take(x, ids, greedy_coreset(x, int(np.ceil(f * len(x))), None, seed)),
                                    len(x), f, seed)


def independent(x, ids, f, pending, seed, oversample):
    keep = np.concatenate([lo + greedy_coreset(x[lo:lo + pending], int(np.ceil(f * len(x[lo:lo + pending]))), None,
                                               seed) for lo in range(0, len(x), pending)])
    return NearestBank.from_members(*_take(x, ids, keep), len(x), f, seed)


def streaming(x, ids, f, pending, seed, oversample):
    c = StreamingCoreset(min(1.0, f * oversample), seed, pending)
    for lo in range(0, len(x), 49 * 16):  # batches of 16 images' locations, as a fit adds them
        c.add(x[lo:lo + 49 * 16], ids[lo:lo + 49 * 16])
    bank = c.result()
    if oversample == 1.0:
        return bank
    keep = greedy_coreset(bank.vectors, int(np.ceil(f * len(x))), None, seed)
    return NearestBank.from_members(bank.vectors[keep], bank.ids[keep], len(x), f, seed)


def _take(x, ids, keep):
    return x[keep], ids[keep]


def variants(pending: int) -> list[tuple[str, object, int, float]]:
    return [("one pass", one_pass, pending, 1.0), (f"independent chunks of {pending}", independent, pending, 1.0),
            (f"streaming, pending {pending}", streaming, pending, 1.0),
            (f"streaming, pending {pending // 4}", streaming, pending // 4, 1.0),
            (f"streaming 2x, pending {pending}, + final pass", streaming, pending, 2.0)]


def score(model, fit_maps, per_image, masks, labels, size, pending):
    vectors, ids = location_vectors(model, fit_maps)
    f, seed = float(params.resolved(model.get_params())["map_coreset"]), 0
    out, reference = {}, None
    for name, fn, p, over in variants(pending):
        t0 = time.perf_counter()
        banks = [fn(x, ids, f, p, seed, over) for x in vectors]
        t_sel = time.perf_counter() - t0
        # covering radius of the fit locations (exact), per bank, relative to the one-pass bank's
        radius = [float(nearest_distances(x, b.vectors).max()) for x, b in zip(vectors, banks)]
        mean_d = [float(nearest_distances(x, b.vectors).mean()) for x, b in zip(vectors, banks)]
        reference = reference or (radius, mean_d)
        model.state_ = replace(model.state_, map_banks=banks)
        amaps = model.anomaly_map_features(per_image, size)
        row = {"select_s": round(t_sel, 2), "bank_rows": [len(b.vectors) for b in banks],
               "radius_rel": round(float(np.mean([r / r0 for r, r0 in zip(radius, reference[0])])), 4),
               "mean_dist_rel": round(float(np.mean([m / m0 for m, m0 in zip(mean_d, reference[1])])), 4),
               "pixel": roc_auc(masks.ravel(), amaps.ravel()),
               "max": roc_auc(labels, amaps.reshape(len(amaps), -1).max(axis=1)),
               "hit": hit_rate(amaps, masks, labels)}
        out[name] = row
        print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--test", action="store_true")
    ap.add_argument("--pending", type=int, default=4096)
    ap.add_argument("--json")
    args = ap.parse_args()
    cat = load_category(args.data)
    model = GaussianAD(preset="fast", verbose=False)
    size = model.feature_extractor().input_size
    fit, held, bad, bad_masks = synthetic_split(cat.train_files)
    _, fit_maps = extract(model, fit, "fit", True)
    _, good_maps = extract(model, held, "held-out good", True)
    _, bad_maps = extract(model, bad, "synthetic", True)
    mapper = GaussianAD(preset="fast", verbose=False).fit_map_features(fit_maps)  # its state: maps only
    masks = split_masks(len(held), bad_masks, size)
    labels = np.r_[np.zeros(len(held)), np.ones(len(bad))]
    print(f"synthetic ({cat.name}: {len(fit)} fit, {len(held)} good + {len(bad)} synthetic)", flush=True)
    report = {"synth": score(mapper, fit_maps, good_maps + bad_maps, masks, labels, size, args.pending)}
    if args.test:
        del good_maps, bad_maps
        _, held_maps = extract(model, held, "held-out", True)
        _, test_maps = extract(model, cat.test_files, "test", True)
        print(f"test ({cat.name}, full protocol: maps fitted on all of train/good)", flush=True)
        report["test"] = score(mapper, fit_maps + held_maps, test_maps, load_masks(cat, size), cat.test_labels,
                               size, args.pending)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
