"""Model files: arrays in safetensors plus JSON metadata; loading never executes code, saving is atomic."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import GaussadError, ModelFormatError

if TYPE_CHECKING:
    from .model import GaussianAD

FORMAT_NAME = "gaussad-model"
FORMAT_VERSION = 1


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _arrays_of(model: "GaussianAD") -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for i, (g, s) in enumerate(zip(model.gaussians_, model.stats_)):
        arrays.update(g.to_arrays(f"level{i}.gauss."))
        arrays.update(s.to_arrays(f"level{i}.stats."))
    for i, (g, s) in enumerate(zip(model.map_gaussians_, model.map_stats_)):
        arrays.update(g.to_arrays(f"map{i}.gauss."))
        arrays.update(s.to_arrays(f"map{i}.stats."))
    if getattr(model, "calibration_scores_", None) is not None:
        arrays["calibration.scores"] = np.asarray(model.calibration_scores_, dtype=np.float64)
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def publish(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Give a finished temporary file the usual permissions (0666 less the umask) and rename it into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, target)


def save_model(model: "GaussianAD", path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` through a temporary file and an atomic rename."""
    from safetensors.numpy import save_file

    path = Path(path)
    arrays = _arrays_of(model)
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "meta": json.dumps(model.metadata()),
        "checksum": _checksum(arrays),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=header)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Validated metadata and arrays of a model file; any problem raises ModelFormatError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="np") as fh:
            header = fh.metadata() or {}
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for foreign or damaged files
        raise ModelFormatError(f"{path}: not a gaussad model file ({type(exc).__name__}: {exc})") from None
    if header.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{path}: not a gaussad model file (a safetensors file without gaussad metadata)")
    version = header.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ModelFormatError(
            f"{path}: model format version {version}, but this gaussad reads version {FORMAT_VERSION}; refit the model"
        )
    if header.get("checksum") != _checksum(arrays):
        raise ModelFormatError(f"{path}: model file is damaged (array checksum mismatch)")
    try:
        meta = json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: damaged model metadata ({exc})") from None
    return meta, arrays


def load(path: str | os.PathLike) -> "GaussianAD":
    """Load a model written by :meth:`GaussianAD.save`."""
    from .gaussian import LevelGaussian, MomentStats
    from .model import GaussianAD

    meta, arrays = read_model_file(path)
    try:
        model = GaussianAD(
            backbone=meta["backbone"],
            levels=meta["levels"],
            input_size=meta["input_size"],
            weights=meta["weights"],
            estimator=meta["estimator"],
            reduction=meta["reduction"],
            variance=meta["variance"],
            normalize=meta["normalize"],
            map_levels=meta["map_levels"],
            preset=meta["preset"],
            threshold=meta.get("threshold", "chi2"),
            fpr=meta.get("fpr", 0.01),
            calibration=meta.get("calibration"),
            random_state=meta.get("random_state", 0),
        )
        n_levels = len(meta["levels"])
        gaussians = [LevelGaussian.from_arrays(arrays, f"level{i}.gauss.", meta["gaussians"][i]) for i in range(n_levels)]
        stats = [MomentStats.from_arrays(arrays, f"level{i}.stats.") for i in range(n_levels)]
        n_maps = len(meta["map_levels"])
        map_gaussians = [LevelGaussian.from_arrays(arrays, f"map{i}.gauss.", meta["map_gaussians"][i]) for i in range(n_maps)]
        map_stats = [MomentStats.from_arrays(arrays, f"map{i}.stats.") for i in range(n_maps)]
        dims = [s.dim for s in stats]
        if dims != list(meta["feature_dims"]) or any(g.mean.shape != (d,) for g, d in zip(gaussians, dims)):
            raise ValueError(f"array shapes {dims} do not match the metadata {meta['feature_dims']}")
        calibration = arrays.get("calibration.scores")
        if calibration is not None and (calibration.ndim != 1 or not np.all(np.isfinite(calibration))):
            raise ValueError("calibration scores must be a 1-D array of finite numbers")
        if meta.get("n_calibration") != (None if calibration is None else int(calibration.size)):
            raise ValueError(f"{meta.get('n_calibration')} calibration scores in the metadata, "
                             f"{0 if calibration is None else calibration.size} stored")
        model._validate_params()
    except (KeyError, IndexError, TypeError, ValueError, GaussadError) as exc:
        raise ModelFormatError(f"{path}: inconsistent model file ({type(exc).__name__}: {exc})") from None
    model.levels_ = list(meta["levels"])
    model.level_names_ = list(meta["level_names"])
    model.input_size_ = meta["input_size"]
    model.gaussians_ = gaussians
    model.stats_ = stats
    model.map_levels_ = list(meta["map_levels"])
    model.map_level_names_ = list(meta["map_level_names"])
    model.map_gaussians_ = map_gaussians
    model.map_stats_ = map_stats
    model.feature_dims_ = dims
    model.n_samples_ = int(meta["n_samples"])
    if calibration is not None:
        model.calibration_scores_ = calibration
    return model
