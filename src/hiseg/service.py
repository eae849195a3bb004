"""``hiseg serve``: a REST API and a web page over the same :class:`~hiseg.predictor.Predictor`.

Each model is loaded once at startup (one ONNX Runtime session, whose ``run`` is thread-safe).
Inference runs on a fixed pool of ``workers`` threads (one per two cores); at most ``queue``
more requests wait for one, and any beyond get 503 with ``Retry-After`` at once, so overload
shows as fast refusals instead of growing memory and latency. Uploads are read from the request
stream into memory, never spooled to disk, and refused with 413 as soon as they pass the limit;
an upload is read whole before it takes a slot, so slow clients cannot hold the workers.
Every error is JSON: ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import hmac
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import cv2
import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from swagger_ui_bundle import swagger_ui_path

from hiseg import __version__
from hiseg.errors import HisegError
from hiseg.images import ImageReadError, ImageTooLargeError, decode_image
from hiseg.predictor import DEFAULT_MODEL, Predictor, bundled_models, load, resolve_model

#: Largest upload accepted, in bytes (the whole request body).
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Largest image accepted, in pixels; a server keeps (workers + queue) of them in memory at once.
MAX_PIXELS = 40_000_000
#: Seconds from admission to answer before a request gets 504.
TIMEOUT_S = 60.0
#: The formats hiseg reads, told apart by their first bytes (a name or a header can lie).
SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
#: glibc's mallopt parameter for the mmap threshold.
M_MMAP_THRESHOLD = -3
STATIC = resources.files("hiseg") / "static"
#: The refusals of ``POST /v1/segment``, for the OpenAPI page.
ERRORS = {
    400: "Empty body, or a multipart body without a 'file' field.",
    401: "Missing or wrong API key (when the server has one).",
    404: "Unknown model.",
    413: "Upload over the byte limit, or image over the pixel limit.",
    415: "Not an image (sniffed from the bytes).",
    422: "Bad option, or image data that cannot be decoded (corrupt, truncated).",
    503: "Busy: retry after Retry-After seconds.",
    504: "No answer within the per-request timeout.",
}


class ApiError(Exception):
    """An answer other than 200: its status, one line, and any headers (``Retry-After``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def default_workers() -> int:
    """One inference per two cores, each with two ONNX Runtime threads: on 2 busy cores one
    two-threaded worker answered more than two single-threaded ones (benchmarks/serve_load.md)."""
    return max(1, (os.cpu_count() or 1) // 2)


@dataclass
class Settings:
    """What ``hiseg serve`` is asked for; the defaults suit a small CPU machine."""

    models: list[str] = field(default_factory=lambda: bundled_models() or [DEFAULT_MODEL])
    api_key: str | None = None
    cors: list[str] = field(default_factory=list)
    workers: int = field(default_factory=lambda: default_workers())
    queue: int = 8
    timeout: float = TIMEOUT_S
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = MAX_PIXELS
    long_side: int | None = None


@dataclass
class ServedModel:
    name: str
    predictor: Predictor

    def describe(self) -> dict[str, Any]:
        tree = self.predictor.tree
        return {
            "name": self.name,
            "tree": tree.to_dict(),
            "levels": [
                {
                    "index": level.index,
                    "nodes": [{"name": n, "color": list(tree.color(n))} for n in level.names],
                }
                for level in tree.levels
            ],
            "long_side": self.predictor.long_side,
        }


class Gate:
    """Admission: ``workers`` inferences at once, ``queue`` more waiting, the rest refused."""

    def __init__(self, workers: int, queue: int):
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="hiseg-infer")
        self.capacity = workers + queue
        self.admitted = 0
        self._lock = threading.Lock()

    def admit(self) -> bool:
        with self._lock:
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
            return True

    def release(self, *_: object) -> None:
        with self._lock:
            self.admitted -= 1


def load_models(settings: Settings) -> dict[str, ServedModel]:
    """Each ``--model`` loaded once, named by its bundled name or its file's stem."""
    threads = max(1, (os.cpu_count() or 1) // max(1, settings.workers))
    served: dict[str, ServedModel] = {}
    for text in settings.models:
        path = resolve_model(text)
        name = text if text in bundled_models() else path.stem
        if name in served:
            raise HisegError(f"{text}: two models named '{name}'; rename one file")
        # no ONNX Runtime arena: a server must not grow in steps with the mix of image sizes
        predictor = load(path, threads=threads, long_side=settings.long_side, memory_arena=False)
        served[name] = ServedModel(name, predictor)
    return served


# -- reading the request ------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, in memory, refused with 413 once it passes ``limit`` bytes (from the
    declared length before reading anything, else as the chunks arrive)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload of {int(declared)} bytes is over the {limit} byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"upload is over the {limit} byte limit")
    return bytes(body)


def multipart_file(body: bytes, content_type: str) -> bytes:
    """The field ``file`` of a multipart/form-data body, parsed in memory."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart body without a boundary in its Content-Type")
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    header: list[bytes] = [b"", b""]

    def on_part_begin() -> None:
        parts.append(({}, bytearray()))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        parts[-1][0][header[0].lower()] = header[1]
        header[:] = [b"", b""]

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1][1].extend(data[start:end])

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as err:
        raise ApiError(400, f"malformed multipart body ({err})") from None
    files = [
        data
        for headers, data in parts
        if parse_options_header(headers.get(b"content-disposition", b""))[1].get(b"name") == b"file"
    ]
    if len(files) > 1:  # which one was meant is unknowable: never answer for the other
        raise ApiError(400, f"multipart body has {len(files)} fields named 'file'; send one")
    if not files:
        raise ApiError(400, "multipart body has no field named 'file'")
    return bytes(files[0])


def sniff(data: bytes) -> str:
    """The image format from the first bytes; 415 for anything else."""
    if not data:
        raise ApiError(400, "no image: the request body is empty")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    for signature, name in SIGNATURES.items():
        if data.startswith(signature):
            return name
    raise ApiError(415, "not an image: JPEG, PNG, WebP, BMP or TIFF expected (sniffed from bytes)")


def parse_levels(text: str, num_levels: int) -> list[int]:
    if text == "all":
        return list(range(num_levels))
    try:
        levels = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise ApiError(422, f"levels must be 'all' or indices like 0,2, not '{text}'") from None
    if not levels or levels[0] < 0 or levels[-1] >= num_levels:
        raise ApiError(422, f"levels '{text}' out of range: this model has 0..{num_levels - 1}")
    return levels


# -- the work of one request (in a worker thread) -------------------------------------------------


def png(array: np.ndarray) -> bytes:
    """Fast PNG (zlib level 1): an answer's latency matters more than its bytes here; files
    written to disk (:func:`hiseg.files.png_writer`) take PIL's smaller default."""
    ok, encoded = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def segment(
    model: ServedModel, data: bytes, levels: list[int], fmt: str, max_pixels: int
) -> tuple[dict[str, Any] | bytes, dict[str, float]]:
    """Decode, predict and encode one upload; timings in milliseconds."""
    start = time.perf_counter()
    try:
        image = decode_image(data, "upload", max_pixels)
    except ImageTooLargeError as err:
        raise ApiError(413, str(err)) from None
    except ImageReadError as err:
        raise ApiError(422, str(err)) from None
    decoded = time.perf_counter()
    result = model.predictor.predict(image)
    predicted = time.perf_counter()
    body: dict[str, Any] | bytes
    if fmt == "png":
        body = png(result.labels)
    else:
        summary = result.summary()
        described = model.describe()
        body = {
            "model": model.name,
            "tree": described["tree"],
            "width": summary["width"],
            "height": summary["height"],
            "people": summary["people"],
            "levels": [
                {
                    **described["levels"][k],
                    "share": summary["levels"][str(k)],
                    "png": base64.b64encode(png(result.level(k))).decode("ascii"),
                }
                for k in levels
            ],
        }
    done = time.perf_counter()
    timing = {
        "decode": (decoded - start) * 1000,
        "inference": (predicted - decoded) * 1000,
        "encode": (done - predicted) * 1000,
    }
    return body, timing


# -- the app --------------------------------------------------------------------------------------


def check_api_key(key: str | None) -> None:
    """Refuses a key no client could send: HTTP strips a header value's outer spaces, and
    header bytes are read as Latin-1, so only printable ASCII arrives as it was typed."""
    if key is not None and not (key.isascii() and key.isprintable() and key == key.strip()):
        raise HisegError(
            "the API key must be printable ASCII with no space at either end (HTTP headers "
            "could not carry it as given)"
        )


def create_app(settings: Settings) -> FastAPI:
    """The service for ``settings``: models are loaded here, before the first request."""
    check_api_key(settings.api_key)
    models = load_models(settings)
    default = next(iter(models))
    gate = Gate(settings.workers, settings.queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        gate.executor.shutdown(wait=False, cancel_futures=True)  # no worker threads outlive it

    app = FastAPI(
        lifespan=lifespan,
        title="hiseg",
        version=__version__,
        description="Hierarchical human segmentation: person, upper/lower body, six parts.",
        docs_url=None,  # FastAPI's page loads Swagger UI from a CDN: blank offline
        redoc_url=None,
    )
    app.state.models = models
    app.state.gate = gate
    if settings.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization"],
        )

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse({"error": err.message}, err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        return JSONResponse({"error": problems}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        # a bug or memory running out: still a JSON answer; uvicorn logs the traceback
        return JSONResponse({"error": f"internal error ({type(err).__name__})"}, 500)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        bearer = request.headers.get("authorization", "")
        if not given and bearer.lower().startswith("bearer "):
            given = bearer[7:]
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            what = "wrong" if given else "missing"
            message = f"{what} API key (send it as X-API-Key or Authorization: Bearer)"
            raise ApiError(401, message, {"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": list(models), "busy": gate.admitted}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    def list_models() -> dict[str, Any]:
        return {"default": default, "models": [m.describe() for m in models.values()]}

    @app.post(
        "/v1/segment",
        dependencies=[Depends(check_key)],
        responses={
            200: {"content": {"application/json": {}, "image/png": {}}},
            **{code: {"description": why} for code, why in ERRORS.items()},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"file": {"type": "string", "format": "binary"}},
                            "required": ["file"],
                        }
                    },
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    async def segment_endpoint(
        request: Request,
        model: str | None = Query(None, description="A served model (default: the first)."),
        levels: str = Query("all", description="'all' or level indices, e.g. 0,2."),
        format: str = Query("json", pattern="^(json|png)$", description="json or png."),
    ) -> Response:
        """Segment one image: a multipart field ``file`` or the raw body. ``format=png``
        answers with the leaf label map (one byte per pixel, the tree's leaf values)."""
        chosen = models.get(model or default)
        if chosen is None:
            raise ApiError(404, f"no model '{model}' (serving: {', '.join(models)})")
        wanted = parse_levels(levels, chosen.predictor.tree.num_levels)
        start = time.perf_counter()
        # The upload is read before a slot is taken: a slow or stalled client holds only its
        # connection (uvicorn's limit bounds them), never a worker or queue slot.
        try:
            body = await asyncio.wait_for(
                read_body(request, settings.max_upload_bytes), settings.timeout
            )
        except asyncio.TimeoutError:
            raise ApiError(504, f"upload not received within {settings.timeout:g} s") from None
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";")[0].strip().lower()  # case-insensitive (RFC 9110)
        if media_type == "multipart/form-data":
            body = multipart_file(body, content_type)
        elif media_type.startswith("multipart/"):
            raise ApiError(415, f"{media_type}: send multipart/form-data or the raw image")
        sniff(body)
        if not gate.admit():
            raise ApiError(503, "busy: every worker and queue slot is taken", {"Retry-After": "1"})
        submitted = False
        try:
            queued = time.perf_counter()
            job = gate.executor.submit(segment, chosen, body, wanted, format, settings.max_pixels)
            job.add_done_callback(gate.release)
            submitted = True
            left = settings.timeout - (queued - start)
            answer, timing = await asyncio.wait_for(asyncio.wrap_future(job), left)
        except asyncio.TimeoutError:
            raise ApiError(504, f"no answer within {settings.timeout:g} s") from None
        finally:
            if not submitted:
                gate.release()
        timing = {"read": (queued - start) * 1000, **timing}
        timing["total"] = (time.perf_counter() - start) * 1000
        if isinstance(answer, bytes):
            headers = {"X-Hiseg-Model": chosen.name, "X-Hiseg-Total-Ms": f"{timing['total']:.1f}"}
            return Response(answer, media_type="image/png", headers=headers)
        answer["timing_ms"] = {k: round(v, 1) for k, v in timing.items()}
        return JSONResponse(answer)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """The OpenAPI page with Swagger UI served from the package: it works with no network."""
        return get_swagger_ui_html(
            openapi_url=str(app.openapi_url),
            title="hiseg API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )

    return app


def fixed_mmap_threshold(size: int = 128 * 1024) -> None:
    """glibc raises its mmap threshold after each large free, so the next large arrays of a
    request come from the heap and fragment it: the server's RSS grew about 45 MB per 1,000
    requests. A fixed threshold gives every large array its own mapping, returned on free
    (benchmarks/serve_load.md). Nothing to do off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, size)
    except (OSError, AttributeError):
        pass


class AddressError(HisegError):
    """The service cannot listen on the address it was given."""


def check_address(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            raise AddressError(f"{host}:{port}: cannot listen there ({err.strerror})") from None


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the service with uvicorn until interrupted. The address is tried first, so a port in
    use is one error line before any model loads (uvicorn would log it between start and stop)."""
    import uvicorn

    check_address(host, port)
    fixed_mmap_threshold()
    app = create_app(settings)
    # Connections beyond this get uvicorn's own 503: bounds the uploads held in memory at once.
    connections = 4 * (settings.workers + settings.queue) + 16
    uvicorn.run(app, host=host, port=port, limit_concurrency=connections, log_level="info")
