"""The seed server's REST API: ``GET /``, ``GET /services``, ``POST /inference``.

``POST /inference`` takes one JPEG or PNG image and answers with
predictions in the image's own pixel coordinates.  The image work
(decoding, preprocessing, classification and detection decoders) belongs to
:mod:`twinfer.tasks`; this module calls exactly two functions of it:

* ``submit_image(dispatcher, model_name, image_bytes, task)``, through
  :meth:`twinfer.dataplane.DataPlane.predict_image` like every image request
  (admitted, queued and counted there): predictions as a list of dicts with
  keys ``label_id``, ``label``, ``confidences`` and ``detection_box``
  (``[x1, y1, x2, y2]``), or :class:`~twinfer.errors.TwinferError`
  (``INVALID_INPUT`` for bytes that are not an image, ``WRONG_TASK`` for a
  model without an image task, and the dispatcher's own errors); the image
  is decoded in the device thread.
* ``task_info(dispatcher, model_name)``: a dict describing the model's
  image task (e.g. ``{"task": "classify", "labels": [...]}``) merged into
  its ``/services`` entry, or None if it has none.

Without :mod:`twinfer.tasks` (``DataPlane(..., tasks=None)``, or a build
without it), ``POST /inference`` answers 501.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from twisted.web import http

import twinfer
from twinfer.config import Config
from twinfer.dataplane import DataPlane
from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.http.site import HTTPError, LimitedRequest, Response, Router, session_of

#: Content types ``POST /inference`` accepts.
IMAGE_TYPES = ("image/jpeg", "image/png")

#: The greeting's list of APIs, in the seed's ``{description, path}`` form.
APIS = (
    ("Greeting and the list of APIs", "GET /"),
    ("Served models, their devices and labels", "GET /services"),
    ("Run a model on a JPEG or PNG image (?model=NAME)", "POST /inference"),
    ("KServe v2 server metadata", "GET /v2"),
    ("KServe v2 liveness", "GET /v2/health/live"),
    ("KServe v2 readiness", "GET /v2/health/ready"),
    ("KServe v2 model metadata", "GET /v2/models/{name}"),
    ("KServe v2 model readiness", "GET /v2/models/{name}/ready"),
    ("KServe v2 inference (JSON or binary tensors)", "POST /v2/models/{name}/infer"),
)


class SeedAPI:
    """The seed's routes over one data plane and configuration."""

    def __init__(
        self, dataplane: DataPlane, config: Config, tasks: ModuleType | None = None
    ) -> None:
        self._plane = dataplane
        self._dispatcher = dataplane.dispatcher
        self._config = config
        self._tasks = tasks
        self.default_model = config.server.http_default_model or self._first_image_model()

    def _first_image_model(self) -> str:
        """The first configured model with an image task, else the first model."""
        for model in self._config.models:
            if self._task_info(model.name):
                return model.name
        return self._config.models[0].name

    def _task_info(self, model: str) -> dict[str, Any] | None:
        if self._tasks is None:
            return None
        return self._tasks.task_info(self._dispatcher, model)  # type: ignore[no-any-return]

    def install(self, router: Router) -> None:
        """Add ``/``, ``/services`` and ``/inference`` to ``router``."""
        router.route("GET", "/", self.greeting)
        router.route("GET", "/services", self.services)
        router.route("POST", "/inference", self.inference)

    async def greeting(self, request: LimitedRequest) -> Response:
        """``GET /``: a greeting and the list of APIs."""
        return Response.json(
            {
                "type": "greeting",
                "from": f"twinfer {twinfer.__version__}",
                "message": "welcome to twinfer, an OpenVINO inference server",
                "supported APIs": [{"description": d, "path": p} for d, p in APIS],
            }
        )

    async def services(self, request: LimitedRequest) -> Response:
        """``GET /services``: one entry per served model."""
        entries = []
        for model in self._config.models:
            devices = [self._config.device(name) for name in model.devices]
            entry: dict[str, Any] = {
                "name": model.name,
                "model": model.path,
                "device": ",".join(f"{d.name}={d.target}" for d in devices),
                "default": model.name == self.default_model,
            }
            info = self._task_info(model.name)
            if info:
                entry.update({k: v for k, v in info.items() if k not in entry})
            entries.append(entry)
        return Response.json(entries)

    async def inference(self, request: LimitedRequest) -> Response:
        """``POST /inference``: predictions for one image."""
        name = self.default_model
        args: dict[bytes, list[bytes]] = request.args or {}
        if b"model" in args:
            name = args[b"model"][0].decode("utf-8", "replace")
        session = session_of(request)
        try:
            self._dispatcher.entry(name)  # UNKNOWN_MODEL -> 404
        except TwinferError as e:
            self._plane.refuse(session, name, e)
            raise
        content_type = (request.getHeader("Content-Type") or "").split(";")[0].strip().lower()
        image = request.content.data  # no copy: the tasks decode it in the device thread
        if content_type not in IMAGE_TYPES:
            code, refusal = (
                ErrorCode.INVALID_INPUT,
                HTTPError(
                    http.UNSUPPORTED_MEDIA_TYPE,
                    f"POST /inference takes Content-Type {' or '.join(IMAGE_TYPES)}, "
                    f"got {content_type or 'none'!r}",
                ),
            )
        elif not image:
            code, refusal = (
                ErrorCode.INVALID_INPUT,
                HTTPError(http.BAD_REQUEST, "the request body is empty: send the image"),
            )
        elif self._tasks is None:
            code, refusal = (
                ErrorCode.WRONG_TASK,
                HTTPError(
                    http.NOT_IMPLEMENTED,
                    "image inference is not available: this twinfer has no image tasks "
                    "(twinfer.tasks); use POST /v2/models/{name}/infer with tensors",
                ),
            )
        else:
            result = await self._plane.predict_image(session, request, name, image)
            return Response.json({"status": "ok", "model": name, "predictions": result.predictions})
        # Refused before it became a job: counted like every other refusal.
        self._plane.refuse(session, name, TwinferError(code, refusal.message))
        raise refusal
