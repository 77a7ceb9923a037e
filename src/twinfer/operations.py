"""The operations options of ``twistd twinfer`` and the services they add.

Kept out of :mod:`twinfer.tap` so that module stays about the model server:
``tap.Options`` includes :data:`OPS_PARAMETERS` and :data:`OPS_FLAGS`, calls
:func:`check_operations_options` from ``postOptions`` and
:func:`add_operations_services` from ``makeService``.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.python import usage

from twinfer.config import Config
from twinfer.scheduling import Dispatcher
from twinfer.server import TwinferFactory

OPS_PARAMETERS: list[list[Any]] = [
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
        "drain-timeout",
        None,
        30.0,
        "Seconds to finish queued and running jobs on shutdown before answering UNAVAILABLE.",
        float,
    ],
]
OPS_FLAGS: list[list[Any]] = [
    ["allow-admin", None, "Obey ADMIN_REQUEST messages (load/unload/reload/drain) from clients."],
]

_LOOPBACK = ("127.", "::1", "localhost", "\\:\\:1")
_TCP_KINDS = ("tcp", "tcp6", "ssl")


def local_endpoint(description: str) -> tuple[str, bool]:
    """Bind a TCP endpoint without ``interface=`` to loopback.

    Returns the endpoint description and whether it listens on loopback only
    (non-TCP endpoints such as ``unix:`` count as local).
    """
    if description.isdigit():
        description = f"tcp:{description}"
    parts = description.split(":")
    if parts[0] not in _TCP_KINDS:
        return description, True
    interfaces = [p.split("=", 1)[1] for p in parts[1:] if p.startswith("interface=")]
    if not interfaces:
        loopback = "\\:\\:1" if parts[0] == "tcp6" else "127.0.0.1"
        return f"{description}:interface={loopback}", True
    return description, interfaces[0].startswith(_LOOPBACK)


def check_operations_options(options: usage.Options) -> None:
    """Validate and normalize the operations options (raises ``UsageError``)."""
    if options["drain-timeout"] < 0:
        raise usage.UsageError("--drain-timeout must be 0 or more seconds")
    if options["debug-credentials"]:
        from twinfer.console import read_credentials

        try:
            read_credentials(options["debug-credentials"])
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"bad --debug-credentials: {e}") from e
    if options["debug-port"]:
        description, local = local_endpoint(options["debug-port"])
        if not local and not options["debug-credentials"]:
            raise usage.UsageError(
                "refusing a debug console on a non-loopback interface without "
                "--debug-credentials"
            )
        options["debug-port"] = description
    if options["metrics-port"] and options["metrics-port"].isdigit():
        options["metrics-port"] = f"tcp:{options['metrics-port']}"


def add_operations_services(
    top: service.MultiService,
    options: usage.Options,
    config: Config,
    dispatcher: Dispatcher,
    factory: TwinferFactory,
    reactor: Any,
) -> None:
    """Add the serving (graceful drain), console and metrics services to ``top``."""
    from twinfer.control import Controller
    from twinfer.lifecycle import ServingService
    from twinfer.stats import Stats
    from twinfer.tap import ListeningService

    stats = Stats()
    controller = Controller(config, dispatcher, reactor, stats=stats, config_path=options["config"])
    factory.stats = stats
    dispatcher.stats = stats  # every front end's requests are counted where they are queued
    factory.controller = controller
    factory.allow_admin = bool(options["allow-admin"])
    controller.factories.append(factory)
    ServingService(
        controller, reactor, drain_timeout=options["drain-timeout"], handle_sighup=True
    ).setServiceParent(top)
    if options["debug-port"]:
        from twinfer.console import ConsoleFactory, LogLevels, LogLevelService, make_portal

        portal = make_portal(options["debug-credentials"]) if options["debug-credentials"] else None
        levels = LogLevels()
        LogLevelService(levels).setServiceParent(top)
        console = ConsoleFactory(controller, portal, levels)
        ListeningService(reactor, options["debug-port"], console, "debug console").setServiceParent(
            top
        )
    if options["metrics-port"]:
        from twinfer.metrics import make_site

        site: Any = make_site(controller)
        ListeningService(reactor, options["metrics-port"], site, "metrics").setServiceParent(top)
