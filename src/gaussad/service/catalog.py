"""The served models: loading a folder of model files, and what ``GET /models`` says about each (its settings, how
it decides at the service's FPR, its calibration; from the inference pipeline, which holds the decision rules)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..detector import inference, params
from ..detector.heatmap import heat_scale
from ..detector.model import GaussianAD, load
from ..errors import DataError
from ..intake.engine import int8_summary

log = logging.getLogger(__name__)

MODEL_SUFFIX = ".gaussad"


def load_models(folder: str | os.PathLike) -> dict[str, GaussianAD]:
    """Every ``*.gaussad`` file of ``folder`` by file stem; a file that fails to load is logged and skipped."""
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix == MODEL_SUFFIX and not p.is_dir())
    if not files:
        raise DataError(f"{path}: no model files (*{MODEL_SUFFIX}) found")
    models: dict[str, GaussianAD] = {}
    for file in files:
        try:
            model = load(file)
            # Scoring one blank image builds the backbone now: it is shared by the worker threads from the first
            # request on, and a model whose backbone cannot be built (e.g. a missing weights file) is found here.
            model.level_scores([np.zeros((8, 8, 3), np.uint8)])
        except Exception as exc:  # noqa: BLE001 - any failure skips this one file, as documented
            message = str(exc)
            log.warning("skipping a model file: %s", message if str(file) in message else f"{file}: {message}")
            continue
        models[file.stem] = model
    if not models:
        raise DataError(f"{path}: none of the {len(files)} model files could be loaded (see the warnings above)")
    return models


def model_info(name: str, model: GaussianAD, fpr: float) -> dict:
    """What ``GET /models`` says about one model: its settings as every report shows them (the parameter table's
    :func:`~gaussad.detector.params.reported`, the learned ones as fitted), how it decides at the service's ``fpr``
    and its calibration."""
    fitted = {"input_size": model.input_size_, "levels": list(model.level_names_),
              "map_levels": list(model.map_level_names_), "map_tiles": model.map_tiles_,
              "pool": model.state_.layout.setting("pool")}
    return {"name": name, **params.reported(model.get_params(), fitted), "n_samples": int(model.n_samples_),
            "maps": model.has_maps,
            "int8": None if model.state_.network is None else int8_summary(model.state_.int8_format, model.state_.int8_isa),
            "adaptation": model.state_.adaptation_brief(),
            "threshold": inference.decision(model, fpr),
            "heat_scale": asdict(heat_scale(model.state_.map_calibration)) if model.has_maps else None,
            "calibration": inference.calibration(model, fpr)}
