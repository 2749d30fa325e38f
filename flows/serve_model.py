"""Serve the champion over HTTP (FastAPI): POST /predict, GET /health, GET /model, the line's
home page at GET /, and the pages of ``reports/`` read-only under GET /reports/.

Uploads pass the pipeline's one image check (tasks.data.image_check) and are decoded and
thresholded exactly as ``fanaoi predict`` does (tasks.inference.predictor's Predictor and
load_champion, tasks.data.dataset.decode_image), so the service and the CLI give the same
answer, or refuse with the same reason, for the same file.

Before each request the service looks at ``champion.h5`` (one ``stat``). When the file
was replaced (publish, rollback, an export rewriting its card) the new champion is loaded
by that one request and swapped in under a lock; requests already running finish on the
model they started with, and requests arriving during the load keep using the old one.
A champion that cannot be loaded is logged and reported by /health; the old one serves on.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flows.line_home import ReportFiles, home_page, reports_page
from tasks.data.dataset import decode_image
from tasks.data.image_check import EMPTY, FORMAT, UNIDENTIFIED, ImageRejected, check_image
from tasks.errors import FanaoiError
from tasks.inference.predictor import Predictor
from tasks.params import Params, ServeParams, ValidateParams, replace
from tasks.registry.champion import champion_card, load_champion
from tasks.registry.store import CHAMPION_MODEL, utc_now

log = logging.getLogger(__name__)

# Room for the multipart boundary and part headers around the image itself.
MULTIPART_OVERHEAD = 16 * 1024
LOAD_ATTEMPTS = 3


class Prediction(BaseModel):
    label: str  # a class name, or REVIEW inside the card's review band
    probability: float
    threshold: float
    review_band: list[float] | None
    positive_class: str
    model_version: str


class Health(BaseModel):
    status: str
    model_version: str
    loaded_at: str
    reload_error: str | None


class UploadRejected(FanaoiError):
    """An upload the service cannot classify; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LoadedChampion:
    predictor: Predictor
    card: dict[str, Any]
    signature: tuple[int, int, int] | None  # (inode, mtime_ns, size) of champion.h5 when loaded
    loaded_at: str


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_mtime_ns, status.st_size


def load_current_champion(registry_dir: Path) -> LoadedChampion:
    """The champion and its card, read while champion.h5 stayed the same file."""
    model_path = registry_dir / CHAMPION_MODEL
    for _ in range(LOAD_ATTEMPTS):
        before = _signature(model_path)
        card = champion_card(registry_dir)
        predictor = load_champion(registry_dir)
        if _signature(model_path) == before and predictor.version == card["version"]:
            # The first predict_on_batch builds the predict function; doing it here keeps
            # concurrent first requests from racing to build it.
            height, width = predictor.model_params.input_size
            predictor.model.predict_on_batch(
                np.zeros((1, height, width, predictor.model_params.channels), np.float32)
            )
            return LoadedChampion(predictor, card, before, utc_now())
    raise FanaoiError(
        f"{model_path}: replaced {LOAD_ATTEMPTS} times while being loaded; try again when "
        f"publishing has finished"
    )


class ChampionHolder:
    """The champion in use, swapped for a new one when the registry's champion changes."""

    def __init__(self, registry_dir: Path | str) -> None:
        self.registry_dir = Path(registry_dir)
        self._swap = threading.Lock()
        self._current = load_current_champion(self.registry_dir)
        self._failed: tuple[int, int, int] | None = None
        self.reload_error: str | None = None

    def current(self) -> LoadedChampion:
        """The champion to answer this request with (reloaded first if the file changed)."""
        current = self._current
        signature = _signature(self.registry_dir / CHAMPION_MODEL)
        if signature == current.signature or (self.reload_error and signature == self._failed):
            return current
        # One request loads; the others answer with the model they already have.
        if not self._swap.acquire(blocking=False):
            return current
        try:
            if _signature(self.registry_dir / CHAMPION_MODEL) != self._current.signature:
                self._reload()
        finally:
            self._swap.release()
        return self._current

    def _reload(self) -> None:
        signature = _signature(self.registry_dir / CHAMPION_MODEL)
        try:
            loaded = load_current_champion(self.registry_dir)
        except Exception as exc:  # noqa: BLE001 - whatever a bad registry file raises, the
            # service answers with the model it has and reports "stale"; never a 500.
            self._failed, self.reload_error = signature, str(exc)
            log.warning("keeping champion %s: %s", self._current.card["version"], exc)
            return
        previous = self._current.card["version"]
        self._current, self._failed, self.reload_error = loaded, None, None
        log.info("champion reloaded: %s -> %s", previous, loaded.card["version"])


# HTTP status by what the image check found; anything else it refuses is 422.
UPLOAD_STATUS = {EMPTY: 400, UNIDENTIFIED: 415, FORMAT: 415}


def upload_limits(serve: ServeParams, limits: ValidateParams) -> tuple[ValidateParams, str]:
    """The validate limits, with serve.max_pixels when it caps the pixels tighter."""
    if serve.max_pixels < limits.max_pixels:
        return replace(limits, max_pixels=serve.max_pixels), "serve.max_pixels"
    return limits, "validate.max_pixels"


def check_upload(data: bytes, serve: ServeParams, limits: ValidateParams) -> None:
    """Reject what the pipeline would not take as an image before TensorFlow sees it.

    The verdict is tasks.data.image_check's, the check of validate, ingest and ``fanaoi
    predict``: the same file is refused for the same reason everywhere.
    """
    if not data:
        raise UploadRejected(400, "empty upload; send the image file in the form field 'file'")
    if len(data) > serve.max_upload_bytes:
        raise UploadRejected(
            413, f"upload of {len(data):,} bytes is larger than serve.max_upload_bytes = "
                 f"{serve.max_upload_bytes:,}"
        )
    try:
        check_image(data, *upload_limits(serve, limits))
    except ImageRejected as exc:
        raise UploadRejected(UPLOAD_STATUS.get(exc.problem.kind, 422), str(exc)) from None


def probability_of(predictor: Predictor, data: bytes) -> float:
    """Positive-class probability of one encoded image, preprocessed as in training."""
    import tensorflow as tf

    try:
        image = decode_image(tf.constant(data), predictor.model_params)
    except (tf.errors.OpError, ValueError) as exc:
        raise UploadRejected(422, f"cannot decode the image ({getattr(exc, 'message', exc)})") from None
    return float(predictor.model.predict_on_batch(image[tf.newaxis]).reshape(-1)[0])


def classify(loaded: LoadedChampion, data: bytes) -> dict[str, Any]:
    predictor = loaded.predictor
    probability = probability_of(predictor, data)
    return {
        "label": predictor.label(probability),
        "probability": probability,
        "threshold": predictor.threshold,
        "review_band": list(predictor.review_band) if predictor.review_band else None,
        "positive_class": predictor.class_names[1],
        "model_version": loaded.card["version"],
    }


TOKEN_ENV = "FANAOI_SERVE_TOKEN"
PROTECTED_PATHS = ("/", "/predict", "/model")  # need the bearer token when one is set
# ...and everything under it: reports name data files and batch folders and show part images
PROTECTED_PREFIX = "/reports"
UNCOUNTED_PATHS = ("/health",)  # always answered: the line asks it while the service is busy
UPLOAD_PATHS = ("/predict",)  # the routes that read a body: their slot is taken once it has arrived


def service_token(serve: ServeParams) -> str | None:
    """The bearer token: the environment variable wins over serve.token (kept out of git)."""
    return os.environ.get(TOKEN_ENV) or serve.token


def exposure_warning(host: str, token: str | None) -> str | None:
    """What to tell the operator when the service is reachable from other machines."""
    if host == "localhost" or _is_loopback(host):
        return None
    if token:
        return (f"serving on {host}: reachable from other machines; /, /predict, /model and /reports/ "
                f"need the bearer token, /health is open")
    return (f"serving on {host} WITHOUT a token: anyone who can reach this machine can use "
            f"/predict and read /, /model and /reports/; set {TOKEN_ENV} (or serve.token), or bind to 127.0.0.1")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: assume it is reachable
        return False


class ServiceGuard:
    """ASGI middleware in front of every route: the token, the body size and time, the request cap.

    Each is decided before the endpoint runs, and before the body is read where it can be:
    - /predict and /model need ``Authorization: Bearer <token>`` when a token is set: 401;
    - a Content-Length over the limit gets 413 at once; a body without one (chunked) is
      counted as it arrives and gets 413 as soon as it passes the limit, never read whole;
    - a body not complete ``serve.body_timeout`` seconds after the request began gets 408
      and its connection is closed: a client that stalls or trickles is dropped;
    - at most ``serve.max_concurrency`` requests run at once (GET /health is not counted),
      503 with Retry-After beyond. An upload takes its slot once its body has arrived
      (other requests, which read none, at once), so clients that send headers and then
      go idle hold no slot and cannot lock the line out. Memory stays bounded: the cap
      times one request, plus what the form parser keeps of each upload still arriving
      (1 MB, the rest is spooled to disk) for at most ``serve.body_timeout``.
    The counter needs no lock: ASGI calls run on the one event loop thread.
    """

    def __init__(self, app: ASGIApp, serve: ServeParams, token: str | None) -> None:
        self.app = app
        self.max_upload_bytes = serve.max_upload_bytes
        self.max_body = serve.max_upload_bytes + MULTIPART_OVERHEAD
        self.max_concurrency = serve.max_concurrency
        self.body_timeout = serve.body_timeout
        self.token = token.encode() if token else None
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        slot = _Slot(self, counted=scope["path"] not in UNCOUNTED_PATHS)
        if scope["path"] not in UPLOAD_PATHS and not slot.take():
            await JSONResponse(status_code=503, headers=BUSY_HEADERS, content={"detail": self._busy()})(
                scope, receive, send
            )
            return
        try:
            await self.app(scope, self._receiving(receive, slot), send)
        finally:
            slot.release()

    def _busy(self) -> str:
        return f"busy: {self.max_concurrency} requests in progress (serve.max_concurrency); retry in a moment"

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        if self.token and (scope["path"] in PROTECTED_PATHS or scope["path"].startswith(PROTECTED_PREFIX)):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                return JSONResponse(status_code=401, headers={"WWW-Authenticate": "Bearer"}, content={
                    "detail": f"missing or wrong bearer token; send 'Authorization: Bearer <token>' "
                              f"with the token of {TOKEN_ENV} or serve.token"
                })
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return JSONResponse(status_code=413, content={
                "detail": f"request of {int(length):,} bytes is larger than "
                          f"serve.max_upload_bytes = {self.max_upload_bytes:,} (plus form overhead)"
            })
        return None

    def _receiving(self, receive: Receive, slot: _Slot) -> Receive:
        """``receive`` that sizes and times the body, and takes the request's slot once it is complete."""
        received, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.body_timeout

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body, the app only listens for a disconnect
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                # FastAPI passes an HTTPException from the body reader on as the answer.
                raise HTTPException(408, (
                    f"request body not complete within serve.body_timeout = {self.body_timeout:g} s; "
                    f"send it at once"
                ), headers={"Connection": "close"}) from None
            if message["type"] != "http.request":
                return message
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise HTTPException(413, (
                    f"request body passed {self.max_body:,} bytes, more than "
                    f"serve.max_upload_bytes = {self.max_upload_bytes:,} (plus form overhead); "
                    f"stopped reading"
                ))
            complete = not message.get("more_body", False)
            if complete and not slot.take():
                raise HTTPException(503, self._busy(), headers=BUSY_HEADERS)
            return message

        return guarded_receive


BUSY_HEADERS = {"Retry-After": "1"}


class _Slot:
    """One request's place among ``serve.max_concurrency``: taken at most once, released once."""

    def __init__(self, guard: ServiceGuard, counted: bool) -> None:
        self.guard, self.counted, self.held = guard, counted, False

    def take(self) -> bool:
        """Whether the request may run: always when uncounted; else while the cap is not reached."""
        if self.counted and not self.held:
            if self.guard.active >= self.guard.max_concurrency:
                return False
            self.guard.active += 1
            self.held = True
        return True

    def release(self) -> None:
        if self.held:
            self.guard.active -= 1
            self.held = False


def create_app(params: Params, project: Path = Path()) -> FastAPI:
    """The service over the registry of ``params``; raises if there is no usable champion.

    ``project`` is the folder of the params file: the home page reads its ingest index and dvc.lock.
    """
    serve, limits = params.serve, params.validate
    holder = ChampionHolder(params.registry.dir)
    app = FastAPI(
        title="FanAOI",
        summary="GO/NG classification of fan images by the registry's champion model",
        version=holder.current().card["version"],
    )

    @app.post("/predict", response_model=Prediction, responses={
        400: {"description": "empty upload"}, 413: {"description": "upload too large"},
        415: {"description": "not an image, or a format the model does not take"},
        422: {"description": "truncated or corrupt image, or a decompression bomb"},
    })
    def predict(file: Annotated[UploadFile, File(description="PNG, JPEG or BMP image")]) -> dict[str, Any]:
        """Classify one image with the champion: label (GO, NG or REVIEW), probability, threshold,
        review band, model version."""
        loaded = holder.current()
        data = file.file.read(serve.max_upload_bytes + 1)
        try:
            check_upload(data, serve, limits)
            return classify(loaded, data)
        except UploadRejected as exc:
            raise HTTPException(exc.status, f"{file.filename}: {exc}") from None

    @app.get("/health", response_model=Health)
    def health() -> dict[str, Any]:
        """The version in use; ``stale`` when a newer champion could not be loaded."""
        loaded = holder.current()
        return {
            "status": "stale" if holder.reload_error else "ok",
            "model_version": loaded.card["version"],
            "loaded_at": loaded.loaded_at,
            "reload_error": holder.reload_error,
        }

    @app.get("/model")
    def model() -> dict[str, Any]:
        """The model card of the champion in use."""
        return holder.current().card

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> str:
        """The line's home page: the champion, the last decisions, new data, links to every page."""
        return home_page(
            holder.current().card, holder.reload_error, registry_dir=Path(params.registry.dir),
            reports_dir=Path(serve.reports_dir), project=project, data_dir=params.data.dir,
        )

    # Before the mount, which would answer /reports/ with a 404 (it serves files, not folders).
    @app.get("/reports/", response_class=HTMLResponse, include_in_schema=False)
    def reports() -> str:
        """What reports/ holds, one link per file."""
        return reports_page(Path(serve.reports_dir))

    app.mount("/reports", ReportFiles(directory=serve.reports_dir, html=True, check_dir=False), name="reports")
    app.add_middleware(ServiceGuard, serve=serve, token=service_token(serve))
    return app


def run_server(params: Params, project: Path, host: str, port: int) -> None:
    """Serve until interrupted (uvicorn, one process; predictions run in its thread pool)."""
    import uvicorn

    if warning := exposure_warning(host, service_token(params.serve)):
        log.warning(warning)
    uvicorn.run(create_app(params, project), host=host, port=port, log_level="info")
