"""Serve the champion over HTTP (FastAPI): POST /predict, GET /health, GET /model.

Uploads pass the pipeline's one image check (tasks.image_check) and are decoded and
thresholded exactly as ``fanaoi predict`` does (tasks.predict's Predictor and
load_champion, tasks.dataset.decode_image), so the service and the CLI give the same
answer, or refuse with the same reason, for the same file.

Before each request the service looks at ``champion.h5`` (one ``stat``). When the file
was replaced (publish, rollback, an export rewriting its card) the new champion is loaded
by that one request and swapped in under a lock; requests already running finish on the
model they started with, and requests arriving during the load keep using the old one.
A champion that cannot be loaded is logged and reported by /health; the old one serves on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from tasks.dataset import decode_image
from tasks.errors import FanaoiError
from tasks.image_check import EMPTY, FORMAT, UNIDENTIFIED, ImageRejected, check_image
from tasks.params import Params, ServeParams, ValidateParams
from tasks.predict import Predictor, load_champion
from tasks.registry import CHAMPION_MODEL, champion_card, utc_now

log = logging.getLogger(__name__)

# Room for the multipart boundary and part headers around the image itself.
MULTIPART_OVERHEAD = 16 * 1024
LOAD_ATTEMPTS = 3


class Prediction(BaseModel):
    label: str
    probability: float
    threshold: float
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
        return dataclasses.replace(limits, max_pixels=serve.max_pixels), "serve.max_pixels"
    return limits, "validate.max_pixels"


def check_upload(data: bytes, serve: ServeParams, limits: ValidateParams) -> None:
    """Reject what the pipeline would not take as an image before TensorFlow sees it.

    The verdict is tasks.image_check's, the check of validate, ingest and ``fanaoi
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
        "positive_class": predictor.class_names[1],
        "model_version": loaded.card["version"],
    }


class RefuseLargeBodies:
    """ASGI middleware: a request whose Content-Length is over the limit gets 413 at once.

    Without it the multipart body would be read (and spooled to disk) before the endpoint
    could look at its size.
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > self.max_upload_bytes + MULTIPART_OVERHEAD:
                response = JSONResponse(status_code=413, content={
                    "detail": f"request of {int(length):,} bytes is larger than "
                              f"serve.max_upload_bytes = {self.max_upload_bytes:,} (plus form overhead)"
                })
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(params: Params) -> FastAPI:
    """The service over the registry of ``params``; raises if there is no usable champion."""
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
        """Classify one image with the champion: label, probability, threshold, model version."""
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

    app.add_middleware(RefuseLargeBodies, max_upload_bytes=serve.max_upload_bytes)
    return app


def run_server(params: Params, host: str, port: int) -> None:
    """Serve until interrupted (uvicorn, one process; predictions run in its thread pool)."""
    import uvicorn

    uvicorn.run(create_app(params), host=host, port=port, log_level="info")
