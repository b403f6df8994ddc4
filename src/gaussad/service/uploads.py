"""Uploads: the service's bounds (:class:`Limits`), checking an upload's header before anything is decoded,
admission by decoded pixels in flight (:class:`PixelBudget`), the request-body limit, and scoring checked uploads
through the inference pipeline, with heat-map overlays on request."""

from __future__ import annotations

import asyncio
import base64
import ctypes
from dataclasses import asdict, dataclass
from io import BytesIO

from fastapi.responses import JSONResponse
from PIL import Image
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from fastapi import HTTPException

from ..detector import inference
from ..detector.heatmap import heat_scale, render
from ..detector.model import GaussianAD
from ..errors import GaussadError, ImageError, ImageTooLargeError, UnknownImageFormatError
from ..intake.engine import cpu_count
from ..intake.images import NamedBytes, load_image, probe


@dataclass(frozen=True)
class Limits:
    """Upload bounds of the service; anything beyond them is refused with 413."""

    max_file_bytes: int = 20 * 2**20
    max_files: int = 16
    max_pixels: int = 25_000_000
    # Decoded pixels in flight across the service (see ``request_cost``); a request that does not fit within
    # ``busy_seconds`` is answered 503 with Retry-After. 100 Mpx is about 300 MB of decoded RGB.
    max_pixels_in_flight: int = 100_000_000
    busy_seconds: int = 2

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GaussadError(f"{name} must be a positive integer, got {value!r}")

    @property
    def max_request_bytes(self) -> int:
        """Whole request body: every file at its limit plus room for the multipart framing."""
        return self.max_files * self.max_file_bytes + 2**20


class UploadError(GaussadError):
    """An upload the service refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


OVERLAY_SIDE = 1600  # overlays of larger images are drawn at this longest side: plenty to look at, bounded memory


def _upload_error(exc: ImageError) -> UploadError:
    status = 415 if isinstance(exc, UnknownImageFormatError) else 413 if isinstance(exc, ImageTooLargeError) else 422
    return UploadError(status, str(exc))


def probe_upload(data: bytes, filename: str, limits: Limits) -> int:
    """Pixels of an upload from its header, refusing oversized files and images (413), non-images (415) and
    damaged headers (422) before anything is decoded."""
    if len(data) > limits.max_file_bytes:
        raise UploadError(413, f"{filename}: {len(data)} bytes exceeds the limit of {limits.max_file_bytes} bytes per file")
    try:
        width, height = probe(data, filename, limits.max_pixels)
    except ImageError as exc:
        raise _upload_error(exc) from None
    return width * height


def decode_upload(data: bytes, filename: str, limits: Limits, side: int | None = None) -> Image.Image:
    """Uploaded bytes -> 8-bit RGB image, EXIF-oriented (:func:`gaussad.intake.images.load_image`, as for files); with
    ``side``, shrunk to at most that longest side. The upload's size was checked at admission
    (:func:`probe_upload`); ``load_image`` checks its header again as it reads it."""
    try:
        img = load_image(bytes(data), max_pixels=limits.max_pixels, name=filename)
    except ImageError as exc:
        raise _upload_error(exc) from None
    if side is not None and max(img.size) > side:
        img.thumbnail((side, side), Image.BILINEAR)
    return img


def request_cost(pixels: list[int]) -> int:
    """Decoded pixels a request holds at once: images are decoded by the extractor's threads (one per core) and
    then one at a time for overlays, each freed once resized; never more than all of them."""
    return min(sum(pixels), (cpu_count() + 1) * max(pixels, default=0))


def _return_memory() -> None:
    """Hand freed heap memory back to the system after a request (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PixelBudget:
    """Admission control: requests hold their :func:`request_cost` of a service-wide pixel budget while they run.
    A request waits at most ``wait`` seconds for room, else it is refused (503); one request alone is always
    admitted, however large, so that the per-request limits alone decide what is too large."""

    def __init__(self, capacity: int, wait: float):
        self.capacity, self.wait, self.used = capacity, wait, 0
        self._changed = asyncio.Condition()

    async def acquire(self, cost: int) -> bool:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self.used == 0 or self.used + cost <= self.capacity), self.wait)
            except asyncio.TimeoutError:
                return False
            self.used += cost
            return True

    async def release(self, cost: int) -> None:
        async with self._changed:
            self.used -= cost
            self._changed.notify_all()


def _png(img: Image.Image) -> bytes:
    buf = BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def score_uploads(model: GaussianAD, uploads: list[tuple[str, bytes]], fpr: float, limits: Limits,
                  with_maps: bool) -> list[dict]:
    """Score checked uploads (blocking: run it in a worker thread); with maps each result has a PNG overlay
    (:func:`gaussad.detector.heatmap.render`: heat on the model's good-image scale, colour bar, score and decision).

    The model's extractor decodes the uploads a few at a time, each freed once resized; overlays are drawn one
    image at a time, at most ``OVERLAY_SIDE`` pixels on the longest side.
    """
    sources = [NamedBytes(data, name) for name, data in uploads]
    try:
        scored = inference.score(model, sources, [name for name, _ in uploads], fpr=fpr, with_maps=with_maps)
        results = scored.rows
        if not with_maps:
            return results
        scale = heat_scale(model.state_.map_calibration)
        for row, (name, data), amap in zip(results, uploads, scored.maps):
            img = decode_upload(data, name, limits, OVERLAY_SIDE)
            drawn = render(img, amap, scale, row["score"], row["anomalous"])
            row["overlay"] = "data:image/png;base64," + base64.b64encode(_png(drawn)).decode("ascii")
            del drawn
            del img
        return results
    except ImageError as exc:
        raise _upload_error(exc) from None
    finally:
        del sources
        _return_memory()


def map_upload(model: GaussianAD, name: str, data: bytes, fpr: float, limits: Limits) -> tuple[bytes, dict]:
    """The heat-map overlay PNG of one upload and its result row (blocking)."""
    row = score_uploads(model, [(name, data)], fpr, limits, with_maps=True)[0]
    png = base64.b64decode(row.pop("overlay").split(",", 1)[1])
    return png, row


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, whether declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body exceeds the limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": self._message()}, status_code=413)(scope, receive, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # An HTTPException passes through FastAPI's body parsing and becomes the 413 answer.
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)
