"""What a fit on some images uses, decided once: every parameter's value with the preset's choices filled in and
the ``'auto'`` settings (``input_size``, ``map_tiles``) decided from the images' sizes (:func:`resolve`); the
feature extractor of such settings (:func:`extractor`) and the features it gives (:func:`features`).

``fit`` decides through its extractor cache (:meth:`~gaussad.intake.features.ExtractorCache.decide`, the same
:func:`~gaussad.intake.features.auto_settings`); ``evaluate``, ``tune`` and the Dask fit decide here, so that all
four decide alike, and take their features from an extractor without building a model for it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..intake.features import ExtractorCache, FeatureExtractor, auto_settings, progress_bar
from ..intake.images import ImageSource
from . import params


def resolve(settings: Mapping[str, Any], images: Sequence[ImageSource] | None = None) -> dict[str, Any]:
    """Every parameter's value in use (defaults for those not given, the preset's choices filled in) and, with
    ``images``, the ``'auto'`` ones as a fit on ``images`` decides them (from a sample of their headers)."""
    out = params.resolved({**params.defaults(), **settings})
    if images is not None:
        out.update(auto_settings(images, out))
    return out


def extractor(settings: Mapping[str, Any], cache: ExtractorCache | None = None) -> FeatureExtractor:
    """The feature extractor of :func:`resolve`'d ``settings`` (the one ``cache`` holds when its settings shape
    the same extractor)."""
    for name in ("batch_size", "max_pixels", "engine", "decoder", "precision"):
        params.check_value(name, settings[name])
    params.check_precision(settings)
    return (cache if cache is not None else ExtractorCache()).get(dict(settings))


def features(extracting: FeatureExtractor, images: Sequence[ImageSource], desc: str, with_maps: bool,
             verbose: bool = False) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Pooled features of ``images`` (one (n, C_l) array per level) and, with ``with_maps``, their raw feature maps
    (per image, one (C, H, W) array per map level: sizes differ between images with the aspect-kept resize), in one
    pass, with a progress bar when ``verbose``."""
    pooled, fmaps = [], []
    bar = progress_bar(len(images), desc, verbose)
    try:
        for _, batch, fm in extracting.iter_features_and_maps(list(images), bar, "fail", None, with_maps):
            pooled.append(batch)
            if with_maps:
                fmaps.extend(list(image) for image in zip(*fm))
    finally:
        if bar is not None:
            bar.close()
    return [np.concatenate(p) for p in zip(*pooled)], fmaps
