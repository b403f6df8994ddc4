"""Research for issue 33, session 13: network fine-tuning from images in the product's own preprocessing.

Rippel et al.'s follow-up objective (arXiv 2108.04116): the Gaussians of the product's pooled features (one per
level, Ledoit-Wolf, :mod:`gaussad.core.gaussian`) are fitted once on the pretrained features of the fit part of
train/good and stay fixed; the network from stage4 on (stage4-stage7 and the head; the stem and stage1-3 frozen)
is trained to minimise the mean over the changing levels (stage4 .. head) of the Mahalanobis distance (divided by
sqrt(dim)) of the fit images' pooled features to those Gaussians. Batch norm frozen: every module stays in eval mode
(running statistics untouched, no stochastic depth; only the weights, batch-norm affine parameters included, move).

Inputs exactly as the ``recommended`` preset feeds the network at the set's ``auto`` input size (tile: 224 px,
aspect kept, sides multiples of 32, native normalisation): :func:`gaussad.intake.images.preprocess` with the
extractor's own settings. Goods and pasted defects are decoded alike (full decode, :func:`bench.experiments.adapt.read`).
Because stem .. stage3 are frozen their outputs are cached once (``/tmp/ft-cache``, never in the repository): the
stage3 maps (float16) and the pooled vectors of levels 0-3 per image, grouped into batches of equal input shape.

Session 14: the inputs follow the recommended preset as it now is, brightness matched (``--brightness match``; the
cache and state files say so in their names), and ``--bn train`` puts the trained part's batch-norm layers in
training mode while training (batch statistics in the forward pass, running statistics moving; scoring always in
eval mode).

Only train/good chooses: :func:`bench.experiments.adapt.split` (fit 70 %, validation 15 %, selection 15 %, seeded), one
pasted defect per validation good, two per selection good (:func:`bench.experiments.adapt.with_defects`, the same seeds
as ``bench.experiments.adapt``). Each epoch the Gaussians are refitted on the fit part's features of the current network
(all 9 levels) and the global score's image AUROC on the validation goods + defects decides the epoch (epoch 0 =
pretrained); the selection part's AUROC is recorded alongside (it compares learning rates, never epochs).

    PYTHONPATH=src:. python -m bench.experiments.adapt_ft --data ../shared/data/magnetic_tile --lr 1e-4 --epochs 6 \
        [--seed 0] [--json F]                                    # train, choose the epoch, save the state
    PYTHONPATH=src:. python -m bench.experiments.adapt_ft --data ../shared/data/magnetic_tile --test STATE [--json F]

``--test STATE`` (after the choice is committed): the product's features (pooled + map levels, torch engine) computed
with the saved weights for train/good and the test set, and :func:`gaussad.tools.evaluate.evaluate_category` under
the full protocol, as ``bench.experiments.adapt_product`` runs it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.experiments import adapt as A

CACHE = Path("/tmp/ft-cache")
HEAD_LEVELS = (0, 1, 2, 3)  # frozen: stem .. stage3
TAIL_LEVELS = (4, 5, 6, 7, 8)  # trained: stage4 .. head
START = 3  # the tail's input is the stage3 map


def product_extractor(data: Path, engine: str = "auto"):
    """The ``recommended`` preset's extractor for ``data`` (its 'auto' settings decided from train/good)."""
    from gaussad.detector import params as parameters
    from gaussad.detector.model import GaussianAD
    from gaussad.intake.features import auto_settings
    from gaussad.tools.datasets import load_category

    cat = load_category(data)
    em = GaussianAD(verbose=False, engine=engine)
    em.set_params(**auto_settings(cat.train_files, parameters.resolved(em.get_params())))
    return cat, em, em.feature_extractor()


def head_pass(net: A.Network, tensors: Sequence[np.ndarray], batch: int = 16) -> dict[str, Any]:
    """Frozen stem .. stage3 of preprocessed inputs: batches of equal shape (indices, stage3 maps float16) and the
    pooled vectors of levels 0-3 (product pooling: spread at the map levels 2 and 3)."""
    torch = net.torch
    by_shape: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        by_shape.setdefault(tuple(t.shape), []).append(i)
    pooled_rows: list[list[Any]] = [[None] * len(tensors) for _ in HEAD_LEVELS]
    groups = []
    with torch.no_grad():
        for idx in by_shape.values():
            for lo in range(0, len(idx), batch):
                chunk = idx[lo:lo + batch]
                x = torch.from_numpy(np.stack([tensors[i] for i in chunk]))
                levels = net.backbone.forward_levels(x, list(HEAD_LEVELS))
                for li, f in enumerate(levels):
                    p = A.pool(torch, f, li in A.MAP_LEVELS).double().numpy()
                    for j, i in enumerate(chunk):
                        pooled_rows[li][i] = p[j]
                groups.append((np.array(chunk), levels[-1].numpy().astype(np.float16), x.numpy().astype(np.float16)))
    return {"groups": groups, "pooled": [np.stack(r) for r in pooled_rows], "n": len(tensors)}


def prepare_sets(data: Path, seed: int, net: A.Network, ex) -> dict[str, Any]:
    """Cached head passes of train/good (all), the validation defects and the two selection defect sets."""
    import torch
    from PIL import Image

    from gaussad.intake.images import preprocess
    from gaussad.tools.datasets import load_category
    from gaussad.tools.synthetic import PASTED_DEFECTS

    CACHE.mkdir(parents=True, exist_ok=True)
    light = "" if ex.brightness == "keep" else f"-{ex.brightness}"  # session 13's files: the pixels as decoded
    path = CACHE / f"{data.name}-{ex.input_size}{light}-s{seed}-v2.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    t0 = time.perf_counter()
    cat = load_category(data)
    sp = A.split(len(cat.train_files), seed)
    images = [A.read(p) for p in cat.train_files]

    def pre(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [preprocess(Image.fromarray(a), ex.input_size, ex.normalization, ex.resize, ex.brightness)
                for a in arrays]

    out: dict[str, Any] = {"split": sp, "train": head_pass(net, pre(images))}
    donors = [images[i] for i in sp.fit]
    for key, idx, s in (("val_def", sp.val, 1000), ("sel_def0", sp.select, 2000), ("sel_def1", sp.select, 3000)):
        imgs, _, _ = A.with_defects([images[i] for i in idx], donors, seed + s, PASTED_DEFECTS)
        out[key] = head_pass(net, pre(imgs))
    out["cache_s"] = round(time.perf_counter() - t0, 1)
    torch.save(out, path)
    print(f"cached {path}: {out['cache_s']} s", flush=True)
    return out


def subset(hp: dict[str, Any], idx: np.ndarray) -> dict[str, Any]:
    """A head pass restricted to images ``idx`` (renumbered in the order of ``idx``)."""
    where = {int(i): k for k, i in enumerate(idx)}
    groups = []
    for g_idx, maps, inputs in hp["groups"]:
        keep = [j for j, i in enumerate(g_idx) if int(i) in where]
        if keep:
            groups.append((np.array([where[int(g_idx[j])] for j in keep]), maps[keep], inputs[keep]))
    return {"groups": groups, "pooled": [p[idx] for p in hp["pooled"]], "n": len(idx)}


def trained_levels(stages: str) -> tuple[int, ...]:
    return TAIL_LEVELS if stages == "stage4" else tuple(range(A.N_LEVELS))


def run_trained(net: A.Network, stages: str, x: Any) -> list:
    """The maps of the trained levels: from the stage3 maps (``stage4``) or from the input (``all``)."""
    if stages == "stage4":
        return net.tail(x, START)
    return net.backbone.forward_levels(x, list(range(A.N_LEVELS)))


def group_input(group: tuple, stages: str) -> np.ndarray:
    return group[1] if stages == "stage4" else group[2]


def tail_pooled(net: A.Network, hp: dict[str, Any], stages: str, batch: int = 32) -> list[np.ndarray]:
    """All 9 pooled levels of a head pass's images with the current network."""
    torch = net.torch
    levels = trained_levels(stages)
    rows: list[list[Any]] = [[None] * hp["n"] for _ in levels]
    with torch.no_grad():
        for group in hp["groups"]:
            g_idx, inp = group[0], group_input(group, stages)
            for lo in range(0, len(g_idx), batch):
                outs = run_trained(net, stages, torch.from_numpy(inp[lo:lo + batch].astype(np.float32)))
                for li, (f, level) in enumerate(zip(outs, levels)):
                    p = A.pool(torch, f, level in A.MAP_LEVELS).double().numpy()
                    for j, i in enumerate(g_idx[lo:lo + batch]):
                        rows[li][i] = p[j]
    return list(hp["pooled"][:A.N_LEVELS - len(levels)]) + [np.stack(r) for r in rows]


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from gaussad.tools.evaluate import roc_auc

    cat, em, ex = product_extractor(args.data)
    net = A.Network(ex.input_size, "native")
    t0 = time.perf_counter()
    sets = prepare_sets(args.data, args.seed, net, ex)
    row: dict[str, Any] = {"data": args.data.name, "seed": args.seed, "lr": args.lr, "epochs": args.epochs,
                           "patience": args.patience, "stages": "stage4-head" if args.stages == "stage4" else "all",
                           "bn": "frozen (eval mode)" if args.bn == "frozen" else "train mode while training",
                           "brightness": ex.brightness,
                           "input_size": ex.input_size, "resize": ex.resize, "cache_load_s": round(time.perf_counter() - t0, 1),
                           "cache_s": sets.get("cache_s")}
    sp = sets["split"]
    fit = subset(sets["train"], sp.fit)
    parts = {"val_good": subset(sets["train"], sp.val), "val_def": sets["val_def"],
             "sel_good": subset(sets["train"], sp.select), "sel_def": None}
    sel_def = [sets["sel_def0"], sets["sel_def1"]]
    torch.manual_seed(args.seed)
    backbone = net.backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    params = ([p for m in net.tail_modules(START) for p in m.parameters()] if args.stages == "stage4"
              else list(backbone.parameters()))
    for p in params:
        p.requires_grad_(True)
    row["trained_parameters"] = int(sum(p.numel() for p in params))
    # --bn train: the trained part's batch-norm layers normalise by each batch and move their running statistics
    # while training (scoring always uses the running statistics); everything else stays in eval mode
    trained_parts = net.tail_modules(START) if args.stages == "stage4" else [backbone]
    norms = [m for part in trained_parts for m in part.modules()
             if args.bn == "train" and isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    row["moving_norms"] = len(norms)

    def all_pooled(hp):
        return tail_pooled(net, hp, args.stages)

    def evaluate() -> tuple[float, float]:
        gs = A.fit_gaussians(all_pooled(fit))
        vg, vd = (A.gaussian_scores(gs, all_pooled(parts[k])) for k in ("val_good", "val_def"))
        sg = A.gaussian_scores(gs, all_pooled(parts["sel_good"]))
        sd = np.concatenate([A.gaussian_scores(gs, all_pooled(d)) for d in sel_def])
        val = roc_auc(np.r_[np.zeros(len(vg)), np.ones(len(vd))], np.r_[vg, vd])
        sel = roc_auc(np.r_[np.zeros(len(sg)), np.ones(len(sd))], np.r_[sg, sd])
        return float(val), float(sel)

    # the fixed targets: Gaussians of the pretrained features of the fit part, trained levels only
    levels = trained_levels(args.stages)
    pre = A.fit_gaussians(all_pooled(fit)[A.N_LEVELS - len(levels):])
    targets = [(torch.from_numpy(g.mean).float(), torch.from_numpy(np.linalg.inv(g.chol).T).float(),
                math.sqrt(g.dim)) for g in pre]
    opt = torch.optim.Adam(params, lr=args.lr)
    t0 = time.perf_counter()
    val, sel = evaluate()
    history = [{"epoch": 0, "val": round(val, 4), "sel": round(sel, 4), "loss": None, "s": round(time.perf_counter() - t0, 1)}]
    print(json.dumps(history[-1]), flush=True)
    best = (val, 0, copy.deepcopy(backbone.state_dict()))
    rng = np.random.default_rng(args.seed)
    chunks = [(g[0][lo:lo + args.batch], group_input(g, args.stages)[lo:lo + args.batch]) for g in fit["groups"]
              for lo in range(0, len(g[0]), args.batch)]
    bad = 0
    deadline = time.time() + args.max_train_s
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        total, count = 0.0, 0
        for m in norms:
            m.train()
        for k in rng.permutation(len(chunks)):
            _, maps = chunks[k]
            outs = run_trained(net, args.stages, torch.from_numpy(maps.astype(np.float32)))
            loss = 0.0
            for (mean, linv_t, scale), f, level in zip(targets, outs, levels):
                z = (A.pool(torch, f, level in A.MAP_LEVELS) - mean) @ linv_t
                loss = loss + (z.square().sum(dim=1) + 1e-12).sqrt().mean() / scale
            loss = loss / len(targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(maps)
            count += len(maps)
        for m in norms:
            m.eval()
        train_s = time.perf_counter() - t0
        val, sel = evaluate()
        history.append({"epoch": epoch, "val": round(val, 4), "sel": round(sel, 4), "loss": round(total / count, 4),
                        "train_s": round(train_s, 1), "s": round(time.perf_counter() - t0, 1)})
        print(json.dumps(history[-1]), flush=True)
        if val > best[0]:
            best, bad = (val, epoch, copy.deepcopy(backbone.state_dict())), 0
        else:
            bad += 1
        if bad >= args.patience or time.time() > deadline:
            row["stopped"] = "patience" if bad >= args.patience else "time box"
            break
    row["history"] = history
    row["best_epoch"], row["best_val"] = best[1], round(best[0], 4)
    row["best_sel"] = next(h["sel"] for h in history if h["epoch"] == best[1])
    extra = ("" if args.bn == "frozen" else "-bntrain") + ("" if ex.brightness == "keep" else f"-{ex.brightness}")
    state = CACHE / f"state-{args.data.name}-s{args.seed}-{args.stages}-lr{args.lr:g}{extra}.pt"
    torch.save(best[2], state)
    row["state"] = str(state)
    return row


def test(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from gaussad.detector.resolve import features
    from gaussad.intake.backbones.base import PooledLevels
    from gaussad.tools.evaluate import evaluate_category, load_masks

    cat, em, ex = product_extractor(args.data, engine="torch")
    net = A.Network(ex.input_size, "native")
    if str(args.test) != "pretrained":  # 'pretrained': the control, the same path with the ImageNet weights
        net.backbone.load_state_dict(torch.load(args.test, weights_only=True))
    ex._module = PooledLevels(net.backbone.eval(), ex.levels, ex.map_levels, ex.spread_levels).eval()
    ex._runner = None
    row: dict[str, Any] = {"data": args.data.name, "state": str(args.test), "engine": "torch"}
    t0 = time.perf_counter()
    train_f, train_maps = features(ex, cat.train_files, "train", True)
    test_f, test_maps = features(ex, cat.test_files, "test", True)
    row["extract_s"] = round(time.perf_counter() - t0, 1)
    masks = load_masks(cat, ex.input_size)
    t0 = time.perf_counter()
    out = evaluate_category(cat, (train_f, test_f), {}, "full", feature_maps=(train_maps, test_maps, masks),
                            level_names=ex.level_names, map_size=ex.input_size)
    row["product"] = {k: out.get(k) for k in ("image_auroc", "max_map_auroc", "fused_auroc", "pixel_auroc", "hit_rate")}
    row["evaluate_s"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--stages", choices=("stage4", "all"), default="stage4",
                    help="train stage4 .. head (stem .. stage3 frozen, their outputs cached) or the whole network")
    ap.add_argument("--bn", choices=("frozen", "train"), default="frozen",
                    help="the trained part's batch norm: eval mode throughout (frozen) or train mode while training")
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-train-s", type=float, default=900, help="stop after the epoch that passes this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--test", type=Path, help="a saved state (or 'pretrained'): the product's full-protocol figures "
                    "with it")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    row = test(args) if args.test else train(args)
    A.emit(row, args.json)


if __name__ == "__main__":
    main()
