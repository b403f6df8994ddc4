"""Heat-map overlays that show a defect and explain themselves: the anomaly map coloured on a scale taken from the
model's own good images, nothing tinted below it, with a colour bar, the scale's numbers, the score and the decision
drawn in a panel under the image. One rendering for ``gaussad score --maps``, the service's page and the HTML report.

The scale (:func:`heat_scale`): a map cell is the distance of a location to the nearest normal one in units of the
typical normal distance, so good images' cells are about 1. A fused model keeps the leave-one-image-out map peak of
every training image (``map_calibration``); colour starts above the largest of them, so a new good image
exchangeable with the training images is tinted at all with probability at most 1 / (n + 1) (the conformal argument
of :mod:`gaussad.core.fusion`), and reaches full colour at :data:`FULL_AT` times that level. A model without those peaks
(global-score models, older files) starts at the fixed :data:`FALLBACK_LOW`. EXPERIMENTS.md, "Issue 35: heat maps
scaled to the model's good images", has the choice and its figures on bottle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..core.maps import upsample

FULL_AT = 2.0  # full colour at this multiple of the level where colour starts
FALLBACK_LOW = 2.0  # colour starts here without calibration peaks: twice a normal location's distance (about 1)
# A visible ramp from its first step on (yellow -> orange -> red -> crimson): the lowest heat must show on dark parts.
_STOPS = np.array([[255, 240, 0], [255, 150, 0], [235, 30, 0], [160, 0, 70]], dtype=np.float64)
MIN_WEIGHT, MAX_WEIGHT = 0.45, 0.85  # blend of the heat colour just above the start level, and at full colour
MIN_PANEL_WIDTH = 240  # narrower images are drawn on a canvas this wide, so that the panel's text fits


@dataclass(frozen=True)
class HeatScale:
    """Where colour starts (``low``: map values at or below it are not tinted) and where it is full (``high``), and
    what ``low`` is, in a few words for the colour bar (``source``)."""

    low: float
    high: float
    source: str


def heat_scale(map_calibration: np.ndarray | None) -> HeatScale:
    """The colour scale of a model's heat maps from its training images' leave-one-image-out map peaks (a fused
    model's ``map_calibration_``): colour above their maximum; without peaks (None or empty), above
    :data:`FALLBACK_LOW`."""
    peaks = None if map_calibration is None else np.asarray(map_calibration, dtype=np.float64).ravel()
    if peaks is None or peaks.size == 0 or not np.all(np.isfinite(peaks)):
        return HeatScale(FALLBACK_LOW, FULL_AT * FALLBACK_LOW, "fixed, no good-image peaks")
    low = float(peaks.max())
    return HeatScale(low, FULL_AT * low, f"max of {peaks.size} good images")


def heat_level(amap: np.ndarray, size: tuple[int, int], scale: HeatScale) -> np.ndarray:
    """The map upsampled to ``size`` (width, height) on the colour scale: 0 at ``scale.low``, 1 at ``scale.high``,
    negative (no colour) below; values above ``high`` are kept (the colour saturates)."""
    m = upsample(amap, size)
    return (m - scale.low) / max(scale.high - scale.low, 1e-12)


def heat_weight(level: np.ndarray) -> np.ndarray:
    """Blend weight of the heat colour per pixel of :func:`heat_level`: 0 at and below the start, at least
    :data:`MIN_WEIGHT` just above it (a cell over the good images' level is visible), :data:`MAX_WEIGHT` at full."""
    return np.where(level > 0, MIN_WEIGHT + (MAX_WEIGHT - MIN_WEIGHT) * np.clip(level, 0.0, 1.0), 0.0)


def heat_colors(level: np.ndarray) -> np.ndarray:
    """uint8 RGB of values in [0, 1] (clipped) along the heat ramp."""
    v = np.clip(level, 0.0, 1.0) * (len(_STOPS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_STOPS) - 2)
    t = (v - lo)[..., None]
    return ((1 - t) * _STOPS[lo] + t * _STOPS[lo + 1]).round().astype(np.uint8)


def blend(image: Image.Image, amap: np.ndarray, scale: HeatScale) -> Image.Image:
    """The image (RGB) with the heat colour blended over every pixel above the scale's start, at its own size."""
    rgb = image.convert("RGB")
    level = heat_level(amap, rgb.size, scale)
    weight = heat_weight(level)[..., None]
    base = np.asarray(rgb, dtype=np.float64)
    return Image.fromarray((base * (1 - weight) + heat_colors(level) * weight).round().astype(np.uint8))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size)


def _panel(width: int, scale: HeatScale, score: float | None, anomalous: bool | None) -> Image.Image:
    """The legend under an overlay: the decision and score, the colour bar from ``low`` to ``high`` with both
    numbers, and what ``low`` is."""
    fs = max(11, round(width / 36))
    pad = fs // 2
    line = round(fs * 1.35)
    panel = Image.new("RGB", (width, pad + 3 * line + pad), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    font = _font(fs)
    x, y = pad, pad
    if anomalous is not None:
        label = "ANOMALY" if anomalous else "ok"
        box = draw.textbbox((x + pad, y), label, font=font)
        draw.rectangle((x, y - 1, box[2] + pad, y + line - 2), fill=(214, 40, 40) if anomalous else (43, 147, 72))
        draw.text((x + pad, y), label, fill=(255, 255, 255), font=font)
        x = box[2] + 2 * pad
    if score is not None:
        draw.text((x, y), f"score {score:.3f}", fill=(29, 35, 41), font=font)
    y += line
    left, right = f"{scale.low:.2f}", f"{scale.high:.2f}+"
    x0 = pad + draw.textlength(left, font=font) + pad
    x1 = width - pad - draw.textlength(right, font=font) - pad
    draw.text((pad, y), left, fill=(29, 35, 41), font=font)
    draw.text((x1 + pad, y), right, fill=(29, 35, 41), font=font)
    if x1 > x0:
        ramp = heat_colors(np.linspace(0.0, 1.0, int(x1 - x0)))
        bar = Image.fromarray(np.repeat(ramp[None], line - pad, axis=0))
        panel.paste(bar, (int(x0), y + pad // 2))
    y += line
    draw.text((pad, y), f"no colour up to {scale.low:.2f}: {scale.source}", fill=(75, 85, 96), font=font)
    return panel


def render(image: Image.Image, amap: np.ndarray, scale: HeatScale, score: float | None = None,
           anomalous: bool | None = None) -> Image.Image:
    """The heat-map overlay of one image: :func:`blend` at the image's size, and under it the legend panel (decision,
    score, colour bar with its scale). An image narrower than :data:`MIN_PANEL_WIDTH` is centred on a canvas that
    wide."""
    top = blend(image, amap, scale)
    width = max(top.width, MIN_PANEL_WIDTH)
    panel = _panel(width, scale, score, anomalous)
    out = Image.new("RGB", (width, top.height + panel.height), (255, 255, 255))
    out.paste(top, ((width - top.width) // 2, 0))
    out.paste(panel, (0, top.height))
    return out
