"""``twistd twinfer``: command-line options and service construction.

Modelled on ``twisted.web.tap``: :class:`Options` parses and validates the
command line and the configuration (a bad config stops ``twistd`` with one
message naming the key); :func:`makeService` loads the models and returns a
``MultiService`` of the model server and its listening port.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python import usage

import twinfer
from twinfer.config import Config, ConfigError, default_config, load_config
from twinfer.dataplane import DataPlane
from twinfer.netutil import enable_direct_reads
from twinfer.operations import (
    OPS_FLAGS,
    OPS_PARAMETERS,
    add_operations_services,
    check_operations_options,
)
from twinfer.registry import build_dispatcher, load_models, replica_counts
from twinfer.scheduling import Dispatcher
from twinfer.server import TwinferFactory

log = Logger()


def endpoint_description(port: str) -> str:
    """Accept a bare port number (``9000``) as shorthand for ``tcp:9000``."""
    return f"tcp:{port}" if port.isdigit() else port


class Options(usage.Options):
    """Options for ``twistd twinfer``."""

    synopsis = "[--port ENDPOINT] [--http-port ENDPOINT] [--config FILE]"
    longdesc = (
        "Serve OpenVINO models over twinfer's binary protocol and, with --http-port, "
        "over HTTP (KServe v2 REST and the seed's REST API). Without --config, "
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
        ["config", "c", None, "TOML configuration file (see etc/twinfer.toml)."],
        *OPS_PARAMETERS,
    ]
    optFlags = [*OPS_FLAGS]

    config: Config

    def postOptions(self) -> None:
        self["port"] = endpoint_description(self["port"])
        if self["http-port"]:
            self["http-port"] = endpoint_description(self["http-port"])
        try:
            self.config = load_config(self["config"]) if self["config"] else default_config()
        except ConfigError as e:
            raise usage.UsageError(f"bad configuration: {e}") from e
        check_operations_options(self)


class ModelService(service.Service):
    """Starts the device workers with the reactor and stops them with it."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def startService(self) -> None:
        super().startService()
        self.dispatcher.start()

    def stopService(self) -> None:
        super().stopService()
        self.dispatcher.stop()


class ListeningService(service.Service):
    """Listens on an endpoint and logs the address it got (``tcp:0`` included).

    ``front`` names the front end in the log line: ``twinfer http listening
    on tcp:127.0.0.1:8080``; the binary protocol's line stays ``twinfer
    listening on tcp:127.0.0.1:9000`` (scripts and tests parse it).
    """

    def __init__(
        self, reactor: Any, description: str, factory: IProtocolFactory, front: str = ""
    ) -> None:
        self._endpoint = endpoints.serverFromString(reactor, description)
        self._description = description
        self._factory = factory
        self._front = front
        self._reactor = reactor
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        d = self._endpoint.listen(self._factory)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        if isinstance(self._factory, TwinferFactory):
            enable_direct_reads(port)
        host = port.getHost()
        kind = "ssl" if self._description.startswith("ssl:") else "tcp"
        log.info(
            "twinfer {front}listening on {kind}:{host}:{port}",
            front=f"{self._front} " if self._front else "",
            kind=kind,
            host=getattr(host, "host", host),
            port=getattr(host, "port", ""),
        )

    def _failed(self, failure: Any) -> None:
        log.failure("cannot listen on {description}", failure, description=self._description)
        self._reactor.stop()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()  # type: ignore[no-any-return]
        return None


def makeService(options: Options) -> service.MultiService:
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
    top = service.MultiService()
    # Every front end's requests go through this one data plane.
    dataplane = DataPlane(dispatcher)
    factory = TwinferFactory(dataplane, config.server)
    # The operations services (graceful drain in place of ModelService,
    # console, metrics) go in first so that the front ends stop after them.
    add_operations_services(top, options, config, dataplane, factory, reactor)
    ListeningService(reactor, options["port"], factory).setServiceParent(top)
    if options["http-port"]:
        # Imported only when asked for: twisted.web is not needed otherwise.
        from twinfer.http import HTTPFrontEnd

        front = HTTPFrontEnd(dataplane, config, reactor)
        front.setServiceParent(top)
        ListeningService(reactor, options["http-port"], front.site, "http").setServiceParent(top)
    return top
