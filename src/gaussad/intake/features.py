"""Images -> pooled multi-level feature vectors from a frozen backbone (step 1 of the paper)."""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from types import EllipsisType
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from .backbones import get_spec, resolve_levels, weights_file
from .adapt import weights_digest
from .engine import Engine, calibration_order, cpu_count, graph_key, resolve_engine
from ..errors import GaussadError, ImageError, InvalidParameterError
from .images import IMAGENET, ImageSource, check_max_pixels, image_side, load_image, preprocess
from . import (AUTO_LARGE_INPUT, BRIGHTNESS, DEFAULT_MAX_PIXELS, MATCH_GREY, NORMALIZATIONS, POOLS, RESIZES,
               check_precision)
from .tiles import Mosaic, auto_tiles, check_tiling, cut, map_side, tile_boxes

if TYPE_CHECKING:
    from .backbones.base import PooledLevels

ON_ERROR = ("fail", "skip")
AUTO_TILES_SAMPLE = 64  # training images whose headers decide input_size and map_tiles 'auto'
AUTO_SETTINGS = ("input_size", "map_tiles")  # the settings that 'auto' decides at fit from the training images


class FeatureExtractor:
    """Runs images through a backbone and returns one (n, C_l) float64 array per chosen level.

    Images are decoded and resized in a thread pool while the engine (ONNX Runtime by default, OpenVINO, or torch
    eager) runs the previous batch; only a few batches are held at once, whatever the number of images.
    ``engine`` is "onnxruntime", "openvino", "torch" or "auto" (ONNX Runtime when installed; where OpenVINO is too,
    whichever of the two :func:`~gaussad.intake.engine.fastest_engine` chose for the graph); ``draft`` lets large JPEGs
    decode at reduced scale, ``decoder`` picks the decoders (see :func:`gaussad.intake.images.load_image`).
    ``precision="int8"`` runs a statically quantized ONNX graph: ``network`` (a fitted model's), or the one
    :meth:`calibrate` makes from training images. ``map_tiles`` > 1 takes the feature maps of the map levels from
    overlapping tiles of a larger map image (:mod:`gaussad.intake.tiles`), the pooled features still from the whole image.
    ``pool="avg+std"`` pools each map level's channels by their spread over the map (the square root of their
    standard deviation) as well as their average (the other levels by their average, as the paper).
    ``brightness="match"`` scales each resized image to one mean grey level before normalising
    (:func:`~gaussad.intake.images.match_brightness`). ``adapted``: a fitted model's adapted tensors of the network
    (:meth:`adapt`, :mod:`gaussad.intake.adapt`), loaded into it when it is built.
    """

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        levels: Sequence[int | str] | None = None,
        input_size: int | None = None,
        weights: str | os.PathLike | None = None,
        batch_size: int = 16,
        workers: int | None = None,
        normalize: str = "imagenet",
        map_levels: Sequence[int | str] = (),
        max_pixels: int = DEFAULT_MAX_PIXELS,
        engine: str = "auto",
        draft: bool = True,
        resize: str = "square",
        decoder: str = "pil",
        precision: str = "fp32",
        network: bytes | None = None,
        map_tiles: int = 1,
        pool: str = "avg",
        brightness: str = "keep",
        adapted: dict[str, np.ndarray] | None = None,
    ):
        spec = get_spec(backbone)
        if normalize not in NORMALIZATIONS:
            raise GaussadError(f"unknown normalization {normalize!r}; choose one of: {', '.join(NORMALIZATIONS)}")
        self.normalization = IMAGENET if normalize == "imagenet" else spec.native_normalization
        self.backbone_name = backbone
        self.input_size = int(input_size or spec.input_size)
        self.levels = resolve_levels(spec.level_names, levels)
        self.level_names = [spec.level_names[i] for i in self.levels]
        self.map_levels = resolve_levels(spec.level_names, map_levels) if map_levels else []
        self.map_level_names = [spec.level_names[i] for i in self.map_levels]
        self.weights = weights
        self.batch_size = batch_size
        self.workers = workers or cpu_count()
        self.max_pixels = check_max_pixels(max_pixels)
        check_precision({"engine": engine, "precision": precision})
        if network is not None and precision != "int8":
            raise InvalidParameterError(f"this model's network is int8 (fitted with precision='int8'), precision="
                                        f"{precision!r} cannot use it: set precision='int8' or refit")
        self.engine = resolve_engine(engine)  # the family; :attr:`runner`'s name is the runtime that runs
        self._auto = engine == "auto"
        self.precision = precision
        self.network = network
        # what :meth:`calibrate` quantized with: the weight format and this CPU's instruction set (None otherwise)
        self.network_format: str | None = None
        self.network_isa: str | None = None
        self.draft = draft
        if resize not in RESIZES:
            raise GaussadError(f"unknown resize {resize!r}; choose one of: {', '.join(RESIZES)}")
        self.resize = resize
        self.decoder = decoder
        self.map_tiles = int(map_tiles) if self.map_levels else 1
        if pool not in POOLS:
            raise GaussadError(f"unknown pool {pool!r}; choose one of: {', '.join(POOLS)}")
        self.pool = pool
        if brightness not in BRIGHTNESS:
            raise GaussadError(f"unknown brightness {brightness!r}; choose one of: {', '.join(BRIGHTNESS)}")
        self.brightness = brightness
        # levels whose pooled vector also holds each channel's spread over the map (PooledLevels)
        self.spread_levels = [i for i in self.levels if i in self.map_levels] if pool == "avg+std" else []
        check_tiling(self.input_size, self.map_tiles)
        self.adapted = adapted or None
        self.adaptation: dict[str, Any] | None = None  # the record of :meth:`adapt` (None when it did not run here)
        self._module: "PooledLevels | None" = None
        self._runner: Engine | None = None

    @property
    def module(self) -> "PooledLevels":
        """The torch module, built on first use so that constructing an extractor is cheap (and imports no torch)."""
        if self._module is None:
            from .backbones import create_backbone
            from .backbones.base import PooledLevels

            net = create_backbone(self.backbone_name, self.input_size, self.weights)
            module = PooledLevels(net, self.levels, self.map_levels, self.spread_levels).eval()
            if self.adapted:
                from .adapt import apply_weights

                apply_weights(module, self.adapted, "this model")
            self._module = module
        return self._module

    def _graph_key(self) -> dict[str, str]:
        """The on-disk cache key of this extractor's fp32 ONNX graph."""
        graph = (("pooled-maps" if self.map_levels else "pooled") + ("-anysize" if self.resize == "aspect" else "")
                 + ("-spread" + "_".join(map(str, self.spread_levels)) if self.spread_levels else "")
                 + (f"-adapted{weights_digest(self.adapted)}" if self.adapted else ""))
        return graph_key(graph, self.backbone_name, weights_file(self.backbone_name, self.weights), self.input_size,
                         self.levels, self.map_levels)

    def calibrate(self, sources: Sequence[ImageSource], on_error: str = "fail") -> None:
        """With int8 precision: quantize the network on :data:`~gaussad.intake.engine.INT8_CALIBRATION_IMAGES` readable
        ``sources`` spread over the list (:func:`~gaussad.intake.engine.calibration_order`), each prepared as for scoring,
        and run that network from now on (it becomes :attr:`network`); with fp32 nothing to do."""
        if self.precision != "int8":
            return
        from .engine import INT8_CALIBRATION_IMAGES, INT8_FORMAT, cached_onnx_graph, cpu_isa, quantize_int8

        inputs: list[np.ndarray] = []
        for i in calibration_order(len(sources), INT8_CALIBRATION_IMAGES):
            if len(inputs) == INT8_CALIBRATION_IMAGES:
                break
            try:
                inputs.append(self.prepare(sources[i], i))
            except ImageError:
                if on_error != "skip":
                    raise
        if not inputs:
            raise GaussadError("precision='int8' calibrates on the training images, but none could be read")
        graph = cached_onnx_graph(lambda: self.module, self.input_size, self._graph_key(), any_size=self.resize == "aspect")
        self.network = quantize_int8(graph, inputs)
        self.network_format, self.network_isa = INT8_FORMAT, cpu_isa()
        self._runner = None  # :attr:`runner` builds the int8 engine of the new network

    def fit_network(self, sources: Sequence[ImageSource], settings: Mapping[str, Any], on_error: str = "fail",
                    verbose: bool = False) -> None:
        """What a fit learns of the network from its training images, in this order: with resolved ``settings``'
        ``adapt`` > 0 the adapted weights (:meth:`adapt`), with int8 precision the quantized graph (:meth:`calibrate`)."""
        if settings.get("adapt"):
            self.adapt(sources, int(settings["adapt"]), settings["adapt_stop"], settings["random_state"], on_error,
                       verbose)
        self.calibrate(sources, on_error)

    def adapt(self, sources: Sequence[ImageSource], epochs: int, stop: str, seed: int | None, on_error: str = "fail",
              verbose: bool = False) -> None:
        """Fine-tune the network on the good images ``sources`` (:func:`gaussad.intake.adapt.adapt`), from the
        pretrained weights whatever this extractor ran before, and run it from now on: :attr:`adapted` becomes the
        trained tensors (None where the validation kept the pretrained network), :attr:`adaptation` its record."""
        from .adapt import adapt

        self.adapted, self._module, self._runner = None, None, None
        found = adapt(self, sources, epochs, stop, seed, on_error,
                      (lambda total: progress_bar(total, "adapt", True, "epoch")) if verbose else None)
        self.adapted = found.weights if found.record["kept_epoch"] else None
        self.adaptation = found.record
        self._module = None  # rebuilt from the pretrained weights and :attr:`adapted`, exactly as a loaded model's

    def fitted_network(self) -> dict[str, Any]:
        """The learned state's fields of the network this extractor runs: an int8 graph (None for fp32), the format
        :meth:`calibrate` quantized it in and this CPU's instruction set then, the adapted tensors and the
        adaptation's record."""
        return {"network": self.network, "int8_format": self.network_format, "int8_isa": self.network_isa,
                "adapted": self.adapted, "adaptation": self.adaptation}

    @property
    def runner(self) -> Engine:
        """The inference engine, built on first use (the ONNX graph comes from the on-disk cache when present; an
        int8 network from :attr:`network`)."""
        if self._runner is None:
            if self.precision == "int8":
                if self.network is None:
                    raise GaussadError("precision='int8' needs a network quantized on training images, which fit "
                                       "makes: fit the model first")
                from .engine import int8_engine

                self._runner = int8_engine(self.network, self.input_size, self._graph_engine())
            elif self.engine == "torch":
                from .engine import TorchEngine

                self._runner = TorchEngine(self.module)
            else:
                from .engine import cached_onnx_engine

                self._runner = cached_onnx_engine(lambda: self.module, self.input_size, self._graph_key(),
                                                  any_size=self.resize == "aspect", engine=self._graph_engine())
        return self._runner

    def _graph_engine(self) -> str:
        """The runtime of the ONNX graph: the one named, or with engine 'auto' "fastest" where OpenVINO is installed
        beside ONNX Runtime (:func:`~gaussad.intake.engine.auto_runtimes`, :func:`~gaussad.intake.engine.fastest_engine`). An int8
        network where 'auto' found no ONNX runtime asks for onnxruntime, whose absence
        :func:`~gaussad.intake.engine.int8_engine` reports."""
        from .engine import auto_runtimes

        if self.engine == "torch":
            return "onnxruntime"
        if self._auto and self.engine == "onnxruntime" and len(auto_runtimes()) > 1:
            return "fastest"
        return self.engine

    @property
    def level_dims(self) -> list[int]:
        """Feature dimension of each chosen level (from the ONNX graph when that is the engine: no torch needed)."""
        if self.engine != "torch":
            return [int(c) for c in self.runner.channels[:len(self.levels)]]
        return self.module.pooled_dims()

    def prepare(self, source: ImageSource, index: int | None = None) -> np.ndarray:
        """One image decoded, resized and normalised: the (3, H, W) float32 network input (H = W = S when square)."""
        draft = self.input_size if self.draft else None
        return preprocess(load_image(source, index, self.max_pixels, draft, decoder=self.decoder), self.input_size,
                          self.normalization, self.resize, self.brightness)

    def prepare_tiled(self, source: ImageSource, index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """With map tiles: one image decoded once (a large JPEG drafted at the map image's scale, so that its tiles
        keep their detail), as the (3, H, W) network input of :meth:`prepare` and the (3, H_m, W_m) map image, the
        same resize at :func:`~gaussad.intake.tiles.map_side` pixels a side that the tiles cut."""
        side = map_side(self.input_size, self.map_tiles)
        img = load_image(source, index, self.max_pixels, side if self.draft else None, decoder=self.decoder)
        return (preprocess(img, self.input_size, self.normalization, self.resize, self.brightness),
                preprocess(img, side, self.normalization, self.resize, self.brightness))

    @property
    def images_per_batch(self) -> int:
        """Images decoded and run together: ``batch_size``, or with map tiles as many as make about ``batch_size``
        tiles (at least one), so that a batch's map images hold about as many pixels as an untiled batch."""
        return max(1, self.batch_size // self.map_tiles ** 2)

    def _batches(self, sources: Sequence[ImageSource], on_error: str, skipped: list | None,
                 tiled: bool) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, ...] | None, int]]:
        """Decode and preprocess in a thread pool, keeping at most two batches in flight.

        Yields (indices of the images that decoded, their stacked inputs or None, number of images handled), in the
        order of ``sources``; the inputs are the network input, and with ``tiled`` the map images too. With the
        aspect-kept resize a batch is split into runs of consecutive images of equal input shapes, the count going
        with the first.
        """
        def work(i: int) -> tuple[np.ndarray, ...] | None:
            try:
                return self.prepare_tiled(sources[i], i) if tiled else (self.prepare(sources[i], i),)
            except ImageError as exc:
                if on_error != "skip":
                    raise
                if skipped is not None:
                    skipped.append((i, str(exc)))
                return None

        def shapes(inputs: tuple[np.ndarray, ...]) -> list[tuple[int, ...]]:
            return [a.shape for a in inputs]

        def collect(futures: list) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, ...] | None, int]]:
            done = [(i, f.result()) for i, f in futures]
            kept = [(i, a) for i, a in done if a is not None]
            if not kept:
                yield np.zeros(0, dtype=int), None, len(done)
                return
            start = 0
            for end in range(1, len(kept) + 1):
                if end == len(kept) or shapes(kept[end][1]) != shapes(kept[start][1]):
                    run = kept[start:end]
                    stacked = tuple(np.stack(a) for a in zip(*(a for _, a in run)))
                    yield np.array([i for i, _ in run], dtype=int), stacked, len(done) if start == 0 else 0
                    start = end

        step = self.images_per_batch if tiled else self.batch_size
        with ThreadPoolExecutor(self.workers) as pool:
            pending: deque = deque()
            for start in range(0, len(sources), step):
                stop = min(start + step, len(sources))
                pending.append([(i, pool.submit(work, i)) for i in range(start, stop)])
                if len(pending) > 2:
                    yield from collect(pending.popleft())
            while pending:
                yield from collect(pending.popleft())

    def _tiled_maps(self, map_images: np.ndarray) -> list[np.ndarray]:
        """(B, C, H_l, W_l) stitched feature maps of the map levels of a batch of (B, 3, H, W) map images: their
        tiles (:func:`~gaussad.intake.tiles.tile_boxes`) run through the network ``batch_size`` at a time, whatever the
        image, each tile's maps added to its image's :class:`~gaussad.intake.tiles.Mosaic` as they come."""
        runner, n_pooled = self.runner, len(self.levels)
        height, width = map_images.shape[2:]
        mosaics = [Mosaic(height, width) for _ in map_images]
        jobs = [(i, box) for i in range(len(map_images)) for box in tile_boxes(height, width, self.input_size)]
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            outs = runner.run(np.stack([cut(map_images[i], box) for i, box in chunk]))[n_pooled:]
            for j, (i, box) in enumerate(chunk):
                mosaics[i].add(box, [o[j] for o in outs])
        return [np.stack(level) for level in zip(*(m.result() for m in mosaics))]

    def _run(self, sources: Sequence[ImageSource], progress, on_error: str, skipped: list | None,
             maps: bool = True) -> Iterator[tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]]:
        """Yield (source indices, pooled float64 arrays per level, float32 feature maps per map level); without
        ``maps`` no feature maps (an empty list), and no tiles run: the pooled features alone cost one pass."""
        if on_error not in ON_ERROR:
            raise GaussadError(f"unknown on_error {on_error!r}; choose one of: {', '.join(ON_ERROR)}")
        runner = self.runner
        n_pooled = len(self.levels)
        tiled = maps and self.map_tiles > 1
        for idx, inputs, handled in self._batches(sources, on_error, skipped, tiled):
            if progress is not None:
                progress.update(handled)
            if inputs is None:
                continue
            outs = runner.run(inputs[0])
            fmaps = (self._tiled_maps(inputs[1]) if tiled else list(outs[n_pooled:])) if maps else []
            yield idx, [o.astype(np.float64) for o in outs[:n_pooled]], fmaps

    def iter_features(self, sources: Sequence[ImageSource], progress=None, on_error: str = "fail",
                      skipped: list | None = None) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """Yield (source indices, per-level feature arrays) batch by batch.

        ``on_error="skip"`` drops images that cannot be read, appending ``(index, message)`` to ``skipped``;
        ``"fail"`` raises the first ImageError. ``progress`` is an optional tqdm-like bar.
        """
        for idx, pooled, _ in self._run(sources, progress, on_error, skipped, maps=False):
            yield idx, pooled

    def iter_features_and_maps(self, sources: Sequence[ImageSource], progress=None, on_error: str = "fail",
                               skipped: list | None = None, maps: bool = True
                               ) -> Iterator[tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]]:
        """Like :meth:`iter_features`, plus the spatial feature maps (B, C, H, W) of each map level (``maps=False``:
        an empty list, at the cost of the pooled features alone)."""
        yield from self._run(sources, progress, on_error, skipped, maps)

    def extract(self, sources: Sequence[ImageSource], progress=None, on_error: str = "fail",
                skipped: list | None = None) -> list[np.ndarray]:
        """Features of ``sources`` as one (n_kept, C_l) array per level (all of them unless skipping)."""
        chunks = [feats for _, feats in self.iter_features(sources, progress, on_error, skipped)]
        if not chunks:
            return [np.zeros((0, d)) for d in self.level_dims]
        return [np.concatenate(level) for level in zip(*chunks)]


def auto_settings(images: Sequence[ImageSource], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The values that the ``'auto'`` settings of resolved model ``settings`` take for a fit on ``images`` (only
    those that are 'auto'): ``input_size`` (:func:`auto_input_size`) and then ``map_tiles``
    (:func:`~gaussad.intake.tiles.auto_tiles` at that size; 1 without map levels), both from the median geometric-mean
    side of up to 64 images spread over the list (headers only; an unreadable one is left out here and reported by
    the fit)."""
    auto = [k for k in AUTO_SETTINGS if settings.get(k) == "auto"]
    if not auto:
        return {}
    side = None
    if settings["backbone"] is not None:
        sides = []
        for i, image in enumerate(tiles_sample(images)):
            try:
                sides.append(image_side(image, i, int(settings["max_pixels"])))
            except ImageError:
                continue
        side = float(np.median(sides)) if sides else None
    out: dict[str, Any] = {}
    size = settings["input_size"]
    if size == "auto":
        size = out["input_size"] = auto_input_size(side, settings["backbone"])
    if settings["map_tiles"] == "auto":
        if side is None or not settings["map_levels"]:
            out["map_tiles"] = 1
        else:
            out["map_tiles"] = auto_tiles(side, size or get_spec(settings["backbone"]).input_size)
    return out


def auto_input_size(side: float | None, backbone: str | None) -> int | None:
    """The input size of ``input_size='auto'`` for images of about ``side`` x ``side`` pixels: about
    :data:`~gaussad.intake.AUTO_LARGE_INPUT` x the backbone's native size (a multiple of 32) where ``side`` is at
    least that large, else the native size (None without backbone or readable images)."""
    if backbone is None:
        return None
    native = get_spec(backbone).input_size
    large = 32 * round(AUTO_LARGE_INPUT * native / 32)
    return large if side is not None and side >= large else native


def tiles_sample(images: Sequence[ImageSource]) -> list[ImageSource]:
    """The images whose size decides the 'auto' settings (:func:`auto_settings`): up to 64 spread evenly over the list (its own sample, so
    that a distributed fit can send only these to the worker that decides)."""
    return [images[i] for i in calibration_order(len(images), AUTO_TILES_SAMPLE)[:AUTO_TILES_SAMPLE]]


def normalization_meta(backbone: str | None, normalize: str, resize: str, brightness: str = "keep") -> dict | None:
    """Mean/std, resize and brightness actually applied to the input, as model files describe them (None without
    backbone)."""
    if backbone is None:
        return None
    mean, std = IMAGENET if normalize == "imagenet" else get_spec(backbone).native_normalization
    shape = "square" if resize == "square" else "aspect kept, about S*S pixels, sides multiples of 32"
    light = ("as decoded" if brightness == "keep" else
             f"each resized image scaled to a mean grey (ITU-R 601 luma) of {MATCH_GREY:g}, clipped at 255")
    return {"mean": list(mean), "std": list(std), "resize": f"{shape}, bilinear at pixel centres (cv2 INTER_LINEAR)",
            "brightness": light}


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "img"):
    """A tqdm bar on stderr, or None when progress is off."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def refitting_differences(settings: Mapping[str, Any], layout) -> list[str]:
    """The levels and input size that resolved model ``settings`` ask for where a fitted ``layout`` has others, as
    'name (fitted vs asked)' texts: a fitted model's layout fixes them (:meth:`ExtractorCache.get`), so a
    parameter set anew after the fit would be ignored without a word by ``partial_fit``."""
    spec = get_spec(settings["backbone"])
    pairs = {"levels": (list(layout.levels), resolve_levels(spec.level_names, settings["levels"])),
             "input size": (layout.input_size, settings["input_size"] or spec.input_size)}
    return [f"{name} ({a!r} vs {b!r})" for name, (a, b) in pairs.items() if a != b]


@dataclass(frozen=True)
class ExtractorKey:
    """Everything that shapes an extractor's network and its outputs: a change in any field builds a new one (an
    extractor holds an inference session); batch size, pixel limit and decoder are set on each use instead."""

    backbone: str
    weights: str | None
    levels: tuple[int, ...]
    input_size: int
    normalize: str
    resize: str
    map_levels: tuple[int, ...]
    engine: str
    precision: str
    map_tiles: int
    pool: str
    brightness: str
    adapt: int
    adapt_stop: str

    def build(self, settings: Mapping[str, Any], network: bytes | None,
              adapted: dict[str, np.ndarray] | None = None) -> FeatureExtractor:
        return FeatureExtractor(self.backbone, list(self.levels), self.input_size, self.weights,
                                int(settings["batch_size"]), normalize=self.normalize, map_levels=list(self.map_levels),
                                engine=self.engine, max_pixels=settings["max_pixels"], resize=self.resize,
                                precision=self.precision, network=network, map_tiles=self.map_tiles, pool=self.pool,
                                brightness=self.brightness, adapted=adapted)


class ExtractorCache:
    """One :class:`FeatureExtractor` for a model: rebuilt only when its :class:`ExtractorKey` changes."""

    def __init__(self) -> None:
        self.key: ExtractorKey | None = None
        self.extractor: FeatureExtractor | None = None
        self.auto: dict[str, Any] = {}  # the 'auto' settings as decided for the model's fit

    def decide(self, images: Sequence[ImageSource], settings: Mapping[str, Any]) -> None:
        """Decide the ``'auto'`` settings for a fit of resolved ``settings`` on ``images`` (:func:`auto_settings`)."""
        self.auto = auto_settings(images, settings)

    def get(self, settings: dict, layout=None, network: bytes | None = None,
            adapted: "dict[str, np.ndarray] | None | EllipsisType" = ...) -> FeatureExtractor:
        """The extractor for resolved model ``settings``; a fitted model's ``layout`` fixes levels, input size and
        map tiles (else the ``'auto'`` ones are those of :meth:`decide`), its ``network`` is its int8 graph and
        ``adapted`` its adapted tensors (None: the pretrained network; ``...``: whatever the extractor holds, as
        during a fit, which adapts it)."""
        spec = get_spec(settings["backbone"])
        decided = ({"input_size": layout.input_size, "map_tiles": layout.setting("map_tiles")} if layout
                   else self.auto)
        settings = {**settings, **{k: decided.get(k, "auto") for k in AUTO_SETTINGS if settings[k] == "auto"}}
        if "auto" in (settings["input_size"], settings["map_tiles"]):
            raise GaussadError("input_size and map_tiles 'auto' are decided from the training images when the "
                               "model is fitted: fit it first, or give their values")
        map_levels = settings["map_levels"]
        key = ExtractorKey(
            backbone=settings["backbone"], weights=settings["weights"],
            levels=tuple(layout.levels if layout else resolve_levels(spec.level_names, settings["levels"])),
            input_size=(layout.input_size if layout else settings["input_size"]) or spec.input_size,
            normalize=settings["normalize"], resize=settings["resize"],
            map_levels=tuple(layout.map_levels if layout else
                             resolve_levels(spec.level_names, map_levels) if map_levels else ()),
            engine=settings["engine"], precision=settings.get("precision", "fp32"),
            map_tiles=int(settings["map_tiles"]), pool=layout.setting("pool") if layout else settings["pool"],
            brightness=layout.setting("brightness") if layout else settings["brightness"],
            adapt=layout.setting("adapt") if layout else settings["adapt"],
            adapt_stop=layout.setting("adapt_stop") if layout else settings["adapt_stop"])
        if (self.extractor is None or self.key != key or (network is not None and self.extractor.network != network)
                or (adapted is not ... and self.extractor.adapted is not adapted)):
            self.extractor = key.build(settings, network, None if adapted is ... else adapted)
            self.key = key
        self.extractor.batch_size, self.extractor.max_pixels = int(settings["batch_size"]), int(settings["max_pixels"])
        self.extractor.decoder = settings.get("decoder", "pil")
        return self.extractor
