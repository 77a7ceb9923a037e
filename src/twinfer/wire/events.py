"""The events a :class:`~twinfer.wire.connection.Connection` hands to its adapter.

Each carries the request id of the frame it came from.  A server sees
:class:`HandshakeComplete`, :class:`MessageReceived` (the requests) and
:class:`ProtocolViolation`; a client also :class:`ServerClosing` and
:class:`GoAwayReceived`.
"""

from __future__ import annotations

from typing import Any

import attrs

from twinfer.errors import RemoteProtocolError, TwinferError
from twinfer.wire.messages import GoAway, Hello, Message


@attrs.frozen
class HandshakeComplete:
    """The handshake succeeded; ``hello`` is the peer's HELLO.

    (A server connection has already queued its own HELLO in answer.)
    """

    request_id: int
    hello: Hello


@attrs.frozen
class MessageReceived:
    """A message from the peer: a request (server) or the reply to one of
    our requests (client; ``handle`` is what was given to
    :meth:`Connection.send_request`)."""

    request_id: int
    message: Message
    handle: Any = None


@attrs.frozen(eq=False)
class ProtocolViolation:
    """The peer broke the protocol.

    A server connection has queued the ``ERROR`` frame that answers it.  When
    ``error.closes_connection``, the connection is now closed: send what
    :meth:`Connection.data_to_send` holds and drop the transport.  Otherwise
    only this request failed.  ``message`` is the decoded message when the
    frame was valid but not allowed (a duplicate request id).
    """

    request_id: int
    error: RemoteProtocolError
    message: Message | None = None


@attrs.frozen
class ServerClosing:
    """(Client only.) The server sent an ``ERROR`` that ends the connection:
    a connection-level code, or any error in answer to the HELLO.

    If ``request_id`` was a request in flight, a :class:`MessageReceived`
    with the same ``ERROR`` came just before.  The connection is now closed.
    """

    request_id: int
    error: TwinferError


@attrs.frozen
class GoAwayReceived:
    """(Client only.) The server sent ``GOAWAY``: it answers the requests in
    flight up to ``goaway.last_request_id`` and accepts no new ones.

    The connection stays open for those replies (requests above the last id
    may be answered ``UNAVAILABLE``: the server never worked on them), but
    :meth:`Connection.send_request` now refuses new requests.
    """

    request_id: int
    goaway: GoAway


Event = HandshakeComplete | MessageReceived | ProtocolViolation | ServerClosing | GoAwayReceived
