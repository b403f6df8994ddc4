"""Fuzzers (hypothesis) of the model loader and of image intake: whatever the bytes, the outcome is a valid result or
one of our own errors, never another exception.

Cases per fuzzer come from GAUSSAD_FUZZ_EXAMPLES: a short run (200, deterministic) in the normal suite, 10,000 in
``make fuzz``.
"""

import atexit
import functools
import io
import json
import os
import shutil
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import gaussad
from gaussad import GaussadError, GaussianAD, ImageError, ModelFormatError
from gaussad.intake.images import load_image
from gaussad.detector.persistence import FORMAT_NAME, FORMAT_VERSION, checksum, read_model_file

EXAMPLES = int(os.environ.get("GAUSSAD_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="GAUSSAD_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
FUZZ_MAX_PIXELS = 1 << 20  # keeps each case small; mutated headers otherwise ask for up to 178 Mpx
WORKDIR = Path(tempfile.mkdtemp(prefix="gaussad-fuzz-"))
atexit.register(shutil.rmtree, WORKDIR, ignore_errors=True)

pytestmark = pytest.mark.fuzz


# ----- byte-level mutations ------------------------------------------------------------------------------

@st.composite
def mutated(draw, corpus: str) -> bytes:
    """A seed file of ``corpus`` ("model" or "image") after 1-6 random edits: bit flips, byte sets, extreme
    integers, deletions, insertions, duplications and truncation; or, now and then, plain random bytes."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=512))
    seeds = model_seeds() if corpus == "model" else image_seeds()
    data = bytearray(seeds[draw(st.integers(0, len(seeds) - 1))])
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "set", "int", "delete", "insert", "duplicate", "truncate"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "int":  # sizes, offsets and counts in headers: try their extremes
            width = draw(st.sampled_from([2, 4, 8]))
            value = draw(st.sampled_from([0, 1, 2**(8 * width) - 1, 2**(8 * width - 1), 0x7FFF, 0x10000])
                         | st.integers(0, 2**(8 * width) - 1))
            order = draw(st.sampled_from(["little", "big"]))
            data[pos:pos + width] = (value % 2**(8 * width)).to_bytes(width, order)
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "duplicate":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 256))]
        else:
            del data[pos:]
    return bytes(data)


def _write(name: str, data: bytes) -> Path:
    path = WORKDIR / name
    path.write_bytes(data)
    return path


# ----- model loader --------------------------------------------------------------------------------------

PROBE = [np.random.default_rng(9).normal(size=(4, 6)), np.random.default_rng(10).normal(size=(4, 3))]
PROBE_MAPS = [[m] for m in np.random.default_rng(11).normal(size=(2, 5, 3, 3))]  # per image, one map level


@lru_cache(maxsize=None)
def model_seeds() -> tuple[bytes, ...]:
    """Valid model files of every estimator and reduction, one with conformal calibration scores, one with
    anomaly-map Gaussians and one with a nearest-neighbour memory bank."""
    rng = np.random.default_rng(0)
    train = [rng.normal(size=(25, 6)), rng.normal(size=(25, 3))]
    out = []
    for estimator, reduction in [("ledoit-wolf", None), ("oas", "npca"), ("empirical", "pca"), ("diagonal", None),
                                 ("l2", None), ("ledoit-wolf", "pca")]:
        path = WORKDIR / f"seed-{estimator}-{reduction}.gaussad"
        GaussianAD(backbone=None, estimator=estimator, reduction=reduction, variance=0.8).fit_features(train).save(path)
        out.append(path.read_bytes())
    calibrated = GaussianAD(backbone=None, threshold="conformal", fpr=0.1, calibration=0.2).fit_features(train)
    calibrated.save(WORKDIR / "seed-calibrated.gaussad")
    out.append((WORKDIR / "seed-calibrated.gaussad").read_bytes())
    with_maps = GaussianAD(backbone=None).fit_features(train)  # map Gaussians as an image model with maps has them
    with_maps.fit_map_features([[m] for m in rng.normal(size=(6, 5, 4, 4))])
    with_maps.save(WORKDIR / "seed-maps.gaussad")
    out.append((WORKDIR / "seed-maps.gaussad").read_bytes())
    banked = GaussianAD(backbone=None, map_method="nearest", map_coreset=0.5).fit_features(train)
    banked.fit_map_features([[m] for m in rng.normal(size=(6, 5, 3, 3))]).save(WORKDIR / "seed-bank.gaussad")
    out.append((WORKDIR / "seed-bank.gaussad").read_bytes())
    return tuple(out)


def _check_loaded_model(path: Path) -> None:
    """Load; a model that loads must score: distances >= 0 (+inf for a forged near-zero scale), never NaN and never
    an error. Any error while scoring a model that loaded, ours included, is a gap in the loader's validation."""
    try:
        model = gaussad.load(path)
    except ModelFormatError as exc:
        assert str(path) in str(exc)
        return
    try:
        scores = model.level_scores_features(PROBE)
        amaps = model.anomaly_map_features(PROBE_MAPS, 8) if model.has_maps else np.zeros(1)
    except GaussadError as exc:
        raise AssertionError(f"a model that loaded fails to score: {type(exc).__name__}: {exc}") from exc
    assert not np.isnan(scores).any() and np.all(scores >= 0)
    assert not np.isnan(amaps).any() and np.all(amaps >= 0)


@FUZZ
@given(mutated("model"))
def test_fuzz_model_loader_with_mutated_bytes(data):
    _check_loaded_model(_write("mutated.gaussad", data))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _paths(value, prefix=()):
    """Every key path into nested JSON."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@lru_cache(maxsize=None)
def _parsed_seed(i: int) -> tuple[str, dict]:
    meta, arrays = read_model_file(_write(f"seed{i}.gaussad", model_seeds()[i]))
    return json.dumps(meta), arrays


@st.composite
def forged(draw) -> bytes:
    """A valid model with its metadata and arrays edited, then re-signed with a correct checksum (a forger's
    file): exercises the validation behind the checksum."""
    from safetensors.numpy import save

    text, stored = _parsed_seed(draw(st.integers(0, len(model_seeds()) - 1)))
    meta, arrays = json.loads(text), {k: v.copy() for k, v in stored.items()}
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            paths = [p for p in _paths(meta) if p]
            where = draw(st.sampled_from(paths))
            parent = meta
            for key in where[:-1]:
                parent = parent[key]
            if draw(st.integers(0, 3)) == 0 and isinstance(parent, dict):
                del parent[where[-1]]
            else:
                parent[where[-1]] = draw(json_values)
        else:
            key = draw(st.sampled_from(sorted(arrays)))
            action = draw(st.sampled_from(["delete", "poke", "reshape", "retype", "random", "extra"]))
            a = arrays[key]
            if action == "delete":
                del arrays[key]
            elif action == "poke" and a.size:
                a = a.copy().reshape(-1)
                pokes = ([0, -1, 1, int(np.iinfo(a.dtype).max)] if a.dtype.kind == "i"
                         else [np.nan, np.inf, -np.inf, 0, -1, 1e300, -1e-300])
                with np.errstate(all="ignore"):
                    a[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from(pokes))
                arrays[key] = a.reshape(arrays[key].shape)
            elif action == "reshape":
                arrays[key] = a.reshape(-1)
            elif action == "retype":
                with np.errstate(all="ignore"):
                    arrays[key] = a.astype(draw(st.sampled_from([np.float32, np.int64, np.int8, np.float16])))
            elif action == "random":
                shape = tuple(draw(st.lists(st.integers(0, 9), max_size=3)))
                arrays[key] = np.random.default_rng(draw(st.integers(0, 99))).normal(size=shape)
            else:
                arrays[f"level{draw(st.integers(0, 3))}.gauss.{draw(st.text('abcs', max_size=6))}"] = np.zeros(3)
    text = json.dumps(meta)
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "meta": text,
              "checksum": checksum(arrays, text)}
    return save(arrays, metadata=header)


@FUZZ
@given(forged())
def test_fuzz_model_loader_with_forged_but_signed_files(data):
    _check_loaded_model(_write("forged.gaussad", data))


# ----- image intake --------------------------------------------------------------------------------------

def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@lru_cache(maxsize=None)
def image_seeds() -> tuple[bytes, ...]:
    """Small valid files of every accepted format and the common modes."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    gray = rgb.convert("L")
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    second = Image.fromarray(255 - np.asarray(rgb))
    return (
        _encode(rgb, "PNG"), _encode(gray, "PNG"), _encode(rgb.convert("RGBA"), "PNG"), _encode(gray.convert("LA"), "PNG"),
        _encode(palette, "PNG"), _encode(palette, "PNG", transparency=3), _encode(rgb.convert("1"), "PNG"),
        _encode(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), "PNG"), _encode(rgb, "PNG", exif=exif),
        _encode(rgb, "JPEG"), _encode(gray, "JPEG"), _encode(rgb.convert("CMYK"), "JPEG"), _encode(rgb, "JPEG", exif=exif),
        _encode(rgb, "JPEG", progressive=True),
        _encode(rgb, "BMP"), _encode(gray, "BMP"), _encode(rgb.convert("1"), "BMP"), _encode(palette, "BMP"),
        _encode(rgb, "TIFF"), _encode(rgb, "TIFF", compression="tiff_lzw"), _encode(rgb, "TIFF", compression="packbits"),
        _encode(rgb, "TIFF", compression="tiff_adobe_deflate"), _encode(rgb.convert("CMYK"), "TIFF"),
        _encode(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), "TIFF"),
        _encode(Image.fromarray(np.asarray(gray).astype(np.float32) / 255), "TIFF"),
        _encode(rgb, "TIFF", save_all=True, append_images=[second]),
        _encode(rgb, "WEBP"), _encode(rgb, "WEBP", lossless=True), _encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        _encode(rgb, "WEBP", save_all=True, append_images=[second]),
    )


@FUZZ
@given(mutated("image"), st.sampled_from(["png", "jpg", "bmp", "tif", "webp"]))
def test_fuzz_image_intake_with_mutated_files(data, ext):
    path = _write(f"mutated.{ext}", data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about corrupt EXIF and the like; the outcome is what counts
        try:
            img = load_image(path, max_pixels=FUZZ_MAX_PIXELS)
        except ImageError as exc:
            assert str(path) in str(exc)
            return
    assert img.mode == "RGB" and 1 <= img.width * img.height <= FUZZ_MAX_PIXELS
    assert np.asarray(img).shape == (img.height, img.width, 3)


def test_fuzz_seeds_are_valid():
    """Unmutated seeds load, so the fuzzers start from files that reach deep into the decoders."""
    for i, data in enumerate(image_seeds()):
        assert load_image(_write(f"seed{i}.img", data)).mode == "RGB"
    for data in model_seeds():
        model = gaussad.load(_write("seed.gaussad", data))
        assert np.all(np.isfinite(model.level_scores_features(PROBE)))
        if model.has_maps:
            assert np.all(np.isfinite(model.anomaly_map_features(PROBE_MAPS, 8)))


# ----- the service's multipart parsing and query parameters ------------------------------------------------

@functools.lru_cache(maxsize=1)
def _service():
    """A TestClient of the service with one tiny plain-feature-free image model (8 px input, stem level only):
    cheap enough to score thousands of uploads."""
    from fastapi.testclient import TestClient

    from gaussad.service.app import Limits, create_app

    rng = np.random.default_rng(0)
    train = [(rng.random((12, 12, 3)) * 255).astype(np.uint8) for _ in range(6)]
    model = GaussianAD(input_size=32, levels=["stem"], map_levels=["stem"], map_method="nearest").fit(train)
    client = TestClient(create_app({"m": model}, limits=Limits(max_file_bytes=1 << 16, max_files=4,
                                                             max_pixels=FUZZ_MAX_PIXELS)))
    client.__enter__()
    atexit.register(client.__exit__, None, None, None)
    return client


_QUERY_VALUES = st.one_of(st.text(max_size=12), st.sampled_from(
    ["0", "1", "-1", "0.05", "1e-12", "5e-324", "nan", "inf", "-inf", "true", "false", "1" * 400, "0x10", ""]))


@st.composite
def multipart(draw) -> tuple[str, bytes, str]:
    """A request: (query string, body, content type): well-formed multipart with mutated images, or a mangled
    body (random bytes, cut boundaries, wrong field names, odd filenames, missing headers)."""
    boundary = draw(st.sampled_from(["b", "x" * 70, "----gaussad", "a b", ""]))
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        field = draw(st.sampled_from(["files", "files", "file", "other", ""]))
        filename = draw(st.one_of(st.sampled_from(["a.png", "../../etc/passwd", "", "x" * 300, "é.png", 'q"t.png']),
                                  st.text(max_size=20)))
        data = draw(mutated("image")) if draw(st.booleans()) else draw(st.binary(max_size=64))
        header = f'Content-Disposition: form-data; name="{field}"; filename="{filename}"'.encode("utf-8", "replace")
        if draw(st.integers(0, 9)) == 0:
            header = draw(st.binary(max_size=40))
        parts.append(b"--" + boundary.encode() + b"\r\n" + header + b"\r\n\r\n" + data + b"\r\n")
    body = b"".join(parts) + (b"--" + boundary.encode() + b"--\r\n" if draw(st.booleans()) else b"")
    if draw(st.integers(0, 9)) == 0:
        body = draw(st.binary(max_size=256))
    elif draw(st.integers(0, 4)) == 0 and body:
        body = body[: draw(st.integers(0, len(body)))]
    ctype = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", "multipart/form-data",
                                  "application/octet-stream", "text/plain", f"multipart/mixed; boundary={boundary}"]))
    query = "&".join(f"{k}={v}" for k, v in draw(st.lists(st.tuples(st.sampled_from(["fpr", "maps", "x"]),
                                                                   _QUERY_VALUES), max_size=3)))
    return query, body, ctype


@FUZZ
@given(multipart(), st.sampled_from(["score", "map"]), st.sampled_from(["m", "nope", "m%00", "%2e%2e"]))
def test_fuzz_service_multipart_and_query(request, endpoint, name):
    query, body, ctype = request
    import httpx

    try:
        resp = _service().post(f"/models/{name}/{endpoint}?{query}", content=body, headers={"content-type": ctype})
    except httpx.InvalidURL:
        return  # the client refuses the URL itself; nothing reached the service
    assert resp.status_code in (200, 400, 404, 413, 415, 422, 503), (resp.status_code, resp.text[:300])
    if resp.status_code != 200:
        detail = resp.json()["detail"]
        assert detail and "Traceback" not in str(detail)
    elif endpoint == "score":
        rows = resp.json()["results"]
        assert all(np.isfinite(r["score"]) and 0.0 <= r["pvalue"] <= 1.0 for r in rows)
    else:
        assert resp.headers["content-type"] == "image/png" and resp.content.startswith(b"\x89PNG")
