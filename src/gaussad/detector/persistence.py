"""Model files: arrays in safetensors plus JSON metadata; loading never executes code, saving is atomic.

Loading reads the bytes, parses them as a safetensors container (a JSON header and raw little-endian arrays,
nothing executable; pickles and zip archives such as PyTorch checkpoints fail here and are named), checks a SHA-256
checksum over the metadata and every array, then validates the metadata schema and every array's dtype,
shape and finiteness against it. The checksum detects damage; a deliberately forged file that recomputes
it still has to pass the strict validation, and can at worst describe a nonsensical but harmless model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import params
from ..version import __version__
from ..errors import GaussadError, ModelFormatError
from ..intake.files import open_regular_file, write_atomic
from .params import MAX_INPUT_SIZE, MAX_MAP_TILES
from .decision import DecisionRule
from ..intake.engine import INT8_FORMATS, warn_if_int8_saturates
from .state import ADAPTED, DetectorState

FORMAT_NAME = "gaussad-model"
FORMAT_VERSION = 2  # 2: the checksum covers the metadata as well as the arrays
MAX_BANK_ABS = 1e15  # bank values (and scales) beyond this would overflow float32 squared distances
MAX_MEAN_ABS = 1e60  # a fit refuses features beyond this (gaussian.MAX_ABS); larger means overflow into NaN distances
MIN_BANK_SCALE = 1e-30  # smaller scales round to 0 in float32
_FOREIGN_MAGIC = (
    (b"PK\x03\x04", "a zip archive, such as a PyTorch .pth/.pt checkpoint"),
    (b"\x80", "a Python pickle"),
    (b"\x93NUMPY", "a NumPy .npy file"),
    (b"\x89HDF", "an HDF5 file"),
)


def checksum(arrays: dict[str, np.ndarray], meta: str) -> str:
    """SHA-256 over the metadata JSON and every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    h.update(f"meta|{len(meta)}|".encode())
    h.update(meta.encode())
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_model(path: str | os.PathLike, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write a model file (metadata and arrays) to ``path`` atomically (:func:`gaussad.intake.files.write_atomic`)."""
    from safetensors.numpy import save

    meta_json = json.dumps(meta)
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "meta": meta_json,
              "checksum": checksum(arrays, meta_json)}
    write_atomic(path, save(arrays, metadata=header), "model file")


def _header_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors buffer that safetensors itself has already parsed."""
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not an object")
    return meta


MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header (array names, shapes, offsets, metadata) larger than this is junk


def _not_ours(path: Path, start: bytes, detail: str) -> ModelFormatError:
    for magic, kind in _FOREIGN_MAGIC:  # only now: a safetensors header length can start with these bytes
        if start.startswith(magic):
            return ModelFormatError(f"{path}: not a gaussad model file ({kind}); gaussad model files are "
                                    "safetensors and are never unpickled")
    return ModelFormatError(f"{path}: not a gaussad model file, or a damaged one ({detail[:200]})")


def _check_version(path: Path, header: dict) -> None:
    version = str(header.get("format_version"))
    if version != str(FORMAT_VERSION):
        if version.isdigit() and int(version) > FORMAT_VERSION:
            raise ModelFormatError(f"{path}: written by a newer gaussad (model format {version[:20]}; this gaussad "
                                   f"{__version__} reads format {FORMAT_VERSION}): upgrade gaussad")
        raise ModelFormatError(f"{path}: model format version {version[:20]}, but this gaussad reads version "
                               f"{FORMAT_VERSION}; refit the model")


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Checked metadata and arrays of a model file; any problem raises ModelFormatError naming the file. The header
    (its size, then whether it is gaussad's) is checked before the arrays are read, so a large file that is not a
    model costs a few bytes of reading, not its size."""
    from safetensors.numpy import load as load_safetensors

    if not isinstance(path, (str, os.PathLike)):
        raise ModelFormatError(f"a model file's path is needed, got {type(path).__name__}")
    path = Path(path)
    with open_regular_file(path, ModelFormatError, "a model file") as fh:
        size = os.fstat(fh.fileno()).st_size
        start = fh.read(8)
        n = int.from_bytes(start, "little") if len(start) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise _not_ours(path, start, f"a header of {n} bytes in a file of {size}")
        head = fh.read(n)
        try:
            header = _header_metadata(start + head)
        except Exception as exc:  # noqa: BLE001 - not JSON, not an object, any damage
            raise _not_ours(path, start, f"{type(exc).__name__}: {exc}") from None
        if header.get("format") != FORMAT_NAME:
            raise ModelFormatError(f"{path}: not a gaussad model file (a safetensors file without gaussad metadata)")
        data = start + head + fh.read()
    try:
        arrays = load_safetensors(data)
    except Exception as exc:  # safetensors raises several types for foreign or damaged files
        raise _not_ours(path, start, f"{type(exc).__name__}: {exc}") from None
    _check_version(path, header)
    meta_json = header.get("meta")
    if not isinstance(meta_json, str) or header.get("checksum") != checksum(arrays, meta_json):
        raise ModelFormatError(f"{path}: model file is damaged (checksum mismatch)")
    try:
        meta = json.loads(meta_json)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ModelFormatError(f"{path}: damaged model metadata ({exc})") from None
    return meta, {k: np.array(v) for k, v in arrays.items()}


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: Any, lo: int, hi: float = math.inf) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_meta(meta: Any) -> None:
    """Check the metadata: every stored setting as its row of the parameter table checks it (the values a model
    file's absent keys meant included, :func:`~gaussad.detector.params.from_stored`), then what the table cannot
    know: the learned structure's types, ranges and consistent lengths (ValueError says what is wrong). The
    combinations of settings are the table's too: :func:`read_model` validates them next."""
    _need(isinstance(meta, dict), "metadata is not a JSON object")
    missing = [k for k in ("backbone", "weights", "levels", "level_names", "input_size", "normalize", "estimator",
                           "reduction", "variance", "n_samples", "feature_dims", "gaussians", "preset", "map_levels",
                           "map_level_names", "map_gaussians") if k not in meta]
    _need(not missing, f"metadata lacks {', '.join(missing)}")
    stored = params.from_stored(meta)
    for row in params.PARAMS:  # the learned ones (levels, input size, ...) are checked as fitted, below
        if row.stored and row.learned is None:
            try:
                row.check(row.name, stored[row.name])
            except GaussadError as exc:
                raise ValueError(str(exc)) from None
    levels, names, dims = meta["levels"], meta["level_names"], meta["feature_dims"]
    _need(isinstance(levels, list) and len(levels) >= 1 and all(_is_int(v, 0) for v in levels)
          and len(set(levels)) == len(levels), "levels must be a non-empty list of distinct non-negative integers")
    _need(isinstance(names, list) and len(names) == len(levels) and all(isinstance(v, str) for v in names),
          "level_names must be one name per level")
    _need(isinstance(dims, list) and len(dims) == len(levels) and all(_is_int(v, 1) for v in dims),
          "feature_dims must be one positive integer per level")
    size = meta["input_size"]
    _need(size is None or _is_int(size, 1, MAX_INPUT_SIZE), f"input_size must be 1..{MAX_INPUT_SIZE} or null")
    _need(_is_int(meta["n_samples"], 2), "n_samples must be an integer >= 2")
    map_levels, map_names, map_gaussians = meta["map_levels"], meta["map_level_names"], meta["map_gaussians"]
    _need(isinstance(map_levels, list) and all(_is_int(v, 0) for v in map_levels)
          and len(set(map_levels)) == len(map_levels), "map_levels must be a list of distinct non-negative integers")
    _need(isinstance(map_names, list) and len(map_names) == len(map_levels) and all(isinstance(v, str) for v in map_names),
          "map_level_names must be one name per map level")
    method, grid = params.effective(stored, "map_method"), params.effective(stored, "map_grid")
    _need(_is_int(meta.get("map_tiles", 1), 1, MAX_MAP_TILES), f"map_tiles must be an integer 1..{MAX_MAP_TILES}")
    n_maps = min(len(map_levels), 1) if grid == "finest" else len(map_levels)
    banks = meta.get("map_banks", [])
    _need(isinstance(banks, list) and len(banks) == (n_maps if method == "nearest" else 0)
          and all(isinstance(b, dict) and _is_int(b.get("seen"), 1) and _is_number(b.get("scale"))
                  and MIN_BANK_SCALE <= b["scale"] <= MAX_BANK_ABS for b in banks),
          f"map_banks must describe every map level of a nearest-neighbour model (seen >= 1, scale in "
          f"[{MIN_BANK_SCALE:g}, {MAX_BANK_ABS:g}])")
    _need(isinstance(map_gaussians, list) and len(map_gaussians) == (n_maps if method == "gaussian" else 0)
          and all(isinstance(g, dict) and g.get("estimator") == "ledoit-wolf" and g.get("reduction") is None
                  and _is_number(g.get("shrinkage", 0.0)) and 0.0 <= g.get("shrinkage", 0.0) <= 1.0
                  for g in map_gaussians),
          "map_gaussians must describe every map level (Ledoit-Wolf, no reduction)")
    gaussians = meta["gaussians"]
    _need(isinstance(gaussians, list) and len(gaussians) == len(levels), "gaussians must describe every level")
    for i, g in enumerate(gaussians):
        _need(isinstance(g, dict) and g.get("estimator") == meta["estimator"] and g.get("reduction") == meta["reduction"],
              f"level {i}: estimator/reduction differ from the model's")
        _need(_is_number(g.get("shrinkage", 0.0)) and 0.0 <= g.get("shrinkage", 0.0) <= 1.0,
              f"level {i}: shrinkage must lie in [0, 1]")
        _need(g.get("variance") is None or _is_number(g["variance"]), f"level {i}: variance must be a number")
        _need("dof" not in g or _is_int(g["dof"], 1, dims[i]), f"level {i}: dof must be 1..{dims[i]}")


def validate_int8(meta: dict) -> None:
    """An int8 model's ``int8`` entry: its weight format (one this gaussad knows) and the instruction set it was
    calibrated on (a short name or null); absent in older int8 files (read as the legacy format) and in fp32 ones."""
    int8 = meta.get("int8")
    if int8 is None:
        return
    _need(meta.get("precision") == "int8", "an int8 entry in a model of precision fp32")
    _need(isinstance(int8, dict) and set(int8) == {"format", "calibrated_on"},
          "int8 must be an object with format and calibrated_on")
    _need(int8["format"] in INT8_FORMATS, f"unknown int8 format {str(int8['format'])[:40]!r} (known: "
          f"{', '.join(INT8_FORMATS)}): written by a newer gaussad? upgrade gaussad")
    isa = int8["calibrated_on"]
    _need(isa is None or (isinstance(isa, str) and 0 < len(isa) <= 40 and isa.isprintable()),
          "int8 calibrated_on must be a short instruction-set name or null")


def validate_adaptation(meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """An adapted model (``adapt`` > 0) records its adaptation and holds its adapted tensors (float32, finite, none
    empty) unless the validation kept the pretrained network (``kept_epoch`` 0); a model without adaptation holds
    neither. Whether the tensors fit the network is checked when the network is built (names and shapes)."""
    record, adapt = meta.get("adaptation"), meta.get("adapt", 0)
    tensors = {k: a for k, a in arrays.items() if k.startswith(ADAPTED)}
    if not adapt:
        _need(record is None and not tensors, "adapted tensors or an adaptation record in a model with adapt 0")
        return
    _need(isinstance(record, dict) and _is_int(record.get("kept_epoch"), 0, adapt)
          and isinstance(record.get("history"), list), "an adapted model needs its adaptation record (kept_epoch "
          f"0..{adapt}, history)")
    _need(bool(tensors) == (record["kept_epoch"] > 0), "adapted tensors must be stored exactly when an adapted epoch "
          "was kept (kept_epoch > 0)")
    for key, a in tensors.items():
        _need(a.dtype == np.float32 and a.size > 0, f"array {key} must be a non-empty float32 array")
        _need(bool(np.isfinite(a).all()), f"array {key} contains NaN or infinite values")


def validate_arrays(arrays: dict[str, np.ndarray], n_levels: int, n_maps: int, n_banks: int,
                    precision: str = "fp32") -> None:
    """Every array the model reads is float64 (sample counts and bank image ids int64, bank vectors float32) and
    finite; an int8 model's network is a non-empty uint8 vector (the serialised ONNX graph: data, run by ONNX
    Runtime only when scoring), which no fp32 model holds."""
    network = arrays.get("network.int8")
    if precision == "int8":
        _need(network is not None and network.dtype == np.uint8 and network.ndim == 1 and network.size > 0,
              "an int8 model needs its network: array network.int8, a non-empty uint8 vector")
    else:
        _need(network is None, f"array network.int8 in a model of precision {str(precision)[:20]!r}")
    used = tuple(f"level{i}." for i in range(n_levels)) + tuple(f"map{i}." for i in range(n_maps)) + ("calibration.",)
    for i in range(n_banks):
        vectors, ids = arrays.get(f"bank{i}.vectors"), arrays.get(f"bank{i}.ids")
        _need(vectors is not None and ids is not None, f"memory bank {i} is missing")
        _need(vectors.dtype == np.float32 and vectors.ndim == 2 and vectors.shape[0] >= 1 and vectors.shape[1] >= 1,
              f"array bank{i}.vectors must be a non-empty 2-D float32 array")
        _need(bool(np.isfinite(vectors).all()), f"array bank{i}.vectors contains NaN or infinite values")
        _need(float(np.abs(vectors).max()) <= MAX_BANK_ABS,
              f"array bank{i}.vectors holds values beyond {MAX_BANK_ABS:g}, where float32 distances overflow")
        _need(ids.dtype == np.int64 and ids.shape == (vectors.shape[0],) and bool((ids >= 0).all()),
              f"array bank{i}.ids must hold one non-negative int64 per bank vector")
    for key, a in arrays.items():
        if not key.startswith(used):
            continue
        if key.endswith(".stats.n"):
            _need(a.dtype == np.int64 and a.size == 1 and a.ndim <= 1, f"array {key} must be one int64")
        else:
            _need(a.dtype == np.float64, f"array {key} has dtype {a.dtype}, expected float64")
            _need(bool(np.isfinite(a).all()), f"array {key} contains NaN or infinite values")
            if key.endswith(".gauss.mean"):
                _need(a.ndim == 1, f"array {key} is not a vector")
                _need(float(np.abs(a).max(initial=0.0)) <= MAX_MEAN_ABS,
                      f"array {key} holds values beyond {MAX_MEAN_ABS:g}, which no fit produces")
            if key.endswith(".gauss.components"):
                _need(a.ndim == 2, f"array {key} is not a matrix")



def read_model(path: str | os.PathLike) -> tuple[dict[str, Any], DetectorState]:
    """The constructor parameters and the learned state of a model file, every part checked; any problem raises
    ModelFormatError naming the file."""
    meta, arrays = read_model_file(path)
    try:
        validate_meta(meta)
        validate_int8(meta)
        validate_adaptation(meta, arrays)
        validate_arrays(arrays, len(meta["levels"]), len(meta["map_gaussians"]), len(meta.get("map_banks", [])),
                        meta.get("precision", "fp32"))
        values = params.from_stored(meta)
        params.validate(values)
        state = DetectorState.from_arrays({**meta, **values}, arrays)
        DecisionRule(values["threshold"], values["fpr"], values["image_score"]).check(state)  # its own rule must apply
    except (KeyError, IndexError, TypeError, ValueError, GaussadError) as exc:
        raise ModelFormatError(f"{path}: inconsistent model file ({type(exc).__name__}: {str(exc)[:300]})") from None
    if state.network is not None:
        warn_if_int8_saturates(state.int8_format, path)
    return values, state
