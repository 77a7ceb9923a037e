"""The graceful drain's connection handling, in memory under a ``Clock``.

Connections are real protocols (the binary protocol, the HTTP front end's
channel), each a data-plane session, on ``StringTransport``; nothing sleeps:
time is ``Clock.advance`` and a connection closes when the test calls its
``connectionLost``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from support import TINY_CONFIG, config_from
from twinfer.dataplane import DataPlane
from twinfer.frontends.binary import TwinferFactory
from twinfer.frontends.http.site import Router, TwinferSite
from twinfer.ops.control import Controller
from twinfer.ops.lifecycle import ServingService, close_connections
from twinfer.registry import build_dispatcher, load_models
from twinfer.scheduling import Dispatcher
from twinfer.wire.decode import decode_message
from twinfer.wire.encode import encode_bytes
from twinfer.wire.frames import FrameDecoder
from twinfer.wire.messages import (
    Error,
    GoAway,
    Hello,
    InferRequest,
    ListModels,
    Message,
    ModelList,
    Ping,
    Pong,
)


def connect(factory: Any) -> tuple[Any, StringTransport]:
    """A protocol from ``factory`` connected to a fresh ``StringTransport``."""
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def tiny_dispatcher() -> Dispatcher:
    """A dispatcher serving the tiny model (not started: nothing runs)."""
    from twisted.internet import reactor

    config = config_from(TINY_CONFIG)
    return build_dispatcher(config, load_models(config), reactor)


def frames(transport: StringTransport) -> list[tuple[int, Message]]:
    """The frames written to ``transport`` since the last call, decoded."""
    found = FrameDecoder().feed(transport.value())
    transport.clear()
    return [(f.request_id, decode_message(f)) for f in found]


def lose(protocol: Any) -> None:
    """What the reactor does once a closing connection is really gone."""
    protocol.connectionLost(Failure(ConnectionDone()))


class SessionTests(unittest.TestCase):
    """Connections are the data plane's sessions, opened and closed by the
    front ends' protocols themselves."""

    def setUp(self) -> None:
        self.plane = DataPlane(tiny_dispatcher(), tasks=None)

    def test_binary_connections_are_sessions_from_made_to_lost(self) -> None:
        factory = TwinferFactory(self.plane)
        first, _ = connect(factory)
        second, _ = connect(factory)
        self.assertEqual(len(self.plane.frontends["binary"].sessions), 2)
        lost = first.session.when_closed()
        self.assertFalse(lost.called)
        lose(first)
        self.assertTrue(lost.called)
        self.assertEqual(list(self.plane.sessions()), [second.session])
        self.assertTrue(first.session.when_closed().called)  # already gone: at once

    def test_http_channels_are_sessions_of_the_http_front_end(self) -> None:
        site = TwinferSite(Router(), self.plane, 1024, 5.0, reactor=Clock())
        channel, _ = connect(site)
        self.assertEqual(list(self.plane.frontends["http"].sessions), [channel.session])
        lose(channel)
        self.assertEqual(list(self.plane.sessions()), [])

    def test_a_cancelled_wait_does_not_disturb_the_others(self) -> None:
        protocol, _ = connect(TwinferFactory(self.plane))
        cancelled = protocol.session.when_closed()
        waiting = protocol.session.when_closed()
        cancelled.cancel()
        self.failureResultOf(cancelled)
        lose(protocol)
        self.assertIsNone(self.successResultOf(waiting))


class CloseConnectionsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.plane = DataPlane(tiny_dispatcher(), tasks=None)
        self.factory = TwinferFactory(self.plane)

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(close_connections(self.plane, self.clock, 5.0))

    def test_fires_once_every_connection_is_lost(self) -> None:
        (a, ta), (b, tb) = connect(self.factory), connect(self.factory)
        d = self.close()
        self.assertTrue(ta.disconnecting and tb.disconnecting)  # asked to close ...
        self.assertNoResult(d)  # ... but not gone yet
        lose(a)
        self.assertNoResult(d)
        lose(b)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the timeout was cancelled

    def test_aborts_what_is_still_open_after_the_close_timeout(self) -> None:
        (a, ta), (b, tb) = connect(self.factory), connect(self.factory)
        d = self.close()
        lose(a)
        self.clock.advance(4.9)
        self.assertFalse(tb.disconnected)  # StringTransport: set by abortConnection
        self.clock.advance(0.1)
        self.assertTrue(tb.disconnected)
        self.assertFalse(ta.disconnected)  # the one that closed was not aborted
        self.assertNoResult(d)  # until the aborted connection is really lost
        lose(b)
        self.successResultOf(d)

    def test_nothing_open_is_done_at_once(self) -> None:
        self.successResultOf(self.close())


class ServingServiceDrainTests(unittest.TestCase):
    """The whole shutdown under a Clock, with a real dispatcher (tiny model)."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        config = config_from(TINY_CONFIG)
        self.dispatcher = build_dispatcher(config, load_models(config), reactor)
        self.dispatcher.start()
        self.addCleanup(self.dispatcher.stop)
        self.plane = DataPlane(self.dispatcher, tasks=None)
        self.controller = Controller(config, self.plane, reactor)
        self.clock = Clock()
        self.service = ServingService(
            self.controller, self.clock, drain_timeout=10.0, close_timeout=5.0, linger=0.5
        )

    def test_an_idle_connection_is_closed_after_the_linger(self) -> None:
        site = TwinferSite(Router(), self.plane, 1024, 5.0, reactor=self.clock)
        channel, transport = connect(site)
        d = Deferred.fromCoroutine(self.service.shutdown())
        self.assertTrue(self.controller.closing)
        self.assertFalse(self.dispatcher.started)  # new requests: UNAVAILABLE
        self.clock.advance(0.4)
        self.assertFalse(transport.disconnecting)  # still lingering
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(d)
        lose(channel)
        self.successResultOf(d)

    def test_without_connections_there_is_no_linger(self) -> None:
        d = Deferred.fromCoroutine(self.service.shutdown())
        self.successResultOf(d)

    def test_binary_clients_are_told_to_go_away_with_their_last_request_id(self) -> None:
        factory = TwinferFactory(self.plane)
        talking, transport = connect(factory)
        talking.dataReceived(
            encode_bytes(0, Hello()) + encode_bytes(1, Ping()) + encode_bytes(2, ListModels())
        )
        self.assertEqual([type(m) for _, m in frames(transport)], [Hello, Pong, ModelList])
        _, silent = connect(factory)  # no HELLO yet: no GOAWAY can be sent
        other_plane = DataPlane(self.dispatcher, tasks=None)
        _, elsewhere = connect(TwinferFactory(other_plane))
        elsewhere.clear()
        d = Deferred.fromCoroutine(self.service.shutdown())
        self.assertEqual(frames(transport), [(0, GoAway(2, "the server is shutting down"))])
        self.assertEqual(silent.value(), b"")
        self.assertEqual(elsewhere.value(), b"")  # another data plane does not drain
        # A request the client sent before it read GOAWAY: refused, never run.
        x = np.ones((1, 4), np.float32)
        talking.dataReceived(encode_bytes(3, InferRequest("tiny", {"x": x})))
        [(rid, error)] = frames(transport)
        assert isinstance(error, Error)
        self.assertEqual((rid, error.code), (3, 111))  # UNAVAILABLE
        # A client that connects while the server drains is told at once.
        newcomer, new_transport = connect(factory)
        newcomer.dataReceived(encode_bytes(0, Hello()))
        self.assertEqual(
            [m for _, m in frames(new_transport)][1:], [GoAway(0, "the server is shutting down")]
        )
        self.clock.advance(0.5)
        for protocol in list(factory.connections):
            lose(protocol)
        self.successResultOf(d)
