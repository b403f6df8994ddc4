"""Adapting the network to the product: fine-tuning the backbone's deeper half on the good training images with the
objective of Rippel, Chavan, Lei and Merhof, "Transfer Learning Gaussian Anomaly Detection by Fine-tuning
Representations" (arXiv 2108.04116).

A Gaussian per trained level is fitted once on the pretrained network's pooled features (the model's pooling, the
Ledoit-Wolf covariance) and stays fixed; the levels from the middle of the network on (:func:`trained_start`;
EfficientNet: stage4 .. head) are trained with Adam to bring the training images' pooled features closer to them:
the mean over those levels of the Mahalanobis distance divided by the square root of the level's dimension. Batch
norm stays frozen (every layer in eval mode: with it moving, the features left the Gaussians from the first batch,
EXPERIMENTS.md "Fine-tuning again, batch norm moving"). The frozen part runs once per image, its output is held
(float16) and the trained part runs from it every epoch.

When to stop (``stop``): ``validation``, the authors' scheme against catastrophic forgetting: 15 % of the images are
held out, each also with one pasted synthetic defect (:mod:`gaussad.intake.defects`), and after every epoch the
global score (Gaussians refitted on the other images' features of the current network, every level) ranks the
held-out goods against their defective copies; the epoch with the highest AUROC is kept (epoch 0: the pretrained
network), training stops after ``PATIENCE`` epochs without a better one. ``last``: every image trains and the last
epoch is kept. No defective image of the product is ever used.

Deterministic for a seed (the split, the defects and the batch order), on the same machine and thread count.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..core.gaussian import LevelGaussian, MomentStats
from ..errors import DataError, GaussadError, ImageError
from .defects import PASTED_DEFECTS, add_defect
from .images import ImageSource, load_image, preprocess

if TYPE_CHECKING:
    import torch

    from .backbones.base import PooledLevels

LEARNING_RATE = 1e-4  # Adam; 1e-3 collapsed the features in session 12, 1e-5 moved them too little to measure
BATCH = 16
HELD_OUT = 0.15
PATIENCE = 2


@dataclass
class Adaptation:
    """What an adaptation learned: the trained tensors (float32, by the backbone's state-dict key) and its record
    (epochs asked and kept, how it stopped, per epoch the objective, the validation AUROC and seconds)."""

    weights: dict[str, np.ndarray]
    record: dict[str, Any] = field(default_factory=dict)


def trained_start(level_names: Sequence[str]) -> int:
    """The first trained level: the middle of the network (EfficientNet and MobileNetV2: stage4 of 9 levels; ResNet:
    layer2 of 5)."""
    return len(level_names) // 2


def trained_keys(module: "PooledLevels") -> list[str]:
    """State-dict keys (of ``module.backbone``) of the parameters adaptation trains, in the network's order."""
    names = {id(p): k for k, p in module.backbone.named_parameters()}
    start = trained_start(module.backbone.level_names)
    return [names[id(p)] for m in module.backbone.tail_modules(start) for p in m.parameters()]


def apply_weights(module: "PooledLevels", weights: dict[str, np.ndarray], source: str) -> None:
    """Load adapted tensors into ``module``'s backbone: exactly its trained parameters, each of its shape; anything
    else is refused naming ``source`` (a model file fitted with another backbone or version, or damaged)."""
    import torch

    own = dict(module.backbone.named_parameters())
    allowed = set(trained_keys(module))
    bad = sorted(k for k in weights if k not in allowed)
    missing = sorted(allowed - set(weights))
    shape = sorted(k for k in weights if k in allowed and tuple(own[k].shape) != tuple(weights[k].shape))
    if bad or missing or shape:
        detail = (f"not trained parameters of this backbone: {', '.join(bad[:3])}" if bad else
                  f"missing: {', '.join(missing[:3])}" if missing else f"wrong shape: {', '.join(shape[:3])}")
        raise GaussadError(f"{source}: adapted weights do not fit this network ({detail})")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(torch.from_numpy(np.asarray(v, dtype=np.float32)))


def weights_digest(weights: dict[str, np.ndarray] | None) -> str | None:
    """A short digest of adapted tensors (the ONNX graph cache key's part for them), None without."""
    if not weights:
        return None
    import hashlib

    h = hashlib.sha256()
    for k in sorted(weights):
        h.update(k.encode())
        h.update(np.ascontiguousarray(weights[k], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


class _Cached:
    """The frozen part's output for a set of images, in batches of equal input shape: the trained part's input
    (float16) and the pooled features of the model's frozen levels. Images are added one at a time and run through
    the frozen part a batch per input shape at once, so that only those batches of network inputs are held."""

    def __init__(self, module: "PooledLevels", start: int) -> None:
        self.module, self.start = module, start
        self.frozen_levels = [lv for lv in module.levels if lv < start]
        self.groups: list[tuple[np.ndarray, np.ndarray]] = []  # (image indices, level start-1 maps)
        self.rows: list[dict[int, np.ndarray]] = [{} for _ in self.frozen_levels]
        self.frozen: list[np.ndarray] = []  # per frozen model level, (n, C) in image order (after :meth:`done`)
        self.pending: dict[tuple, list[tuple[int, np.ndarray]]] = {}
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        """The next image's network input (3, H, W)."""
        batch = self.pending.setdefault(tuple(x.shape), [])
        batch.append((self.n, x))
        self.n += 1
        if len(batch) == BATCH:
            self._run(self.pending.pop(tuple(x.shape)))

    def done(self) -> "_Cached":
        for batch in self.pending.values():
            self._run(batch)
        self.pending = {}
        self.frozen = [np.stack([r[i] for i in range(self.n)]) for r in self.rows]
        self.rows = []
        return self

    def _run(self, batch: list[tuple[int, np.ndarray]]) -> None:
        import torch

        wanted = sorted(set(self.frozen_levels) | {self.start - 1})
        with torch.no_grad():
            maps = self.module.backbone.forward_levels(torch.from_numpy(np.stack([x for _, x in batch])), wanted)
        by_level = dict(zip(wanted, maps))
        for r, lv in enumerate(self.frozen_levels):
            pooled = self.module._pool(by_level[lv], lv in self.module.spread_levels).double().numpy()
            for j, (i, _) in enumerate(batch):
                self.rows[r][i] = pooled[j]
        self.groups.append((np.array([i for i, _ in batch]), by_level[self.start - 1].numpy().astype(np.float16)))


def _subset(cached: _Cached, idx: np.ndarray) -> _Cached:
    where = {int(i): k for k, i in enumerate(idx)}
    out = _Cached(cached.module, cached.start)
    out.n = len(idx)
    for g, maps in cached.groups:
        keep = [j for j, i in enumerate(g) if int(i) in where]
        if keep:
            out.groups.append((np.array([where[int(g[j])] for j in keep]), maps[keep]))
    out.frozen = [f[idx] for f in cached.frozen]
    return out


def _tail(module: "PooledLevels", x: "torch.Tensor", start: int) -> list["torch.Tensor"]:
    """Pooled features of the model's trained levels from the level ``start - 1`` maps ``x``."""
    trained = [lv for lv in module.levels if lv >= start]
    maps = module.backbone.forward_levels(x, trained, start=start)
    return [module._pool(f, lv in module.spread_levels) for f, lv in zip(maps, trained)]


def _pooled(module: "PooledLevels", cached: _Cached, start: int) -> list[np.ndarray]:
    """Every model level's pooled features of the cached images with the current network."""
    import torch

    rows: list[list[Any]] = [[None] * cached.n for lv in module.levels if lv >= start]
    with torch.no_grad():
        for g, maps in cached.groups:
            for lo in range(0, len(g), 2 * BATCH):
                outs = _tail(module, torch.from_numpy(maps[lo:lo + 2 * BATCH].astype(np.float32)), start)
                for r, f in enumerate(outs):
                    f = f.double().numpy()
                    for j, i in enumerate(g[lo:lo + 2 * BATCH]):
                        rows[r][i] = f[j]
    return list(cached.frozen) + [np.stack(r) for r in rows]


def _gaussians(features: Sequence[np.ndarray]) -> list[LevelGaussian]:
    try:
        return [LevelGaussian.fit(MomentStats.from_array(f), "ledoit-wolf") for f in features]
    except ValueError as exc:
        raise DataError(f"adapt: {exc}") from None


def _auroc(good: np.ndarray, bad: np.ndarray) -> float:
    """Share of (defect, good) pairs the scores order correctly, ties one half."""
    from scipy.stats import rankdata

    ranks = rankdata(np.r_[good, bad])
    return float((ranks[len(good):].sum() - len(bad) * (len(bad) + 1) / 2) / (len(good) * len(bad)))


def _load(extractor: Any, source: ImageSource, index: int) -> Any:
    return load_image(source, index, extractor.max_pixels, extractor.input_size if extractor.draft else None,
                      decoder=extractor.decoder)


def _prepare(extractor: Any, img: Any) -> np.ndarray:
    return preprocess(img, extractor.input_size, extractor.normalization, extractor.resize, extractor.brightness)


def _sets(extractor: Any, sources: Sequence[ImageSource], stop: str, seed: int | None, on_error: str, start: int
          ) -> tuple[_Cached, _Cached | None, _Cached | None, int]:
    """The frozen part's output of the training part, of the held-out goods and of their pasted-defect copies
    (None with ``stop='last'``), and the number of readable images. The held-out images and their donors (other
    training images) are decoded a second time to paste the defects, rather than every image held decoded."""
    from PIL import Image

    cached = _Cached(extractor.module, start)
    readable = []
    for i, source in enumerate(sources):
        try:
            img = _load(extractor, source, i)
        except ImageError:
            if on_error != "skip":
                raise
            continue
        readable.append(i)
        cached.add(_prepare(extractor, img))
    n = len(readable)
    if stop == "last":
        if n < 2:
            raise DataError(f"adapt needs at least 2 readable training images, got {n}")
        return cached.done(), None, None, n
    n_val = max(2, int(round(HELD_OUT * n)))
    if n - n_val < 2:
        raise DataError(f"adapt with stop='validation' holds out {n_val} of {n} images, leaving fewer than 2 to "
                        "train on: give more images, or adapt_stop='last'")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    fit_idx, val_idx = np.sort(order[n_val:]), np.sort(order[:n_val])
    for k, i in enumerate(val_idx):
        d = int(fit_idx[(k * 7919) % len(fit_idx)])
        good, donor = (np.asarray(_load(extractor, sources[readable[j]], readable[j])) for j in (int(i), d))
        pasted, _ = add_defect(good, donor, rng, PASTED_DEFECTS[k % len(PASTED_DEFECTS)])
        cached.add(_prepare(extractor, Image.fromarray(pasted)))
    cached.done()
    return (_subset(cached, fit_idx), _subset(cached, val_idx), _subset(cached, n + np.arange(len(val_idx))), n)


def adapt(extractor: Any, sources: Sequence[ImageSource], epochs: int, stop: str = "validation",
          seed: int | None = 0, on_error: str = "fail", progress: Callable[[int], Any] | None = None) -> Adaptation:
    """Fine-tune ``extractor``'s network (a :class:`~gaussad.intake.features.FeatureExtractor`) in place on the good
    images ``sources`` for up to ``epochs`` epochs (see the module's text) and return what it learned.
    ``progress(total)`` makes a progress bar (tqdm's interface) over the epochs, shown with the objective and the
    validation AUROC. On any error, an interruption included, the network is put back as it was."""
    import torch

    module = extractor.module
    backbone = module.backbone
    start = trained_start(backbone.level_names)
    if not any(lv >= start for lv in module.levels):
        raise GaussadError(f"adapt trains the levels from {backbone.level_names[start]} on, but the model's levels "
                           f"stop before it: add a deeper level, or adapt=0")
    keys = trained_keys(module)
    params = dict(backbone.named_parameters())
    original = {k: params[k].detach().clone() for k in keys}
    t_start = time.perf_counter()
    fit, val_good, val_bad, n = _sets(extractor, sources, stop, seed, on_error, start)
    n_frozen = sum(lv < start for lv in module.levels)
    targets = [(torch.from_numpy(g.mean).float(), torch.from_numpy(np.linalg.inv(g.chol).T.copy()).float(),
                math.sqrt(g.dim)) for g in _gaussians(_pooled(module, fit, start)[n_frozen:])]

    def validation() -> float | None:
        if val_good is None or val_bad is None:
            return None
        gs = _gaussians(_pooled(module, fit, start))
        good, bad = (np.mean([g.distances(f) for g, f in zip(gs, _pooled(module, c, start))], axis=0)
                     for c in (val_good, val_bad))
        return _auroc(good, bad)

    for p in backbone.parameters():
        p.requires_grad_(False)
    for k in keys:
        params[k].requires_grad_(True)
    module.eval()
    bar = progress(epochs) if progress is not None else None
    try:
        history, kept, best = _train(module, fit, targets, [params[k] for k in keys], epochs, seed, start,
                                     validation, bar)
    except BaseException:
        with torch.no_grad():
            for k in keys:
                params[k].copy_(original[k])
        raise
    finally:
        for p in backbone.parameters():
            p.requires_grad_(False)
        if bar is not None:
            bar.close()
    with torch.no_grad():
        for k, v in zip(keys, best):
            params[k].copy_(v)
    record = {"epochs": int(epochs), "stop": stop, "kept_epoch": kept, "trained_from": backbone.level_names[start],
              "images": n, "held_out": 0 if val_good is None else val_good.n, "history": history,
              "seconds": round(time.perf_counter() - t_start, 1)}
    return Adaptation({k: v.numpy().astype(np.float32) for k, v in zip(keys, best)}, record)


def _train(module: "PooledLevels", fit: _Cached, targets: list, params: list, epochs: int, seed: int | None,
           start: int, validation: Callable[[], float | None], bar: Any) -> tuple[list[dict], int, list]:
    """The epochs: Adam on the objective, batches of equal input shape in a seeded order, the validation after each;
    (per-epoch history, the kept epoch, its tensors)."""
    import torch

    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    rng = np.random.default_rng(None if seed is None else [seed, 1])
    batches = [maps[lo:lo + BATCH] for _, maps in fit.groups for lo in range(0, len(maps), BATCH)]
    t0 = time.perf_counter()
    history: list[dict[str, Any]] = [{"epoch": 0, "validation_auroc": _rounded(validation()),
                                      "seconds": round(time.perf_counter() - t0, 1)}]
    best = (history[0]["validation_auroc"], 0, [p.detach().clone() for p in params])
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        total = 0.0
        for b in rng.permutation(len(batches)):
            outs = _tail(module, torch.from_numpy(batches[b].astype(np.float32)), start)
            loss = sum((((f - mean) @ linv_t).square().sum(dim=1) + 1e-12).sqrt().mean() / scale
                       for (mean, linv_t, scale), f in zip(targets, outs)) / len(targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batches[b])
        auroc = _rounded(validation())
        history.append({"epoch": epoch, "objective": round(total / fit.n, 5), "validation_auroc": auroc,
                        "seconds": round(time.perf_counter() - t0, 1)})
        if bar is not None:
            bar.set_postfix(objective=history[-1]["objective"], validation=auroc)
            bar.update(1)
        if auroc is None or auroc > best[0]:
            best = (auroc, epoch, [p.detach().clone() for p in params])
        elif epoch - best[1] >= PATIENCE:
            break
    return history, best[1], best[2]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 5)
