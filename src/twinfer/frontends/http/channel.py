"""The HTTP front end's connections: :class:`Channel` (one per client, with
the server's connection limits) and :class:`TwinferSite` (their factory).

Requests, routing and replies are in :mod:`twinfer.frontends.http.site`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

from twinfer.dataplane import DataPlane, Session
from twinfer.frontends.http.site import (
    FRONTEND,
    LimitedRequest,
    Response,
    Router,
    raw_response,
)

log = Logger()


class Channel(http.HTTPChannel):
    """An HTTP/1.1 channel with the server's connection limits.

    Its idle timeout, in the middle of a request body (a stalled upload),
    answers 408 instead of closing silently; a request's headers must arrive
    within ``site.header_timeout`` seconds of its first byte (or of the
    connection's start), else 408 and close (slowloris); beyond
    ``site.max_connections`` connections a new one gets 503 at once.  Each
    refusal is counted in the data plane's ``refused`` by config key.

    Each connection is a :class:`~twinfer.dataplane.Session` of the data
    plane, so keep-alive connections and their requests in flight are
    counted, drained and closed like the binary protocol's.  HTTP/1.1 serves
    one request at a time per connection (pipelined requests wait their
    turn), and the session's ``max_inflight`` bounds it anyway.
    """

    site: TwinferSite
    # A TCP or TLS transport: also an IProducer.
    transport: Any
    session: Session | None = None
    _refused = False
    #: True from the end of a response (or the connection's start) until
    #: the next request's headers are complete.
    _awaiting_headers = True
    _header_timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        site = self.site
        if len(site.channels) >= site.max_connections:
            self._refused = True
            site.dataplane.limit_refused(FRONTEND, "max_connections")
            message = (
                f"the server already holds {site.max_connections} connections on this port "
                f"(server.max_connections); try again later"
            )
            response = Response.error(http.SERVICE_UNAVAILABLE, message, {"Retry-After": "1"})
            self.transport.write(raw_response(response))
            self.transport.loseConnection()
            return
        super().connectionMade()
        site.channels.add(self)
        self.session = site.dataplane.open_session(FRONTEND, self.transport, site.max_inflight)
        self._start_header_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_headers and self._header_timer is None:
            self._start_header_timer()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._awaiting_headers = False
        self._stop_header_timer()
        super().allHeadersReceived()

    def requestDone(self, request: http.Request) -> None:
        # The next request's headers are timed from its first byte.
        self._awaiting_headers = True
        super().requestDone(request)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._stop_header_timer()
        self.site.channels.discard(self)
        # The requests hear of the disconnect first (their notifyFinish fails,
        # so no response is written to a dead connection); then the session
        # withdraws whatever is still in flight.
        super().connectionLost(reason)
        if self.session is not None:
            self.session.close()

    def timeoutConnection(self) -> None:
        request = self.requests[-1] if self.requests else None
        if isinstance(request, LimitedRequest) and request.waiting_for_memory:
            self.setTimeout(self.timeOut)  # the server keeps it waiting, not the client
            return
        if isinstance(request, LimitedRequest) and request.receiving:
            request.too_slow()
            return
        # An idle keep-alive connection (or one stalled mid-headers).
        self._stop_header_timer()
        self.site.dataplane.limit_refused(FRONTEND, "http_timeout")
        super().timeoutConnection()

    def headers_too_slow(self) -> None:
        """A request's headers did not arrive in time: 408 and disconnect."""
        self._header_timer = None
        if self.transport.disconnecting:  # (closed already, by another limit)
            return
        self.site.dataplane.limit_refused(FRONTEND, "http_header_timeout")
        message = (
            f"the request headers did not arrive within {self.site.header_timeout} seconds "
            f"(server.http_header_timeout)"
        )
        log.info(
            "rejecting a request from {peer}: {message}",
            peer=self.transport.getPeer(),
            message=message,
        )
        self.transport.write(raw_response(Response.error(http.REQUEST_TIMEOUT, message)))
        self.loseConnection()

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.site.reactor.callLater(
            self.site.header_timeout, self.headers_too_slow
        )

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None and self._header_timer.active():
            self._header_timer.cancel()
        self._header_timer = None


class TwinferSite(server.Site):
    """The HTTP front end's factory: a :class:`Router` plus the body limits.

    ``body_timeout`` is both the idle timeout of a connection and the time
    a request body may take to arrive in full; see :class:`Channel` for the
    header timeout and the connection limit.  HTTP/1.1 only (the site does
    not negotiate HTTP/2, whose streams would bypass the body checks).
    """

    protocol = Channel  # type: ignore[assignment]  # plain HTTP/1.1, see above
    requestFactory = LimitedRequest

    def __init__(
        self,
        router: Router,
        dataplane: DataPlane,
        max_body_size: int,
        body_timeout: float,
        reactor: Any = None,
        *,
        header_timeout: float = 10.0,
        max_connections: int = 1024,
        max_inflight: int = 0,
    ) -> None:
        super().__init__(
            router, timeout=body_timeout, reactor=reactor, parsePOSTFormSubmission=False
        )
        self.dataplane = dataplane
        dataplane.frontend(FRONTEND)  # its gauges exist before the first client
        self.max_body_size = max_body_size
        self.body_timeout = body_timeout
        #: Seconds a request's headers may take (``server.http_header_timeout``).
        self.header_timeout = header_timeout
        #: Connections this site holds at once (``server.max_connections``).
        self.max_connections = max_connections
        #: Requests one connection may have in flight (0: no limit).
        self.max_inflight = max_inflight
        #: The open connections (refused ones are never in it).
        self.channels: set[Channel] = set()
        self.noisy = False
