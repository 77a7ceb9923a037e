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

Several endpoints (``BlockingClient.connect("tcp:a:9000,tcp:b:9000")``, or a
list): the client uses the first that answers and moves on when its
connection is lost or its server sends ``GOAWAY``, re-sending the inference
it had in flight once (inference is idempotent; other requests are never
re-sent).  :attr:`BlockingClient.resent` counts them.  The socket handling
lives in :mod:`twinfer.blocking_net`; the rest stays in one module because
every call, the move to another endpoint and the shared-memory path share one
connection's state inside the single :class:`BlockingClient`.

Errors: an ``ERROR`` from the server raises :class:`~twinfer.errors.TwinferError`
with its code; failing to reach the server raises :class:`ConnectFailed`, a
dropped connection :class:`ConnectionLost` (both ``UNAVAILABLE``) and a reply
that does not come in time :class:`ReplyTimeout` (``DEADLINE_EXCEEDED``).
"""

from __future__ import annotations

import collections
import logging
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from twinfer.blocking_net import (
    AGENT,
    Channel,
    ConnectFailed,
    ConnectionLost,
    ReplyTimeout,
    TransportError,
    open_socket,
    parse_endpoint,
    split_endpoints,
)
from twinfer.errors import ErrorCode, TwinferError, expect_reply
from twinfer.shm_client import SharedMemoryState
from twinfer.wire.messages import (
    Error,
    GetMetadata,
    Hello,
    ImageRequest,
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

#: Requests that may be sent again: they change nothing on the server.
_IDEMPOTENT = (InferRequest, ImageRequest)
__all__ = [
    "AGENT",
    "DEFAULT_SERVER",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WINDOW",
    "BlockingClient",
    "ConnectFailed",
    "ConnectionLost",
    "ReplyTimeout",
    "TransportError",
    "parse_endpoint",
    "split_endpoints",
]
DEFAULT_SERVER = "tcp:127.0.0.1:9000"
#: Seconds to wait for the connection, the handshake and each reply.
DEFAULT_TIMEOUT = 30.0
#: Requests :meth:`BlockingClient.infer_many` keeps in flight at once.
DEFAULT_WINDOW = 64

log = logging.getLogger(__name__)


class BlockingClient(Channel):
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
        endpoints: Sequence[str] = (),
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        """Wrap a connected socket (plain or ``ssl``) that has not sent anything yet.

        Most code should call :meth:`connect`, which also does the handshake.
        ``endpoints`` (with ``endpoint`` among them) are where the client may
        move to when the connection is lost or the server goes away.
        """
        self.endpoint = endpoint or repr(sock.getpeername())
        #: Every endpoint the client may use, in order.
        self.endpoints = list(endpoints) or [self.endpoint]
        self.ca_file = ca_file
        #: The client certificate (and its key) presented to ``tls:`` servers.
        self.cert_file = cert_file
        self.key_file = key_file
        #: Seconds to wait for each call's replies; ``None`` waits forever.
        self.timeout = timeout
        #: Inference requests sent a second time after a lost connection or a GOAWAY.
        self.resent = 0
        self._shm = SharedMemoryState()  # (shared_memory=True)
        super().__init__(sock)

    # -- connecting ---------------------------------------------------------

    @classmethod
    def connect(
        cls,
        endpoint: str | Sequence[str] = DEFAULT_SERVER,
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> BlockingClient:
        """Connect to ``tcp:HOST:PORT`` or ``tls:HOST:PORT`` and do the handshake.

        ``endpoint`` may also list several, comma-separated or as a list: the
        first that answers is used, and the client moves to the next when
        its connection is lost or its server sends ``GOAWAY`` (to the same
        one first then: through a balancer that is another node), re-sending
        the inference it had in flight once (never other requests).
        For ``tls:`` the server's certificate must be valid for HOST and chain
        to ``ca_file`` (a PEM bundle; default: the system's trust store), TLS
        1.2 or newer; for servers that require a client certificate (mutual
        TLS), ``cert_file`` is presented, with its key from ``key_file`` (or
        from ``cert_file`` itself).
        ``timeout`` bounds the connection, the handshake and every later call.
        Raises :class:`ConnectFailed` when no server can be reached and
        :class:`TwinferError` when it refuses the handshake.
        """
        endpoints = split_endpoints(endpoint if isinstance(endpoint, str) else list(endpoint))
        failures: list[ConnectFailed] = []
        for name in endpoints:
            try:
                sock = open_socket(name, ca_file, timeout, cert_file=cert_file, key_file=key_file)
            except ConnectFailed as e:
                failures.append(e)
                continue
            client = cls(
                sock,
                endpoint=name,
                timeout=timeout,
                endpoints=endpoints,
                ca_file=ca_file,
                cert_file=cert_file,
                key_file=key_file,
            )
            try:
                client.handshake()
            except BaseException:
                client.close()
                raise
            return client
        if len(failures) == 1:
            raise failures[0]
        raise ConnectFailed(
            ErrorCode.UNAVAILABLE, "; ".join(f.message for f in failures)
        ) from failures[-1].__cause__

    def _move(self, start: int, why: str) -> None:
        """Leave this connection for a new one, to ``endpoints[start]`` or the
        next that answers; raises :class:`ConnectionLost` (``why`` and the
        reasons) when none does, and the client is then closed."""
        self._close_socket()
        reasons = []
        for step in range(len(self.endpoints)):
            name = self.endpoints[(start + step) % len(self.endpoints)]
            try:
                sock = open_socket(
                    name,
                    self.ca_file,
                    self.timeout,
                    cert_file=self.cert_file,
                    key_file=self.key_file,
                )
            except ConnectFailed as e:
                reasons.append(e.message)
                continue
            self.endpoint = name
            self._attach(sock)
            try:
                self.handshake()
            except TwinferError as e:
                self._close_socket()
                reasons.append(f"{name}: {e}")
                continue
            return
        self._lost = ConnectionLost(ErrorCode.UNAVAILABLE, f"{why} and the retry failed")
        raise ConnectionLost(
            ErrorCode.UNAVAILABLE, f"{why} and the retry failed: {'; '.join(reasons)}"
        )

    def _next_endpoint(self) -> int:
        return (self.endpoints.index(self.endpoint) + 1) % len(self.endpoints)

    def _leave_if_going_away(self) -> None:
        """After the server's GOAWAY, once nothing is in flight here, move to a
        new connection to the same endpoint (through a balancer: another node)."""
        going = self._connection.going_away
        if going is not None and not self._connection.in_flight and self._lost is None:
            self._move(self.endpoints.index(self.endpoint), f"{self.endpoint} went away")

    def _refused_by_goaway(self, request_id: int, reply: Message) -> bool:
        """Whether ``reply`` refuses a request the server never worked on:
        ``UNAVAILABLE`` for an id above the last its ``GOAWAY`` accepted."""
        going = self._connection.going_away
        return (
            going is not None
            and request_id > going.last_request_id
            and isinstance(reply, Error)
            and reply.code == ErrorCode.UNAVAILABLE
        )

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
        shared_memory: bool = False,
    ) -> InferReply:
        """Like :meth:`infer`, but returns the whole :class:`InferReply`
        (outputs plus the server's queue and compute times in microseconds)."""
        if shared_memory:
            reply = self._infer_shm(model, inputs, tuple(outputs or ()), timeout_ms, priority)
            if reply is not None:
                return reply
        request = InferRequest(model, dict(inputs), tuple(outputs or ()), timeout_ms, priority)
        return expect_reply(self._call(request), InferReply)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        *,
        timeout_ms: int = 0,
        priority: int = 0,
        shared_memory: bool = False,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` (name -> array); return output name -> array.

        Only ``outputs`` are returned when given.  ``timeout_ms`` is the
        server-side deadline for the job to start (0: the server's default).
        Raises :class:`TwinferError` with the server's code on a server error.
        ``shared_memory=True``: the tensors go through POSIX shared memory
        when the server is on this host (see :meth:`twinfer.client.TwinferClient.infer`).
        """
        reply = self.infer_reply(
            model,
            inputs,
            outputs,
            timeout_ms=timeout_ms,
            priority=priority,
            shared_memory=shared_memory,
        )
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
        # request id -> (index in results, the request, whether it is a re-send)
        in_flight: dict[int, tuple[int, InferRequest, bool]] = {}
        again: collections.deque[tuple[int, InferRequest]] = collections.deque()
        exhausted = False
        try:
            while True:
                going_away = self._connection.going_away is not None
                while (again or not exhausted) and len(in_flight) < window and not going_away:
                    if again:
                        index, request = again.popleft()
                        in_flight[self._queue(request)] = (index, request, True)
                        continue
                    item = next(pending, None)
                    if item is None:
                        exhausted = True
                        break
                    request = InferRequest(model, dict(item), wanted, timeout_ms, 0)
                    in_flight[self._queue(request)] = (len(results), request, False)
                    results.append(None)
                if not in_flight:
                    if going_away and (again or not exhausted):
                        self._leave_if_going_away()
                        continue
                    break
                try:
                    request_id, message = self._wait_one(in_flight, self.timeout)
                except ConnectionLost as e:
                    lost, in_flight = list(in_flight.values()), {}
                    why = f"connection to {self.endpoint} lost"
                    if any(resent for _, _, resent in lost):
                        raise ConnectionLost(
                            ErrorCode.UNAVAILABLE, f"{why} after re-sending: {e.message}"
                        ) from e
                    self._move(self._next_endpoint(), why)
                    again.extend((index, request) for index, request, _ in lost)
                    self.resent += len(lost)
                    continue
                index, request, resent = in_flight.pop(request_id)
                if not resent and self._refused_by_goaway(request_id, message):
                    again.append((index, request))
                    self.resent += 1
                    continue
                results[index] = dict(expect_reply(_check(message), InferReply).outputs)
        finally:
            # After an error or a timeout: stop the requests still running.
            self._abandon(in_flight.keys())
        return [r for r in results if r is not None]

    def models(self) -> list[ModelInfo]:
        """The served models."""
        return list(expect_reply(self._call(ListModels()), ModelList).models)

    def metadata(self, model: str) -> Metadata:
        """``model``'s inputs, outputs (dynamic dims are ``-1``) and devices."""
        return expect_reply(self._call(GetMetadata(model)), Metadata)

    def ping(self) -> float:
        """Round-trip time to the server, in seconds."""
        start = time.perf_counter()
        expect_reply(self._call(Ping()), Pong)
        return time.perf_counter() - start

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._shm.close()  # (the server unregisters the regions as the connection ends)
        if self._lost is None:
            self._lost = ConnectionLost(ErrorCode.UNAVAILABLE, "the client was closed")
        self._close_socket()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _infer_shm(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: tuple[str, ...],
        timeout_ms: int,
        priority: int,
    ) -> InferReply | None:
        """Infer through shared memory; None: use the socket instead (logged once)."""
        shm, sock, off = self._shm, self._sock, self._shm.off
        peer = sock.getpeername() if sock is not None else None
        version = self.server.max_version if self.server is not None else 0
        pool = shm.pool_for(sock, version, peer)
        if off is None and shm.off is not None:
            log.info("shared memory off, tensors go through the socket: %s", shm.off)
        if pool is None:
            return None
        metadata = shm.metadata[model] = shm.metadata.get(model) or self.metadata(model)
        prepared = pool.prepare(metadata, inputs, outputs, timeout_ms, priority)
        try:
            if prepared.register is not None:
                try:
                    self._call(prepared.register)
                except TwinferError as e:
                    shm.refused(prepared, e)
                    log.info(
                        "shared memory not used for %s, tensors go through the socket: %s", model, e
                    )
                    return None
            reply = expect_reply(self._call(prepared.request), InferReply)
            return InferReply(prepared.finish(reply), reply.queue_us, reply.compute_us)
        finally:
            prepared.abandon()

    # -- requests and replies -------------------------------------------------

    def _call(self, message: Message) -> Message:
        """Send ``message`` and wait for its reply; an ``ERROR`` reply is raised.

        Inference lost with its connection, or refused by a server going
        away, is sent once more on a new connection (see :meth:`connect`).
        """
        self._leave_if_going_away()
        if self._lost is not None:
            raise self._closed_error()
        request_id = self._queue(message)
        try:
            reply = self._wait_one([request_id], self.timeout)[1]
        except ConnectionLost as e:
            why = f"connection to {self.endpoint} lost"
            if not isinstance(message, _IDEMPOTENT):
                raise ConnectionLost(
                    ErrorCode.UNAVAILABLE,
                    f"{why} with a {type(message).__name__} in flight; it is not re-sent "
                    f"(only inference is): {e.message}",
                ) from e
            self._move(self._next_endpoint(), why)
            return self._call_again(message, why)
        if isinstance(message, _IDEMPOTENT) and self._refused_by_goaway(request_id, reply):
            why = f"{self.endpoint} went away before it accepted the request"
            self._move(self.endpoints.index(self.endpoint), why)
            return self._call_again(message, why)
        return _check(reply)

    def _call_again(self, message: Message, why: str) -> Message:
        self.resent += 1
        try:
            return _check(self._wait_one([self._queue(message)], self.timeout)[1])
        except ConnectionLost as e:
            raise ConnectionLost(
                ErrorCode.UNAVAILABLE, f"{why} and the retry failed: {e.message}"
            ) from e


def _check(message: Message) -> Message:
    """Raise an ``ERROR`` reply as :class:`TwinferError`; pass anything else through."""
    if isinstance(message, Error):
        raise TwinferError(message.code, message.message)
    return message
