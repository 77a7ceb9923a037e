"""The client that moves (:class:`twinfer.failover.ClientPool`), in memory.

The endpoints are Twisted's real ``tcp:`` endpoints over a ``MemoryReactor``
(which records each connection attempt instead of opening a socket); each
accepted connection runs over a ``StringTransport`` and the test plays the
server's part with real frames.  Nothing sleeps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from twinfer.client import TwinferClient, connect
from twinfer.client_protocol import ClientProtocol, GoneAway, Unreachable
from twinfer.errors import ErrorCode, LocalProtocolError, TwinferError
from twinfer.failover import ClientPool
from twinfer.wire.decode import decode_message
from twinfer.wire.encode import encode_bytes
from twinfer.wire.frames import FrameDecoder
from twinfer.wire.messages import (
    AdminReply,
    AdminRequest,
    Error,
    GoAway,
    Hello,
    ImageRequest,
    InferReply,
    InferRequest,
    Message,
    Ping,
    Pong,
    Predictions,
)

SERVER_HELLO = Hello(1, 1, 1 << 20, "test-server")
X = np.ones((1, 4), np.float32)
INFER = InferRequest("tiny", {"x": X})


class Peer:
    """The server's end of one connection the client made."""

    def __init__(self, reactor: MemoryReactorClock, index: int) -> None:
        self.host, self.port, factory = reactor.tcpClients[index][:3]
        self.protocol: Any = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        [(rid, hello)] = self.received()
        assert rid == 0 and isinstance(hello, Hello)
        self.send(0, SERVER_HELLO)

    def received(self) -> list[tuple[int, Message]]:
        frames = FrameDecoder().feed(self.transport.value())
        self.transport.clear()
        return [(f.request_id, decode_message(f)) for f in frames]

    def send(self, request_id: int, message: Message) -> None:
        self.protocol.dataReceived(encode_bytes(request_id, message))

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionLost("the node died")))


def refuse(reactor: MemoryReactorClock, index: int) -> None:
    _, _, factory = reactor.tcpClients[index][:3]
    factory.clientConnectionFailed(reactor.connectors[index], Failure(ConnectionRefusedError()))


class ClientPoolTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def start(self, endpoints: list[str], connections: int) -> tuple[TwinferClient, list[Peer]]:
        d = connect(self.reactor, endpoints, connections=connections)
        self.assertNoResult(d)  # until the handshakes are done
        peers = [Peer(self.reactor, i) for i in range(connections)]
        client = self.successResultOf(d)
        assert isinstance(client.protocol, ClientPool)
        return client, peers

    def test_connections_are_spread_round_robin_and_requests_go_to_the_least_busy(self) -> None:
        client, peers = self.start(["tcp:a:9000", "tcp:b:9000"], connections=3)
        self.assertEqual([p.host for p in peers], ["a", "b", "a"])
        self.assertEqual(client.server, SERVER_HELLO)
        pings = [client.ping() for _ in range(4)]
        per_peer = [len(p.received()) for p in peers]
        self.assertEqual(sorted(per_peer), [1, 1, 2])
        self.assertEqual(client.protocol.in_flight, 4)
        for peer in peers:
            self.assertFalse(peer.transport.disconnecting)
        self.assertEqual([d.called for d in pings], [False] * 4)

    def test_goaway_moves_to_a_new_connection_to_the_same_endpoint(self) -> None:
        client, [old] = self.start(["tcp:lb:9000"], connections=1)
        accepted = client.infer("tiny", {"x": X})
        sent_late = client.infer("tiny", {"x": X})
        [(first, _), (second, _)] = old.received()
        old.send(0, GoAway(first, "the server is shutting down"))
        # A replacement is opened to the same endpoint string at once...
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(self.reactor.tcpClients[1][:2], ("lb", 9000))
        # ...and nothing new goes to the old connection meanwhile.
        waiting = client.ping()
        self.assertEqual(old.received(), [])
        # The server refuses the request that came after its GOAWAY.
        old.send(second, Error(ErrorCode.UNAVAILABLE, "the server is shutting down"))
        self.assertNoResult(sent_late)
        new = Peer(self.reactor, 1)
        sent = new.received()
        self.assertEqual(sorted(type(m).__name__ for _, m in sent), ["InferRequest", "Ping"])
        for rid, message in sent:
            new.send(rid, InferReply({"y": X}) if isinstance(message, InferRequest) else Pong())
        np.testing.assert_array_equal(self.successResultOf(sent_late)["y"], X)
        self.successResultOf(waiting)
        self.assertEqual(client.resent, 1)
        self.assertFalse(old.transport.disconnecting)  # one reply still due
        old.send(first, InferReply({"y": X * 2}))
        np.testing.assert_array_equal(self.successResultOf(accepted)["y"], X * 2)
        self.assertTrue(old.transport.disconnecting)  # retired once its replies are in

    def test_a_node_that_sends_every_new_connection_away_is_retried_with_backoff(self) -> None:
        client, [first] = self.start(["tcp:lb:9000"], connections=1)
        first.send(0, GoAway(0, "the server is shutting down"))  # before any request
        self.assertEqual(len(self.reactor.tcpClients), 1)  # not at once
        self.reactor.advance(0.05)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        second = Peer(self.reactor, 1)
        second.send(0, GoAway(0, "the server is shutting down"))  # the same node again
        self.reactor.advance(0.05)
        self.assertEqual(len(self.reactor.tcpClients), 2)  # waits twice as long now
        self.reactor.advance(0.05)
        self.assertEqual(len(self.reactor.tcpClients), 3)
        third = Peer(self.reactor, 2)
        d = client.ping()
        [(rid, _)] = third.received()
        third.send(rid, Pong())
        self.successResultOf(d)
        self.assertTrue(first.transport.disconnecting and second.transport.disconnecting)

    def test_a_lost_connection_resends_inference_once_and_never_admin(self) -> None:
        client, [a, b] = self.start(["tcp:a:9000", "tcp:b:9000"], connections=2)
        infer = client.infer("tiny", {"x": X})
        image = client.predict("faces", b"\x89PNG...")
        admin = client.admin(AdminRequest("drain", device="cpu"))
        ping = client.ping()
        on_a = [type(m) for _, m in a.received()]
        on_b = b.received()
        self.assertEqual(len(on_a) + len(on_b), 4)
        # Whatever went to b is answered by b; a dies with the rest.
        answers = {
            InferRequest: InferReply({"y": X}),
            ImageRequest: Predictions("detect", ()),
            AdminRequest: AdminReply("drained"),
            Ping: Pong(),
        }
        for rid, message in on_b:
            b.send(rid, answers[type(message)])
        a.lose()
        resent = b.received()
        self.assertEqual(
            sorted(type(m).__name__ for _, m in resent),
            sorted(t.__name__ for t in on_a if t in (InferRequest, ImageRequest)),
        )
        self.assertEqual(client.resent, len(resent))
        for rid, message in resent:
            b.send(rid, answers[type(message)])
        np.testing.assert_array_equal(self.successResultOf(infer)["y"], X)
        self.assertEqual(self.successResultOf(image), [])
        for d, kind in ((admin, AdminRequest), (ping, Ping)):
            if kind in on_a:
                error = self.failureResultOf(d, TwinferError).value
                self.assertEqual(error.code, ErrorCode.UNAVAILABLE)
                self.assertIn("connection to tcp:a:9000 lost", error.message)
                self.assertIn("not re-sent", error.message)
            else:
                self.successResultOf(d)

    def test_a_retry_that_cannot_connect_fails_naming_the_lost_connection(self) -> None:
        client, [a] = self.start(["tcp:a:9000"], connections=1)
        d = client.infer("tiny", {"x": X})
        a.lose()
        self.assertNoResult(d)  # reconnecting to tcp:a:9000
        refuse(self.reactor, 1)  # the retry's connection (the node is gone)
        refuse(self.reactor, 2)  # the replacement of the lost connection
        error = self.failureResultOf(d, TwinferError).value
        self.assertEqual(error.code, ErrorCode.UNAVAILABLE)
        self.assertTrue(
            error.message.startswith("connection to tcp:a:9000 lost and the retry failed:"),
            error.message,
        )
        self.assertEqual(client.resent, 1)
        self.assertFalse(client.protocol.usable)

    def test_a_request_is_resent_only_once(self) -> None:
        client, [a, b] = self.start(["tcp:a:9000", "tcp:b:9000"], connections=2)
        d = client.infer("tiny", {"x": X})
        first = a if a.received() else b
        other = b if first is a else a
        first.lose()
        self.assertEqual(len(other.received()), 1)  # re-sent there
        other.lose()
        error = self.failureResultOf(d, TwinferError).value
        first_name, other_name = (f"tcp:{p.host}:9000" for p in (first, other))
        self.assertTrue(
            error.message.startswith(
                f"connection to {first_name} lost and the retry failed: "
                f"connection to {other_name} lost: "
            ),
            error.message,
        )
        self.assertEqual(client.resent, 1)

    def test_a_request_refused_after_goaway_twice_through_a_balancer_is_answered(self) -> None:
        # Two connections through one balancer to the same draining node:
        # the request the first refuses is re-sent on the second, which has
        # not read its GOAWAY yet and refuses it too.  The node never ran it,
        # so it goes on to a fresh connection and is answered.
        client, [a, b] = self.start(["tcp:lb:9000"], connections=2)
        d = client.infer("tiny", {"x": X})
        first = a if a.received() else b
        other = b if first is a else a
        kept = client.ping()  # on the other connection, accepted before its GOAWAY
        [(ping_id, _)] = other.received()
        first.send(0, GoAway(0, "the server is shutting down"))
        first.send(1, Error(ErrorCode.UNAVAILABLE, "the server is shutting down"))
        [(again, _)] = other.received()  # re-sent there
        other.send(0, GoAway(ping_id, "the server is shutting down"))
        other.send(again, Error(ErrorCode.UNAVAILABLE, "the server is shutting down"))
        self.assertNoResult(d)
        fresh = Peer(self.reactor, len(self.reactor.tcpClients) - 1)
        [(rid, message)] = fresh.received()
        self.assertIsInstance(message, InferRequest)
        fresh.send(rid, InferReply({"y": X}))
        np.testing.assert_array_equal(self.successResultOf(d)["y"], X)
        self.assertEqual(client.resent, 2)
        other.send(ping_id, Pong())
        self.successResultOf(kept)

    def test_refusals_after_goaway_are_followed_at_most_once_per_connection(self) -> None:
        client, [a] = self.start(["tcp:lb:9000"], connections=1)
        d = client.infer("tiny", {"x": X})
        a.received()
        a.send(0, GoAway(0, "the server is shutting down"))
        a.send(1, Error(ErrorCode.UNAVAILABLE, "the server is shutting down"))
        self.reactor.advance(0.05)  # the replacement, after the back-off
        b = Peer(self.reactor, 1)
        [(rid, _)] = b.received()
        b.send(0, GoAway(0, "the server is shutting down"))
        b.send(rid, Error(ErrorCode.UNAVAILABLE, "the server is shutting down"))
        error = self.failureResultOf(d, TwinferError).value
        self.assertIn("went away before it accepted the request", error.message)
        self.assertEqual(client.resent, 1)

    def test_through_a_balancer_a_lost_request_is_resent_on_a_fresh_connection(self) -> None:
        # A node behind the balancer dies: every connection to it is lost,
        # one after the other.  The other connection may be to that node
        # too, its loss not yet read, so the request waits for the
        # replacement opened after the loss.
        client, [a, b] = self.start(["tcp:lb:9000"], connections=2)
        d = client.infer("tiny", {"x": X})
        first = a if a.received() else b
        other = b if first is a else a
        first.lose()
        self.assertEqual(other.received(), [])  # not there
        self.assertEqual(len(self.reactor.tcpClients), 3)  # one replacement, no more
        other.lose()  # it was on the dead node as well
        self.assertNoResult(d)
        fresh = Peer(self.reactor, 2)
        [(rid, message)] = fresh.received()
        self.assertIsInstance(message, InferRequest)
        fresh.send(rid, InferReply({"y": X}))
        np.testing.assert_array_equal(self.successResultOf(d)["y"], X)
        self.assertEqual(client.resent, 1)

    def test_a_server_error_on_the_retry_is_the_answer(self) -> None:
        client, [a, b] = self.start(["tcp:a:9000", "tcp:b:9000"], connections=2)
        d = client.infer("tiny", {"x": X})
        first = a if a.received() else b
        other = b if first is a else a
        first.lose()
        [(rid, _)] = other.received()
        other.send(rid, Error(ErrorCode.OVERLOADED, "the queue is full"))
        error = self.failureResultOf(d, TwinferError).value
        self.assertEqual((error.code, error.message), (ErrorCode.OVERLOADED, "the queue is full"))

    def test_no_reachable_endpoint_fails_the_connect(self) -> None:
        d = connect(self.reactor, ["tcp:a:9000", "tcp:b:9000"], connections=2)
        refuse(self.reactor, 0)
        refuse(self.reactor, 1)
        error = self.failureResultOf(d, Unreachable).value
        self.assertEqual(error.code, ErrorCode.UNAVAILABLE)
        self.assertIn("tcp:a:9000", error.message)
        self.assertIn("tcp:b:9000", error.message)

    def test_one_reachable_endpoint_is_enough_to_start(self) -> None:
        d = connect(self.reactor, ["tcp:a:9000", "tcp:b:9000"], connections=2)
        refuse(self.reactor, 0)
        Peer(self.reactor, 1)
        client = self.successResultOf(d)
        client.ping()
        self.assertEqual(len(self.reactor.tcpClients), 2)  # nothing else opened

    def test_close_fails_what_is_in_flight_without_resending(self) -> None:
        client, [a] = self.start(["tcp:a:9000"], connections=1)
        d = client.infer("tiny", {"x": X})
        closed = client.close()
        self.assertTrue(a.transport.disconnecting)
        a.lose()
        self.successResultOf(closed)
        self.failureResultOf(d, TwinferError)
        self.assertEqual(client.resent, 0)
        self.assertEqual(len(self.reactor.tcpClients), 1)  # no reconnection


class SingleConnectionGoAwayTests(unittest.SynchronousTestCase):
    """One :class:`ClientProtocol` (``connect`` to one endpoint): GOAWAY stops it sending."""

    def test_goaway_fires_and_new_requests_are_refused_locally(self) -> None:
        protocol = ClientProtocol()
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(encode_bytes(0, SERVER_HELLO))
        in_flight = protocol.request(INFER)
        after = protocol.request(Ping())
        transport.clear()
        self.assertTrue(protocol.usable)
        protocol.dataReceived(encode_bytes(0, GoAway(1, "bye")))
        self.assertEqual(self.successResultOf(protocol.goaway), GoAway(1, "bye"))
        self.assertFalse(protocol.usable)
        refused = self.failureResultOf(protocol.request(Ping()), LocalProtocolError).value
        self.assertEqual(refused.code, ErrorCode.UNAVAILABLE)
        self.assertEqual(transport.value(), b"")  # nothing was sent
        # An UNAVAILABLE above the last id: the server never worked on it.
        protocol.dataReceived(encode_bytes(2, Error(ErrorCode.UNAVAILABLE, "shutting down")))
        self.failureResultOf(after, GoneAway)
        protocol.dataReceived(encode_bytes(1, InferReply({"y": X})))
        self.successResultOf(in_flight)
