"""``twistd twinfer``: command-line options and service construction.

Modelled on ``twisted.web.tap``: :class:`Options` parses and validates the
command line and the configuration (a bad config stops ``twistd`` with one
message naming the key); :func:`makeService` loads the models and returns a
:class:`TwinferService`: the serving service (workers, graceful drain), the
HTTP front end's codec pool, and one :class:`~twinfer.ops.listening.ListeningService`
per port (binary protocol, HTTP, debug console, metrics), bound in
``privilegedStartService``.

One module, as ``twisted.web.tap`` is, though it runs past 500 lines: the
option table alone is ~160 of them, and the options and the services they
build are read together.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import service
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.interfaces import IAddress
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

import twinfer
from twinfer.budget import BufferBudget
from twinfer.config import Config, ConfigError, default_config, load_config
from twinfer.dataplane import DataPlane
from twinfer.frontends.binary import TwinferFactory
from twinfer.ops.lifecycle import ServingService
from twinfer.ops.listening import CannotListen, ListeningService
from twinfer.registry import build_dispatcher, load_models, replica_counts

if TYPE_CHECKING:
    from twinfer.ops.repository import ModelRepository
    from twinfer.sharedmem import RegionTable

log = Logger()

_LOOPBACK = ("127.", "::1", "localhost", "\\:\\:1")
_TCP_KINDS = ("tcp", "tcp6", "ssl")


def endpoint_description(port: str) -> str:
    """Accept a bare port number (``9000``) as shorthand for ``tcp:9000``."""
    return f"tcp:{port}" if port.isdigit() else port


def local_endpoint(description: str) -> tuple[str, bool]:
    """Bind a TCP endpoint without ``interface=`` to loopback.

    Returns the endpoint description and whether it listens on loopback only
    (non-TCP endpoints such as ``unix:`` count as local).
    """
    description = endpoint_description(description)
    parts = description.split(":")
    if parts[0] not in _TCP_KINDS:
        return description, True
    interfaces = [p.split("=", 1)[1] for p in parts[1:] if p.startswith("interface=")]
    if not interfaces:
        loopback = "\\:\\:1" if parts[0] == "tcp6" else "127.0.0.1"
        return f"{description}:interface={loopback}", True
    return description, interfaces[0].startswith(_LOOPBACK)


class Options(usage.Options):
    """Options for ``twistd twinfer``."""

    synopsis = "[--port ENDPOINT] [--http-port ENDPOINT] [--config FILE]"
    longdesc = (
        "Serve OpenVINO models over twinfer's binary protocol and, with --http-port, "
        "over HTTP (KServe v2 REST and the seed's REST API), with --grpc-port over KServe v2 "
        "gRPC. Without --config, "
        "serves the embedded default (SqueezeNet, ResNet-50 and a tiny model on the CPU)."
    )
    optParameters = [
        [
            "port",
            "p",
            "tcp:9000",
            "Port number or Twisted server endpoint for the binary protocol, "
            "e.g. tcp:9000:interface=127.0.0.1 or ssl:9443:privateKey=key.pem:certKey=cert.pem.",
        ],
        [
            "http-port",
            None,
            None,
            "Port number or Twisted server endpoint for the HTTP front end (off by default), "
            "e.g. tcp:8080:interface=127.0.0.1 or ssl:8443:privateKey=key.pem:certKey=cert.pem.",
        ],
        [
            "grpc-port",
            None,
            None,
            "Port number or endpoint for the KServe v2 gRPC front end (off by default), "
            "e.g. tcp:8001:interface=127.0.0.1 or ssl:8443:privateKey=key.pem:certKey=cert.pem.",
        ],
        ["config", "c", None, "TOML configuration file (see etc/twinfer.toml)."],
        [
            "debug-port",
            None,
            None,
            "Endpoint of the debug console (off unless given); a bare port or an endpoint "
            "without interface= binds to 127.0.0.1 only.",
        ],
        [
            "debug-credentials",
            None,
            None,
            "Credentials file (user:pbkdf2 hash lines) for console logins; required for a "
            "debug port on a non-loopback interface.",
        ],
        [
            "metrics-port",
            None,
            None,
            "Endpoint for Prometheus /metrics and /healthz, /readyz over HTTP (off unless given).",
        ],
        [
            "agent-port",
            None,
            None,
            "Endpoint of the HAProxy agent-check responder (off unless given): one line per "
            "check, e.g. 'up ready 80%', 'drain' or 'down #reason' (see docs/operations.md).",
        ],
        [
            "tls-client-ca",
            None,
            None,
            "Mutual TLS: every ssl: port (binary, HTTP, metrics, console, agent) requires a "
            "client certificate that chains to a CA in this PEM bundle (one port can name "
            "its own with clientCA=PEM). See docs/security.md.",
        ],
        [
            "drain-timeout",
            None,
            30.0,
            "Seconds to finish queued and running jobs on shutdown before answering UNAVAILABLE.",
            float,
        ],
        [
            "max-connections",
            None,
            None,
            "Client connections each port (binary, HTTP) holds at once; more are refused "
            "at once (default: server.max_connections, 1024).",
            int,
        ],
        [
            "port-file",
            None,
            None,
            "Once every port listens, write their port numbers there as JSON, e.g. "
            '{"binary": 9000, "grpc": 8001, "http": 8080} (useful with tcp:0); removed on '
            "shutdown.",
        ],
    ]
    optFlags = [
        [
            "allow-admin",
            None,
            "Obey ADMIN_REQUEST messages (load/unload/reload/drain) from clients, "
            "and HTTP's Triton model load/unload.",
        ],
        [
            "allow-shm",
            None,
            "Accept shared-memory regions (POSIX shm objects of same-host clients) for "
            "tensors, over the binary protocol and HTTP; off: every shared-memory request is "
            "refused.",
        ],
    ]

    config: Config

    def postOptions(self) -> None:
        self["port"] = endpoint_description(self["port"])
        if self["http-port"]:
            self["http-port"] = endpoint_description(self["http-port"])
        if self["grpc-port"]:
            self["grpc-port"] = endpoint_description(self["grpc-port"])
        try:
            self.config = load_config(self["config"]) if self["config"] else default_config()
        except ConfigError as e:
            raise usage.UsageError(f"bad configuration: {e}") from e
        if self["max-connections"] is not None:
            if self["max-connections"] < 1:
                raise usage.UsageError("--max-connections must be at least 1")
            server = attrs.evolve(self.config.server, max_connections=self["max-connections"])
            self.config = attrs.evolve(self.config, server=server)
        self._check_operations()

    def _check_operations(self) -> None:
        """Validate and normalize the operations options."""
        if self["drain-timeout"] < 0:
            raise usage.UsageError("--drain-timeout must be 0 or more seconds")
        if self["debug-credentials"]:
            from twinfer.frontends.console import read_credentials

            try:
                read_credentials(self["debug-credentials"])
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"bad --debug-credentials: {e}") from e
        if self["debug-port"]:
            description, local = local_endpoint(self["debug-port"])
            if not local and not self["debug-credentials"]:
                raise usage.UsageError(
                    "refusing a debug console on a non-loopback interface without "
                    "--debug-credentials"
                )
            self["debug-port"] = description
        if self["metrics-port"]:
            self["metrics-port"] = endpoint_description(self["metrics-port"])
        if self["tls-client-ca"]:
            from twinfer.tls import load_certificates

            try:
                load_certificates(self["tls-client-ca"])
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"bad --tls-client-ca: {e}") from e
        if self["port-file"]:
            # Relative to where the command was typed, not twistd's --rundir.
            self["port-file"] = os.path.abspath(self["port-file"])


def port_number(address: IAddress) -> int | str:
    """A bound address as the port file gives it: the TCP port, or the UNIX socket's path."""
    port = getattr(address, "port", None)
    if isinstance(port, int):
        return port
    name = getattr(address, "name", None)
    return os.fsdecode(name) if name is not None else str(address)


def write_port_file(path: str, ports: dict[str, int | str]) -> None:
    """Write ``ports`` as one JSON line to ``path``.

    A regular file (or a new one) is replaced atomically, so a reader never
    sees half of it; a pipe or ``/dev/fd/N`` is written straight, so a parent
    process can wait for the line instead of polling for a file.
    """
    text = json.dumps(ports, sort_keys=True) + "\n"
    target = Path(path)
    try:
        regular = stat.S_ISREG(target.stat().st_mode)
    except FileNotFoundError:
        regular = True
    if not regular:
        with target.open("w") as stream:
            stream.write(text)
        return
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, target)


class TwinferService(service.MultiService):
    """Everything ``twistd twinfer`` runs, and what the outside may ask of it.

    Listening services are bound in ``privilegedStartService``; one that
    cannot be bound stops ``twistd`` with ``twinfer: cannot listen on
    ENDPOINT: REASON`` and exit status 1.  :meth:`bound_addresses` gives the
    address each port got; with ``port_file``, the port numbers are written
    there once every port listens (:func:`write_port_file`).

    ``log_observer`` (a callable taking ``twistd``'s own options and
    returning the observer to log to) is given to ``twistd`` as the
    application's ``ILogObserver`` when the service joins it, which is
    before ``twistd`` starts logging.
    """

    def __init__(
        self, port_file: str | None = None, log_observer: Any = None, reactor: Any = None
    ) -> None:
        super().__init__()
        self.port_file = port_file
        #: Stopped if a port fails after start-up (an endpoint that binds asynchronously).
        self.reactor = reactor
        self.log_observer = log_observer
        #: twistd's ServerOptions, when run by twistd (the plugin options' parent).
        self.twistd_options: Any = None
        self._wrote_port_file = False
        #: The PEM bundle of CAs every ssl: port verifies client certificates with.
        self.tls_client_ca: str | None = None

    def listening_services(self) -> list[Any]:
        """The services of the listening ports, in the order they were added
        (``ListeningService`` and the gRPC front end's service)."""
        return [
            s for s in self if isinstance(s, ListeningService) or getattr(s, "reports_port", False)
        ]

    def bound_addresses(self) -> dict[str, IAddress]:
        """The address each listening port is bound to, by port name (``binary``, ``http``...)."""
        found = {str(s.name): s.address() for s in self.listening_services()}
        return {name: address for name, address in found.items() if address is not None}

    def when_listening(self) -> Deferred[dict[str, int | str]]:
        """Fires with ``{name: port}`` once every port listens (fails if one cannot)."""
        services = self.listening_services()
        d = gatherResults([s.when_listening() for s in services], consumeErrors=True)
        return d.addCallback(
            lambda ports: {str(s.name): port_number(p.getHost()) for s, p in zip(services, ports)}
        )

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        set_component = getattr(parent, "setComponent", None)
        if (
            self.log_observer is not None
            and self.twistd_options is not None
            and set_component is not None
        ):
            # The plugin-world form of a .tac file's
            # application.setComponent(ILogObserver, observer).
            set_component(ILogObserver, self.log_observer(self.twistd_options))

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListen as e:
            # twistd logs from here on (stderr included): one line, no traceback.
            log.critical("twinfer: {reason}", reason=str(e))
            raise SystemExit(1) from None

    def startService(self) -> None:
        super().startService()
        self.when_listening().addCallbacks(self._listening, self._not_listening)

    def _listening(self, ports: dict[str, int | str]) -> None:
        if self.port_file:
            write_port_file(self.port_file, ports)
            self._wrote_port_file = True

    def _not_listening(self, failure: Any) -> None:
        if not self.running:  # stopped before a port was bound: nothing to report
            return
        error = failure.value.subFailure.value if failure.check(FirstError) else failure.value
        log.critical("twinfer: {reason}; stopping", reason=str(error))
        if self.reactor is not None:
            self.reactor.stop()

    def stopService(self) -> Deferred[Any]:
        d: Deferred[Any] = super().stopService()
        path = Path(self.port_file) if self.port_file and self._wrote_port_file else None
        if path is not None and path.is_file():
            path.unlink(missing_ok=True)
        return d


def makeService(options: Options) -> TwinferService:
    """Load the configured models and build the services ``twistd`` runs."""
    from twisted.internet import reactor

    config = options.config
    try:
        loaded = load_models(config)
    except ValueError as e:
        raise SystemExit(f"twinfer: {e}") from e
    dispatcher = build_dispatcher(config, loaded, reactor)  # type: ignore[arg-type]
    counts = replica_counts(config, loaded)
    log.info(
        "twinfer {version}: models {models}; devices {devices}",
        version=twinfer.__version__,
        models=", ".join(f"{m.name} on {'+'.join(m.devices)}" for m in config.models),
        devices=", ".join(f"{d.name}={d.target}x{counts[d.name]}" for d in config.devices),
    )
    top = TwinferService(port_file=options["port-file"], reactor=reactor)
    top.tls_client_ca = options["tls-client-ca"]
    top.twistd_options = getattr(options, "parent", None)
    # Every front end's requests go through this one data plane.
    dataplane = DataPlane(dispatcher, budget=BufferBudget(config.server.max_buffered_bytes))
    factory = TwinferFactory(dataplane, config.server, clock=reactor)
    server_regions = None
    if options["allow-shm"]:
        from twinfer.sharedmem import SharedMemory

        factory.shared_memory = shm = SharedMemory()
        # Triton's semantics: regions registered over HTTP or gRPC are
        # server-wide, one table both front ends share.
        server_regions = shm.table(
            config.server.http_shm_max_regions,
            config.server.http_shm_max_bytes,
            "the server-wide (HTTP and gRPC) regions",
        )
    # The operations services (graceful drain, console, metrics) go in first
    # so that the front ends stop after them.
    _add_operations_services(top, options, config, dataplane, factory, reactor)
    _listen(top, reactor, "binary", options["port"], factory, direct_reads=True)
    # Triton's extensions answer the same over HTTP and gRPC: one repository.
    repository = None
    if options["http-port"] or options["grpc-port"]:
        from twinfer.ops.repository import ModelRepository

        repository = ModelRepository.for_server(
            dataplane, config, controller=factory.controller, allow_admin=factory.allow_admin
        )
    if options["http-port"]:
        # Imported only when asked for: twisted.web is not needed otherwise.
        from twinfer.frontends.http import HTTPFrontEnd

        front = HTTPFrontEnd(
            dataplane,
            config,
            reactor,
            shared_regions=server_regions,
            repository=repository,
        )
        front.setServiceParent(top)
        _listen(top, reactor, "http", options["http-port"], front.site, label="http")
    if options["grpc-port"]:
        _add_grpc(top, options, config, dataplane, reactor, repository, server_regions)
    return top


def _add_grpc(
    top: TwinferService,
    options: Options,
    config: Config,
    dataplane: DataPlane,
    reactor: Any,
    repository: ModelRepository | None,
    shared_regions: RegionTable | None,
) -> None:
    """The gRPC front end (imported only when asked for: it loads grpcio)."""
    from twinfer.frontends.grpc.service import GRPCService

    description = options["grpc-port"]
    try:
        grpc_service = GRPCService(
            dataplane,
            reactor,
            description,
            client_ca=top.tls_client_ca,
            max_message_size=config.server.max_frame_size,
            max_inflight=config.server.max_inflight_per_connection,
            # In-flight calls finish within the drain (new requests get UNAVAILABLE).
            grace=options["drain-timeout"] + 1.0,
            repository=repository,
            shared_regions=shared_regions,
        )
    except ValueError as e:
        raise SystemExit(f"twinfer: bad endpoint {description!r}: {e}") from e
    grpc_service.setServiceParent(top)


def _listen(
    top: TwinferService,
    reactor: Any,
    name: str,
    description: str,
    factory: Any,
    **kwargs: Any,
) -> None:
    try:
        if description.startswith("ssl:"):
            from twinfer.tls import server_endpoint

            # TLS 1.2 or newer, and client certificates with --tls-client-ca.
            kwargs["endpoint"] = server_endpoint(reactor, description, client_ca=top.tls_client_ca)
        listening = ListeningService(reactor, name, description, factory, **kwargs)
    except (ValueError, KeyError, OSError) as e:  # serverFromString: a bad description
        raise SystemExit(f"twinfer: bad endpoint {description!r}: {e}") from e
    listening.setServiceParent(top)


def _add_operations_services(
    top: TwinferService,
    options: Options,
    config: Config,
    dataplane: DataPlane,
    factory: TwinferFactory,
    reactor: Any,
) -> None:
    """Add the serving (graceful drain), console and metrics services to ``top``."""
    from twinfer.ops.control import Controller

    controller = Controller(config, dataplane, reactor, config_path=options["config"])
    factory.controller = controller
    factory.allow_admin = bool(options["allow-admin"])
    ServingService(
        controller, reactor, drain_timeout=options["drain-timeout"], handle_sighup=True
    ).setServiceParent(top)
    if options["debug-port"]:
        from twinfer.compat import twistd_log_observer
        from twinfer.frontends.console import ConsoleFactory, LogLevels, make_portal

        portal = make_portal(options["debug-credentials"]) if options["debug-credentials"] else None
        levels = LogLevels()
        # twistd logs through the console's level filter from its first line on.
        top.log_observer = lambda twistd_options: levels.filtering(
            twistd_log_observer(twistd_options)
        )
        console = ConsoleFactory(controller, portal, levels)
        _listen(top, reactor, "console", options["debug-port"], console, label="debug console")
    if options["metrics-port"]:
        from twinfer.ops.metrics import make_site

        site: Any = make_site(controller)
        _listen(top, reactor, "metrics", options["metrics-port"], site, label="metrics")
    if options["agent-port"]:
        from twinfer.ops.agent import AgentFactory, drain_finished

        agent = AgentFactory(controller, reactor)
        _listen(
            top,
            reactor,
            "agent",
            endpoint_description(options["agent-port"]),
            agent,
            label="agent",
            keep_open=lambda: drain_finished(dataplane),
        )
