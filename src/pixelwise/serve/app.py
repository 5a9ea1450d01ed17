"""The HTTP API and web page: ``create_app(["runs/x/model_best.safetensors"])`` -> a FastAPI app.

Endpoints (the OpenAPI schema is at ``/docs``):

- ``POST /v1/models/{name}/predict``: an image upload -> the label PNG, or JSON with class
  names, pixel counts, area fractions and the run-length encoded label map.
- ``GET /v1/models``, ``GET /healthz`` (the process answers), ``GET /readyz`` (models loaded
  and room in the job queue).
- ``GET /``: the web page (``static/``: plain HTML, JS and CSS, nothing fetched from outside).

Inference runs in a thread pool, never on the event loop, behind a bounded job queue:
at most ``ServeLimits.max_jobs`` images are held (running or waiting) at any time, and a
request beyond that gets 503 with ``Retry-After`` before its body is read. Prediction is
the CLI's (:func:`pixelwise.inference.segment_image` on the same CPU predictor), so the
label PNG equals ``pixelwise predict``'s ``NAME_labels.png`` for the same options.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from pixelwise.crf import PRESETS
from pixelwise.data.transforms import ToTensor
from pixelwise.export import prepare_for_cpu
from pixelwise.inference import segment_image
from pixelwise.io import encode_mask, read_image
from pixelwise.models import load_model, model_kind, spatial_dims

STATIC = Path(__file__).with_name("static")
PREDICT_PATH = re.compile(r"^/v1/models/[^/]+/predict/?$")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "tiff": "image/tiff"}
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts.

    Args:
        max_upload_mb: Largest request body in MB (10^6 bytes); larger ones get 413.
        max_pixels: Largest image (height x width); larger ones get 413 before decoding.
        max_jobs: Images held at once, running or waiting for a worker; more get 503.
        workers: Inference threads (each runs one image at a time).
        timeout_s: Seconds a request waits for its result before 504.
    """

    max_upload_mb: float = 20.0
    max_pixels: int = 16_000_000
    max_jobs: int = 4
    workers: int = 1
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_pixels", "max_jobs", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)


@dataclass
class ServedModel:
    """A loaded model with what the API reports about it."""

    name: str
    path: Path
    predictor: Callable[[Any], Any]
    normalise: ToTensor
    config: dict[str, Any]
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    valid_margin: int | None

    def info(self, limits: ServeLimits) -> dict[str, Any]:
        """The model's entry in ``GET /v1/models``."""
        return {
            "name": self.name,
            "architecture": self.config["name"],
            "classes": [
                {"id": i, "name": n, "colour": list(c)} for i, (n, c) in enumerate(zip(self.class_names, self.palette))
            ],
            "input": {
                "channels": self.config["in_channels"],
                "formats": sorted(MEDIA_TYPES.values()),
                "max_pixels": limits.max_pixels,
                "max_upload_bytes": limits.max_upload_bytes,
                "any_size": True,
                "min_tile": None if self.valid_margin is None else 2 * self.valid_margin + 1,
            },
        }


def _run_name(path: Path) -> str:
    """``runs/camvid/model_best.safetensors`` -> ``camvid`` (the run folder), else the file stem."""
    return path.parent.name if path.parent.name not in ("", ".") else path.stem


def load_models(specs: Sequence[str | Path]) -> dict[str, ServedModel]:
    """Load ``PATH`` or ``NAME=PATH`` model files; a bare path is named after its run folder."""
    models: dict[str, ServedModel] = {}
    for spec in map(str, specs):
        name, sep, path_text = spec.partition("=")
        path = Path(path_text if sep else spec)
        name = name if sep else _run_name(path)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"model name {name!r} (from {spec!r}) may hold only letters, digits, '_', '.' and '-'; "
                             "name it explicitly with --model NAME=PATH")
        if name in models:
            raise ValueError(f"two models are named {name!r} ({models[name].path} and {path}); "
                             "name them apart with --model NAME=PATH")
        model, extra = load_model(path)
        kind = "a Mask R-CNN (instance)" if model_kind(model.config["name"]) != "dense" else (
            "a 3D (volume)" if spatial_dims(model.config["name"]) != 2 else None)
        if kind:
            raise ValueError(f"{path} is {kind} model; serve runs 2D semantic models: "
                             f"use pixelwise predict IMAGE --model {path}")
        model.eval()
        outputs = model.config["num_classes"]
        count = 2 if outputs == 1 else outputs  # a single-channel model labels 0 / 1
        names = list(extra.get("class_names") or [])[:count]
        palette = [tuple(int(v) for v in c[:3]) for c in (extra.get("palette") or [])][:count]
        names += [f"class {i}" for i in range(len(names), count)]
        palette += [(0, 0, 0)] * (count - len(palette))
        margin = getattr(model, "valid_margin", None)
        models[name] = ServedModel(
            name=name, path=path, predictor=prepare_for_cpu(model, "torch"),
            normalise=ToTensor(extra.get("mean"), extra.get("std")), config=dict(model.config),
            class_names=names, palette=palette, valid_margin=margin if isinstance(margin, int) else None,
        )
    if not models:
        raise ValueError("no model to serve; pass --model runs/NAME/model_best.safetensors (repeat for more)")
    return models


# ---------------------------------------------------------------------------------------
# The job queue and the upload guard
# ---------------------------------------------------------------------------------------


class JobQueue:
    """A thread pool that holds at most ``capacity`` jobs (running or waiting); more are refused.

    A job's slot is freed when the job ends, not when its request gives up, so a timed-out
    request cannot let more images into memory than ``capacity``.
    """

    def __init__(self, workers: int, capacity: int) -> None:
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="pixelwise-infer")
        self.workers = workers
        self.capacity = capacity
        self.active = 0
        self.mean_seconds = 1.0  # running mean of job durations, for Retry-After
        self._lock = threading.Lock()

    def full(self) -> bool:
        return self.active >= self.capacity

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue's work spread over the workers."""
        return max(1, math.ceil(self.mean_seconds * self.active / self.workers))

    def submit(self, fn: Callable[[], Any]) -> Future | None:
        """Run ``fn`` in the pool, or return None when the queue is full."""
        with self._lock:
            if self.active >= self.capacity:
                return None
            self.active += 1
        return self.executor.submit(self._timed, fn)

    def _timed(self, fn: Callable[[], Any]) -> Any:
        started = time.monotonic()
        try:
            return fn()
        finally:
            with self._lock:
                self.active -= 1
                self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.monotonic() - started)

    def cancel(self, future: Future) -> None:
        """Drop a job that has not started (its slot is freed); a running one finishes."""
        if future.cancel():
            with self._lock:
                self.active -= 1


def _busy(queue: JobQueue) -> JSONResponse:
    return JSONResponse(
        {"detail": f"server busy: {queue.active} of {queue.capacity} inference jobs in progress; retry later"},
        status_code=503, headers={"Retry-After": str(queue.retry_after())},
    )


class _TooLarge(HTTPException):
    """Raised from ``receive`` when a body outgrows the limit (FastAPI passes HTTPExceptions through)."""


class UploadGuard:
    """ASGI middleware for prediction requests: 503 when the queue is full and 413 for bodies
    over the limit, both before the body is read (the limit also holds for chunked bodies)."""

    def __init__(self, app: Any, queue: JobQueue, limits: ServeLimits) -> None:
        self.app, self.queue, self.limits = app, queue, limits

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not PREDICT_PATH.match(scope["path"]):
            return await self.app(scope, receive, send)
        if self.queue.full():
            return await _busy(self.queue)(scope, receive, send)
        limit = self.limits.max_upload_bytes
        too_large = f"upload too large: at most {self.limits.max_upload_mb:g} MB per request (--max-upload-mb)"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            detail = f"upload of {int(length) / 1e6:.1f} MB is too large: at most {self.limits.max_upload_mb:g} MB per request (--max-upload-mb)"
            return await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge(413, too_large)
            return message

        await self.app(scope, limited, send)


# ---------------------------------------------------------------------------------------
# One prediction
# ---------------------------------------------------------------------------------------


def _sniff(data: bytes, filename: str, declared: str | None) -> str:
    """The upload's format ("png", "jpeg" or "tiff") from its first bytes, else 415."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    what = "an empty file" if not data else f"{declared or 'unknown type'}, starting with {data[:8]!r}"
    raise HTTPException(415, f"upload {filename!r} is not a PNG, JPEG or TIFF image ({what})")


def _image_size(data: bytes, kind: str, filename: str) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels; 400 if unreadable."""
    try:
        if kind == "tiff":
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        with Image.open(io.BytesIO(data)) as image:
            return image.height, image.width
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"image {filename!r} is too large: {e}") from e
    except Exception as e:  # Pillow and tifffile raise many types for damaged headers
        raise HTTPException(400, f"cannot read image {filename!r}: {e}") from e


def _decode(data: bytes, kind: str, filename: str) -> np.ndarray:
    """(H, W, C) pixels through the project's reader (16-bit PNG and TIFF included); 400 if corrupt."""
    with tempfile.TemporaryDirectory(prefix="pixelwise-upload-") as tmp:
        path = Path(tmp) / f"upload.{'tif' if kind == 'tiff' else kind}"
        path.write_bytes(data)
        try:
            return read_image(path)
        except ValueError as e:
            raise HTTPException(400, str(e).replace(str(path), repr(filename))) from e


def run_length(labels: np.ndarray) -> dict[str, Any]:
    """Row-major run-length code of an (H, W) label map: ``values[i]`` repeated ``counts[i]`` times."""
    flat = labels.ravel()
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1]) if flat.size else np.zeros(0, int)
    counts = np.diff(np.concatenate([starts, [flat.size]]))
    return {"shape": list(labels.shape), "order": "row-major",
            "values": flat[starts].tolist(), "counts": counts.tolist()}


def class_areas(labels: np.ndarray, served: ServedModel) -> list[dict[str, Any]]:
    """Per class: id, name, colour, pixel count and area fraction of an (H, W) label map."""
    counts = np.bincount(labels.ravel(), minlength=len(served.class_names))
    total = max(labels.size, 1)
    return [
        {"id": i, "name": name, "colour": list(colour), "pixels": int(counts[i]), "fraction": counts[i] / total}
        for i, (name, colour) in enumerate(zip(served.class_names, served.palette))
    ]


@dataclass(frozen=True)
class PredictOptions:
    """The CLI's prediction options, as the form fields give them."""

    tile: int | None
    overlap: float
    scales: tuple[float, ...]
    flip: bool
    crf: str | None


def _predict(served: ServedModel, data: bytes, kind: str, filename: str, options: PredictOptions) -> np.ndarray:
    """Decode, check channels and predict: (H, W) class ids. Runs in a worker thread."""
    raw = _decode(data, kind, filename)
    channels = served.config["in_channels"]
    if raw.shape[-1] != channels:
        raise HTTPException(400, f"image {filename!r} has {raw.shape[-1]} channel(s) but model {served.name!r} takes {channels}")
    try:
        labels = segment_image(served.predictor, raw, served.normalise, tile=options.tile, overlap=options.overlap,
                               scales=options.scales, flip=options.flip, crf=options.crf)
    except ValueError as e:  # options the model cannot use (e.g. a tile smaller than its margin)
        raise HTTPException(400, str(e)) from e
    return labels.numpy().astype(np.uint8 if len(served.palette) <= 256 else np.int64)


def _respond(served: ServedModel, labels: np.ndarray, as_json: bool, include_png: bool, filename: str) -> Response:
    """The label PNG, or the JSON body (with the PNG in base64 when asked). Runs in a worker thread."""
    png = encode_mask(labels, served.palette) if not as_json or include_png else b""
    if not as_json:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(filename).stem) or "upload"  # safe in a header
        return Response(png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{stem}_labels.png"'})
    height, width = labels.shape
    body = {"model": served.name, "height": height, "width": width, "classes": class_areas(labels, served),
            "labels": run_length(labels)}
    if include_png:
        body["label_png"] = base64.b64encode(png).decode("ascii")
    return JSONResponse(body)


def _wants_json(fmt: str | None, accept: str) -> bool:
    """JSON when ``format=json``, or when Accept ranks application/json above image/png."""
    if fmt is not None:
        if fmt not in ("png", "json"):
            raise HTTPException(400, f"format must be 'png' or 'json', got {fmt!r}")
        return fmt == "json"
    quality: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            quality[media.lower()] = float(q)
        except ValueError:
            quality[media.lower()] = 0.0
    png = max(quality.get("image/png", 0.0), quality.get("image/*", 0.0), quality.get("*/*", 0.0))
    return quality.get("application/json", 0.0) > png


def _parse_options(tile: int | None, overlap: float, scales: str, flip: bool, crf: str | None) -> PredictOptions:
    if tile is not None and tile < 1:
        raise HTTPException(400, f"tile must be >= 1 pixel, got {tile}")
    if not 0 <= overlap < 1:
        raise HTTPException(400, f"overlap must be in [0, 1), got {overlap}")
    try:
        values = tuple(float(v) for v in scales.split(","))
    except ValueError:
        raise HTTPException(400, f"scales {scales!r} must be comma-separated numbers, e.g. 0.75,1,1.25") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise HTTPException(400, f"scales {scales!r} must be positive numbers")
    if crf is not None and crf not in PRESETS:
        raise HTTPException(400, f"crf must be one of {', '.join(PRESETS)}, got {crf!r}")
    return PredictOptions(tile, overlap, values, flip, crf)


# ---------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------

_ERRORS = {
    400: "Unreadable image or bad option (the message names it).",
    404: "Unknown model.",
    413: "Upload or image too large.",
    415: "Not a PNG, JPEG or TIFF image.",
    503: "Job queue full; retry after Retry-After seconds.",
    504: "Inference took longer than the server's timeout.",
}


def create_app(models: Sequence[str | Path] | dict[str, ServedModel], limits: ServeLimits | None = None) -> FastAPI:
    """The FastAPI app serving ``models`` (model files, ``NAME=PATH`` or :func:`load_models`' result).

    Run it with ``uvicorn.run(app, host="127.0.0.1", port=8000)`` or ``pixelwise serve``.
    """
    limits = limits or ServeLimits()
    served = models if isinstance(models, dict) else load_models(models)
    queue = JobQueue(limits.workers, limits.max_jobs)
    app = FastAPI(
        title="pixelwise", summary="Semantic segmentation of uploaded images.", version="1",
        openapi_tags=[{"name": "models"}, {"name": "health"}],
    )
    app.state.models, app.state.queue, app.state.limits = served, queue, limits
    app.add_middleware(UploadGuard, queue=queue, limits=limits)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", tags=["health"], summary="The process answers (also while images are being predicted).")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Models loaded and room in the job queue (503 when full).",
             responses={503: {"description": _ERRORS[503]}})
    def readyz() -> JSONResponse:
        body = {"status": "ready", "models": list(served), "jobs": queue.active, "capacity": queue.capacity}
        if queue.full():
            return JSONResponse({**body, "status": "busy"}, status_code=503,
                                headers={"Retry-After": str(queue.retry_after())})
        return JSONResponse(body)

    @app.get("/v1/models", tags=["models"], summary="Models with their classes, colours and input rules.")
    def list_models() -> dict[str, Any]:
        return {"models": [m.info(limits) for m in served.values()]}

    @app.post(
        "/v1/models/{name}/predict", tags=["models"],
        summary="Segment an image: the label PNG, or JSON with per-class areas and the run-length encoded label map.",
        responses={200: {"content": {"image/png": {}, "application/json": {}},
                         "description": "Label PNG (palette = class colours), or JSON when asked for."},
                   **{code: {"description": text} for code, text in _ERRORS.items()}},
    )
    async def predict(
        request: Request,
        name: str,
        image: Annotated[UploadFile, File(description="PNG, JPEG or TIFF image (8 or 16 bits, grey or RGB).")],
        tile: Annotated[int | None, Form(description="Sliding-window tile in px; default whole image.")] = None,
        overlap: Annotated[float, Form(description="Fraction of a tile that neighbouring tiles share.")] = 0.25,
        scales: Annotated[str, Form(description="Comma-separated test-time scales, e.g. 0.75,1,1.25.")] = "1",
        flip: Annotated[bool, Form(description="Average with the horizontally flipped prediction.")] = False,
        crf: Annotated[str | None, Form(description=f"Dense CRF preset: {', '.join(PRESETS)}.")] = None,
        format: Annotated[str | None, Form(description="png or json; default from the Accept header (png).")] = None,
        include_png: Annotated[bool, Form(description="JSON only: add the label PNG, base64, as label_png.")] = False,
    ) -> Response:
        if name not in served:
            raise HTTPException(404, f"unknown model {name!r}; available: {', '.join(served)}")
        model = served[name]
        as_json = _wants_json(format, request.headers.get("accept", ""))
        options = _parse_options(tile, overlap, scales, flip, crf)
        filename = image.filename or "upload"
        data = await image.read()
        kind = _sniff(data, filename, image.content_type)
        height, width = _image_size(data, kind, filename)
        if height * width > limits.max_pixels:
            raise HTTPException(413, f"image {filename!r} is {width} x {height} = {height * width:,} pixels; "
                                     f"this server takes at most {limits.max_pixels:,} (--max-pixels)")
        future = queue.submit(
            lambda: _respond(model, _predict(model, data, kind, filename, options), as_json, include_png, filename)
        )
        if future is None:
            return _busy(queue)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), limits.timeout_s)
        except asyncio.TimeoutError:
            queue.cancel(future)
            raise HTTPException(504, f"inference took longer than {limits.timeout_s:g} s (--timeout); "
                                     "try a smaller image or --tile") from None

    return app
