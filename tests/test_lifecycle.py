"""The graceful drain's connection handling, in memory under a ``Clock``.

Connections are real protocols (the binary protocol, twisted.web's HTTP
channel) on ``StringTransport``; nothing sleeps: time is ``Clock.advance``
and a connection closes when the test calls its ``connectionLost``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.server import Site

from support import TINY_CONFIG, config_from
from twinfer.control import Controller
from twinfer.http.site import Router, TwinferSite
from twinfer.lifecycle import ServingService, close_connections
from twinfer.listening import ConnectionTracker
from twinfer.registry import build_dispatcher, load_models


def connect(factory: Any) -> tuple[Any, StringTransport]:
    """A protocol from ``factory`` connected to a fresh ``StringTransport``."""
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def lose(protocol: Any) -> None:
    """What the reactor does once a closing connection is really gone."""
    protocol.connectionLost(Failure(ConnectionDone()))


class TrackerTests(unittest.TestCase):
    def test_tracks_connections_from_made_to_lost(self) -> None:
        tracker = ConnectionTracker()
        factory = Factory.forProtocol(Protocol)
        tracker.track(factory, "binary")
        first, _ = connect(factory)
        second, _ = connect(factory)
        self.assertIsInstance(first, Protocol)
        self.assertEqual(tracker.connections(), [first, second])
        lost = tracker.when_lost(first)
        self.assertFalse(lost.called)
        lose(first)
        self.assertTrue(lost.called)
        self.assertEqual(tracker.connections("binary"), [second])
        self.assertEqual(tracker.connections("http"), [])
        self.assertTrue(tracker.when_lost(first).called)  # already gone: at once

    def test_tracks_http_channels_of_the_http_front_end(self) -> None:
        tracker = ConnectionTracker()
        site = TwinferSite(Router(), max_body_size=1024, body_timeout=5.0, reactor=Clock())
        tracker.track(site, "http")
        channel, _ = connect(site)
        self.assertEqual(tracker.connections("http"), [channel])
        lose(channel)
        self.assertEqual(tracker.connections(), [])

    def test_refuses_a_factory_whose_protocol_is_not_a_class(self) -> None:
        site = Site(Router())  # twisted.web's default: a function choosing HTTP/1.1 or 2
        with self.assertRaises(TypeError):
            ConnectionTracker().track(site, "http")

    def test_a_cancelled_wait_does_not_disturb_the_others(self) -> None:
        tracker = ConnectionTracker()
        factory = Factory.forProtocol(Protocol)
        tracker.track(factory, "binary")
        protocol, _ = connect(factory)
        cancelled = tracker.when_lost(protocol)
        waiting = tracker.when_lost(protocol)
        cancelled.cancel()
        self.failureResultOf(cancelled)
        lose(protocol)
        self.assertIsNone(self.successResultOf(waiting))


class CloseConnectionsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.tracker = ConnectionTracker()
        self.factory = Factory.forProtocol(Protocol)
        self.tracker.track(self.factory, "binary")

    def test_fires_once_every_connection_is_lost(self) -> None:
        (a, ta), (b, tb) = connect(self.factory), connect(self.factory)
        d = Deferred.fromCoroutine(close_connections(self.tracker, self.clock, 5.0))
        self.assertTrue(ta.disconnecting and tb.disconnecting)  # asked to close ...
        self.assertNoResult(d)  # ... but not gone yet
        lose(a)
        self.assertNoResult(d)
        lose(b)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the timeout was cancelled

    def test_aborts_what_is_still_open_after_the_close_timeout(self) -> None:
        (a, ta), (b, tb) = connect(self.factory), connect(self.factory)
        d = Deferred.fromCoroutine(close_connections(self.tracker, self.clock, 5.0))
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
        d = Deferred.fromCoroutine(close_connections(self.tracker, self.clock, 5.0))
        self.successResultOf(d)


class ServingServiceDrainTests(unittest.TestCase):
    """The whole shutdown under a Clock, with a real dispatcher (tiny model)."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        config = config_from(TINY_CONFIG)
        self.dispatcher = build_dispatcher(config, load_models(config), reactor)
        self.dispatcher.start()
        self.controller = Controller(config, self.dispatcher, reactor)
        self.clock = Clock()
        self.tracker = ConnectionTracker()
        self.service = ServingService(
            self.controller,
            self.clock,
            drain_timeout=10.0,
            close_timeout=5.0,
            linger=0.5,
            connections=self.tracker,
        )

    def test_an_idle_connection_is_closed_after_the_linger(self) -> None:
        site = TwinferSite(Router(), max_body_size=1024, body_timeout=5.0, reactor=self.clock)
        self.tracker.track(site, "http")
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
