"""Small socket-level helpers shared by the server and the Twisted client."""

from __future__ import annotations

from errno import EWOULDBLOCK
from typing import Any, cast

from twisted.internet import main, tcp


def set_no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off on a TCP transport (under TLS too).

    Frames are written whole; without TCP_NODELAY the last segment of a large
    frame can wait for the peer's delayed ACK (tens of milliseconds at
    concurrency 1).
    """
    while transport is not None:
        set_option = getattr(transport, "setTcpNoDelay", None)
        if set_option is not None:
            set_option(True)
            return
        transport = getattr(transport, "transport", None)  # TLS wraps the TCP transport


class DirectReads(tcp.Connection):
    """A TCP transport that receives large frame bodies in place.

    When its protocol offers a buffer (``read_buffer()``: the unfilled rest of
    the frame being reassembled), bytes are received straight into it with
    ``socket.recv_into`` and reported with ``buffer_filled(count)``: no
    64 KiB ``bytes`` per read and no copy into the frame afterwards. Other
    reads (headers, small frames) go through Twisted's usual ``doRead``.
    """

    #: Below this many missing bytes, the ordinary path is as good.
    MIN_DIRECT = 16384
    #: What offers the buffers, when not the transport's own protocol (a
    #: client endpoint wraps the protocol in one that forwards only bytes).
    reader: Any = None

    def doRead(self) -> Any:
        reader: Any = self.reader if self.reader is not None else self.protocol
        read_buffer = getattr(reader, "read_buffer", None)
        target = read_buffer() if read_buffer is not None else None
        if target is None or len(target) < self.MIN_DIRECT:
            return super().doRead()
        try:
            count = self.socket.recv_into(target)
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not count:
            return main.CONNECTION_DONE
        reader.buffer_filled(count)
        return None


class DirectReadServer(DirectReads, tcp.Server):
    """The server side of :class:`DirectReads` (see :func:`enable_direct_reads`)."""


class DirectReadClient(DirectReads, tcp.Client):
    """The client side of :class:`DirectReads` (see :func:`enable_direct_client_reads`)."""


def enable_direct_client_reads(transport: Any, reader: Any) -> bool:
    """Make a connected plain TCP client transport a :class:`DirectReadClient`
    whose large frame bodies go to ``reader`` (its ``read_buffer`` and
    ``buffer_filled``: the client protocol, from its ``connectionMade``);
    returns whether it was.

    Twisted's connector builds a ``tcp.Client`` and offers no hook to build
    another class, so the transport's class is changed in place: the
    subclass adds no state, only :meth:`DirectReads.doRead`.  Anything else
    (TLS, a test transport) is left alone.
    """
    if type(transport) is tcp.Client:
        transport.__class__ = DirectReadClient
        cast(DirectReadClient, transport).reader = reader
        return True
    return False


def enable_direct_reads(port: Any) -> bool:
    """Make a listening TCP port create :class:`DirectReadServer` transports.

    Only a plain ``tcp.Port`` is changed (TLS decrypts into new buffers
    anyway); returns whether it was.
    """
    if type(port) is tcp.Port and port.transport is tcp.Server:
        port.transport = DirectReadServer
        return True
    return False
