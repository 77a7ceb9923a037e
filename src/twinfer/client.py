"""The Twisted client for twinfer's binary protocol.

Example::

    from twisted.internet import task
    from twinfer.client import connect

    async def main(reactor):
        client = await connect(reactor, "tcp:127.0.0.1:9000")
        outputs = await client.infer("tiny", {"x": numpy.ones((2, 4), "float32")})
        print(outputs["y"])

    task.react(lambda r: defer.ensureDeferred(main(r)))

Every method returns a ``Deferred``; many requests may be in flight on one
connection and replies are matched by request id.  A server error fails the
Deferred with :class:`~twinfer.errors.TwinferError` carrying the code.

:class:`ClientProtocol` is a thin adapter: the handshake, request ids and
the rules of the protocol live in a client-side
:class:`~twinfer.wire.connection.Connection`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, TypeVar, cast

import numpy as np
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.python.failure import Failure

import twinfer
from twinfer.errors import ErrorCode, TwinferError
from twinfer.netutil import set_no_delay
from twinfer.wire.connection import Connection, Role
from twinfer.wire.events import HandshakeComplete, MessageReceived, ProtocolViolation, ServerClosing
from twinfer.wire.messages import (
    AdminReply,
    AdminRequest,
    Error,
    GetHealth,
    GetMetadata,
    Health,
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
    Prediction,
    Predictions,
)

AGENT = f"twinfer-client/{twinfer.__version__}"
DEFAULT_SERVER = "tcp:127.0.0.1:9000"
M = TypeVar("M")


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

    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        self._connection.start_handshake()
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        self._connection.receive_data(data)
        for event in self._connection.events():
            if isinstance(event, MessageReceived):
                d: Deferred[Message] = event.handle
                if isinstance(event.message, Error):
                    d.errback(TwinferError(event.message.code, event.message.message))
                else:
                    d.callback(event.message)
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

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._lost = reason
        self._fail_all(
            TwinferError(
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

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._connection.in_flight)


def _expect(message: Message, kind: type[M]) -> M:
    if not isinstance(message, kind):
        raise TwinferError(
            ErrorCode.INTERNAL, f"expected {kind.__name__} from the server, got {message!r}"
        )
    return message


class TwinferClient:
    """A connection to a twinfer server.  Get one from :func:`connect`."""

    def __init__(self, protocol: ClientProtocol) -> None:
        self.protocol = protocol
        #: The server's HELLO: its protocol version, frame limit and agent.
        self.server: Hello = protocol.server_hello

    def infer_reply(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: list[str] | tuple[str, ...] | None = None,
        *,
        timeout_ms: int = 0,
        priority: int = 0,
    ) -> Deferred[InferReply]:
        """Like :meth:`infer`, but fires with the whole :class:`InferReply`
        (outputs plus the server's queue and compute times)."""
        request = InferRequest(model, dict(inputs), tuple(outputs or ()), timeout_ms, priority)
        d = self.protocol.request(request)
        return d.addCallback(_expect, InferReply)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: list[str] | tuple[str, ...] | None = None,
        *,
        timeout_ms: int = 0,
        priority: int = 0,
    ) -> Deferred[dict[str, np.ndarray]]:
        """Run ``model`` on ``inputs`` (name -> array).

        Fires with a dict of output name -> numpy array (only ``outputs`` if
        given); fails with :class:`TwinferError` on a server error.
        """
        d = self.infer_reply(model, inputs, outputs, timeout_ms=timeout_ms, priority=priority)
        return d.addCallback(lambda reply: dict(reply.outputs))

    def predict(self, model: str, image: bytes, task: str = "") -> Deferred[list[Prediction]]:
        """Send an encoded image (JPEG, PNG... file bytes) to the image model ``model``.

        Fires with its predictions, best first (see :class:`Prediction`:
        label id and name, confidence, box in pixels of ``image``).
        ``task`` (``"classify"``/``"detect"``) makes the server check the
        model's task (``WRONG_TASK`` otherwise); an image the server cannot
        decode fails with ``INVALID_INPUT``.
        """
        d = self.protocol.request(ImageRequest(model, image, task))
        return d.addCallback(lambda m: list(_expect(m, Predictions).predictions))

    def classify(self, model: str, image: bytes) -> Deferred[list[Prediction]]:
        """Classify an encoded image: fires with the top labels, best first
        (each box is the whole image).  See :meth:`predict`."""
        return self.predict(model, image, "classify")

    def detect(self, model: str, image: bytes) -> Deferred[list[Prediction]]:
        """Detect objects in an encoded image: fires with labelled boxes, best first.
        See :meth:`predict`."""
        return self.predict(model, image, "detect")

    def models(self) -> Deferred[list[ModelInfo]]:
        """Fires with the served models."""
        d = self.protocol.request(ListModels())
        return d.addCallback(lambda m: list(_expect(m, ModelList).models))

    def metadata(self, model: str) -> Deferred[Metadata]:
        """Fires with ``model``'s inputs, outputs and devices."""
        return self.protocol.request(GetMetadata(model)).addCallback(_expect, Metadata)

    def ping(self) -> Deferred[float]:
        """Fires with the round-trip time in seconds."""
        start = time.perf_counter()
        d = self.protocol.request(Ping())
        return d.addCallback(lambda m: (_expect(m, Pong), time.perf_counter() - start)[1])

    def health(self) -> Deferred[Health]:
        """Fires with the server's liveness and readiness (:class:`Health`)."""
        return self.protocol.request(GetHealth()).addCallback(_expect, Health)

    def admin(self, request: AdminRequest) -> Deferred[str]:
        """Run a control operation (the server must allow admin); fires with its summary."""
        d = self.protocol.request(request)
        return d.addCallback(lambda m: _expect(m, AdminReply).message)

    def close(self) -> Deferred[None]:
        """Close the connection; fires with ``None`` once it is closed (from
        ``connectionLost``).  Pending requests fail with UNAVAILABLE."""
        return self.protocol.close()


def client_endpoint(
    reactor: Any,
    description: str,
    *,
    trust_root: str | Certificate | None = None,
    client_certificate: PrivateCertificate | None = None,
) -> IStreamClientEndpoint:
    """Make an endpoint from ``tcp:HOST:PORT``, ``tls:HOST:PORT`` or any
    Twisted client endpoint description.

    For ``tls:``, the server's certificate must match HOST (checked by
    ``service_identity``) and chain to ``trust_root`` (a PEM file path or a
    ``Certificate``; default: the platform's trust store).
    """
    if description.startswith("tls:") and description.count(":") == 2:
        _, host, port = description.split(":")
        if isinstance(trust_root, str):
            with open(trust_root, "rb") as f:
                trust_root = Certificate.loadPEM(f.read())
        options = optionsForClientTLS(
            host, trustRoot=trust_root, clientCertificate=client_certificate
        )
        return wrapClientTLS(options, HostnameEndpoint(reactor, host, int(port)))
    return clientFromString(reactor, description)


async def _connect(reactor: Any, endpoint: IStreamClientEndpoint) -> TwinferClient:
    protocol = cast(ClientProtocol, await endpoint.connect(Factory.forProtocol(ClientProtocol)))
    await protocol.handshake
    return TwinferClient(protocol)


def connect(
    reactor: Any,
    endpoint: str | IStreamClientEndpoint = DEFAULT_SERVER,
    *,
    trust_root: str | Certificate | None = None,
    client_certificate: PrivateCertificate | None = None,
) -> Deferred[TwinferClient]:
    """Connect and handshake; fires with a :class:`TwinferClient`.

    ``endpoint`` is ``"tcp:HOST:PORT"``, ``"tls:HOST:PORT"`` (see
    :func:`client_endpoint`) or any ``IStreamClientEndpoint``.
    """
    if isinstance(endpoint, str):
        endpoint = client_endpoint(
            reactor, endpoint, trust_root=trust_root, client_certificate=client_certificate
        )
    return Deferred.fromCoroutine(_connect(reactor, endpoint))
