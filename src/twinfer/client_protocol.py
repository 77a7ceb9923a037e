"""The Twisted protocol of :mod:`twinfer.client`: one connection's bytes <-> messages.

:class:`ClientProtocol` is a thin adapter: the handshake, request ids and the
rules of the protocol live in a client-side
:class:`~twinfer.wire.connection.Connection`; it fires each request's
``Deferred`` with the reply, or fails it with one of the errors below.
:class:`~twinfer.client.TwinferClient` (and
:class:`~twinfer.failover.ClientPool`) send their requests through it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

import twinfer
from twinfer.errors import ErrorCode, TwinferError
from twinfer.netutil import enable_direct_client_reads, set_no_delay
from twinfer.wire.connection import Connection, Role
from twinfer.wire.events import (
    GoAwayReceived,
    HandshakeComplete,
    MessageReceived,
    ProtocolViolation,
    ServerClosing,
)
from twinfer.wire.messages import Error, GoAway, Hello, Message

AGENT = f"twinfer-client/{twinfer.__version__}"


class ConnectionDropped(TwinferError):
    """``UNAVAILABLE``: the connection closed while the request was in flight
    (the server may or may not have run it)."""


class GoneAway(TwinferError):
    """``UNAVAILABLE`` for a request the server never worked on: it arrived
    after the server's ``GOAWAY`` (its id is above the last one answered)."""


class Unreachable(TwinferError):
    """``UNAVAILABLE``: no connection could be made to any endpoint."""


class ClientProtocol(Protocol):
    """Speaks the client side of the protocol; use through :class:`TwinferClient`."""

    transport: Any

    def __init__(self) -> None:
        self._connection = Connection(Role.CLIENT, agent=AGENT)
        self._lost: Failure | None = None
        self._closed_waiters: list[Deferred[None]] = []
        #: The server's HELLO (its version and frame limit), once received.
        self.server_hello = Hello()
        #: Fires with the server's HELLO once the handshake is done.
        self.handshake: Deferred[Hello] = Deferred()
        #: Fires with the server's ``GOAWAY`` if it sends one (then no new
        #: request may be sent here; those in flight are still answered).
        self.goaway: Deferred[GoAway] = Deferred()

    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        enable_direct_client_reads(self.transport, self)  # large replies land in place
        self._connection.start_handshake()
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        self._connection.receive_data(data)
        self._handle_events()

    def read_buffer(self) -> memoryview | None:
        """Where the transport may receive the rest of a large reply in place
        (see :class:`twinfer.netutil.DirectReads`): the frame's own buffer,
        which the reply's tensors are then views of."""
        if self._lost is not None:
            return None
        return self._connection.read_buffer()

    def buffer_filled(self, count: int) -> None:
        """``count`` bytes arrived in :meth:`read_buffer`."""
        self._connection.buffer_filled(count)
        self._handle_events()

    def _handle_events(self) -> None:
        for event in self._connection.events():
            if isinstance(event, MessageReceived):
                d: Deferred[Message] = event.handle
                if isinstance(event.message, Error):
                    d.errback(self._error(event.request_id, event.message))
                else:
                    d.callback(event.message)
            elif isinstance(event, GoAwayReceived):
                self.goaway.callback(event.goaway)
            elif isinstance(event, HandshakeComplete):
                self.server_hello = event.hello
                self.handshake.callback(event.hello)
            elif isinstance(event, ServerClosing):
                self._fail_all(event.error)
            elif isinstance(event, ProtocolViolation):
                error = event.error
                message = f"bad data from the server: {error.message}"
                self._fail_all(TwinferError(error.code, message))
                self.transport.loseConnection()

    def _error(self, request_id: int, error: Error) -> TwinferError:
        """The exception for an ``ERROR`` reply: :class:`GoneAway` for an
        ``UNAVAILABLE`` the server sent to a request it never accepted."""
        going = self._connection.going_away
        if (
            going is not None
            and request_id > going.last_request_id
            and error.code == ErrorCode.UNAVAILABLE
        ):
            return GoneAway(error.code, error.message)
        return TwinferError(error.code, error.message)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._lost = reason
        self._fail_all(
            ConnectionDropped(
                ErrorCode.UNAVAILABLE,
                f"connection to the server lost: {reason.getErrorMessage()}",
            )
        )
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    def _fail_all(self, error: TwinferError) -> None:
        """Fail the handshake (if still waited for) and every request in flight."""
        if not self.handshake.called:
            self.handshake.errback(error)
        for d in self._connection.close().values():
            d.errback(error)

    def _flush(self) -> None:
        chunks = self._connection.data_to_send()
        if chunks:
            self.transport.writeSequence([c if type(c) is bytes else bytes(c) for c in chunks])

    def request(self, message: Message) -> Deferred[Message]:
        """Send ``message`` with a fresh request id; fires with the reply message.

        Cancelling the Deferred sends CANCEL for the request.  Fails with
        :class:`TwinferError` (``UNAVAILABLE``) once the connection is
        closed, and with :class:`~twinfer.errors.LocalProtocolError` or
        :class:`~twinfer.errors.CodecError` for a request that cannot be sent
        (larger than the server accepts, a dtype the protocol cannot carry).
        """
        if self._lost is not None:
            return defer.fail(
                TwinferError(ErrorCode.UNAVAILABLE, "the connection to the server is closed")
            )
        request_id = 0

        def cancel(d: Deferred[Message]) -> None:
            if self._connection.cancel(request_id):
                self._flush()

        d: Deferred[Message] = Deferred(cancel)
        try:
            request_id = self._connection.send_request(message, d)
        except TwinferError as e:
            return defer.fail(e)
        self._flush()
        return d

    def close(self) -> Deferred[None]:
        """Close the connection; fires with ``None`` once it is closed.

        Requests still in flight fail with ``UNAVAILABLE``.
        """
        if self._lost is not None:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        self.transport.loseConnection()
        return d

    def when_closed(self) -> Deferred[None]:
        """Fires with ``None`` once the connection is closed (``connectionLost``),
        whoever closed it."""
        if self._lost is not None:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        return d

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._connection.in_flight)

    @property
    def going_away(self) -> GoAway | None:
        """The server's ``GOAWAY``, once received."""
        return self._connection.going_away

    @property
    def usable(self) -> bool:
        """Whether new requests can be sent here: connected, the handshake
        done, and the server has not said it is going away."""
        return (
            self._lost is None
            and self.handshake.called
            and not self._connection.closed
            and self._connection.going_away is None
        )
