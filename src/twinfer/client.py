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

:class:`ClientProtocol` (in :mod:`twinfer.client_protocol`, importable from
here too) is a thin adapter: the handshake, request ids and the rules of the
protocol live in a client-side :class:`~twinfer.wire.connection.Connection`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import attrs
import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.logger import Logger

from twinfer.client_protocol import (
    AGENT,
    ClientProtocol,
    ConnectionDropped,
    GoneAway,
    Unreachable,
)
from twinfer.errors import TwinferError, expect_reply
from twinfer.shm_client import RegionPool, SharedMemoryState
from twinfer.tls import client_options, load_private_certificate
from twinfer.wire.messages import (
    AdminReply,
    AdminRequest,
    GetHealth,
    GetMetadata,
    Health,
    Hello,
    ImageRequest,
    InferReply,
    InferRequest,
    ListModels,
    Metadata,
    ModelInfo,
    ModelList,
    Ping,
    Pong,
    Prediction,
    Predictions,
)

if TYPE_CHECKING:
    from twinfer.failover import ClientPool

__all__ = [
    "AGENT",
    "DEFAULT_SERVER",
    "ClientProtocol",
    "ConnectionDropped",
    "GoneAway",
    "TwinferClient",
    "Unreachable",
    "client_endpoint",
    "connect",
    "parse_servers",
]

log = Logger()

DEFAULT_SERVER = "tcp:127.0.0.1:9000"


class TwinferClient:
    """A connection (or a pool of them) to twinfer servers.  Get one from :func:`connect`."""

    def __init__(self, protocol: ClientProtocol | ClientPool) -> None:
        #: What requests go through: one :class:`ClientProtocol`, or a
        #: :class:`~twinfer.failover.ClientPool` of connections that move.
        self.protocol = protocol
        #: The server's HELLO: its protocol version, frame limit and agent.
        self.server: Hello = protocol.server_hello
        self._shm = SharedMemoryState()  # (shared_memory=True)

    @property
    def resent(self) -> int:
        """Requests sent a second time after a lost connection or a ``GOAWAY``
        (always 0 for a single connection, which never re-sends)."""
        return getattr(self.protocol, "resent", 0)

    def infer_reply(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: list[str] | tuple[str, ...] | None = None,
        *,
        timeout_ms: int = 0,
        priority: int = 0,
        shared_memory: bool = False,
    ) -> Deferred[InferReply]:
        """Like :meth:`infer`, but fires with the whole :class:`InferReply`
        (outputs plus the server's queue and compute times)."""
        if shared_memory and self.shared_memory_pool() is not None:  # else: the socket
            return Deferred.fromCoroutine(
                self._infer_shm(model, inputs, tuple(outputs or ()), timeout_ms, priority)
            )
        request = InferRequest(model, dict(inputs), tuple(outputs or ()), timeout_ms, priority)
        d = self.protocol.request(request)
        return d.addCallback(expect_reply, InferReply)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: list[str] | tuple[str, ...] | None = None,
        *,
        timeout_ms: int = 0,
        priority: int = 0,
        shared_memory: bool = False,
    ) -> Deferred[dict[str, np.ndarray]]:
        """Run ``model`` on ``inputs`` (name -> array).

        Fires with a dict of output name -> numpy array (only ``outputs`` if
        given); fails with :class:`TwinferError` on a server error.

        ``shared_memory=True`` passes the tensors through POSIX shared memory
        instead of the socket when the server is on this host (loopback or
        UNIX socket, ``--allow-shm``): the client keeps a pool of shm objects
        registered once and reused (see :mod:`twinfer.shm_client`), unlinked
        by :meth:`close`.  Otherwise it logs why once and uses the socket.
        """
        d = self.infer_reply(
            model,
            inputs,
            outputs,
            timeout_ms=timeout_ms,
            priority=priority,
            shared_memory=shared_memory,
        )
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
        return d.addCallback(lambda m: list(expect_reply(m, Predictions).predictions))

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
        return d.addCallback(lambda m: list(expect_reply(m, ModelList).models))

    def metadata(self, model: str) -> Deferred[Metadata]:
        """Fires with ``model``'s inputs, outputs and devices."""
        return self.protocol.request(GetMetadata(model)).addCallback(expect_reply, Metadata)

    def ping(self) -> Deferred[float]:
        """Fires with the round-trip time in seconds."""
        start = time.perf_counter()
        d = self.protocol.request(Ping())
        return d.addCallback(lambda m: (expect_reply(m, Pong), time.perf_counter() - start)[1])

    def health(self) -> Deferred[Health]:
        """Fires with the server's liveness and readiness (:class:`Health`)."""
        return self.protocol.request(GetHealth()).addCallback(expect_reply, Health)

    def admin(self, request: AdminRequest) -> Deferred[str]:
        """Run a control operation (the server must allow admin); fires with its summary."""
        d = self.protocol.request(request)
        return d.addCallback(lambda m: expect_reply(m, AdminReply).message)

    def close(self) -> Deferred[None]:
        """Close the connection; fires with ``None`` once it is closed (from
        ``connectionLost``).  Pending requests fail with UNAVAILABLE."""
        self._shm.close()
        return self.protocol.close()

    def shared_memory_pool(self) -> RegionPool | None:
        """The pool of shm objects that ``shared_memory=True`` uses (closed by
        :meth:`close`), or None when shared memory is off (logged once)."""
        protocol, off = self.protocol, self._shm.off
        if not isinstance(protocol, ClientProtocol):
            self._shm.off = "a client over several connections does not use shared memory"
            pool = None
        else:
            peer = protocol.transport.getPeer()
            pool = self._shm.pool_for(protocol, self.server.max_version, peer)
        if off is None and self._shm.off is not None:
            log.info("shared memory off, tensors go through the socket: {why}", why=self._shm.off)
        return pool

    @property
    def shared_memory_off(self) -> str | None:
        """Why ``shared_memory=True`` goes through the socket (the server's
        protocol version, a server not on this host, a client over several
        connections, a refused registration); None while shared memory may
        be used.  Known once :meth:`shared_memory_pool` has been asked."""
        return self._shm.off

    async def _infer_shm(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: tuple[str, ...],
        timeout_ms: int,
        priority: int,
    ) -> InferReply:
        shm = self._shm
        pool = shm.pool
        assert pool is not None
        metadata = shm.metadata.get(model) or await self.metadata(model)
        shm.metadata[model] = metadata
        prepared = pool.prepare(metadata, inputs, outputs, timeout_ms, priority)
        try:
            if prepared.register is not None:
                try:
                    await self.protocol.request(prepared.register)
                except TwinferError as e:
                    shm.refused(prepared, e)
                    log.info(
                        "shared memory not used for {model}, tensors go through the socket: {why}",
                        model=model,
                        why=e,
                    )
                    return await self.infer_reply(
                        model, inputs, outputs, timeout_ms=timeout_ms, priority=priority
                    )
            reply = expect_reply(await self.protocol.request(prepared.request), InferReply)
            return attrs.evolve(reply, outputs=prepared.finish(reply))
        finally:
            prepared.abandon()


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
    ``Certificate``; default: the platform's trust store); TLS 1.2 or newer
    only; ``client_certificate`` is presented to a server that asks for one
    (mutual TLS).
    """
    if description.startswith("tls:") and description.count(":") == 2:
        _, host, port = description.split(":")
        options = client_options(host, trust_root, client_certificate)
        return wrapClientTLS(options, HostnameEndpoint(reactor, host, int(port)))
    return clientFromString(reactor, description)


async def _connect(reactor: Any, endpoint: IStreamClientEndpoint) -> TwinferClient:
    protocol = cast(ClientProtocol, await endpoint.connect(Factory.forProtocol(ClientProtocol)))
    await protocol.handshake
    return TwinferClient(protocol)


async def _connect_pool(
    reactor: Any, endpoints: list[tuple[str, IStreamClientEndpoint]], connections: int
) -> TwinferClient:
    from twinfer.failover import ClientPool

    return TwinferClient(await ClientPool(endpoints, connections, clock=reactor).start())


def parse_servers(servers: str) -> list[str]:
    """Split ``"tcp:a:9000,tcp:b:9000"`` (the ``--server`` option) into endpoints."""
    return [s.strip() for s in servers.split(",") if s.strip()]


def connect(
    reactor: Any,
    endpoint: str | IStreamClientEndpoint | Sequence[str | IStreamClientEndpoint] = DEFAULT_SERVER,
    *,
    connections: int = 1,
    trust_root: str | Certificate | None = None,
    client_certificate: PrivateCertificate | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> Deferred[TwinferClient]:
    """Connect and handshake; fires with a :class:`TwinferClient`.

    ``endpoint`` is ``"tcp:HOST:PORT"``, ``"tls:HOST:PORT"`` (see
    :func:`client_endpoint`) or any ``IStreamClientEndpoint``: one
    connection, which fails its requests when it closes.

    A list of them (even of one: a balancer), or ``connections`` above 1,
    makes a client that moves (:class:`twinfer.failover.ClientPool`): it
    opens ``connections`` connections round-robin over the endpoints, sends
    each request on the least busy one, follows a server's ``GOAWAY`` to a
    new connection and re-sends in-flight inference once when a connection
    is lost (never admin requests); :attr:`TwinferClient.resent` counts the
    re-sent requests.  It fires once at least one connection is up, and
    fails with :class:`Unreachable` when none could be made.

    For ``tls:`` endpoints, ``trust_root`` verifies the servers, and a client
    certificate for mutual TLS is ``client_certificate`` or loaded from the
    PEM files ``client_cert`` and ``client_key`` (None: the key is in
    ``client_cert``).
    """
    if client_cert is not None:
        client_certificate = load_private_certificate(client_cert, client_key)
    elif client_key is not None:
        raise ValueError("client_key needs client_cert")

    def make(description: str) -> IStreamClientEndpoint:
        return client_endpoint(
            reactor, description, trust_root=trust_root, client_certificate=client_certificate
        )

    if isinstance(endpoint, str | IStreamClientEndpoint) and connections <= 1:
        if isinstance(endpoint, str):
            endpoint = make(endpoint)
        return Deferred.fromCoroutine(_connect(reactor, endpoint))
    listed = [endpoint] if isinstance(endpoint, str | IStreamClientEndpoint) else list(endpoint)
    if not listed:
        raise ValueError("connect() needs at least one endpoint")
    named = [(e, make(e)) if isinstance(e, str) else (repr(e), e) for e in listed]
    return Deferred.fromCoroutine(_connect_pool(reactor, named, connections))
