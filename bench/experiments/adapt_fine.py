"""Research for issue 33, session 13: a light adaptor on a finer grid.

The product's maps score 7 x 7 cells at 224 px (stage2-stage7 brought down to the coarsest grid); session 12's
SimpleNet-style adaptor worked on those 49 cells and lost. Here the location features are PatchCore's / SimpleNet's
finer grid: stage3 (28 x 28, 40 channels), stage4 and stage5 (14 x 14, 80 + 112 channels) averaged over 3 x 3
neighbourhoods at their own resolution, upsampled bilinearly to 28 x 28 and concatenated (232 values per cell,
:func:`gaussad.core.maps.to_finest`), 784 cells per image. The frozen backbone's stage3 and stage5 maps come from
``bench.experiments.adapt``'s cache (square resize, ``--normalize native`` as the recommended preset; stage4 is recomputed from
the cached stage3 maps), so the network runs once per image. Same split, synthetic defects and figures as
``bench.experiments.adapt`` (fit 70 % / validation 15 % / selection 15 % of train/good; pasted defects).

Variants (the global score is always the frozen one, :class:`bench.experiments.adapt.Frozen`):

- ``frozen``: the product's maps (stage2-7, coarsest grid, nearest neighbours), the baseline;
- ``fine-gauss``: frozen fine features, one Gaussian (Ledoit-Wolf) over all fit locations, map = Mahalanobis
  distance per cell (no training; the grid's own baseline);
- ``fine-nn``: frozen fine features, nearest neighbour in a random 3 % sample of the fit locations (PatchCore
  without the coreset; the greedy coreset over ~400k vectors is too slow here);
- ``fine-disc-s{sigma}``: SimpleNet (Liu et al. 2023) on the fine grid: features standardised per channel, a linear
  adaptor (identity at start) and a discriminator (232-1024-1, batch norm, leaky ReLU 0.2) trained with the
  truncated L1 loss (margin 0.5) to tell adapted good locations from the same plus Gaussian noise of std ``sigma``;
  Adam 1e-4 / 2e-4, batches of 4,096 locations, ``--steps`` per epoch, ``--epochs`` epochs, the epoch kept is the best
  validation pixel AUROC; map = minus the discriminator's output per cell;
- ``combo-{variant}``: the frozen coarse map and the fine variant's map, each standardised by its validation goods'
  cells (mean, std), upsampled to 224 and averaged with weight ``w`` on the coarse one, ``w`` in {0.25, 0.5, 0.75}
  chosen on the validation pixel AUROC.

Selection figures as ``bench.experiments.adapt.figures``; the validation split chooses sigma's epoch and the combination weight.
``--test VARIANT`` (after choosing): the real test set, frozen and that variant, fitted on the seed's fit part and
calibrated on its validation goods. One JSON line per variant.

    PYTHONPATH=src:. OMP_NUM_THREADS=1 python -m bench.experiments.adapt_fine --data ../shared/data/magnetic_tile \
        --variants frozen fine-gauss fine-disc-s0.5 combo-fine-disc-s0.5 [--seed 0] [--test VARIANT] [--json F]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.experiments import adapt as A

SIDE = 28
QUIET = False


def say(*args: Any) -> None:
    if not QUIET:
        print(*args, flush=True)


def fine_features(net: A.Network, f: A.Feats, batch: int = 32) -> np.ndarray:
    """(n, 784, 232) float32: stage3, stage4 (recomputed from the cached stage3 maps) and stage5 on the 28 x 28 grid."""
    import torch

    from gaussad.core.maps import to_finest

    b = net.backbone
    blocks = list(b.net._blocks)
    s4_blocks = blocks[b.stage_ends[2] + 1:b.stage_ends[3] + 1]
    out = []
    with torch.no_grad():
        for lo in range(0, f.n, batch):
            s3 = torch.from_numpy(f.s3[lo:lo + batch].astype(np.float32))
            x = s3
            for blk in s4_blocks:
                x = blk(x)
            g = to_finest([s3.numpy(), x.numpy(), f.s5[lo:lo + batch]], 3)[0]
            out.append(np.ascontiguousarray(g.transpose(0, 2, 3, 1).reshape(g.shape[0], -1, g.shape[1]), np.float32))
    return np.concatenate(out)


def cached_fine(cache: Path, key: str, net: A.Network, f: A.Feats) -> np.ndarray:
    path = cache / f"fine-{key}.npy"
    if path.is_file():
        return np.load(path).astype(np.float32)
    t0 = time.perf_counter()
    x = fine_features(net, f)
    np.save(path, x.astype(np.float16))
    say(f"  fine features {key}: {x.shape}, {time.perf_counter() - t0:.0f} s")
    return x


class FineFeats(A.Feats):
    """A.Feats with the fine grid vectors attached (``fine``: (n, 784, 232))."""

    fine: np.ndarray


def attach(f: A.Feats, fine: np.ndarray) -> A.Feats:
    f.fine = fine  # type: ignore[attr-defined]
    return f


_TAKE, _CONCAT = A.take, A.concat


def take(f: A.Feats, idx: np.ndarray) -> A.Feats:
    out = _TAKE(f, idx)
    return attach(out, f.fine[idx]) if hasattr(f, "fine") else out


def concat(fs: Sequence[A.Feats]) -> A.Feats:
    out = _CONCAT(fs)
    return attach(out, np.concatenate([f.fine for f in fs])) if all(hasattr(f, "fine") for f in fs) else out


A.take, A.concat = take, concat  # bench.experiments.adapt.figures concatenates goods and defects: keep the fine vectors


def pixel_auc(maps: np.ndarray, masks: np.ndarray, step: int = 4) -> float:
    """Pixel AUROC at 224 x 224 on every ``step``-th row and column (validation only)."""
    from gaussad.tools.evaluate import roc_auc

    up = A.upsampled(maps) if maps.shape[-1] != A.PIXEL_SIDE else maps
    return roc_auc(masks[:, ::step, ::step].reshape(-1), up[:, ::step, ::step].reshape(-1))


# ---------------------------------------------------------------------------------------------------- variants


class FineScorer(A.Scorer):
    frozen: A.Frozen

    def global_scores(self, f: A.Feats) -> np.ndarray:
        return self.frozen.global_scores(f)

    def cells(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def maps(self, f: A.Feats, own_ids: np.ndarray | None = None) -> np.ndarray:
        x = f.fine  # type: ignore[attr-defined]
        return np.concatenate([self.cells(x[lo:lo + 64].reshape(-1, x.shape[2])) for lo in range(0, f.n, 64)]
                              ).reshape(f.n, SIDE, SIDE)


class FineGauss(FineScorer):
    def __init__(self, fit: A.Feats, frozen: A.Frozen):
        from gaussad.core.gaussian import LevelGaussian, MomentStats

        x = fit.fine  # type: ignore[attr-defined]
        stats = None
        for lo in range(0, fit.n, 64):
            chunk = x[lo:lo + 64].reshape(-1, x.shape[2]).astype(np.float64)
            stats = MomentStats.from_array(chunk) if stats is None else stats.update(chunk)
        self.gaussian = LevelGaussian.fit(stats)
        self.frozen = frozen

    def cells(self, x: np.ndarray) -> np.ndarray:
        return self.gaussian.distances(x.astype(np.float64))


class FineNN(FineScorer):
    def __init__(self, fit: A.Feats, frozen: A.Frozen, seed: int, share: float = 0.03):
        from gaussad.core.bank import NearestBank

        x = fit.fine.reshape(-1, fit.fine.shape[2])  # type: ignore[attr-defined]
        ids = np.repeat(np.arange(fit.n), SIDE * SIDE)
        keep = np.sort(np.random.default_rng(seed).choice(len(x), int(share * len(x)), replace=False))
        self.bank = NearestBank.build(x[keep], ids[keep], 1.0, seed)
        self.frozen = frozen

    def maps(self, f: A.Feats, own_ids: np.ndarray | None = None) -> np.ndarray:
        x = f.fine  # type: ignore[attr-defined]
        out = []
        for lo in range(0, f.n, 32):
            ids = None if own_ids is None else np.repeat(own_ids[lo:lo + 32], SIDE * SIDE)
            out.append(self.bank.distances(x[lo:lo + 32].reshape(-1, x.shape[2]), ids))
        return np.concatenate(out).reshape(f.n, SIDE, SIDE)


class FineDisc(FineScorer):
    def __init__(self, fit: A.Feats, val: A.Feats | None, frozen: A.Frozen, seed: int, sigma: float, epochs: int,
                 steps: int, batch: int = 4096):
        """``val`` None: train ``epochs`` epochs and keep the last (fits on all of train/good, no held-out part)."""
        import torch

        torch.manual_seed(seed)
        self.torch = torch
        self.frozen = frozen
        x = fit.fine.reshape(-1, fit.fine.shape[2])  # type: ignore[attr-defined]
        self.mu = x.mean(axis=0)
        self.sd = x.std(axis=0) + 1e-6
        dim = x.shape[1]
        self.adaptor, self.disc, opt = A.adaptor_and_discriminator(dim)
        good = torch.from_numpy(self.standard(x))
        rng = np.random.default_rng(seed)
        best = (-1.0, 0, None)
        self.history: list[tuple[int, float, float]] = []
        for epoch in range(1, epochs + 1):
            self.adaptor.train()
            self.disc.train()
            total = 0.0
            for _ in range(steps):
                idx = torch.from_numpy(rng.integers(0, len(good), batch))
                a = self.adaptor(good[idx])
                loss = torch.relu(0.5 - self.disc(a)).mean() + \
                    torch.relu(0.5 + self.disc(a + sigma * torch.randn_like(a))).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item()
            auc = pixel_auc(self.maps(val), val.masks) if val is not None else float(epoch)
            self.history.append((epoch, round(auc, 4), round(total / steps, 4)))
            say(f"    epoch {epoch}: loss {total / steps:.4f}" + (f", validation pixel AUROC {auc:.4f}" if val is not None else ""))
            if auc > best[0]:
                best = (auc, epoch, A.snapshot(self.adaptor, self.disc))
        self.best_epoch = best[1]
        A.restore((self.adaptor, self.disc), best[2])

    def standard(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mu) / self.sd).astype(np.float32)

    def cells(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        self.adaptor.eval()
        self.disc.eval()
        with torch.no_grad():
            return -self.disc(self.adaptor(torch.from_numpy(self.standard(x)))).numpy()[:, 0]


class Combo(A.Scorer):
    """The frozen coarse map and a fine map, each standardised on the validation goods' cells, averaged at 224 with
    weight ``w`` on the coarse one; ``w`` chosen on the validation pixel AUROC."""

    def __init__(self, coarse: A.Frozen, fine: A.Scorer, val_goods: A.Feats, val: A.Feats | None,
                 weights: Sequence[float] = (0.25, 0.5, 0.75), own_ids: np.ndarray | None = None):
        """``val`` None: ``weights`` holds the one weight; ``own_ids``: ``val_goods`` are fit images (their own
        bank members skipped in the coarse map, leave-one-image-out)."""
        self.coarse, self.fine, self.frozen = coarse, fine, coarse
        cm, fm = coarse.maps(val_goods, own_ids), fine.maps(val_goods, own_ids)
        self.cstat = (float(cm.mean()), float(cm.std()) + 1e-12)
        self.fstat = (float(fm.mean()), float(fm.std()) + 1e-12)
        self.w = 0.5
        self.history = []
        best = -1.0
        for w in weights:
            self.w = w
            auc = pixel_auc(self.maps(val), val.masks) if val is not None else 0.0
            self.history.append((w, round(auc, 4)))
            if auc > best:
                best, chosen = auc, w
        self.w = chosen
        self.best_epoch = getattr(fine, "best_epoch", None)

    def global_scores(self, f: A.Feats) -> np.ndarray:
        return self.coarse.global_scores(f)

    def maps(self, f: A.Feats, own_ids: np.ndarray | None = None) -> np.ndarray:
        c = (A.upsampled(self.coarse.maps(f, own_ids)) - self.cstat[0]) / self.cstat[1]
        m = (A.upsampled(self.fine.maps(f, own_ids)) - self.fstat[0]) / self.fstat[1]
        return (self.w * c + (1 - self.w) * m).astype(np.float32)


def pixel_parts(scorer: A.Scorer, goods: A.Feats, defects: A.Feats) -> dict[str, float]:
    """The pixel AUROC split by where the normal pixels are: defect pixels against the good images' pixels
    (``pixel_vs_goods``) and against the normal pixels of the defective images (``pixel_within_defective``)."""
    from gaussad.tools.evaluate import roc_auc

    g = A.upsampled(scorer.maps(goods))
    d = A.upsampled(scorer.maps(defects))
    pos = d[defects.masks.astype(bool)]
    neg_in = d[~defects.masks.astype(bool)]
    neg_g = g.reshape(-1)
    auc = lambda p, n: roc_auc(np.r_[np.ones(p.size), np.zeros(n.size)], np.r_[p, n])
    return {"pixel_vs_goods": round(auc(pos, neg_g), 4), "pixel_within_defective": round(auc(pos, neg_in), 4)}


def make_variant(name: str, sets: dict[str, A.Feats], seed: int, frozen: A.Frozen, epochs: int, steps: int,
                 made: dict[str, A.Scorer], weight: float | None = None, own_ids: np.ndarray | None = None
                 ) -> A.Scorer:
    """``weight`` given: fitted on all of train/good (no validation: the discriminator trains ``epochs`` epochs, the
    combination uses ``weight`` and standardises on the validation goods' leave-one-image-out maps, ``own_ids``)."""
    if name in made:
        return made[name]
    fit = sets["fit"]
    val = None if weight is not None else concat([sets["val_good"], sets["val_def"]])
    if name == "frozen":
        s: A.Scorer = frozen
    elif name == "fine-gauss":
        s = FineGauss(fit, frozen)
    elif name == "fine-nn":
        s = FineNN(fit, frozen, seed)
    elif name.startswith("fine-disc-s"):
        s = FineDisc(fit, val, frozen, seed, float(name[len("fine-disc-s"):]), epochs, steps)
    elif name.startswith("combo-"):
        s = Combo(frozen, make_variant(name[len("combo-"):], sets, seed, frozen, epochs, steps, made, weight, own_ids),
                  sets["val_good"], val, (weight,) if weight is not None else (0.25, 0.5, 0.75), own_ids)
    else:
        raise SystemExit(f"unknown variant {name!r}")
    made[name] = s
    return s


def main(argv: Sequence[str] | None = None) -> None:
    global QUIET
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/adapt-cache"))
    ap.add_argument("--variants", nargs="+", default=["frozen", "fine-gauss", "fine-disc-s0.5"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40, help="batches of 4,096 locations per epoch")
    ap.add_argument("--test", metavar="VARIANT", nargs="+", help="after choosing: the test set, frozen and these")
    ap.add_argument("--test-fit", choices=("fit", "all"), default="fit",
                    help="with --test: fit on the fit part (validation chooses as in selection) or on all of "
                         "train/good as the full protocol (then --epochs trains that many epochs, --weight is the "
                         "combination's; the fused score's p-values are in-sample and not meaningful)")
    ap.add_argument("--weight", type=float, default=0.5, help="with --test-fit all: the combination weight")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    QUIET = args.quiet
    A.QUIET = args.quiet
    import torch

    torch.set_num_threads(1)
    net = A.Network(224, "native")
    raw = A.prepare(args.data, args.cache, args.seed, 224, net, bool(args.test))
    cache = args.cache / f"{args.data.name}-224-native-s{args.seed}-v2"
    sp: A.Split = raw["_split"]  # type: ignore[assignment]
    keys = ["train", "val_def", "sel_def0", "sel_def1"] + (["test"] if args.test else [])
    for k in keys:
        attach(raw[k], cached_fine(cache, k, net, raw[k]))
    train = raw["train"]
    sets = {"fit": take(train, sp.fit), "val_good": take(train, sp.val), "val_def": raw["val_def"],
            "sel_good": take(train, sp.select), "sel_def": concat([raw["sel_def0"], raw["sel_def1"]])}
    weight, own_ids = None, None
    if args.test and args.test_fit == "all":
        sets["fit"] = train
        weight, own_ids = args.weight, sp.val
    say(f"{args.data.name}: fit {sets['fit'].n}, validation {sp.val.size}, selection {sp.select.size}, seed {args.seed}")
    t0 = time.perf_counter()
    frozen = A.Frozen(sets["fit"], args.seed)
    frozen_s = time.perf_counter() - t0
    made: dict[str, A.Scorer] = {}
    for name in (args.test or args.variants):
        t0 = time.perf_counter()
        scorer = make_variant(name, sets, args.seed, frozen, args.epochs, args.steps, made, weight, own_ids)
        seconds = frozen_s if name == "frozen" else time.perf_counter() - t0
        row: dict[str, Any] = {"data": args.data.name, "variant": name, "seed": args.seed, "fit_images": sets["fit"].n,
                               "test_fit": args.test_fit if args.test else None,
                               "train_s": round(seconds, 1), "best_epoch": getattr(scorer, "best_epoch", None),
                               "history": getattr(scorer, "history", None), "weight": getattr(scorer, "w", None),
                               "epochs": args.epochs, "steps": args.steps}
        t1 = time.perf_counter()
        if args.test:
            test = raw["test"]
            goods = take(test, np.flatnonzero(np.array(test.kinds) == "0"))
            defects = take(test, np.flatnonzero(np.array(test.kinds) == "1"))
            row["test_frozen"] = A.figures(frozen, sets["fit"], sets["val_good"], goods, defects)
            row["test"] = A.figures(scorer, sets["fit"], sets["val_good"], goods, defects)
            row["test_frozen"].update(pixel_parts(frozen, goods, defects))
            row["test"].update(pixel_parts(scorer, goods, defects))
        else:
            row["select"] = A.figures(scorer, sets["fit"], sets["val_good"], sets["sel_good"], sets["sel_def"])
        row["figures_s"] = round(time.perf_counter() - t1, 1)
        A.emit(row, args.json)


if __name__ == "__main__":
    main()
