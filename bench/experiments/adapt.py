"""Research for issue 33: do features that learn the product beat the frozen ImageNet features?

Only train/good images choose. They are split (seeded) into a fit part (70 %), a validation part (15 %: early
stopping) and a selection part (15 %: the figures that compare the variants). Every validation good gets one
synthetic defect (:func:`gaussad.tools.synthetic.add_defect`, the four kinds cycling, donors from the fit part), every
selection good two (two seeds). Variants, all on EfficientNet-Lite0 at one square input size (``--input-size``,
224), ImageNet or the network's own normalisation (``--normalize``; the recommended preset uses ``native``), the
product's pooling (average, plus the square root of the spread at the map levels) and its maps (stage2-stage7 on the
coarsest grid, 3 x 3 neighbourhoods, one nearest-neighbour bank per level, 10 % coreset), re-implemented here on
cached features:

- ``frozen``: the product's features (the baseline): global score = mean over the 9 levels of the Mahalanobis
  distances (Ledoit-Wolf), map = mean over the levels of the scaled nearest-neighbour distances;
- ``concat-nn``: the map levels' location vectors standardised and concatenated (768 values per cell), one bank;
- ``simplenet-s{sigma}[-e{epochs}]``: a light adaptor (SimpleNet, Liu et al. 2023): a linear layer (identity at
  start) on those 768 values, trained with a small discriminator to tell adapted good locations from the same with
  Gaussian noise (std ``sigma`` in standardised units), early-stopped on the validation map-maximum AUROC; scored by
  the discriminator (``select``) and by nearest neighbours on the adapted vectors (``select_nn``); global score frozen;
- ``paste``: the same adaptor and discriminator trained with pasted synthetic defects of the fit images as the
  negatives (kinds ``patch`` and ``noise`` only, so that ``scratch`` and ``spot`` of the selection set are unseen);
- ``finetune-bn{frozen,train}[-lr{lr}][-from3][-e{epochs}]``: Rippel et al. (arXiv 2108.04116): the network's tail
  (stage6, stage7 and head; ``-from3``: stage4 on) trained to minimise the Mahalanobis distance of the fit images'
  pooled features to the Gaussians fitted on the pretrained features, early-stopped on the validation AUROC of the
  global score (Gaussians refitted each epoch, epoch 0 = frozen); the tail's input (stage5 or stage3 maps) is cached,
  so only the tail runs; batch-norm layers in eval mode (``bnfrozen``) or training mode (``bntrain``);
- ``bnstats-from{5,3}-mix{a}``: no gradient step: the tail's batch-norm statistics re-estimated on the fit images in
  one pass and mixed with the pretrained ones, ``(1 - a) pretrained + a fit``.

Figures per variant on the selection part: image AUROC of the global score, of the map maximum and of a fused score
(Fisher's combination of the two p-values against the validation goods), pixel AUROC of the map against the
synthetic masks at 224 x 224, per-kind map-maximum AUROC, the false alarms of held-out goods (share of selection
goods above the 95th percentile of the validation goods' scores, about 0.05 when calibrated; and the share of them
above the 95th percentile of the fit images' own scores, far above 0.05 when a variant learned its training images
and a threshold set on them would flag new good parts), and the training time on one thread. ``--test VARIANT``
(after choosing) scores the real test set with the frozen features and with that variant, fitted on the same fit
part and calibrated on the same validation goods (``--test-fit all``: fitted on all of train/good). One JSON line
per variant goes to stdout (and ``--json``); ``--quiet`` silences the progress lines. Results: EXPERIMENTS.md,
"Issue 33: adapting the features".

    PYTHONPATH=src:. OMP_NUM_THREADS=1 python -m bench.experiments.adapt --data ../shared/data/magnetic_tile \
        [--cache /tmp/adapt-cache] [--variants frozen bnstats-from5-mix0.5 ...] [--seed 0] [--normalize native] \
        [--test VARIANT [--test-fit all]] [--json out.jsonl] [--quiet]

Frozen features are cached under ``--cache`` (never in the repository): the backbone runs once per image and set.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

N_LEVELS = 9
MAP_LEVELS = (2, 3, 4, 5, 6, 7)  # stage2-stage7
TRAIN_KINDS_PASTE = ("patch", "noise")
PIXEL_SIDE = 224
CORESET = 0.1
QUIET = False


def say(*args: Any) -> None:
    if not QUIET:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------------- data


@dataclass
class Split:
    fit: np.ndarray
    val: np.ndarray
    select: np.ndarray


def split(n: int, seed: int) -> Split:
    order = np.random.default_rng(seed).permutation(n)
    n_val = n_sel = max(2, int(round(0.15 * n)))
    return Split(np.sort(order[n_val + n_sel:]), np.sort(order[:n_val]), np.sort(order[n_val:n_val + n_sel]))


@dataclass
class Feats:
    """Frozen features of a set of images: pooled vectors per level, grid vectors per map level (n, 49, C),
    stage5 maps (the fine-tuned tail's input), and for defect images masks at 224 and cell coverage (n, 7, 7)."""

    pooled: list[np.ndarray]
    grid: list[np.ndarray]
    s5: np.ndarray
    masks: np.ndarray | None = None
    kinds: list[str] = field(default_factory=list)
    s3: np.ndarray | None = None  # stage3 maps: the input of a tail fine-tuned from stage4

    def tail_input(self, start: int) -> np.ndarray:
        out = {5: self.s5, 3: self.s3}[start]
        assert out is not None
        return out

    @property
    def n(self) -> int:
        return len(self.s5)

    def save(self, path: Path) -> None:
        arrays = {f"pooled{i}": p for i, p in enumerate(self.pooled)}
        arrays.update({f"grid{i}": g for i, g in enumerate(self.grid)})
        arrays["s5"] = self.s5
        if self.s3 is not None:
            arrays["s3"] = self.s3
        if self.masks is not None:
            arrays["masks"] = self.masks
        np.savez(path, kinds=np.array(self.kinds), **arrays)

    @classmethod
    def load(cls, path: Path) -> "Feats":
        z = np.load(path)
        return cls([z[f"pooled{i}"] for i in range(N_LEVELS)], [z[f"grid{i}"] for i in range(len(MAP_LEVELS))],
                   z["s5"], z["masks"] if "masks" in z else None, [str(k) for k in z["kinds"]],
                   z["s3"] if "s3" in z else None)


class Network:
    """EfficientNet-Lite0 in torch: the frozen head part (up to stage5) and the tail that may be trained."""

    def __init__(self, input_size: int, normalize: str = "imagenet"):
        import torch

        from gaussad.intake.backbones import get_spec
        from gaussad.intake.images import IMAGENET

        from gaussad.intake.backbones import create_backbone

        self.torch = torch
        self.backbone = create_backbone("efficientnet-lite0", input_size).eval()
        self.input_size = input_size
        self.normalize = normalize
        self.normalization = IMAGENET if normalize == "imagenet" else get_spec("efficientnet-lite0").native_normalization

    def all_levels(self, x: "Any") -> list:
        return self.backbone.forward_levels(x, list(range(N_LEVELS)))

    def tail_modules(self, start: int) -> list:
        b = self.backbone
        return list(b.net._blocks)[b.stage_ends[start - 1] + 1:] + [b.net._conv_head, b.net._bn1]

    def tail(self, x: "Any", start: int) -> list:
        """The maps of levels start + 1 .. head from the maps of level ``start`` (a stage)."""
        b, net = self.backbone, self.backbone.net
        out = []
        blocks = list(net._blocks)
        for i in range(b.stage_ends[start - 1] + 1, len(blocks)):
            x = blocks[i](x)
            if i in b.stage_ends:
                out.append(x)
        out.append(net._swish(net._bn1(net._conv_head(x))))
        return out


def pool(torch: Any, fmap: Any, spread: bool) -> Any:
    """The product's pooling (backbones.base.PooledLevels._pool), with a small epsilon in the square roots so that
    gradients stay finite."""
    mean = fmap.mean(dim=(2, 3))
    if not spread:
        return mean
    std = ((fmap - mean[:, :, None, None]).square().mean(dim=(2, 3)) + 1e-12).sqrt()
    return torch.cat([mean, (std + 1e-12).sqrt()], dim=1)


def grid_of(torch: Any, fmaps: Sequence[Any]) -> list[np.ndarray]:
    """Grid vectors (n, h*w, C) of the map levels as the product makes them (coarsest grid, 3 x 3 neighbourhoods)."""
    from gaussad.core.maps import to_grid

    grids = to_grid([f.detach().numpy() for f in fmaps], 3)
    return [np.ascontiguousarray(g.transpose(0, 2, 3, 1).reshape(g.shape[0], -1, g.shape[1]), np.float32)
            for g in grids]


def extract(net: Network, images: Sequence[np.ndarray], batch: int = 16) -> Feats:
    """Frozen features of uint8 images (the product's preprocessing: square resize, ImageNet normalisation)."""
    from PIL import Image

    from gaussad.intake.images import preprocess

    torch = net.torch
    pooled: list[list[np.ndarray]] = [[] for _ in range(N_LEVELS)]
    grid: list[list[np.ndarray]] = [[] for _ in MAP_LEVELS]
    s5: list[np.ndarray] = []
    s3: list[np.ndarray] = []
    with torch.no_grad():
        for lo in range(0, len(images), batch):
            x = torch.from_numpy(np.stack([preprocess(Image.fromarray(a), net.input_size, net.normalization)
                                           for a in images[lo:lo + batch]]))
            levels = net.all_levels(x)
            for i, f in enumerate(levels):
                pooled[i].append(pool(torch, f, i in MAP_LEVELS).double().numpy())
            for j, g in enumerate(grid_of(torch, [levels[i] for i in MAP_LEVELS])):
                grid[j].append(g)
            s5.append(levels[5].numpy())
            s3.append(levels[3].numpy().astype(np.float16))
    return Feats([np.concatenate(p) for p in pooled], [np.concatenate(g) for g in grid], np.concatenate(s5),
                 s3=np.concatenate(s3))


def read(path: Path) -> np.ndarray:
    from gaussad.intake.images import load_image

    return np.asarray(load_image(path, decoder="pil"))


def with_defects(goods: Sequence[np.ndarray], donors: Sequence[np.ndarray], seed: int, kinds: Sequence[str]
                 ) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """One pasted defect per good image (kinds cycling); images, masks at 224 x 224, kinds."""
    from PIL import Image

    from gaussad.tools.synthetic import add_defect

    out, masks, names = [], [], []
    for k, good in enumerate(goods):
        kind = kinds[k % len(kinds)]
        donor = donors[(k * 7919) % len(donors)]
        image, mask = add_defect(good, donor, np.random.default_rng([seed, k]), kind)
        out.append(image)
        masks.append(np.asarray(Image.fromarray(mask).resize((PIXEL_SIDE, PIXEL_SIDE), Image.NEAREST)))
        names.append(kind)
    return out, np.stack(masks), names


def cached(cache: Path, key: str, make: Callable[[], Feats]) -> Feats:
    path = cache / f"{key}.npz"
    if path.is_file():
        return Feats.load(path)
    t0 = time.perf_counter()
    feats = make()
    feats.save(path)
    say(f"  extracted {key}: {feats.n} images, {time.perf_counter() - t0:.0f} s")
    return feats


def prepare(data: Path, cache: Path, seed: int, input_size: int, net: Network, test: bool
            ) -> dict[str, Feats]:
    """The frozen features of every set this bench uses (cached)."""
    from gaussad.tools.datasets import load_category
    from gaussad.tools.synthetic import PASTED_DEFECTS

    cat = load_category(data)
    norm = "" if net.normalize == "imagenet" else f"-{net.normalize}"
    cache = cache / f"{data.name}-{input_size}{norm}-s{seed}-v2"
    cache.mkdir(parents=True, exist_ok=True)
    sp = split(len(cat.train_files), seed)
    need = ["train", "val_def", "sel_def0", "sel_def1", "fit_def"] + (["test"] if test else [])
    if all((cache / f"{k}.npz").is_file() for k in need):
        images = None
    else:
        images = [read(p) for p in cat.train_files]
    out: dict[str, Feats] = {"train": cached(cache, "train", lambda: extract(net, images))}
    donors = (lambda: [images[i] for i in sp.fit])
    for key, idx, s, kinds in (("val_def", sp.val, 1000, PASTED_DEFECTS), ("sel_def0", sp.select, 2000, PASTED_DEFECTS),
                               ("sel_def1", sp.select, 3000, PASTED_DEFECTS),
                               ("fit_def", sp.fit, 4000, TRAIN_KINDS_PASTE)):
        def make(idx=idx, s=s, kinds=kinds) -> Feats:
            imgs, masks, names = with_defects([images[i] for i in idx], donors(), seed + s, kinds)
            f = extract(net, imgs)
            f.masks, f.kinds = masks, names
            return f
        out[key] = cached(cache, key, make)
    if test:
        from gaussad.tools.evaluate import load_masks

        def make_test() -> Feats:
            f = extract(net, [read(p) for p in cat.test_files])
            f.masks = load_masks(cat, PIXEL_SIDE)
            f.kinds = [str(y) for y in cat.test_labels]
            return f
        out["test"] = cached(cache, "test", make_test)
    out["_split"] = sp  # type: ignore[assignment]
    return out


def take(f: Feats, idx: np.ndarray) -> Feats:
    return Feats([p[idx] for p in f.pooled], [g[idx] for g in f.grid], f.s5[idx],
                 None if f.masks is None else f.masks[idx], [f.kinds[i] for i in idx] if f.kinds else [],
                 None if f.s3 is None else f.s3[idx])


def concat(fs: Sequence[Feats]) -> Feats:
    masks = [f.masks if f.masks is not None else np.zeros((f.n, PIXEL_SIDE, PIXEL_SIDE), bool) for f in fs]
    return Feats([np.concatenate(p) for p in zip(*(f.pooled for f in fs))],
                 [np.concatenate(g) for g in zip(*(f.grid for f in fs))], np.concatenate([f.s5 for f in fs]),
                 np.concatenate(masks), [k for f in fs for k in (f.kinds or ["good"] * f.n)],
                 None if any(f.s3 is None for f in fs) else np.concatenate([f.s3 for f in fs]))


# -------------------------------------------------------------------------------------------------------- scoring


class Scorer:
    """A fitted variant: global score per image and map (n, 7, 7) per image (higher = more anomalous)."""

    def global_scores(self, f: Feats) -> np.ndarray:
        raise NotImplementedError

    def maps(self, f: Feats, own_ids: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError


def fit_gaussians(pooled: Sequence[np.ndarray]) -> list:
    from gaussad.core.gaussian import LevelGaussian, MomentStats

    return [LevelGaussian.fit(MomentStats.from_array(p)) for p in pooled]


def gaussian_scores(gaussians: Sequence, pooled: Sequence[np.ndarray]) -> np.ndarray:
    return np.mean([g.distances(p) for g, p in zip(gaussians, pooled)], axis=0)


def nn_maps(banks: Sequence, grids: Sequence[np.ndarray], own_ids: np.ndarray | None = None) -> np.ndarray:
    """Mean over levels of the scaled nearest-member distances: (n, h, w); with ``own_ids`` (image ids in the
    banks' numbering) each image's own members are skipped (leave-one-image-out, for fit images)."""
    n, cells = grids[0].shape[:2]
    side = int(round(math.sqrt(cells)))
    ids = None if own_ids is None else np.repeat(own_ids, cells)
    d = np.mean([b.distances(g.reshape(n * cells, -1), ids) for b, g in zip(banks, grids)], axis=0)
    return d.reshape(n, side, side)


def build_banks(grids: Sequence[np.ndarray], seed: int) -> list:
    from gaussad.core.bank import NearestBank

    n, cells = grids[0].shape[:2]
    ids = np.repeat(np.arange(n), cells)
    return [NearestBank.build(g.reshape(n * cells, -1), ids, CORESET, seed) for g in grids]


class Frozen(Scorer):
    def __init__(self, fit: Feats, seed: int):
        self.gaussians = fit_gaussians(fit.pooled)
        self.banks = build_banks(fit.grid, seed)

    def global_scores(self, f: Feats) -> np.ndarray:
        return gaussian_scores(self.gaussians, f.pooled)

    def maps(self, f: Feats, own_ids: np.ndarray | None = None) -> np.ndarray:
        return nn_maps(self.banks, f.grid, own_ids)


# ------------------------------------------------------------------------------------------------ light adaptor


def flat_locations(f: Feats) -> np.ndarray:
    """(n * cells, 768) concatenated location vectors of the map levels."""
    return np.concatenate([g.reshape(-1, g.shape[2]) for g in f.grid], axis=1)


def cell_coverage(masks: np.ndarray, side: int) -> np.ndarray:
    """Share of each of side x side cells covered by the mask: (n, side * side)."""
    n, h, w = masks.shape
    m = masks.reshape(n, side, h // side, side, w // side).mean(axis=(2, 4)) if h % side == 0 else None
    if m is None:
        from PIL import Image

        m = np.stack([np.asarray(Image.fromarray(x.astype(np.float32)).resize((side, side), Image.BOX))
                      for x in masks])
    return m.reshape(n, -1)


def snapshot(*modules: Any) -> tuple[dict, ...]:
    """Copies of the modules' weights, to return to the best epoch's with :func:`restore`."""
    return tuple({k: v.clone() for k, v in m.state_dict().items()} for m in modules)


def restore(modules: Sequence[Any], states: Sequence[dict]) -> None:
    for module, state in zip(modules, states):
        module.load_state_dict(state)


def adaptor_and_discriminator(dim: int):
    """SimpleNet's pair: a linear adaptor started at the identity and a one-hidden-layer discriminator, with their
    Adam optimiser (learning rates 1e-4 and 2e-4)."""
    import torch
    from torch import nn

    adaptor = nn.Linear(dim, dim)
    with torch.no_grad():
        adaptor.weight.copy_(torch.eye(dim))
        adaptor.bias.zero_()
    disc = nn.Sequential(nn.Linear(dim, 1024), nn.BatchNorm1d(1024), nn.LeakyReLU(0.2), nn.Linear(1024, 1))
    opt = torch.optim.Adam([{"params": adaptor.parameters(), "lr": 1e-4}, {"params": disc.parameters(), "lr": 2e-4}])
    return adaptor, disc, opt


class Adaptor(Scorer):
    """SimpleNet's feature adaptor and discriminator on the standardised location vectors of the map levels.

    ``negatives``: ``noise`` (Gaussian noise of std ``sigma`` added to adapted good vectors), ``paste`` (adapted
    vectors of cells covered by pasted defects of the fit images) or ``both``. Early-stopped on the validation
    split's map-maximum AUROC of the discriminator's map (evaluated every ``every`` epochs)."""

    def __init__(self, fit: Feats, val_goods: Feats, val_defects: Feats, seed: int, sigma: float,
                 negatives: str = "noise", fit_defects: Feats | None = None, epochs: int = 40, every: int = 4,
                 frozen_global: Frozen | None = None):
        import torch

        torch.manual_seed(seed)
        self.torch = torch
        x = flat_locations(fit)
        self.mu = x.mean(axis=0)
        self.sd = x.std(axis=0) + 1e-6
        self.cells = fit.grid[0].shape[1]
        dim = x.shape[1]
        self.adaptor, self.disc, opt = adaptor_and_discriminator(dim)
        good = torch.from_numpy(self.standard(x))
        bad = None
        if negatives in ("paste", "both"):
            assert fit_defects is not None
            cover = cell_coverage(fit_defects.masks, int(round(math.sqrt(self.cells)))).reshape(-1)
            bad = torch.from_numpy(self.standard(flat_locations(fit_defects))[cover > 0.05])
        rng = np.random.default_rng(seed)
        self.frozen_global = frozen_global
        self.score_by = "disc"
        val = concat([val_goods, val_defects])
        val_labels = np.r_[np.zeros(val_goods.n), np.ones(val_defects.n)]
        from gaussad.tools.evaluate import roc_auc

        best = (-1.0, 0, None)
        self.history: list[tuple[int, float]] = []
        batch = 2048
        for epoch in range(1, epochs + 1):
            self.adaptor.train()
            self.disc.train()
            for lo in range(0, len(good), batch):
                idx = torch.from_numpy(rng.permutation(len(good))[:batch])
                a = self.adaptor(good[idx])
                losses = [torch.relu(0.5 - self.disc(a)).mean()]
                if negatives in ("noise", "both"):
                    losses.append(torch.relu(0.5 + self.disc(a + sigma * torch.randn_like(a))).mean())
                if bad is not None:
                    bidx = torch.from_numpy(rng.integers(0, len(bad), min(batch, len(bad))))
                    losses.append(torch.relu(0.5 + self.disc(self.adaptor(bad[bidx]))).mean())
                loss = sum(losses)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if epoch % every == 0 or epoch == epochs:
                auc = roc_auc(val_labels, self.maps(val).reshape(val.n, -1).max(axis=1))
                self.history.append((epoch, round(auc, 4)))
                if auc > best[0]:
                    best = (auc, epoch, snapshot(self.adaptor, self.disc))
        self.best_epoch = best[1]
        restore((self.adaptor, self.disc), best[2])
        self.adaptor.eval()
        self.disc.eval()
        with torch.no_grad():
            adapted = self.adaptor(good).numpy()
        from gaussad.core.bank import NearestBank

        n = fit.n
        self.bank = NearestBank.build(adapted, np.repeat(np.arange(n), self.cells), CORESET, seed)

    def standard(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mu) / self.sd).astype(np.float32)

    def global_scores(self, f: Feats) -> np.ndarray:
        assert self.frozen_global is not None
        return self.frozen_global.global_scores(f)

    def maps(self, f: Feats, own_ids: np.ndarray | None = None) -> np.ndarray:
        torch = self.torch
        side = int(round(math.sqrt(self.cells)))
        with torch.no_grad():
            self.adaptor.eval()
            self.disc.eval()
            a = self.adaptor(torch.from_numpy(self.standard(flat_locations(f))))
            if self.score_by == "disc":
                s = -self.disc(a).numpy()[:, 0]
            else:
                ids = None if own_ids is None else np.repeat(own_ids, self.cells)
                s = self.bank.distances(a.numpy(), ids)
        return s.reshape(f.n, side, side)


class Concat(Scorer):
    """The adaptor's starting point without training: the standardised location vectors of the map levels
    concatenated (768 values), one nearest-neighbour bank; the global score is frozen."""

    def __init__(self, fit: Feats, seed: int, frozen_global: Frozen):
        from gaussad.core.bank import NearestBank

        x = flat_locations(fit)
        self.mu, self.sd = x.mean(axis=0), x.std(axis=0) + 1e-6
        self.cells = fit.grid[0].shape[1]
        self.bank = NearestBank.build(self.standard(x), np.repeat(np.arange(fit.n), self.cells), CORESET, seed)
        self.frozen_global = frozen_global

    def standard(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mu) / self.sd).astype(np.float32)

    def global_scores(self, f: Feats) -> np.ndarray:
        return self.frozen_global.global_scores(f)

    def maps(self, f: Feats, own_ids: np.ndarray | None = None) -> np.ndarray:
        ids = None if own_ids is None else np.repeat(own_ids, self.cells)
        side = int(round(math.sqrt(self.cells)))
        return self.bank.distances(self.standard(flat_locations(f)), ids).reshape(f.n, side, side)


# ---------------------------------------------------------------------------------------------------- fine-tune


class FineTuned(Scorer):
    """The tail after stage ``start`` (stage6, stage7 and head for 5; stage4 to head for 3) fine-tuned to pull the
    fit images towards the pretrained Gaussians of its levels (mean Mahalanobis distance over those levels, each
    divided by sqrt(dim)); Gaussians and banks refitted on the fine-tuned features; early-stopped on the validation
    AUROC of the global score (epoch 0 = frozen); the cached maps of stage ``start`` are the tail's input."""

    def __init__(self, net: Network, fit: Feats, val_goods: Feats, val_defects: Feats, seed: int, bn: str,
                 start: int = 5, epochs: int = 12, patience: int = 4, lr: float = 1e-4, batch: int = 32):
        import copy

        import torch

        from gaussad.tools.evaluate import roc_auc

        torch.manual_seed(seed)
        self.torch = torch
        self.start = start
        self.net = Network.__new__(Network)
        self.net.torch, self.net.input_size = torch, net.input_size
        self.net.backbone = copy.deepcopy(net.backbone)
        self.tail_levels = list(range(start + 1, N_LEVELS))
        pre = fit_gaussians([fit.pooled[i] for i in self.tail_levels])
        targets = []
        for g in pre:
            linv = np.linalg.inv(g.chol)
            targets.append((torch.from_numpy(g.mean).float(), torch.from_numpy(linv.T).float(), math.sqrt(g.dim)))
        params = [p for m in self.net.tail_modules(start) for p in m.parameters()]
        for p in self.net.backbone.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        self.bn = bn
        rng = np.random.default_rng(seed)
        x_fit = torch.from_numpy(fit.tail_input(start).astype(np.float32))
        val = concat([val_goods, val_defects])
        labels = np.r_[np.zeros(val_goods.n), np.ones(val_defects.n)]

        def validate() -> float:
            self.refit(fit)
            return roc_auc(labels, self.global_scores(val))

        best = (validate(), 0, copy.deepcopy(self.net.backbone.state_dict()))
        self.history = [(0, round(best[0], 4), None)]
        bad_epochs = 0
        for epoch in range(1, epochs + 1):
            self.train_mode()
            total = 0.0
            order = rng.permutation(len(x_fit))
            for lo in range(0, len(x_fit), batch):
                idx = torch.from_numpy(order[lo:lo + batch])
                outs = self.net.tail(x_fit[idx], start)
                loss = 0.0
                for (mean, linv_t, scale), fmap, level in zip(targets, outs, self.tail_levels):
                    z = (pool(torch, fmap, level in MAP_LEVELS) - mean) @ linv_t
                    loss = loss + (z.square().sum(dim=1) + 1e-12).sqrt().mean() / scale
                loss = loss / len(targets)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            auc = validate()
            self.history.append((epoch, round(auc, 4), round(total / len(x_fit), 4)))
            say(f"    epoch {epoch}: loss {total / len(x_fit):.4f}, validation AUROC {auc:.4f}")
            if auc > best[0]:
                best, bad_epochs = (auc, epoch, copy.deepcopy(self.net.backbone.state_dict())), 0
            else:
                bad_epochs += 1
                if bad_epochs >= patience:
                    break
        self.best_epoch = best[1]
        self.net.backbone.load_state_dict(best[2])
        self.net.backbone.eval()
        self.refit(fit, banks=True, seed=seed)

    def train_mode(self) -> None:
        for m in self.net.tail_modules(self.start):
            m.train()
            if self.bn == "frozen":
                for sub in m.modules():
                    if isinstance(sub, self.torch.nn.BatchNorm2d):
                        sub.eval()

    def adapted(self, f: Feats) -> Feats:
        """``f`` with the pooled vectors and grid vectors of the tail's levels from the fine-tuned tail."""
        torch = self.torch
        self.net.backbone.eval()
        pooled: list[list[np.ndarray]] = [[] for _ in self.tail_levels]
        map_tail = [lv for lv in self.tail_levels if lv in MAP_LEVELS]
        grids: list[list[np.ndarray]] = [[] for _ in map_tail]
        x = f.tail_input(self.start)
        with torch.no_grad():
            for lo in range(0, f.n, 64):
                outs = self.net.tail(torch.from_numpy(x[lo:lo + 64].astype(np.float32)), self.start)
                for i, (fm, level) in enumerate(zip(outs, self.tail_levels)):
                    pooled[i].append(pool(torch, fm, level in MAP_LEVELS).double().numpy())
                for j, g in enumerate(grid_of(torch, [o for o, lv in zip(outs, self.tail_levels) if lv in MAP_LEVELS])):
                    grids[j].append(g)
        keep = len(MAP_LEVELS) - len(map_tail)
        return Feats(f.pooled[:self.start + 1] + [np.concatenate(p) for p in pooled],
                     f.grid[:keep] + [np.concatenate(g) for g in grids], f.s5, f.masks, f.kinds, f.s3)

    def refit(self, fit: Feats, banks: bool = False, seed: int = 0) -> None:
        a = self.adapted(fit)
        self.gaussians = fit_gaussians(a.pooled)
        if banks:
            self.banks = build_banks(a.grid, seed)

    def global_scores(self, f: Feats) -> np.ndarray:
        return gaussian_scores(self.gaussians, self.adapted(f).pooled)

    def maps(self, f: Feats, own_ids: np.ndarray | None = None) -> np.ndarray:
        return nn_maps(self.banks, self.adapted(f).grid, own_ids)


class BNStats(FineTuned):
    """No gradient step: the batch-norm statistics of the tail after stage ``start`` re-estimated on the fit images
    (one pass in training mode, a cumulative average over batches of 32), mixed with the pretrained ones as
    ``(1 - mix) * pretrained + mix * fit``; Gaussians and banks refitted on the resulting features."""

    def __init__(self, net: Network, fit: Feats, seed: int, start: int, mix: float, batch: int = 32):
        import copy

        import torch

        self.torch = torch
        self.start = start
        self.bn = "train"
        self.net = Network.__new__(Network)
        self.net.torch, self.net.input_size = torch, net.input_size
        self.net.backbone = copy.deepcopy(net.backbone)
        self.tail_levels = list(range(start + 1, N_LEVELS))
        self.best_epoch = None
        bns = [m for t in self.net.tail_modules(start) for m in t.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        pretrained = [(b.running_mean.clone(), b.running_var.clone()) for b in bns]
        for b in bns:
            b.reset_running_stats()
            b.momentum = None
        self.train_mode()
        x = fit.tail_input(start)
        with torch.no_grad():
            for lo in range(0, fit.n, batch):
                self.net.tail(torch.from_numpy(x[lo:lo + batch].astype(np.float32)), start)
        for b, (mean, var) in zip(bns, pretrained):
            b.running_mean.mul_(mix).add_((1 - mix) * mean)
            b.running_var.mul_(mix).add_((1 - mix) * var)
        self.net.backbone.eval()
        self.refit(fit, banks=True, seed=seed)


# ------------------------------------------------------------------------------------------------------ figures


def upsampled(maps: np.ndarray) -> np.ndarray:
    from gaussad.core.maps import combine

    return combine([maps], PIXEL_SIDE)


def p_values(cal: np.ndarray, x: np.ndarray) -> np.ndarray:
    cal = np.sort(cal)
    return (1 + len(cal) - np.searchsorted(cal, x, "left")) / (len(cal) + 1)


def figures(scorer: Scorer, fit: Feats, val_goods: Feats, goods: Feats, defects: Feats) -> dict[str, Any]:
    """Selection (or test) figures of a fitted variant; ``goods``/``defects`` are scored, the validation goods
    calibrate the false-alarm threshold and the fused score's p-values."""
    from gaussad.tools.evaluate import roc_auc

    allf = concat([goods, defects])
    labels = np.r_[np.zeros(goods.n), np.ones(defects.n)]
    g = scorer.global_scores(allf)
    m = scorer.maps(allf)
    peak = m.reshape(allf.n, -1).max(axis=1)
    vg, vm = scorer.global_scores(val_goods), scorer.maps(val_goods).reshape(val_goods.n, -1).max(axis=1)
    fused = -np.log(p_values(vg, g)) - np.log(p_values(vm, peak))
    out: dict[str, Any] = {"image_global": roc_auc(labels, g), "image_map_max": roc_auc(labels, peak),
                           "image_fused": roc_auc(labels, fused)}
    pix = upsampled(m)
    out["pixel"] = roc_auc(allf.masks.reshape(-1), pix.reshape(-1))
    # held-out false alarms: threshold at the 95th percentile of the validation goods' scores
    for name, s, v in (("global", g, vg), ("map_max", peak, vm)):
        t = np.quantile(v, 0.95)
        out[f"fpr95_{name}"] = float(np.mean(s[labels == 0] > t))
        out[f"tpr95_{name}"] = float(np.mean(s[labels == 1] > t))
    kinds = sorted(set(defects.kinds))
    if len(kinds) > 1 and all(k in ("patch", "scratch", "noise", "spot") for k in kinds):
        for k in kinds:
            sel = np.r_[np.ones(goods.n, bool), np.array([kk == k for kk in defects.kinds])]
            out[f"map_max_{k}"] = roc_auc(labels[sel], peak[sel])
    # learned its own images? share of held-out goods above the 95th percentile of the fit images' own scores
    # (leave-one-image-out for nearest-neighbour maps), which a threshold set on training images would flag: 0.05
    # when fit and held-out goods score alike
    fit_peak = scorer.maps(fit, np.arange(fit.n)).reshape(fit.n, -1).max(axis=1)
    out["heldout_over_fit95_global"] = float(np.mean(g[labels == 0] > np.quantile(scorer.global_scores(fit), 0.95)))
    out["heldout_over_fit95_map_max"] = float(np.mean(peak[labels == 0] > np.quantile(fit_peak, 0.95)))
    return {k: round(v, 4) for k, v in out.items()}


# --------------------------------------------------------------------------------------------------------- main


def make_variant(name: str, net: Network, sets: dict[str, Feats], seed: int, frozen: Frozen) -> Scorer:
    fit, vg, vd = sets["fit"], sets["val_good"], sets["val_def"]
    if name == "frozen":
        return frozen
    if name == "concat-nn":  # the adaptor's starting point: standardised map levels concatenated, one bank
        return Concat(fit, seed, frozen)
    if name.startswith("simplenet") or name.startswith("paste") or name.startswith("both"):
        # simplenet-s0.5[-nn], paste[-nn], both-s0.5[-nn]
        parts = name.split("-")
        sigma = next((float(p[1:]) for p in parts if p.startswith("s") and p[1:2].isdigit()), 0.5)
        epochs = next((int(p[1:]) for p in parts if p.startswith("e") and p[1:2].isdigit()), 40)
        negatives = {"simplenet": "noise", "paste": "paste", "both": "both"}[parts[0]]
        a = Adaptor(fit, vg, vd, seed, sigma, negatives, sets["fit_def"], epochs=epochs, frozen_global=frozen)
        a.score_by = "nn" if parts[-1] == "nn" else "disc"
        return a
    if name.startswith("bnstats"):  # bnstats-from5-mix0.5
        start = next((int(p[4:]) for p in name.split("-") if p.startswith("from")), 5)
        mix = next((float(p[3:]) for p in name.split("-") if p.startswith("mix")), 1.0)
        return BNStats(net, fit, seed, start, mix)
    if name.startswith("finetune"):
        # finetune-bnfrozen|bntrain[-lr1e-3][-from3][-e24]
        bn = "train" if "bntrain" in name else "frozen"
        found = re.search(r"lr(\d+(?:\.\d+)?(?:e-?\d+)?)", name)
        lr = float(found.group(1)) if found else 1e-4
        start = next((int(p[4:]) for p in name.split("-") if p.startswith("from")), 5)
        epochs = next((int(p[1:]) for p in name.split("-") if p.startswith("e") and p[1:2].isdigit()), 12)
        return FineTuned(net, fit, vg, vd, seed, bn, start=start, lr=lr, epochs=epochs)
    raise SystemExit(f"unknown variant {name!r}")


def emit(row: dict, json_path: str | None) -> None:
    """Print one result row as JSON and, with ``json_path``, append it there (one JSON object a line)."""
    print(json.dumps(row), flush=True)
    if json_path:
        with open(json_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    global QUIET
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="a category in MVTec layout")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/adapt-cache"), help="frozen features (not the repo)")
    ap.add_argument("--variants", nargs="+", metavar="VARIANT",
                    default=["frozen", "concat-nn", "simplenet-s0.5", "paste", "finetune-bnfrozen",
                             "bnstats-from5-mix0.5"], help="names as in the module docstring")
    ap.add_argument("--seed", type=int, default=0, help="split, defects, training")
    ap.add_argument("--input-size", type=int, default=224, help="square network input, pixels")
    ap.add_argument("--normalize", choices=("imagenet", "native"), default="imagenet",
                    help="input normalisation: ImageNet's (the paper preset) or the Lite network's own (recommended)")
    ap.add_argument("--test", metavar="VARIANT", help="after choosing: the test set, frozen and this variant")
    ap.add_argument("--test-fit", choices=("fit", "all"), default="fit",
                    help="with --test: fit on the fit part (default) or on all of train/good, as the product does "
                         "(the fused score's p-values then come from in-sample validation goods: not meaningful)")
    ap.add_argument("--json", type=Path, help="append one JSON line per variant here")
    ap.add_argument("--quiet", action="store_true", help="only the JSON lines")
    args = ap.parse_args(argv)
    QUIET = args.quiet
    import torch

    torch.set_num_threads(1)
    net = Network(args.input_size, args.normalize)
    raw = prepare(args.data, args.cache, args.seed, args.input_size, net, args.test is not None)
    sp: Split = raw["_split"]  # type: ignore[assignment]
    train = raw["train"]
    sets = {"fit": take(train, sp.fit), "val_good": take(train, sp.val), "val_def": raw["val_def"],
            "sel_good": take(train, sp.select), "sel_def": concat([raw["sel_def0"], raw["sel_def1"]]),
            "fit_def": raw["fit_def"]}
    say(f"{args.data.name}: fit {sp.fit.size}, validation {sp.val.size} (+{raw['val_def'].n} defects), "
        f"selection {sp.select.size} (+{sets['sel_def'].n} defects), seed {args.seed}, {args.input_size} px")
    if args.test and args.test_fit == "all":
        sets["fit"] = train
    t0 = time.perf_counter()
    frozen = Frozen(sets["fit"], args.seed)
    frozen_s = time.perf_counter() - t0
    variants = [args.test] if args.test else args.variants
    for name in variants:
        t0 = time.perf_counter()
        scorer = make_variant(name, net, sets, args.seed, frozen)
        seconds = frozen_s if name == "frozen" else time.perf_counter() - t0
        row: dict[str, Any] = {"data": args.data.name, "variant": name, "seed": args.seed,
                               "fit_images": sets["fit"].n,
                               "train_s": round(seconds, 1),
                               "best_epoch": getattr(scorer, "best_epoch", None),
                               "history": getattr(scorer, "history", None)}
        if args.test:
            test = raw["test"]
            goods = take(test, np.flatnonzero(np.array(test.kinds) == "0"))
            defects = take(test, np.flatnonzero(np.array(test.kinds) == "1"))
            row["test_frozen"] = figures(frozen, sets["fit"], sets["val_good"], goods, defects)
            row["test"] = figures(scorer, sets["fit"], sets["val_good"], goods, defects)
        else:
            row["select"] = figures(scorer, sets["fit"], sets["val_good"], sets["sel_good"], sets["sel_def"])
            if isinstance(scorer, Adaptor) and scorer.score_by == "disc":  # the same adaptor, nearest neighbours
                scorer.score_by = "nn"
                row["select_nn"] = figures(scorer, sets["fit"], sets["val_good"], sets["sel_good"], sets["sel_def"])
        emit(row, args.json)


if __name__ == "__main__":
    main()
