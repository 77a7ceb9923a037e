"""The KServe v2 / Open Inference Protocol REST endpoints.

Every inference goes through :meth:`twinfer.dataplane.DataPlane.infer`: the
same admission, queues, limits and counting as the binary protocol.  The body <-> tensor
mapping is :mod:`twinfer.frontends.http.kserve`; this module only routes and schedules it:

* JSON documents above :data:`THREAD_THRESHOLD` bytes are parsed, and JSON
  outputs above :data:`THREAD_ELEMENTS` elements are serialised, in the HTTP
  front end's own small thread pool, not on the reactor thread (parsing a
  SqueezeNet input, 150k floats, takes tens of milliseconds).  Not in the
  device threads: those should only run models, and parsing happens before
  a job exists.  Small documents are handled inline, where a thread hop
  would cost more than the work.
* Triton's ``timeout`` request parameter (microseconds) becomes the job's
  deadline in the dispatcher (``timeout_ms``, rounded up): a job still
  queued when it passes is withdrawn and the client gets 504.  Triton's
  ``priority`` (1 is the highest, 0 the default) maps onto the model's
  priority levels (where 1 is the lowest).
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.web import http

from twinfer import sharedmem_requests
from twinfer.dataplane import DataPlane
from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.http import kserve
from twinfer.frontends.http.site import HTTPError, LimitedRequest, Response, Router, session_of
from twinfer.scheduling import InferResult
from twinfer.sharedmem import RegionTable

#: JSON headers larger than this many bytes are parsed in the codec pool.
THREAD_THRESHOLD = 64 * 1024
#: Responses with more JSON elements than this are serialised in the codec pool.
THREAD_ELEMENTS = 16 * 1024


class KServeAPI:
    """The ``/v2`` routes over one data plane."""

    def __init__(
        self,
        dataplane: DataPlane,
        reactor: Any,
        codec_pool: ThreadPool,
        shared_regions: RegionTable | None = None,
    ) -> None:
        self._plane = dataplane
        #: The server-wide shared-memory regions (``--allow-shm``), if any.
        self._regions = shared_regions
        self._dispatcher = dataplane.dispatcher
        self._reactor = reactor  # IReactorTime and IReactorFromThreads
        self._pool = codec_pool

    def install(self, router: Router) -> None:
        """Add the ``/v2`` routes to ``router``."""
        router.route("GET", "/v2", self.server_metadata)
        router.route("GET", "/v2/health/live", self.live)
        router.route("GET", "/v2/health/ready", self.ready)
        router.route("GET", "/v2/models/{name}", self.model_metadata)
        router.route("GET", "/v2/models/{name}/versions/{version}", self.model_metadata)
        router.route("GET", "/v2/models/{name}/ready", self.model_ready)
        router.route("GET", "/v2/models/{name}/versions/{version}/ready", self.model_ready)
        router.route("POST", "/v2/models/{name}/infer", self.infer)
        router.route("POST", "/v2/models/{name}/versions/{version}/infer", self.infer)

    async def server_metadata(self, request: LimitedRequest) -> Response:
        """``GET /v2``."""
        return Response.json(kserve.server_metadata())

    async def live(self, request: LimitedRequest) -> Response:
        """``GET /v2/health/live``: 200 while the process answers."""
        return Response.json({"live": True})

    async def ready(self, request: LimitedRequest) -> Response:
        """``GET /v2/health/ready``: 200 when every model has a healthy device, else 503."""
        ready = all(info.ready for info in self._dispatcher.model_infos())
        return Response.json({"ready": ready}, http.OK if ready else http.SERVICE_UNAVAILABLE)

    def _check_model(self, name: str, version: str | None) -> None:
        self._dispatcher.entry(name)  # UNKNOWN_MODEL -> 404
        if version is not None and version != kserve.MODEL_VERSION:
            raise TwinferError(
                ErrorCode.UNKNOWN_MODEL,
                f"model {name!r} has no version {version!r} (versions: [{kserve.MODEL_VERSION!r}])",
            )

    async def model_metadata(
        self, request: LimitedRequest, name: str, version: str | None = None
    ) -> Response:
        """``GET /v2/models/{name}``: inputs and outputs, -1 for dynamic dimensions."""
        self._check_model(name, version)
        return Response.json(kserve.model_metadata(self._dispatcher.metadata(name)))

    async def model_ready(
        self, request: LimitedRequest, name: str, version: str | None = None
    ) -> Response:
        """``GET /v2/models/{name}/ready``: 200 when it can serve, 503 if not, 404 if unknown."""
        self._check_model(name, version)
        ready = self._dispatcher.model_ready(name)
        return Response.json(
            {"name": name, "ready": ready}, http.OK if ready else http.SERVICE_UNAVAILABLE
        )

    async def infer(
        self, request: LimitedRequest, name: str, version: str | None = None
    ) -> Response:
        """``POST /v2/models/{name}/infer``: decode, queue, encode."""
        session = session_of(request)
        encoding = request.getHeader("Content-Encoding")
        if encoding not in (None, "identity"):
            message = f"Content-Encoding {encoding!r} is not supported; send the body uncompressed"
            self._plane.refuse(session, name, TwinferError(ErrorCode.INVALID_INPUT, message))
            raise HTTPError(http.UNSUPPORTED_MEDIA_TYPE, message)
        try:
            self._check_model(name, version)
            decoded = await self._decode(request)
            priority = self._level(name, decoded.priority)
        except TwinferError as e:  # refused before it became a job: count it too
            self._plane.refuse(session, name, e)
            raise
        timeout_ms = math.ceil(decoded.timeout_us / 1000) if decoded.timeout_us else 0
        # Tensors may be in shared memory (parameters.shared_memory_region).
        result: InferResult = await sharedmem_requests.infer_maybe_shared(
            self._plane,
            session,
            request,
            name,
            self._regions,
            decoded.inputs,
            decoded.output_names,
            decoded.output_regions,
            timeout_ms=timeout_ms,
            priority=priority,
        )

        if _json_elements(decoded, result) > THREAD_ELEMENTS:
            chunks, header = await deferToThreadPool(
                self._reactor,
                self._pool,
                kserve.encode_infer_response,
                name,
                decoded,
                result.outputs,
            )
        else:
            chunks, header = kserve.encode_infer_response(name, decoded, result.outputs)
        if header is None:
            return Response(http.OK, chunks, {"Content-Type": "application/json"})
        return Response(
            http.OK,
            chunks,
            {"Content-Type": "application/octet-stream", kserve.HEADER_LENGTH: str(header)},
        )

    async def _decode(self, request: LimitedRequest) -> kserve.InferRequest:
        """The request body as tensors; large JSON is parsed in the codec pool."""
        body: bytearray = request.content.data
        header_length = request.getHeader(kserve.HEADER_LENGTH)
        json_size = len(body) if header_length is None else _leading_int(header_length)
        if json_size > THREAD_THRESHOLD:
            return await deferToThreadPool(  # type: ignore[no-any-return]
                self._reactor, self._pool, kserve.decode_infer_request, body, header_length
            )
        return kserve.decode_infer_request(body, header_length)

    def _level(self, name: str, priority: int) -> int:
        """twinfer's level for Triton's ``priority``: :func:`kserve.priority_level`."""
        if not priority:
            return 0
        return kserve.priority_level(
            name, priority, self._dispatcher.entry(name).choose_queue().levels
        )


def _leading_int(value: str) -> int:
    return int(value) if value.isdigit() else 0  # a bad value is reported by the codec


def _json_elements(request: kserve.InferRequest, result: InferResult) -> int:
    """How many elements the response will carry as JSON."""
    total = 0
    wanted = {o.name: o.binary for o in request.outputs}
    for name, array in result.outputs.items():
        binary = wanted.get(name) if request.outputs else None
        if not (request.binary_output if binary is None else binary):
            total += getattr(array, "size", 0)  # (none for an output in shared memory)
    return total
