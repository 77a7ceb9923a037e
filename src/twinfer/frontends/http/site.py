"""The HTTP plumbing shared by both REST APIs: limits, routing, JSON replies.

:class:`LimitedRequest` enforces the body-size limit *before* buffering (from
``Content-Length`` as soon as the headers are in, or chunk by chunk for a
chunked upload) and the time a body may take to arrive; :class:`Router` maps
``(method, path)`` to a handler and turns a handler's result or failure
(a :class:`~twinfer.errors.TwinferError` included) into a JSON response with
the status from :data:`STATUS_BY_CODE`.  The connections and their factory
(``TwinferSite``, with the connection limits) are in
:mod:`twinfer.frontends.http.channel`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from twinfer.dataplane import Session
from twinfer.errors import ErrorCode, TwinferError
from twinfer.outcomes import outcome

if TYPE_CHECKING:
    from twinfer.frontends.http.channel import TwinferSite

log = Logger()

#: This front end's name in the data plane's counts and the metrics' labels.
FRONTEND = "http"

#: HTTP status for each per-request error code, from :mod:`twinfer.outcomes`
#: (the one table every front end uses).
STATUS_BY_CODE: dict[ErrorCode, int] = {
    code: outcome(code).http_status for code in ErrorCode if not code.closes_connection
}


def status_for(code: ErrorCode | int) -> int:
    """The HTTP status for a :class:`TwinferError` code (500 for anything unexpected)."""
    return outcome(code).http_status


#: Reason phrases twisted.web does not know (it would send "Unknown Status").
_REASONS = {429: b"Too Many Requests", 499: b"Client Closed Request"}


def reason(status: int) -> bytes:
    """The reason phrase for ``status``."""
    return _REASONS.get(status) or http.RESPONSES.get(status, b"Unknown Status")


class HTTPError(Exception):
    """A failure that is about HTTP itself (404 route, 405, 413, 415, 501...)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@attrs.frozen
class Response:
    """What a handler returns: a status, body chunks and headers."""

    status: int
    body: Sequence[bytes]
    headers: dict[str, str] = attrs.field(factory=dict)

    @classmethod
    def json(cls, document: Any, status: int = http.OK) -> Response:
        """A ``application/json`` response (numpy scalars are written as numbers)."""
        return cls(
            status,
            [json.dumps(document, separators=(",", ":"), default=_json_default).encode()],
            {"Content-Type": "application/json"},
        )

    @classmethod
    def error(cls, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        """The ``{"error": message}`` body both APIs use for failures."""
        response = cls.json({"error": message}, status)
        response.headers.update(headers or {})
        return response


def _json_default(value: object) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def raw_response(response: Response) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for use before
    twisted.web has a request to answer (the body is still arriving)."""
    body = b"".join(response.body)
    lines = [f"HTTP/1.1 {response.status} {reason(response.status).decode()}"]
    lines += [f"{name}: {value}" for name, value in response.headers.items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode() + body


class _Body:
    """The request body, as the file-like object twisted.web expects.

    A growing ``bytearray`` rather than Twisted's temporary file: the body
    ends up in memory anyway, and :attr:`data` hands it to numpy without a
    copy (and writable, so OpenVINO can share it).  ``close`` only drops the
    reference, so arrays still viewing the bytes stay valid.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self._position = 0

    def write(self, chunk: bytes) -> None:
        # Bodies are only ever appended to (twisted.web seeks back to 0 to read).
        self.data += chunk
        self._position = len(self.data)

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> None:
        self._position = offset if whence == 0 else len(self.data) + offset

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self._position + size
        chunk = bytes(self.data[self._position : end])
        self._position += len(chunk)
        return chunk

    def close(self) -> None:
        self.data = bytearray()


class LimitedRequest(server.Request):
    """A request whose body is size-limited before it is buffered, and time-limited.

    The body's bytes are reserved in the data plane's buffer budget
    (:class:`~twinfer.budget.BufferBudget`) before they are read: while it
    is spent, reading the connection pauses; they are released when the
    request is answered or its connection is gone.

    The limit (``site.max_body_size``) is checked against ``Content-Length``
    when the headers are complete and against the running total of a chunked
    upload; either way a 413 goes out at once and the connection is closed,
    so an oversized body is never held.  The whole body must arrive within
    ``site.body_timeout`` seconds, or the client gets a 408 and is
    disconnected: a slow or stalled upload cannot hold memory for long, and
    it never holds a device worker (nothing is queued before the body is in).
    """

    site: TwinferSite
    content: _Body  # type: ignore[assignment]

    _rejected = False
    _received = 0
    #: True from the headers until the whole body is in.
    receiving = False
    _upload_timer: IDelayedCall | None = None
    #: Budget bytes this request holds (released when it is answered or gone).
    _reserved = 0
    #: The body's Content-Length (0: none or chunked).
    _length = 0
    #: True while reading is paused for the buffer budget.
    waiting_for_memory = False

    def _site(self) -> TwinferSite:
        return self.channel.site  # type: ignore[attr-defined,no-any-return]

    def _transport(self) -> Any:
        """The connection's transport (a producer: reading pauses and resumes)."""
        return self.channel.transport if self.channel is not None else None

    def gotLength(self, length: int | None) -> None:
        self.content = _Body()
        site = self._site()
        if length is not None and length > site.max_body_size:
            self._reject(
                http.REQUEST_ENTITY_TOO_LARGE,
                f"the request body ({length} bytes) is larger than the limit "
                f"({site.max_body_size} bytes, server.http_max_body_size)",
            )
            return
        if length == 0:
            return
        self._length = length or 0
        self.receiving = True
        budget = site.dataplane.budget
        if length is None:  # chunked: reserved chunk by chunk
            self._start_timer()
        elif not budget.fits(length):
            site.dataplane.limit_refused(FRONTEND, "max_buffered_bytes")
            self._reject(
                http.REQUEST_ENTITY_TOO_LARGE,
                f"the request body ({length} bytes) is larger than the server's whole buffer "
                f"budget ({budget.limit} bytes, server.max_buffered_bytes)",
            )
        elif budget.try_reserve(length):
            self._reserved = length
            self._start_timer()
        else:
            # Wait for the bytes instead of allocating them: stop reading
            # (the upload's clock starts once it may go on).
            site.dataplane.limit_refused(FRONTEND, "max_buffered_bytes")
            self.waiting_for_memory = True
            self._transport().pauseProducing()
            budget.wait(length, self._memory_granted)

    def _memory_granted(self, size: int) -> None:
        self._reserved += size
        self.waiting_for_memory = False
        # Bytes read while waiting were counted already (take): keep only
        # what the whole body needs.
        need = max(self._length, self._received)
        if self._reserved > need:
            excess, self._reserved = self._reserved - need, need
            self._site().dataplane.budget.release(excess)
        transport = self._transport()
        if transport is not None and not self._rejected:
            transport.resumeProducing()
            self._start_timer()

    def _start_timer(self) -> None:
        site = self._site()
        self._upload_timer = site.reactor.callLater(site.body_timeout, self.too_slow)

    def _release(self) -> None:
        budget = self._site().dataplane.budget
        budget.forget(self._memory_granted)
        reserved, self._reserved = self._reserved, 0
        if reserved:
            budget.release(reserved)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        limit = self._site().max_body_size
        if self._received > limit:
            self._reject(
                http.REQUEST_ENTITY_TOO_LARGE,
                f"the request body is larger than the limit "
                f"({limit} bytes, server.http_max_body_size)",
            )
            return
        if self._received > self._reserved:
            # A chunked upload (or the rest of a read that came in while
            # waiting): the bytes are here already, so they are counted, and
            # reading stops while the budget is overspent.
            budget = self._site().dataplane.budget
            extra = self._received - self._reserved
            budget.take(extra)
            self._reserved += extra
            if budget.used > budget.limit and not self.waiting_for_memory:
                self._site().dataplane.limit_refused(FRONTEND, "max_buffered_bytes")
                self.waiting_for_memory = True
                self._transport().pauseProducing()
                budget.wait(0, self._memory_granted)
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.receiving = False
        self._stop_timer()
        if self._rejected:
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        self._stop_timer()
        self._release()
        super().connectionLost(reason)

    def finish(self) -> None:
        self._release()  # answered: its bytes go back to the budget
        super().finish()

    def too_slow(self) -> None:
        """Give up on the body: 408 and disconnect."""
        if self._rejected:
            return
        self._site().dataplane.limit_refused(FRONTEND, "http_timeout")
        self._reject(
            http.REQUEST_TIMEOUT,
            f"the request body did not arrive within {self._site().body_timeout} seconds "
            f"(server.http_timeout)",
        )

    def _stop_timer(self) -> None:
        if self._upload_timer is not None and self._upload_timer.active():
            self._upload_timer.cancel()
        self._upload_timer = None

    def _reject(self, status: int, message: str) -> None:
        """Answer before the body is in (twisted.web has no API for that) and hang up."""
        self._rejected = True
        self.receiving = False
        self._stop_timer()
        self._release()
        self.content.close()
        channel = self.channel
        if channel is None or channel.transport is None:
            return
        log.info(
            "rejecting a request from {peer}: {message}",
            peer=self.getClientAddress(),
            message=message,
        )
        channel.transport.write(raw_response(Response.error(status, message)))
        channel.loseConnection()


def session_of(request: server.Request) -> Session:
    """The data-plane session of the connection ``request`` came on."""
    session = getattr(request.channel, "session", None)
    if session is None:  # the connection is already gone
        raise TwinferError(ErrorCode.CANCELLED, "the client closed the connection")
    return session  # type: ignore[no-any-return]


#: A route handler: an ``async def`` called with the request and the path's
#: variable parts, returning a :class:`Response`.
Handler = Callable[..., Coroutine[Any, Any, Response]]
#: A path pattern: literal segments, and ``None`` for a variable segment.
Pattern = tuple[str | None, ...]


class Router(Resource):
    """A leaf resource that dispatches on method and path segments.

    A handler's :class:`TwinferError` becomes ``{"error": ...}`` with the
    status from :data:`STATUS_BY_CODE`, an :class:`HTTPError` its own status.
    If the client goes away first, the handler's Deferred is cancelled (which
    withdraws a queued inference job).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._routes: list[tuple[bytes, Pattern, Handler]] = []

    def route(self, method: str, path: str, handler: Handler) -> None:
        """Add a route: ``path`` like ``/v2/models/{name}/infer`` (``{x}`` is a variable)."""
        pattern = (
            tuple(None if part.startswith("{") else part for part in path.strip("/").split("/"))
            if path != "/"
            else ("",)
        )
        self._routes.append((method.encode(), pattern, handler))

    def _match(self, request: server.Request) -> tuple[Handler, list[str]]:
        segments = [s.decode("utf-8", "replace") for s in request.postpath or []]
        allowed = []
        for method, pattern, handler in self._routes:
            if len(pattern) != len(segments):
                continue
            if any(p is not None and p != s for p, s in zip(pattern, segments, strict=True)):
                continue
            if method != request.method and not (method == b"GET" and request.method == b"HEAD"):
                allowed.append(method.decode())
                continue
            return handler, [s for p, s in zip(pattern, segments, strict=True) if p is None]
        if allowed:
            raise HTTPError(
                http.NOT_ALLOWED,
                f"{request.method.decode('ascii', 'replace')} is not allowed on "
                f"{request.path.decode('utf-8', 'replace')} (allowed: {', '.join(allowed)})",
                {"Allow": ", ".join(allowed)},
            )
        raise HTTPError(
            http.NOT_FOUND, f"no such endpoint: {request.path.decode('utf-8', 'replace')}"
        )

    def render(self, request: server.Request) -> int:
        d = Deferred.fromCoroutine(self._call(request))
        finished = request.notifyFinish()
        # The client hung up: stop working for it (and free the queue slot).
        finished.addErrback(lambda _: d.cancel())
        d.addErrback(_to_response)
        d.addCallback(_write, request, finished)
        d.addErrback(_write_failed, request, finished)
        return server.NOT_DONE_YET

    async def _call(self, request: server.Request) -> Response:
        handler, arguments = self._match(request)
        return await handler(request, *arguments)


def _to_response(failure: Failure) -> Response:
    if failure.check(HTTPError):
        e: HTTPError = failure.value  # type: ignore[assignment]
        return Response.error(e.status, e.message, e.headers)
    if failure.check(TwinferError):
        error: TwinferError = failure.value  # type: ignore[assignment]
        result = outcome(error.code)
        # Overload and unavailability are temporary: say when to come back.
        retry = {"Retry-After": "1"} if result.retryable else None
        return Response.error(result.http_status, error.message, retry)
    if failure.check(CancelledError):
        return Response.error(499, "the request was cancelled")
    log.failure("unexpected failure in an HTTP handler", failure)
    return Response.error(
        http.INTERNAL_SERVER_ERROR, f"internal error: {failure.getErrorMessage()}"
    )


def _write(response: Response, request: server.Request, finished: Deferred[None]) -> None:
    """Send ``response`` unless the request is over (``finished``, from
    ``request.notifyFinish()``, has fired: finished, or the client is gone)."""
    if finished.called:
        return
    request.setResponseCode(response.status, reason(response.status))
    for name, value in response.headers.items():
        request.setHeader(name, value)
    request.setHeader("Content-Length", str(sum(len(c) for c in response.body)))
    if request.method != b"HEAD":
        # writeSequence-like: tensor chunks are bytes already, nothing is joined.
        for chunk in response.body:
            request.write(chunk)
    request.finish()


def _write_failed(failure: Failure, request: server.Request, finished: Deferred[None]) -> None:
    log.failure("cannot write an HTTP response", failure)
    if not finished.called:
        request.loseConnection()


def __getattr__(name: str) -> Any:
    # TwinferSite and its channel live in twinfer.frontends.http.channel
    # (which imports this module); this keeps the old import path working.
    if name == "TwinferSite":
        from twinfer.frontends.http.channel import TwinferSite

        return TwinferSite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
