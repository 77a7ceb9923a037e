"""The private Twisted names :mod:`twinfer.compat` relies on exist on this Twisted.

Checked against Twisted 26.10.0.  If one of these fails after a Twisted
upgrade, the matching function in ``src/twinfer/compat.py`` must change.
"""

from __future__ import annotations

import inspect
import signal
from pathlib import Path

from twisted.application import app
from twisted.internet import main, selectreactor, tcp
from twisted.internet.interfaces import _ISupportsExitSignalCapturing
from twisted.logger import ILogObserver, Logger
from twisted.scripts import twistd

from twinfer.compat import exit_normally, twistd_log_observer
from twinfer.netutil import DirectReadClient, DirectReadServer


def test_twistd_exits_with_the_signal_its_reactor_recorded() -> None:
    # twistd re-raises reactor._exitSignal after the reactor stops ...
    assert "reactor._exitSignal" in inspect.getsource(app.ApplicationRunner.startReactor)
    assert "runner._exitSignal" in inspect.getsource(twistd.runApp)
    assert "_exitSignal" in _ISupportsExitSignalCapturing.names()
    # ... which a reactor records from SIGTERM, and exit_normally clears.
    reactor = selectreactor.SelectReactor()  # not the global one: nothing is stopped
    try:
        assert _ISupportsExitSignalCapturing.providedBy(reactor)
        assert reactor._exitSignal is None
        reactor.sigTerm(signal.SIGTERM, None)
        assert reactor._exitSignal == signal.SIGTERM
        exit_normally(reactor)
        assert reactor._exitSignal is None
    finally:
        reactor.waker.connectionLost(None)  # closes its pipe


def test_exit_normally_leaves_a_reactor_without_an_exit_signal_alone() -> None:
    from twisted.internet.task import Clock

    clock = Clock()
    exit_normally(clock)
    assert not hasattr(clock, "_exitSignal")


def test_twistd_log_observer_is_the_one_twistd_would_build(tmp_path: Path) -> None:
    assert twistd._SomeApplicationRunner.loggerFactory._getLogObserver
    path = tmp_path / "twistd.log"
    options = twistd.ServerOptions()
    options.parseOptions(["--nodaemon", f"--logfile={path}"])
    # For a log file twistd also installs a SIGUSR1 handler (rotation): put it back.
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        observer = twistd_log_observer(options)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert ILogObserver.providedBy(observer)
    Logger(namespace="compat.test", observer=observer).info("to {where}", where="the file")
    assert "[compat.test#info] to the file" in path.read_text()


def test_the_in_place_receive_transport_uses_names_twisted_still_has() -> None:
    # netutil.enable_direct_reads swaps the transport class of a tcp.Port.
    assert tcp.Port.transport is tcp.Server
    assert issubclass(DirectReadServer, tcp.Server)
    # netutil.enable_direct_client_reads changes a connected tcp.Client's class
    # to this subclass, which must add no state of its own but ``reader``.
    assert issubclass(DirectReadClient, tcp.Client)
    assert "__slots__" not in vars(tcp.Client) and "__slots__" not in vars(DirectReadClient)
    # DirectReadServer.doRead overrides Connection.doRead and reads Connection.socket.
    assert "self.socket.recv" in inspect.getsource(tcp.Connection.doRead)
    assert main.CONNECTION_LOST and main.CONNECTION_DONE
