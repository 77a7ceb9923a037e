"""``twistd twinfer``'s service tree: ports bound at start-up, their addresses, the port
file, a bind failure, and the log filter handed to twistd (real loopback sockets)."""

from __future__ import annotations

import errno
import json
import signal
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, Logger, LogLevel, capturedLogs, formatEvent
from twisted.scripts import twistd
from twisted.trial import unittest
from zope.interface import implementer

from twinfer import tap
from twinfer.ops.listening import CannotListen, ListeningService
from twistd_process import TWISTD_TINY_CONFIG

LOOPBACK = "tcp:0:interface=127.0.0.1"


def echo_factory() -> Factory:
    return Factory.forProtocol(Protocol)


class TwinferServiceTests(unittest.TestCase):
    def service_with_ports(self, port_file: Path | None = None) -> tap.TwinferService:
        top = tap.TwinferService(port_file=str(port_file) if port_file else None)
        for name in ("binary", "http"):
            ListeningService(reactor, name, LOOPBACK, echo_factory()).setServiceParent(top)
        return top

    async def test_ports_are_bound_before_start_and_their_addresses_reported(self) -> None:
        top = self.service_with_ports()
        self.assertEqual(top.bound_addresses(), {})
        top.privilegedStartService()
        addresses = top.bound_addresses()
        self.assertEqual(sorted(addresses), ["binary", "http"])
        for address in addresses.values():
            assert isinstance(address, IPv4Address)
            self.assertEqual(address.host, "127.0.0.1")
            self.assertGreater(address.port, 0)
        top.startService()
        ports = await top.when_listening()
        self.assertEqual(ports, {name: a.port for name, a in addresses.items()})  # type: ignore[attr-defined]
        await top.stopService()

    async def test_the_port_file_is_written_once_listening_and_removed_at_stop(self) -> None:
        path = Path(self.mktemp())
        top = self.service_with_ports(path)
        top.privilegedStartService()
        self.assertFalse(path.exists())  # not before the service starts
        top.startService()
        written = json.loads(path.read_text())
        bound = {name: a.port for name, a in top.bound_addresses().items()}  # type: ignore[attr-defined]
        self.assertEqual(written, bound)
        await top.stopService()
        self.assertFalse(path.exists())

    async def test_a_port_that_cannot_be_bound_stops_start_up(self) -> None:
        taken = reactor.listenTCP(0, echo_factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        description = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        listening = ListeningService(reactor, "http", description, echo_factory())
        with self.assertRaises(CannotListen) as e:
            listening.privilegedStartService()
        self.assertEqual(
            str(e.exception), f"cannot listen on {description}: address already in use"
        )
        self.failureResultOf(listening.when_listening(), CannotListen)
        top = tap.TwinferService()
        ListeningService(reactor, "http", description, echo_factory()).setServiceParent(top)
        with self.assertRaises(SystemExit) as exit:
            top.privilegedStartService()
        self.assertEqual(exit.exception.code, 1)
        await top.stopService()

    async def test_a_port_failing_after_start_up_stops_the_reactor(self) -> None:
        pending: Deferred[Any] = Deferred()
        endpoint = _PendingEndpoint(pending)
        stopped: list[bool] = []
        top = tap.TwinferService(reactor=_Stoppable(stopped))
        ListeningService(
            reactor, "http", "onion:80", echo_factory(), endpoint=endpoint
        ).setServiceParent(top)
        top.privilegedStartService()  # nothing known yet
        top.startService()
        self.assertEqual(stopped, [])
        with capturedLogs() as events:
            pending.errback(CannotListenError("any", 80, OSError(errno.EADDRINUSE, "in use")))
        self.assertEqual(stopped, [True])
        self.assertIn(
            "twinfer: cannot listen on onion:80: in use; stopping",
            [formatEvent(e) for e in events if e["log_level"] is LogLevel.critical],
        )
        await top.stopService()


@implementer(IStreamServerEndpoint)
class _PendingEndpoint:
    """An endpoint whose listening outcome the test decides."""

    def __init__(self, result: Deferred[Any]) -> None:
        self.result = result

    def listen(self, factory: Any) -> Deferred[Any]:
        return self.result


class _Stoppable:
    def __init__(self, stopped: list[bool]) -> None:
        self.stopped = stopped

    def stop(self) -> None:
        self.stopped.append(True)


class MakeServiceTests(unittest.TestCase):
    def twistd_options(self, *plugin_args: str) -> twistd.ServerOptions:
        directory = Path(self.mktemp())
        directory.mkdir()
        config = directory / "twinfer.toml"
        config.write_text(TWISTD_TINY_CONFIG)
        self.log_path = directory / "twistd.log"
        options = twistd.ServerOptions()
        options.parseOptions(
            [
                "--nodaemon",
                f"--logfile={self.log_path}",
                "twinfer",
                f"--config={config}",
                f"--port={LOOPBACK}",
                *plugin_args,
            ]
        )
        return options

    def test_with_a_console_twistd_logs_through_the_level_filter(self) -> None:
        options = self.twistd_options("--debug-port=tcp:0")
        top = tap.makeService(options.subOptions)
        application = service.Application("twinfer")
        previous = signal.getsignal(signal.SIGUSR1)  # twistd's log rotation handler
        try:
            top.setServiceParent(application)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        observer = application.getComponent(ILogObserver)
        self.assertIsNotNone(observer)
        [console] = [s for s in top.listening_services() if s.name == "console"]
        log = Logger(namespace="twinfer.test", observer=observer)
        log.info("before")
        console.factory.log_levels.set(LogLevel.warn)  # type: ignore[attr-defined]
        log.info("hidden")
        log.warn("after")
        text = self.log_path.read_text()
        self.assertIn("before", text)
        self.assertIn("after", text)
        self.assertNotIn("hidden", text)

    def test_without_a_console_twistd_keeps_its_own_observer(self) -> None:
        top = tap.makeService(self.twistd_options().subOptions)
        application = service.Application("twinfer")
        top.setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver, None))
        names = [s.name for s in top.listening_services()]
        self.assertEqual(names, ["binary"])

    def test_http_and_grpc_share_the_repository_and_the_server_wide_regions(self) -> None:
        from twinfer.frontends.http import HTTPFrontEnd

        options = self.twistd_options(
            "--http-port=tcp:0", "--grpc-port=tcp:0", "--allow-shm", "--allow-admin"
        )
        top = tap.makeService(options.subOptions)
        [http] = [s for s in top if isinstance(s, HTTPFrontEnd)]
        adapter = top.getServiceNamed("grpc").adapter  # type: ignore[attr-defined]
        self.assertIs(adapter.repository, http.repository)
        self.assertTrue(adapter.repository.allow_admin)
        self.assertIsNotNone(http.shared_regions)
        self.assertIs(adapter.regions, http.shared_regions)

    def test_the_port_file_option_is_made_absolute(self) -> None:
        options = self.twistd_options("--port-file=ports.json")
        self.assertTrue(Path(options.subOptions["port-file"]).is_absolute())
