"""The gRPC front end as a Twisted service: its thread, its server, its endpoint.

See :mod:`twinfer.frontends.grpc` for the design and docs/architecture.md, "gRPC".
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import attrs
import grpc
from twisted.application import service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from twinfer.dataplane import DataPlane
from twinfer.frontends.grpc import grpc_service_pb2_grpc as pb_grpc
from twinfer.frontends.grpc.adapter import FRONTEND, GRPCAdapter, ReactorBridge
from twinfer.frontends.grpc.servicer import InferenceServicer
from twinfer.ops.listening import CannotListen
from twinfer.ops.repository import ModelRepository
from twinfer.sharedmem import RegionTable
from twinfer.tls import split_description

__all__ = ["GRPCEndpoint", "GRPCService", "parse_endpoint"]

log = Logger()

#: Seconds the server may take to start listening on its thread.
START_TIMEOUT = 30.0
_TCP_KEYWORDS = frozenset({"interface"})
_SSL_KEYWORDS = frozenset({"interface", "privateKey", "certKey", "clientCA"})


@attrs.frozen
class GRPCEndpoint:
    """Where and how the gRPC server listens (from a ``--grpc-port`` description)."""

    port: int
    #: The interface: ``""`` is every IPv4 interface, as for Twisted's ``tcp:``.
    interface: str = ""
    #: PEM files of the server's key and certificate chain (TLS); None: plain TCP.
    private_key: str | None = None
    certificate: str | None = None
    #: A PEM bundle of CAs the client certificates must chain to (mutual TLS).
    client_ca: str | None = None

    @property
    def address(self) -> str:
        """The address as gRPC takes it (``0.0.0.0:9001``, ``[::1]:9001``)."""
        host = self.interface or "0.0.0.0"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS server credentials (client certificates required with a CA), or None."""
        if self.private_key is None:
            return None
        key = Path(self.private_key).read_bytes()
        chain = Path(self.certificate or self.private_key).read_bytes()
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
        )


def parse_endpoint(description: str, client_ca: str | None = None) -> GRPCEndpoint:
    """Parse ``tcp:PORT[:interface=ADDR]`` or
    ``ssl:PORT:privateKey=KEY[:certKey=CERT][:interface=ADDR][:clientCA=PEM]``
    (Twisted's syntax and names, as the other ports take them; a bare port
    is ``tcp:PORT``).  ``client_ca`` (``--tls-client-ca``) applies to an
    ``ssl:`` endpoint without its own ``clientCA=``.  Raises ``ValueError``.
    """
    if description.isdigit():
        description = f"tcp:{description}"
    kind, args, kwargs = split_description(description)
    allowed = {"tcp": _TCP_KEYWORDS, "ssl": _SSL_KEYWORDS}.get(kind)
    if allowed is None:
        raise ValueError(f"the gRPC port takes tcp: or ssl: endpoints, not {kind}:")
    unknown = sorted(set(kwargs) - allowed)
    if len(args) != 1 or not args[0].isdigit() or unknown:
        raise ValueError(
            "expected tcp:PORT[:interface=ADDR] or ssl:PORT:privateKey=KEY[:certKey=CERT]"
            f"[:interface=ADDR] (unknown: {', '.join(unknown) or ' '.join(args) or 'no port'})"
        )
    endpoint = GRPCEndpoint(int(args[0]), kwargs.get("interface", ""))
    if kind == "ssl":
        key = kwargs.get("privateKey")
        if key is None:
            raise ValueError("an ssl: gRPC port needs privateKey=KEY (and certKey=CERT)")
        ca = kwargs.get("clientCA", client_ca)
        for path in (key, kwargs.get("certKey"), ca):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"no such file: {path}")
        endpoint = attrs.evolve(
            endpoint, private_key=key, certificate=kwargs.get("certKey", key), client_ca=ca
        )
    return endpoint


class _BoundPort:
    """What :meth:`GRPCService.when_listening` fires with: the bound address."""

    def __init__(self, address: IPv4Address | IPv6Address) -> None:
        self._address = address

    def getHost(self) -> IPv4Address | IPv6Address:
        return self._address


class GRPCService(service.Service):
    """The gRPC server over a data plane, on its own thread while the service runs.

    It binds in ``privilegedStartService`` (a port that cannot be bound
    raises :class:`~twinfer.ops.listening.CannotListen`, which stops
    ``twistd`` with one line and status 1, as for the other ports).
    ``stopService`` stops accepting calls, lets those in flight finish for
    up to ``grace`` seconds (the graceful drain answers new requests
    ``UNAVAILABLE`` meanwhile), then ends the thread; its Deferred fires
    (with None) once the thread is done.  ``repository`` and
    ``shared_regions`` are the server's own, shared with the HTTP front end
    (see :class:`~twinfer.frontends.grpc.adapter.GRPCAdapter`).
    """

    #: TwinferService collects this service's port for the port file.
    reports_port = True

    def __init__(
        self,
        dataplane: DataPlane,
        reactor: Any,
        description: str,
        *,
        client_ca: str | None = None,
        max_message_size: int = 64 * 1024 * 1024,
        max_inflight: int = 0,
        grace: float = 30.0,
        repository: ModelRepository | None = None,
        shared_regions: RegionTable | None = None,
    ) -> None:
        self.setName(FRONTEND)
        self.description = description
        self.endpoint = parse_endpoint(description, client_ca)
        self.reactor = reactor
        self.adapter = GRPCAdapter(
            dataplane, max_inflight, repository=repository, shared_regions=shared_regions
        )
        self.max_message_size = max_message_size
        self.grace = grace
        #: The port the server is bound to, once it is.
        self.port: int | None = None
        self._error: CannotListen | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped: Deferred[None] | None = None

    # -- start ------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Start the loop thread and bind; raises :class:`CannotListen` if binding failed."""
        super().privilegedStartService()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, args=(self._loop,), name="twinfer-grpc", daemon=True
        )
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            # Start-up only: the reactor is not running yet, nothing waits on it.
            self.port = started.result(START_TIMEOUT)
        except Exception as e:
            reason = _bind_error(self.endpoint) or _reason(e)
            self._error = CannotListen(f"cannot listen on {self.description}: {reason}")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(START_TIMEOUT)  # start-up again: the thread ends at once
            self._loop = self._thread = None
            raise self._error from None
        host = self.endpoint.interface or "0.0.0.0"
        log.info(
            "twinfer grpc listening on {kind}:{host}:{port}",
            kind="ssl" if self.endpoint.private_key else "tcp",
            host=host,
            port=self.port,
        )

    def startService(self) -> None:
        if self._loop is None:  # started without privilegedStartService (tests)
            self.privilegedStartService()
        super().startService()

    async def _start(self) -> int:
        """Build, bind and start the server (on the loop's thread); returns the port."""
        assert self._loop is not None
        options = [
            ("grpc.max_receive_message_length", self.max_message_size),
            ("grpc.max_send_message_length", self.max_message_size),
            # gRPC binds with SO_REUSEPORT by default, which lets two servers
            # share a port silently; a port in use must fail as the others do.
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=options)
        bridge = ReactorBridge(self.reactor, self._loop)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.adapter, bridge), server
        )
        credentials = self.endpoint.credentials()
        address = self.endpoint.address
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
        if not port:  # older gRPC returns 0 instead of raising
            raise RuntimeError(f"failed to bind to address {address}")
        await server.start()
        self._server = server
        return port

    def address(self) -> IPv4Address | IPv6Address | None:
        """The bound address (None before the server listens)."""
        if self.port is None:
            return None
        host = self.endpoint.interface or "0.0.0.0"
        kind = IPv6Address if ":" in host else IPv4Address
        return kind("TCP", host, self.port)

    def when_listening(self) -> Deferred[Any]:
        """Fires with an object whose ``getHost()`` is the bound address, or
        fails with :class:`CannotListen` (as ``ListeningService.when_listening``)."""
        address = self.address()
        if address is not None:
            return succeed(_BoundPort(address))
        return fail(self._error or CannotListen(f"{self.description} is not listening"))

    # -- stop --------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """Stop accepting, let calls in flight finish (``grace``), end the thread."""
        super().stopService()
        if self._stopped is not None:
            return self._stopped
        loop, self._stopped = self._loop, Deferred()
        if loop is None or self._thread is None or not self._thread.is_alive():
            self._stopped.callback(None)
        else:
            asyncio.run_coroutine_threadsafe(self._stop(loop), loop)
        return self._stopped

    async def _stop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._server is not None:
            await self._server.stop(self.grace)
        loop.stop()  # _run_loop then tells the reactor

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()
            stopped = self._stopped
            if stopped is not None:
                self.reactor.callFromThread(stopped.callback, None)


def _reason(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0].split(";")[0]


def _bind_error(endpoint: GRPCEndpoint) -> str | None:
    """Why binding ``endpoint`` fails (``address already in use``), as the
    other ports say it: gRPC's own error names no reason."""
    host = endpoint.interface or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, endpoint.port))
    except OSError as e:
        return (e.strerror or str(e)).lower()
    return None
