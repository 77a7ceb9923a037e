"""A blocking twinfer client for code without a reactor (scripts, notebooks, the CLI).

Example::

    from twinfer.blocking import BlockingClient

    with BlockingClient.connect("tcp:127.0.0.1:9000") as client:
        outputs = client.infer("tiny", {"x": numpy.ones((2, 4), "float32")})
        print(outputs["y"])

It speaks the same protocol as :mod:`twinfer.client` through the same sans-I/O
:class:`~twinfer.wire.connection.Connection` (handshake, request ids, the
protocol's rules), over a plain :mod:`socket` (wrapped by :mod:`ssl` for ``tls:``).  One
client is one connection and is not thread-safe: use one per thread.

Internally every call queues its frames and runs a small ``selectors`` loop
that writes and reads at the same time until the replies it waits for have
arrived.  Writing and reading together matters for :meth:`BlockingClient.infer_many`:
the server stops reading a connection whose replies are not being read, so a
client that first wrote everything and only then read could deadlock on big
pipelines.  Tensor data is written straight from the arrays' memory
(``sendmsg`` on TCP) and replies are received into one reusable buffer, from
which the frame decoder makes the only copy.

Errors: an ``ERROR`` from the server raises :class:`~twinfer.errors.TwinferError`
with its code; failing to reach the server raises :class:`ConnectFailed`, a
dropped connection :class:`ConnectionLost` (both ``UNAVAILABLE``) and a reply
that does not come in time :class:`ReplyTimeout` (``DEADLINE_EXCEEDED``).
"""

from __future__ import annotations

import collections
import contextlib
import selectors
import socket
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

import twinfer
from twinfer.errors import ErrorCode, TwinferError
from twinfer.wire.connection import Connection, Role
from twinfer.wire.events import HandshakeComplete, MessageReceived, ProtocolViolation, ServerClosing
from twinfer.wire.messages import (
    Error,
    GetMetadata,
    Hello,
    InferReply,
    InferRequest,
    ListModels,
    Message,
    Metadata,
    ModelInfo,
    ModelList,
    Ping,
    Pong,
)

AGENT = f"twinfer-blocking/{twinfer.__version__}"
DEFAULT_SERVER = "tcp:127.0.0.1:9000"
#: Seconds to wait for the connection, the handshake and each reply.
DEFAULT_TIMEOUT = 30.0
#: Requests :meth:`BlockingClient.infer_many` keeps in flight at once.
DEFAULT_WINDOW = 64

_RECV_SIZE = 256 * 1024
# Linux's IOV_MAX; sendmsg rejects longer chunk lists.
_IOV_MAX = 1024
# Largest slice handed to one SSL write (it then maps to a few TLS records).
_TLS_WRITE = 256 * 1024
M = TypeVar("M")


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


def _expect(message: Message, kind: type[M]) -> M:
    if not isinstance(message, kind):
        raise TwinferError(
            ErrorCode.INTERNAL, f"expected {kind.__name__} from the server, got {message!r}"
        )
    return message


class BlockingClient:
    """One blocking connection to a twinfer server.  Get one from :meth:`connect`.

    Mirrors :class:`twinfer.client.TwinferClient`, returning values instead of
    Deferreds.  Not thread-safe.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        endpoint: str = "",
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        """Wrap a connected socket (plain or ``ssl``) that has not sent anything yet.

        Most code should call :meth:`connect`, which also does the handshake.
        """
        self.endpoint = endpoint or repr(sock.getpeername())
        #: Seconds to wait for each call's replies; ``None`` waits forever.
        self.timeout = timeout
        #: The server's HELLO (protocol version, frame limit, agent), after the handshake.
        self.server: Hello | None = None
        self._sock: socket.socket | None = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)
        self._connection = Connection(Role.CLIENT, agent=AGENT)
        self._recv_buffer = bytearray(_RECV_SIZE)
        self._recv_view = memoryview(self._recv_buffer)
        # Chunks not yet written, in order; frames are never interleaved.
        self._out: collections.deque[memoryview] = collections.deque()
        # Replies that arrived for requests being waited for.
        self._replies: dict[int, Message] = {}
        self._lost: TwinferError | None = None

    # -- connecting ---------------------------------------------------------

    @classmethod
    def connect(
        cls,
        endpoint: str = DEFAULT_SERVER,
        *,
        ca_file: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> BlockingClient:
        """Connect to ``tcp:HOST:PORT`` or ``tls:HOST:PORT`` and do the handshake.

        For ``tls:`` the server's certificate must be valid for HOST and chain
        to ``ca_file`` (a PEM bundle; default: the system's trust store).
        ``timeout`` bounds the connection, the handshake and every later call.
        Raises :class:`ConnectFailed` when the server cannot be reached and
        :class:`TwinferError` when it refuses the handshake.
        """
        kind, host, port = parse_endpoint(endpoint)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ConnectFailed(
                ErrorCode.UNAVAILABLE, f"cannot connect to {endpoint}: {_os_reason(e)}"
            ) from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if kind == "tls":
                context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
                # Handshake while the socket is still blocking (with the timeout).
                sock = context.wrap_socket(sock, server_hostname=host)
        except (OSError, ssl.SSLError) as e:
            sock.close()
            reason = e.verify_message if isinstance(e, ssl.SSLCertVerificationError) else e
            raise ConnectFailed(
                ErrorCode.UNAVAILABLE, f"TLS handshake with {endpoint} failed: {reason}"
            ) from e
        client = cls(sock, endpoint=endpoint, timeout=timeout)
        try:
            client.handshake()
        except BaseException:
            client.close()
            raise
        return client

    def handshake(self) -> Hello:
        """Send HELLO and wait for the server's; returns it (also kept as :attr:`server`).

        :meth:`connect` does this; call it yourself only on a client made from
        a socket.  Raises :class:`TwinferError` with the server's code when it
        refuses (the connection is then closed) and :class:`ReplyTimeout`
        when it does not answer within :attr:`timeout`.
        """
        if self._lost is not None:
            raise self._closed_error()
        self._connection.start_handshake()
        self._take_output()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while self.server is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise ReplyTimeout(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"no HELLO from {self.endpoint} within {self.timeout:g} s",
                )
            self._pump(remaining)
        return self.server

    # -- the API --------------------------------------------------------------

    def infer_reply(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        *,
        timeout_ms: int = 0,
        priority: int = 0,
    ) -> InferReply:
        """Like :meth:`infer`, but returns the whole :class:`InferReply`
        (outputs plus the server's queue and compute times in microseconds)."""
        request = InferRequest(model, dict(inputs), tuple(outputs or ()), timeout_ms, priority)
        return _expect(self._call(request), InferReply)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        *,
        timeout_ms: int = 0,
        priority: int = 0,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` (name -> array); return output name -> array.

        Only ``outputs`` are returned when given.  ``timeout_ms`` is the
        server-side deadline for the job to start (0: the server's default).
        Raises :class:`TwinferError` with the server's code on a server error.
        """
        reply = self.infer_reply(model, inputs, outputs, timeout_ms=timeout_ms, priority=priority)
        return dict(reply.outputs)

    def infer_many(
        self,
        model: str,
        inputs: Iterable[Mapping[str, Any]],
        outputs: Sequence[str] | None = None,
        *,
        timeout_ms: int = 0,
        window: int = DEFAULT_WINDOW,
    ) -> list[dict[str, np.ndarray]]:
        """Run ``model`` on each input set, pipelined; return the outputs in input order.

        Up to ``window`` requests are in flight at once (the server's per
        connection limit is 1024 by default); replies are collected by request
        id as they arrive, in any order.  On the first error the requests
        still in flight are cancelled and the error is raised.
        """
        if window < 1:
            raise ValueError("window must be at least 1")
        wanted = tuple(outputs or ())
        pending = iter(inputs)
        results: list[dict[str, np.ndarray] | None] = []
        in_flight: dict[int, int] = {}  # request id -> index in results
        exhausted = False
        try:
            while True:
                while not exhausted and len(in_flight) < window:
                    item = next(pending, None)
                    if item is None:
                        exhausted = True
                        break
                    request = InferRequest(model, dict(item), wanted, timeout_ms, 0)
                    in_flight[self._queue(request)] = len(results)
                    results.append(None)
                if not in_flight:
                    break
                request_id, message = self._wait_one(in_flight, self.timeout)
                index = in_flight.pop(request_id)
                results[index] = dict(_expect(_check(message), InferReply).outputs)
        finally:
            # After an error or a timeout: stop the requests still running.
            self._abandon(in_flight.keys())
        return [r for r in results if r is not None]

    def models(self) -> list[ModelInfo]:
        """The served models."""
        return list(_expect(self._call(ListModels()), ModelList).models)

    def metadata(self, model: str) -> Metadata:
        """``model``'s inputs, outputs (dynamic dims are ``-1``) and devices."""
        return _expect(self._call(GetMetadata(model)), Metadata)

    def ping(self) -> float:
        """Round-trip time to the server, in seconds."""
        start = time.perf_counter()
        _expect(self._call(Ping()), Pong)
        return time.perf_counter() - start

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._lost is None:
            self._lost = ConnectionLost(ErrorCode.UNAVAILABLE, "the client was closed")
        self._close_socket()

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

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- requests and replies -------------------------------------------------

    def _call(self, message: Message) -> Message:
        """Send ``message`` and wait for its reply; an ``ERROR`` reply is raised."""
        return _check(self._wait_one([self._queue(message)], self.timeout)[1])

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
            self._connection_lost(_os_reason(e))

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


def _check(message: Message) -> Message:
    """Raise an ``ERROR`` reply as :class:`TwinferError`; pass anything else through."""
    if isinstance(message, Error):
        raise TwinferError(message.code, message.message)
    return message


def _os_reason(error: OSError) -> str:
    if isinstance(error, socket.timeout | TimeoutError):
        return "timed out"
    return error.strerror or str(error) or type(error).__name__
