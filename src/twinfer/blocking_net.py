"""The blocking client's sockets: endpoints, connecting (TCP or TLS), its errors,
and :class:`Channel`, which drives one socket through a client
:class:`~twinfer.wire.connection.Connection`.

Split from :mod:`twinfer.blocking` (which re-exports the public names) so
that the client there is the API and the moves between connections.
"""

from __future__ import annotations

import collections
import contextlib
import selectors
import socket
import ssl
import time
from collections.abc import Iterable

import twinfer
from twinfer.errors import ErrorCode, TwinferError
from twinfer.wire.connection import Connection, Role
from twinfer.wire.events import (
    GoAwayReceived,
    HandshakeComplete,
    MessageReceived,
    ProtocolViolation,
    ServerClosing,
)
from twinfer.wire.messages import Hello, Message

AGENT = f"twinfer-blocking/{twinfer.__version__}"


class TransportError(TwinferError):
    """The server could not be reached or stopped answering; it did not send this error."""


class ConnectFailed(TransportError):
    """No connection could be made (refused, unresolvable, TLS verification failed...).

    ``__cause__`` holds the underlying :class:`OSError` or :class:`ssl.SSLError`.
    """


class ConnectionLost(TransportError):
    """The connection dropped; requests still waiting for a reply are lost."""


class ReplyTimeout(TransportError, TimeoutError):
    """A reply did not arrive within the client's ``timeout``.

    The requests concerned are cancelled on the server and their late replies
    dropped, so the client stays usable.
    """


def parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """Split ``tcp:HOST:PORT`` or ``tls:HOST:PORT`` into (kind, host, port).

    ``HOST`` may be an IPv6 address in brackets (``tcp:[::1]:9000``).
    Raises ``ValueError`` naming the problem.
    """
    kind, _, rest = endpoint.partition(":")
    host, _, port = rest.rpartition(":")
    if kind not in ("tcp", "tls") or not host or not port.isdigit() or int(port) > 0xFFFF:
        raise ValueError(
            f"bad server endpoint {endpoint!r}: expected tcp:HOST:PORT or tls:HOST:PORT"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return kind, host, int(port)


def split_endpoints(endpoints: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"tcp:a:9000,tcp:b:9000"`` (or a list) -> the endpoints, each checked
    by :func:`parse_endpoint`; raises ``ValueError`` for none or a bad one."""
    if isinstance(endpoints, str):
        endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
    listed = list(endpoints)
    if not listed:
        raise ValueError("no server endpoint given")
    for endpoint in listed:
        parse_endpoint(endpoint)
    return listed


def open_socket(
    endpoint: str,
    ca_file: str | None,
    timeout: float | None,
    *,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> socket.socket:
    """A connected socket to ``endpoint`` (TLS-wrapped and verified for ``tls:``;
    see :func:`twinfer.tls.blocking_context`).

    Raises :class:`ConnectFailed` naming the endpoint and the reason.
    """
    kind, host, port = parse_endpoint(endpoint)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ConnectFailed(
            ErrorCode.UNAVAILABLE, f"cannot connect to {endpoint}: {os_reason(e)}"
        ) from e
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if kind == "tls":
            context = blocking_context(ca_file, cert_file, key_file)
            # Handshake while the socket is still blocking (with the timeout).
            sock = context.wrap_socket(sock, server_hostname=host)
    except (OSError, ssl.SSLError) as e:
        sock.close()
        reason = e.verify_message if isinstance(e, ssl.SSLCertVerificationError) else e
        raise ConnectFailed(
            ErrorCode.UNAVAILABLE, f"TLS handshake with {endpoint} failed: {reason}"
        ) from e
    return sock


def blocking_context(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """An ``ssl`` client context: the server verified against ``ca_file``
    (None: the system's store), TLS 1.2 or newer, and the client certificate
    ``cert_file`` (its key in ``key_file`` or in the same file) if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    elif key_file is not None:
        raise ValueError("a client key needs its certificate (--cert)")
    return context


def os_reason(error: OSError) -> str:
    """A short reason for a socket error ("timed out", "Connection refused")."""
    if isinstance(error, socket.timeout | TimeoutError):
        return "timed out"
    return error.strerror or str(error) or type(error).__name__


_RECV_SIZE = 256 * 1024
# Linux's IOV_MAX; sendmsg rejects longer chunk lists.
_IOV_MAX = 1024
# Largest slice handed to one SSL write (it then maps to a few TLS records).
_TLS_WRITE = 256 * 1024


class Channel:
    """One connection's socket driven through a client :class:`Connection`:
    writing and reading at once (``selectors``), the replies, the loss.

    The base of :class:`twinfer.blocking.BlockingClient`, which moves it
    from socket to socket (:meth:`_attach`).
    """

    endpoint: str
    timeout: float | None
    server: Hello | None

    def __init__(self, sock: socket.socket) -> None:
        self._recv_buffer = bytearray(_RECV_SIZE)
        self._recv_view = memoryview(self._recv_buffer)
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        """Use ``sock`` (connected, nothing sent yet) from now on."""
        #: The server's HELLO (protocol version, frame limit, agent), after the handshake.
        self.server: Hello | None = None
        self._sock: socket.socket | None = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)
        self._connection = Connection(Role.CLIENT, agent=AGENT)
        # Chunks not yet written, in order; frames are never interleaved.
        self._out: collections.deque[memoryview] = collections.deque()
        # Replies that arrived for requests being waited for.
        self._replies: dict[int, Message] = {}
        self._lost: TwinferError | None = None

    def _close_socket(self) -> None:
        self._connection.close()
        sock, self._sock = self._sock, None
        if sock is not None:
            self._selector.close()
            sock.close()

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (by :meth:`close` or because it dropped)."""
        return self._sock is None

    def _queue(self, message: Message) -> int:
        """Encode ``message`` and append it to the outgoing chunks; returns its id.

        A request that cannot be sent (larger than the server accepts, say)
        raises :class:`~twinfer.errors.LocalProtocolError` and sends nothing.
        """
        if self._lost is not None:
            raise self._closed_error()
        request_id = self._connection.send_request(message)
        self._take_output()
        return request_id

    def _take_output(self) -> None:
        """Move the connection's queued chunks to the outgoing queue."""
        chunks = self._connection.data_to_send()
        self._out.extend(memoryview(c).cast("B") for c in chunks if len(c))

    def _closed_error(self) -> TwinferError:
        lost = self._lost
        assert lost is not None
        if isinstance(lost, ConnectionLost):
            return ConnectionLost(
                lost.code, f"the connection to {self.endpoint} is closed ({lost.message})"
            )
        return lost

    def _abandon(self, request_ids: Iterable[int]) -> None:
        """Cancel requests whose replies nobody waits for any more."""
        if self._lost is not None or self._sock is None:
            return
        cancelled = [
            request_id
            for request_id in request_ids
            # (A reply not taken yet is dropped; a late one will be by the connection.)
            if self._replies.pop(request_id, None) is None and self._connection.cancel(request_id)
        ]
        if not cancelled:
            return
        self._take_output()
        # Send the cancels now if the socket takes them; never block for it.
        # (A lost connection is reported by the next call, not from here.)
        with contextlib.suppress(TransportError):
            self._pump(0.0)

    def _wait_one(self, request_ids: Iterable[int], timeout: float | None) -> tuple[int, Message]:
        """Write and read until one of ``request_ids`` is answered; return (id, reply).

        The reply may be an :class:`Error`.  When ``timeout`` passes first,
        the requests are cancelled and :class:`ReplyTimeout` is raised.
        """
        ids = set(request_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for request_id in ids:
                message = self._replies.pop(request_id, None)
                if message is not None:
                    return request_id, message
            remaining = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._abandon(ids)
                    raise ReplyTimeout(
                        ErrorCode.DEADLINE_EXCEEDED,
                        f"no reply from {self.endpoint} within {timeout:g} s",
                    )
            self._pump(remaining)

    def _pump(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` s for the socket, then write and read what it allows."""
        sock = self._sock
        if sock is None or self._lost is not None:
            raise self._closed_error()
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
        self._selector.modify(sock, events)
        # Decrypted bytes already inside the SSL object do not wake select().
        if self._tls and sock.pending():  # type: ignore[attr-defined]
            ready = selectors.EVENT_READ
        else:
            ready = 0
            for _key, mask in self._selector.select(timeout):
                ready |= mask
        try:
            if ready & selectors.EVENT_WRITE:
                self._write(sock)
            if ready & selectors.EVENT_READ:
                self._read(sock)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass  # not ready after all; the next round waits again
        except OSError as e:
            # A TLS alert waiting to be read (a server that refused our client
            # certificate) says more than the failed write would.
            self._connection_lost(self._tls_alert(sock) or os_reason(e))

    def _tls_alert(self, sock: socket.socket) -> str | None:
        """The TLS alert the server sent before it closed, if one is there to read.

        With TLS 1.3 a server refuses a client certificate after the client
        thinks the handshake is done, so the alert (``certificate required``,
        ``unknown ca``) arrives while the client writes its first frame.
        """
        if not self._tls:
            return None
        try:
            sock.recv(1)
        except ssl.SSLError as e:
            if not isinstance(e, ssl.SSLEOFError | ssl.SSLWantReadError):
                return str(e)
        except OSError:
            pass
        return None

    def _write(self, sock: socket.socket) -> None:
        out = self._out
        while out:
            if self._tls:
                # SSLSocket has no sendmsg; a failed write must be retried
                # with the same slice, which the next round does.
                sent = sock.send(out[0][:_TLS_WRITE])
            else:
                sent = sock.sendmsg([out[i] for i in range(min(len(out), _IOV_MAX))])
            while sent:
                head = out[0]
                if sent >= len(head):
                    sent -= len(head)
                    out.popleft()
                else:
                    out[0] = head[sent:]
                    sent = 0

    def _read(self, sock: socket.socket) -> None:
        received = sock.recv_into(self._recv_buffer)
        if received == 0:
            self._connection_lost("the server closed the connection")
        self._connection.receive_data(self._recv_view[:received])
        for event in self._connection.events():
            if isinstance(event, MessageReceived):
                self._replies[event.request_id] = event.message
            elif isinstance(event, HandshakeComplete):
                self.server = event.hello
            elif isinstance(event, GoAwayReceived):
                pass  # the connection refuses new requests; _call moves on
            elif isinstance(event, ServerClosing):
                self._server_closing(event)
            elif isinstance(event, ProtocolViolation):
                self._connection_lost(f"bad data from the server: {event.error}")

    def _server_closing(self, event: ServerClosing) -> None:
        """The server sent a connection-level error and closes the connection."""
        error = event.error
        if self.server is None:
            # The handshake was refused: connect() (or handshake()) raises it.
            self._lost = ConnectionLost(ErrorCode.UNAVAILABLE, str(error))
            self._close_socket()
            raise TwinferError(error.code, error.message)
        if event.request_id in self._replies:
            # The caller gets this error itself; later calls get UNAVAILABLE.
            self._lost = ConnectionLost(ErrorCode.UNAVAILABLE, str(error))
            self._close_socket()
            return
        self._connection_lost(f"the server closed the connection: {error}")

    def _connection_lost(self, reason: str) -> None:
        self._lost = ConnectionLost(ErrorCode.UNAVAILABLE, reason)
        pending = len(self._connection.close())
        self._close_socket()
        detail = f" with {pending} request(s) unanswered" if pending else ""
        raise ConnectionLost(
            ErrorCode.UNAVAILABLE, f"connection to {self.endpoint} lost{detail}: {reason}"
        )
