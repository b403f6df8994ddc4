"""The whole detector as one ONNX graph: uint8 images (N, H, W, 3) -> image score, per-level distances, p-value and
decision under the model's own rule, for use without Python, torch or gaussad (``gaussad export``).

The graph is the feature network (as :mod:`gaussad.intake.engine` exports it) with the preprocessing before it and the
Gaussians and the decision rule after it, all as constants: resize as :func:`gaussad.intake.images.resize_to` (PIL's bilinear
transform at pixel centres replayed in float64 and truncated to 8 bit as PIL does: the same pixels; square, or
aspect-kept with the size computed in the graph),
normalisation, Mahalanobis distances through the inverse Cholesky factor (float64), chi-square p-values in closed
form (float64; the odd-dimension case through a 1.2e-7-accurate erfc) or conformal p-values against the embedded
calibration scores. What is left to the caller: decoding, EXIF orientation and conversion to RGB (PIL's draft-mode
JPEG decoding of large JPEGs too), maps of the ``gaussian`` map method (``nearest`` maps are exported with
``maps=True``), and the Hotelling p-value (the F law has no closed form here).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.linalg
from scipy.special import gammaln

from ..core import fusion
from ..version import __version__
from ..detector.decision import RANKING, DecisionRule
from ..errors import GaussadError
from ..intake import LUMA, MATCH_GREY
from ..intake.images import ASPECT_STEP
from ..detector.state import DetectorState

OPSET = 17
# What the graph does not do, shown by ``gaussad export`` and stored in the graph's metadata.
LIMITS = ("the graph takes decoded 8-bit RGB pixels: decoding, EXIF orientation and conversion of other modes to RGB "
          "are the caller's (gaussad also decodes JPEGs of at least twice the input size at reduced scale, PIL's "
          "draft mode; give such JPEGs decoded in full and the scores differ slightly)")
NO_MAPS = "anomaly maps are not part of the graph: export with --maps to add them"
# The name of the node that refuses an image without pixels (H or W 0): ONNX Runtime's error message quotes it.
EMPTY_IMAGE = "gaussad_refuses_an_image_without_pixels_height_and_width_must_be_at_least_1"


def _erfc_log(b, z: str) -> str:
    """log erfc(z) for z >= 0 (Numerical Recipes' erfcc, fractional error below 1.2e-7 everywhere)."""
    coeffs = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
              -0.82215223, 0.17087277)
    t = b.op("Reciprocal", b.op("Add", b.const(1.0), b.op("Mul", b.const(0.5), z)))
    acc = b.const(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = b.op("Add", b.const(c), b.op("Mul", t, acc))
    return b.op("Add", b.op("Log", t), b.op("Sub", acc, b.op("Mul", z, z)))


def _chi2_log_sf(b, sq: str, dof: int) -> str:
    """log P(chi2_dof > sq) for (N, 1) float64 squared distances, by the finite series of integer degrees of freedom."""
    y = b.op("Max", b.op("Mul", sq, b.const(0.5)), b.const(1e-300))
    logy = b.op("Log", y)
    if dof % 2 == 0:
        j = np.arange(dof // 2, dtype=np.float64)
        terms = [b.op("Sub", b.op("Sub", b.op("Mul", logy, b.const(j[None, :])), b.const(gammaln(j + 1)[None, :])), y)]
    else:
        terms = [_erfc_log(b, b.op("Sqrt", y))]
        if dof > 1:
            j = np.arange((dof - 1) // 2, dtype=np.float64) + 0.5
            terms.append(b.op("Sub", b.op("Sub", b.op("Mul", logy, b.const(j[None, :])),
                                          b.const(gammaln(j + 1)[None, :])), y))
    logt = b.op("Concat", *terms, axis=1) if len(terms) > 1 else terms[0]
    top = b.op("ReduceMax", logt, axes=[1], keepdims=1)
    total = b.op("ReduceSum", b.op("Exp", b.op("Sub", logt, top)), b.const(np.array([1], np.int64)), keepdims=1)
    return b.op("Add", top, b.op("Log", total))


class _Builder:
    """Appends nodes and constants to an ONNX graph under fresh names."""

    def __init__(self, graph, prefix: str = "gaussad_"):
        self.graph, self.prefix, self.count = graph, prefix, 0

    def name(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count}"

    def const(self, value, dtype=np.float64) -> str:
        from onnx import numpy_helper

        arr = np.asarray(value, dtype=dtype if not isinstance(value, np.ndarray) else value.dtype)
        name = self.name()
        self.graph.initializer.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, kind: str, *inputs: str, out: str | None = None, name: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = out or self.name()
        self.graph.node.append(helper.make_node(kind, list(inputs), [out], name=name or self.name(), **attrs))
        return out


def _whitening(g) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(components, inverse-Cholesky transpose, scale) of a level Gaussian: z = ((x - mean) @ V) @ W or / scale."""
    winv = None
    if g.chol is not None:
        winv = scipy.linalg.solve_triangular(g.chol, np.eye(g.chol.shape[0]), lower=True).T.copy()
    return g.components, winv, g.scale


def _axis(b, n_in: str, n_out: str) -> tuple[str, str, str]:
    """Source indices (clamped) and weights of PIL's bilinear transform along one axis, in float64 as PIL computes
    them: source coordinate (n_in / n_out) * (i + 0.5) - 0.5 for output pixel i."""
    from onnx import TensorProto

    i = b.op("Cast", b.op("Range", b.const(np.array(0, np.int64)), b.op("Cast", n_out, to=TensorProto.INT64),
                          b.const(np.array(1, np.int64))), to=TensorProto.DOUBLE)
    c = b.op("Sub", b.op("Mul", b.op("Div", n_in, n_out), b.op("Add", i, b.const(0.5))), b.const(0.5))
    lo = b.op("Floor", c)
    frac = b.op("Sub", c, lo)
    top = b.op("Sub", n_in, b.const(1.0))
    clamp = lambda t: b.op("Cast", b.op("Min", b.op("Max", t, b.const(0.0)), top), to=TensorProto.INT64)  # noqa: E731
    return clamp(lo), clamp(b.op("Add", lo, b.const(1.0))), frac


def _lerp(b, x: str, i0: str, i1: str, w: str, axis: int) -> str:
    """PIL's ``a + (b - a) * w`` between the entries i0 and i1 of ``x`` along ``axis``."""
    lo = b.op("Gather", x, i0, axis=axis)
    return b.op("Add", lo, b.op("Mul", b.op("Sub", b.op("Gather", x, i1, axis=axis), lo), w))


def _preprocess(b, image: str, size: int, resize: str, normalization, brightness: str) -> str:
    """uint8 (N, H, W, 3) -> the normalised float32 network input (N, 3, H', W'), the brightness matched as
    :func:`gaussad.intake.images.match_brightness` does with ``brightness='match'``.

    The resize is PIL's affine bilinear transform (:func:`gaussad.core.maps.resize_bilinear`) replayed in float64 with
    its truncation to 8 bit: the same pixels, not merely close ones.
    """
    from onnx import TensorProto

    x = b.op("Cast", image, to=TensorProto.DOUBLE)
    shape = b.op("Cast", b.op("Shape", x), to=TensorProto.DOUBLE)
    pick = lambda k: b.op("Gather", shape, b.const(np.array(k, np.int64)))  # noqa: E731  (a scalar)
    h, w = pick(1), pick(2)
    # An image without pixels fails here, in a node whose name ONNX Runtime's error quotes (it would fail later in
    # a Gather of the resize, with nothing to say why): index 1 - min(H, W, 1) into a one-element constant.
    empty = b.op("Cast", b.op("Sub", b.const(1.0), b.op("Min", h, w, b.const(1.0))), to=TensorProto.INT64)
    zero = b.op("Gather", b.const(np.zeros(1)), empty, name=EMPTY_IMAGE)
    h, w = b.op("Add", h, zero), b.op("Add", w, zero)  # so that every later node runs after the check
    if resize == "square":
        out_h = out_w = b.const(float(size))
    else:  # aspect_size: round(side * S / sqrt(w h) / 32) clipped to 1..8S/32, times 32, in float64 as Python does
        k = b.op("Div", b.const(float(size)), b.op("Sqrt", b.op("Mul", w, h)))
        side = lambda v: b.op("Mul", b.op("Min", b.op("Max", b.op("Round", b.op("Div", b.op("Mul", v, k),  # noqa: E731
                                                                                        b.const(float(ASPECT_STEP)))),
                                                              b.const(1.0)), b.const(float(8 * size // ASPECT_STEP))),
                               b.const(float(ASPECT_STEP)))
        out_h, out_w = side(h), side(w)
    y0, y1, dy = _axis(b, h, out_h)
    x0, x1, dx = _axis(b, w, out_w)
    # PIL interpolates each row along x first, then between the two rows: same order of operations here.
    wx = b.op("Unsqueeze", dx, b.const(np.array([0, 1, 3], np.int64)))
    top = _lerp(b, b.op("Gather", x, y0, axis=1), x0, x1, wx, axis=2)
    bottom = _lerp(b, b.op("Gather", x, y1, axis=1), x0, x1, wx, axis=2)
    wy = b.op("Unsqueeze", dy, b.const(np.array([0, 2, 3], np.int64)))
    value = b.op("Add", top, b.op("Mul", b.op("Sub", bottom, top), wy))
    pixels = b.op("Transpose", b.op("Cast", b.op("Floor", value), to=TensorProto.FLOAT), perm=[0, 3, 1, 2])
    if brightness == "match":  # as match_brightness: exact channel sums in float64, the factor rounded once
        sums = b.op("ReduceSum", b.op("Cast", pixels, to=TensorProto.DOUBLE), b.const(np.array([2, 3], np.int64)),
                    keepdims=1)
        grey = b.op("Div", b.op("ReduceSum", b.op("Mul", sums, b.const(np.asarray(LUMA).reshape(1, 3, 1, 1))),
                                b.const(np.array([1], np.int64)), keepdims=1), b.op("Mul", out_h, out_w))
        gain = b.op("Cast", b.op("Div", b.const(MATCH_GREY), b.op("Max", grey, b.const(1.0))), to=TensorProto.FLOAT)
        pixels = b.op("Min", b.op("Mul", pixels, gain), b.const(255.0, np.float32))
    mean, std = (np.asarray(v, np.float32) for v in normalization)
    scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(1, 3, 1, 1)
    shift = (-mean / std).astype(np.float32).reshape(1, 3, 1, 1)
    return b.op("Add", b.op("Mul", pixels, b.const(scale)), b.const(shift))


def _distances(b, state: DetectorState, features: list[str]) -> list[str]:
    """Per level (N, 1) float64 Mahalanobis distances of the (N, D_l) float32 pooled features."""
    from onnx import TensorProto

    out = []
    for g, f in zip(state.gaussians, features):
        comps, winv, scale = _whitening(g)
        diff = b.op("Sub", b.op("Cast", f, to=TensorProto.DOUBLE), b.const(g.mean[None, :]))
        if comps is not None:
            diff = b.op("MatMul", diff, b.const(comps))
        z = b.op("MatMul", diff, b.const(winv)) if winv is not None else b.op("Div", diff, b.const(scale[None, :]))
        sq = b.op("ReduceSum", b.op("Mul", z, z), b.const(np.array([1], np.int64)), keepdims=1)
        out.append(b.op("Sqrt", sq))
    return out


def _decision(b, state: DetectorState, rule: DecisionRule, levels: str, per_level: list[str],
              score: str) -> tuple[str, str]:
    """(anomalous int64 (N,), p-value float64 (N,)) under ``rule``."""
    from onnx import TensorProto

    flat = lambda t: b.op("Squeeze", t, b.const(np.array([1], np.int64)))  # noqa: E731
    if rule.method == "conformal":
        limit = rule.score_threshold(state)
        pvalue = _conformal_pvalue(b, score, state.calibration_scores)
        flagged = b.op("Greater", score, b.const(limit if math.isfinite(limit) else np.inf))
        return b.op("Cast", flagged, to=TensorProto.INT64), pvalue
    n_levels = len(state.dofs)
    thresholds = rule.level_thresholds(state, rule.fpr / n_levels)
    over = b.op("Cast", b.op("Greater", levels, b.const(thresholds[None, :])), to=TensorProto.DOUBLE)
    flagged = b.op("Cast", b.op("ReduceMax", over, axes=[1], keepdims=0), to=TensorProto.INT64)
    logs = [_chi2_log_sf(b, b.op("Mul", d, d), k) for d, k in zip(per_level, state.dofs)]
    lowest = b.op("ReduceMin", b.op("Concat", *logs, axis=1), axes=[1], keepdims=1)
    pvalue = b.op("Min", b.op("Mul", b.op("Exp", lowest), b.const(float(n_levels))), b.const(1.0))
    return flagged, flat(pvalue)


def _conformal_pvalue(b, x: str, calibration: np.ndarray) -> str:
    """(N,) exact conformal p-values of (N,) float64 scores: (1 + #{calibration >= x}) / (n + 1)."""
    from onnx import TensorProto

    cal = np.asarray(calibration, np.float64)
    at_least = b.op("Cast", b.op("LessOrEqual", b.op("Unsqueeze", x, b.const(np.array([1], np.int64))),
                                 b.const(cal[None, :])), to=TensorProto.DOUBLE)
    count = b.op("ReduceSum", at_least, b.const(np.array([1], np.int64)), keepdims=0)
    return b.op("Div", b.op("Add", count, b.const(1.0)), b.const(cal.size + 1.0))


def _fisher_pvalue(b, evidence: list[str], calibrations: list[np.ndarray]) -> str:
    """(N,) :func:`gaussad.core.fusion.fisher_pvalue` of (N,) float64 pieces of evidence against their paired
    calibrations: rank counts as doubles (exact integers), their products compared, as the Python path does."""
    from onnx import TensorProto

    cals = [np.asarray(c, np.float64).ravel() for c in calibrations]
    n = cals[0].size
    if any(c.size != n for c in cals) or float(n + 1) ** len(cals) >= 2.0 ** 53:
        raise GaussadError(f"the fused score's calibrations must be paired and at most 2^26 values to be exported; "
                           f"got sizes {[c.size for c in cals]}")
    axis = b.const(np.array([1], np.int64))
    image = others = None
    for e, c in zip(evidence, cals):
        column = b.op("Unsqueeze", e, axis)  # (N, 1)
        at_least = b.op("Cast", b.op("LessOrEqual", column, b.const(c[None, :])), to=TensorProto.DOUBLE)
        count = b.op("Add", b.op("ReduceSum", at_least, axis, keepdims=0), b.const(1.0))  # 1 + #{c >= e}
        own = fusion.calibration_ranks(c).astype(np.float64)
        below = b.op("Cast", b.op("GreaterOrEqual", column, b.const(c[None, :])), to=TensorProto.DOUBLE)
        rank = b.op("Add", below, b.const(own[None, :]))  # (N, n)
        image = count if image is None else b.op("Mul", image, count)
        others = rank if others is None else b.op("Mul", others, rank)
    within = b.op("Cast", b.op("LessOrEqual", others, b.op("Unsqueeze", image, axis)), to=TensorProto.DOUBLE)
    return b.op("Div", b.op("Add", b.op("ReduceSum", within, axis, keepdims=0), b.const(1.0)), b.const(n + 1.0))


def _smooth_pvalue(b, x: str, calibration: np.ndarray) -> str:
    """(N,) :func:`gaussad.core.fusion.smooth_pvalues` of (N,) float64 scores: the rank interpolated between the sorted
    calibration scores (k = #{c <= x}, between c[k-1] and c[k]), 1 at and below the smallest, the exponential tail
    beyond the largest."""
    from onnx import TensorProto

    c = fusion.sorted_calibration(calibration)
    n = c.size
    if n < 2:
        raise GaussadError("the fused score needs at least 2 calibration scores per piece of evidence to be exported")
    below = b.op("Cast", b.op("LessOrEqual", b.const(c[None, :]), b.op("Unsqueeze", x, b.const(np.array([1], np.int64)))),
                 to=TensorProto.DOUBLE)
    k = b.op("Clip", b.op("ReduceSum", below, b.const(np.array([1], np.int64)), keepdims=0), b.const(1.0),
             b.const(float(n - 1)))
    ki = b.op("Cast", k, to=TensorProto.INT64)
    lo = b.op("Gather", b.const(c), b.op("Sub", ki, b.const(np.array(1, np.int64))))
    hi = b.op("Gather", b.const(c), ki)
    step = b.op("Sub", hi, lo)
    frac = b.op("Where", b.op("Greater", step, b.const(0.0)),
                b.op("Div", b.op("Sub", x, lo), b.op("Max", step, b.const(1e-300))), b.const(1.0))
    mid = b.op("Div", b.op("Sub", b.const(n + 1.0), b.op("Add", k, frac)), b.const(n + 1.0))
    tail = b.op("Div", b.op("Exp", b.op("Div", b.op("Sub", b.const(float(c[-1])), x), b.const(fusion.tail_scale(c)))),
                b.const(n + 1.0))
    return b.op("Where", b.op("LessOrEqual", x, b.const(float(c[0]))), b.const(1.0),
                b.op("Where", b.op("Greater", x, b.const(float(c[-1]))), tail, mid))


def _fused(b, state: DetectorState, rule: DecisionRule, score: str, peak: str) -> tuple[str, str, str]:
    """(fused score, anomalous int64, p-value) of a fused image score (:func:`gaussad.core.fusion.fused`): -log10 of the
    ranking combination of smoothed p-values (Fisher's for two p-values in closed form: P (1 - ln P), P their
    product), and the full-conformal Fisher p-value, flagged at most the FPR."""
    from onnx import TensorProto

    cals, evidence = [state.calibration_scores, state.map_calibration], [score, peak]
    pvalue = _fisher_pvalue(b, evidence, cals)
    smooth = [b.op("Max", _smooth_pvalue(b, e, c), b.const(1e-300)) for e, c in zip(evidence, cals)]
    if RANKING == "fisher":
        log_product = b.op("Add", b.op("Log", smooth[0]), b.op("Log", smooth[1]))
        combined = b.op("Mul", b.op("Exp", log_product), b.op("Sub", b.const(1.0), log_product))
    else:
        combined = b.op("Min", b.op("Mul", b.op("Min", *smooth), b.const(2.0)), b.const(1.0))
    clipped = b.op("Clip", combined, b.const(1e-300), b.const(1.0))
    fused = b.op("Div", b.op("Log", clipped), b.const(-math.log(10.0)))
    flagged = b.op("Cast", b.op("LessOrEqual", pvalue, b.const(rule.target_fpr(state))), to=TensorProto.INT64)
    return fused, flagged, pvalue


def _grid_kernels(extractor, layout) -> list[int]:
    """Per map level the block size that averages it down to the coarsest map level's grid (1 on that grid), from
    the network's map shapes at the input it sees (the square input size, or with the aspect-keeping resize a
    square image's input, whose sides are multiples of 32 like every aspect-kept input's: Lite1's native 240 px is
    256 there); refused where the grids do not divide evenly."""
    import torch

    from ..intake.images import aspect_size

    size = layout.input_size
    side = size if extractor.resize == "square" else aspect_size(size, size, size)[0]
    with torch.inference_mode():
        shapes = [tuple(o.shape[2:]) for o in extractor.module(torch.zeros(1, 3, side, side))[len(layout.levels):]]
    h, w = min(s[0] for s in shapes), min(s[1] for s in shapes)
    if any(a % h or b % w or a // h != b // w for a, b in shapes):
        raise GaussadError(f"--maps: the feature maps at input size {size} do not average evenly onto the "
                           f"coarsest map grid (shapes {shapes}); maps export needs an input size that is a "
                           "multiple of 32 (or --resize aspect, which makes every input one)")
    return [a // h for a, _ in shapes]


def _maps(b, state: DetectorState, kernels: list[int], fmaps: list[str], size: int) -> tuple[str, str]:
    """(N, size, size) float32 anomaly maps as :meth:`DetectorState.anomaly_maps` makes them, and their (N,) float64
    peaks on the grid (:meth:`DetectorState.map_peaks`) (nearest method):
    location vectors averaged over pool x pool neighbourhoods (border locations over fewer) and down to the coarsest
    grid, nearest bank member distance / bank scale, mean over levels, upsampled as PIL does (float64, no rounding)."""
    from onnx import TensorProto

    pool = state.map_pool
    per_level = []
    for bank, k, f in zip(state.map_banks, kernels, fmaps):
        if pool > 1:
            f = b.op("AveragePool", f, kernel_shape=[pool, pool], pads=[pool // 2] * 4, count_include_pad=0)
        if k > 1:
            f = b.op("AveragePool", f, kernel_shape=[k, k], strides=[k, k])
        q = b.op("Transpose", f, perm=[0, 2, 3, 1])  # (N, h, w, C)
        members = np.ascontiguousarray(bank.vectors, dtype=np.float32)
        g = b.op("Add", b.op("MatMul", q, b.const(np.ascontiguousarray(members.T * np.float32(-2.0)))),
                 b.const(np.einsum("ij,ij->i", members, members)))
        axis = b.const(np.array([-1], np.int64))
        sq = b.op("Add", b.op("ReduceMin", g, axes=[-1], keepdims=0),
                  b.op("ReduceSum", b.op("Mul", q, q), axis, keepdims=0))
        d = b.op("Sqrt", b.op("Max", sq, b.const(0.0, np.float32)))
        per_level.append(b.op("Div", d, b.const(np.float32(bank.scale), np.float32)))
    mean = per_level[0]
    if len(per_level) > 1:
        stacked = b.op("Concat", *[b.op("Unsqueeze", m, b.const(np.array([0], np.int64))) for m in per_level], axis=0)
        mean = b.op("ReduceMean", stacked, axes=[0], keepdims=0)
    x = b.op("Cast", mean, to=TensorProto.DOUBLE)
    peak = b.op("ReduceMax", x, axes=[1, 2], keepdims=0)
    shape = b.op("Cast", b.op("Shape", x), to=TensorProto.DOUBLE)
    pick = lambda i: b.op("Gather", shape, b.const(np.array(i, np.int64)))  # noqa: E731
    out = b.const(float(size))
    y0, y1, dy = _axis(b, pick(1), out)
    x0, x1, dx = _axis(b, pick(2), out)
    wx = b.op("Unsqueeze", dx, b.const(np.array([0, 1], np.int64)))
    top = _lerp(b, b.op("Gather", x, y0, axis=1), x0, x1, wx, axis=2)
    bottom = _lerp(b, b.op("Gather", x, y1, axis=1), x0, x1, wx, axis=2)
    wy = b.op("Unsqueeze", dy, b.const(np.array([0, 2], np.int64)))
    return b.op("Cast", b.op("Add", top, b.op("Mul", b.op("Sub", bottom, top), wy)), to=TensorProto.FLOAT), peak


def export_detector(model, maps: bool = False) -> tuple[bytes, list[str]]:
    """The serialised ONNX graph of a fitted image model and the notes on what it leaves out.

    ``model`` is a fitted :class:`gaussad.GaussianAD` with a backbone; its own decision rule (method and FPR) is
    embedded. Outputs: ``score`` (N,), ``levels`` (N, L), ``pvalue`` (N,) float64 and ``anomalous`` (N,) int64; with
    ``maps`` (nearest-neighbour map models) also ``map`` (N, S, S) float32, as :meth:`GaussianAD.anomaly_map`. A
    fused image score (the default preset's) gives its own score, p-value and decision at the target FPR it decides
    at, with its calibration scores as constants (:func:`_fused`); its graph always has the map, whose peak it needs.
    """
    import onnx
    from onnx import TensorProto, helper

    from ..intake.engine import export_onnx

    state: DetectorState = model.state_
    rule = model.rule()
    maps = maps or rule.fused  # a fused image score needs the map peak: its graph always computes the map
    _check_exportable(model, state, rule, maps)
    rule.check(state, "cannot export: ")
    extractor = model.feature_extractor()
    layout = state.layout
    kernels = _grid_kernels(extractor, layout) if maps else []
    # An int8 model's network is the quantized graph its model file carries (the one `score` runs); else the
    # backbone exported as the engine exports it.
    net = onnx.load_from_string(state.network if state.network is not None else
                                export_onnx(extractor.module, extractor.input_size, any_size=extractor.resize == "aspect"))
    del net.metadata_props[:]  # the cache key an engine graph carries; the detector's own metadata follows
    graph = net.graph
    pooled = [o.name for o in graph.output][:len(layout.levels)]
    fmaps = [o.name for o in graph.output][len(layout.levels):]
    old_input = graph.input[0].name
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", "height", "width", 3]))
    b = _Builder(graph)
    # The network's nodes read the old input: the preprocessing must come first in topological order.
    body = list(graph.node)
    del graph.node[:]
    b.op("Identity", _preprocess(b, "image", layout.input_size, extractor.resize, extractor.normalization,
                                 extractor.brightness), out=old_input)
    graph.node.extend(body)
    per_level = _distances(b, state, pooled)
    levels = b.op("Concat", *per_level, axis=1, out="levels")
    score = b.op("ReduceMean", levels, axes=[1], keepdims=0, out="score" if not rule.fused else None)
    if maps:
        amap, peak = _maps(b, state, kernels, fmaps, layout.input_size)
        b.op("Identity", amap, out="map")
    if rule.fused:
        fused, flagged, pvalue = _fused(b, state, rule, score, peak)
        b.op("Identity", fused, out="score")
    else:
        flagged, pvalue = _decision(b, state, rule, levels, per_level, score)
    b.op("Identity", flagged, out="anomalous")
    b.op("Identity", pvalue, out="pvalue")
    del graph.output[:]
    n_levels = len(layout.levels)
    graph.output.extend([
        helper.make_tensor_value_info("score", TensorProto.DOUBLE, ["batch"]),
        helper.make_tensor_value_info("levels", TensorProto.DOUBLE, ["batch", n_levels]),
        helper.make_tensor_value_info("pvalue", TensorProto.DOUBLE, ["batch"]),
        helper.make_tensor_value_info("anomalous", TensorProto.INT64, ["batch"]),
    ] + ([helper.make_tensor_value_info("map", TensorProto.FLOAT, ["batch", layout.input_size, layout.input_size])]
         if maps else []))
    notes = [LIMITS, NO_MAPS] if state.has_maps and not maps else [LIMITS]
    meta = _metadata(model, state, rule, extractor, maps, notes)
    for key, value in meta.items():
        net.metadata_props.add(key=key, value=value)
    net.producer_name = "gaussad"
    net.producer_version = __version__
    onnx.checker.check_model(net)
    return net.SerializeToString(), notes


def _check_exportable(model, state: DetectorState, rule: DecisionRule, maps: bool) -> None:
    """Refuse, naming the reason and the way out, what the graph cannot express."""
    if model.backbone is None:
        raise GaussadError("this model works on plain feature arrays (backbone=None): there is no network to export")
    if maps and not state.has_maps:
        raise GaussadError("--maps: this model has no anomaly maps (fit it with --preset recommended or --map-levels)")
    if maps and not state.map_banks:
        raise GaussadError("--maps: only nearest-neighbour maps (--map-method nearest, the recommended preset's) can be "
                           "exported; export without --maps")
    if maps and model.map_tiles_ > 1:
        raise GaussadError(f"--maps: this model's maps are tiled (map_tiles={model.map_tiles_}"
                           f"{' decided by auto' if model.setting('map_tiles') == 'auto' else ''}) and the graph does "
                           "not tile; export without --maps, or fit with --map-tiles 1 (or --preset fast)")
    if maps and state.map_grid != "coarsest":
        raise GaussadError("--maps: only maps on the coarsest grid (--map-grid coarsest, every preset's) can be "
                           "exported so far; export without --maps")
    if rule.method == "hotelling":
        raise GaussadError("the Hotelling p-value (F law) cannot be expressed in the graph: export a chi2 or conformal "
                           "model (refit with --threshold chi2 or conformal)")


def _metadata(model, state: DetectorState, rule: DecisionRule, extractor, maps: bool, notes: list[str]) -> dict[str, str]:
    """The graph's metadata: the model's settings, its decision rule and what the graph leaves out."""
    layout = state.layout
    limit = math.nan if rule.fused else rule.score_threshold(state)
    return {
        "gaussad.version": __version__, "gaussad.preset": str(model.setting("preset")),
        "gaussad.backbone": str(model.backbone), "gaussad.levels": ",".join(layout.level_names),
        "gaussad.input_size": str(layout.input_size), "gaussad.resize": extractor.resize,
        "gaussad.brightness": extractor.brightness,
        # the network's weights: pretrained, or fine-tuned at fit (adapt; the epoch kept, 0 = the pretrained network)
        "gaussad.adapt": ("none" if state.adaptation is None else
                          f"{state.adaptation['kept_epoch']} of {state.adaptation['epochs']} epochs"),
        "gaussad.normalize": str(model.setting("normalize")), "gaussad.threshold": rule.method,
        "gaussad.fpr": repr(rule.target_fpr(state)),
        "gaussad.image_score": rule.image_score,
        "gaussad.score_threshold": repr(float(limit)), "gaussad.n_samples": str(state.n_samples),
        "gaussad.n_calibration": str(0 if state.calibration_scores is None else state.calibration_scores.size),
        "gaussad.outputs": "score (N,) float64, levels (N, L) float64, pvalue (N,) float64, anomalous (N,) int64"
                           + (f", map (N, {layout.input_size}, {layout.input_size}) float32" if maps else ""),
        "gaussad.limits": " ".join(notes),
        "gaussad.precision": "fp32" if state.network is None else f"int8 {state.int8_format}",
    }
