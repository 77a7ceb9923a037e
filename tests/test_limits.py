"""The binary front end's limits in memory: each refusal, its count, and the
clients it leaves alone.

The first frame before HELLO, the buffer budget, the connection limit and
the idle timeout (see docs/operations.md, "Limits"); a StringTransport per
client and a Clock, on the worker-less fixture of test_protocol.
"""

from __future__ import annotations

import attrs
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial import unittest

from test_protocol import ProtocolFixture, X
from twinfer import tap
from twinfer.budget import BufferBudget
from twinfer.engines import builtin
from twinfer.errors import ErrorCode
from twinfer.frontends.binary import TwinferProtocol
from twinfer.scheduling import InferResult
from twinfer.wire.encode import encode_bytes
from twinfer.wire.frames import HEADER, HEADER_SIZE, MAGIC
from twinfer.wire.messages import InferReply, InferRequest, Ping, Pong

#: The body length of one inference request for ``tiny`` on X.
REQUEST_SIZE = len(encode_bytes(1, InferRequest("tiny", {"x": X}))) - HEADER_SIZE


class LimitFixture(ProtocolFixture):
    def refused(self) -> dict[str, int]:
        return self.dataplane.frontend("binary").refused

    def ping_answered(self, proto: TwinferProtocol, transport: StringTransport) -> bool:
        self.send(proto, 77, Ping())
        return self.replies(transport) == [(77, Pong())]

    def answer(self) -> None:
        job = self.take_job()
        job.deferred.callback(InferResult(builtin.tiny_reference(job.inputs["x"]), 0, 0))


class HelloSizeTests(LimitFixture):
    def test_a_first_frame_larger_than_a_hello_is_refused_from_its_header(self) -> None:
        proto, transport = self.connect(handshake=False)
        # The 60 MiB frame of the attack, before any HELLO: only its header.
        proto.dataReceived(HEADER.pack(MAGIC, 0x01, 0, 60 << 20, 0))
        _, error = self.error(transport)
        assert error.code == ErrorCode.FRAME_TOO_LARGE and "HELLO" in error.message
        assert transport.disconnecting
        assert proto.read_buffer() is None and self.dataplane.budget.used == 0
        assert self.refused() == {"hello_size": 1}
        assert self.ping_answered(self.proto, self.transport)  # the other client


class BudgetTests(LimitFixture):
    def setUp(self) -> None:
        super().setUp()
        # Room for one request's frame, or for one request's tensors (what a
        # request in flight holds) and small frames, not for two requests.
        self.dataplane.budget = BufferBudget(REQUEST_SIZE + X.nbytes - 1, small=0)
        self.other, self.other_transport = self.connect()

    def test_a_request_that_does_not_fit_pauses_its_connection_until_bytes_are_released(
        self,
    ) -> None:
        budget = self.dataplane.budget
        self.send(self.proto, 1, InferRequest("tiny", {"x": X}))
        assert budget.used == X.nbytes  # held by the request in flight
        self.send(self.other, 2, InferRequest("tiny", {"x": X}))
        # Not allocated, not queued: the connection is paused instead.
        assert self.other_transport.producerState == "paused"
        assert self.other.paused_for == {"memory"} and not self.other.inflight
        assert self.queue.depth == 1 and budget.used == X.nbytes
        assert self.refused() == {"max_buffered_bytes": 1}
        # Small frames still pass: the first client is served meanwhile.
        assert self.ping_answered(self.proto, self.transport)
        self.answer()  # the first request is answered: its bytes go back
        [(rid, reply)] = self.replies(self.transport)
        assert rid == 1 and isinstance(reply, InferReply)
        assert self.other_transport.producerState == "producing"
        assert 2 in self.other.inflight and budget.used == X.nbytes
        self.answer()
        [(rid, reply)] = self.replies(self.other_transport)
        assert rid == 2 and isinstance(reply, InferReply)
        assert budget.used == 0

    def test_bytes_held_while_waiting_are_decoded_once_admitted(self) -> None:
        self.send(self.proto, 1, InferRequest("tiny", {"x": X}))
        # A request and a ping in one read: both wait for the request's bytes.
        self.other.dataReceived(
            encode_bytes(2, InferRequest("tiny", {"x": X})) + encode_bytes(3, Ping())
        )
        assert self.replies(self.other_transport) == []
        self.answer()
        assert self.replies(self.other_transport) == [(3, Pong())]
        assert 2 in self.other.inflight

    def test_a_client_that_leaves_gives_its_bytes_back(self) -> None:
        budget = self.dataplane.budget
        self.send(self.proto, 1, InferRequest("tiny", {"x": X}))
        self.send(self.other, 2, InferRequest("tiny", {"x": X}))
        assert budget.waiting == 1
        self.other.connectionLost()  # the waiting one
        assert budget.waiting == 0
        self.proto.connectionLost()  # the one holding bytes (its job is withdrawn)
        assert budget.used == 0

    def test_a_frame_larger_than_the_whole_budget_is_refused(self) -> None:
        self.dataplane.budget = BufferBudget(16, small=0)
        self.send(self.other, 2, InferRequest("tiny", {"x": X}))
        _, error = self.error(self.other_transport)
        assert error.code == ErrorCode.FRAME_TOO_LARGE and "max_buffered_bytes" in error.message
        assert self.other_transport.disconnecting
        assert self.refused() == {"max_buffered_bytes": 1}
        assert self.ping_answered(self.proto, self.transport)


class ConnectionLimitTests(LimitFixture):
    def test_connections_beyond_the_limit_get_overloaded_and_are_closed(self) -> None:
        self.factory.config = attrs.evolve(self.factory.config, max_connections=2)
        second, second_transport = self.connect()
        proto, transport = self.connect(handshake=False)
        rid, error = self.error(transport)
        assert (rid, error.code) == (0, ErrorCode.OVERLOADED)
        assert "max_connections" in error.message and transport.disconnecting
        assert proto.session is None and len(self.factory.connections) == 2
        assert self.refused() == {"max_connections": 1}
        proto.connectionLost()
        assert self.ping_answered(self.proto, self.transport)
        assert self.ping_answered(second, second_transport)
        second.connectionLost()
        self.connect()  # a freed place is taken again


class IdleTimeoutTests(LimitFixture):
    def setUp(self) -> None:
        super().setUp()
        self.factory.clock = self.clock
        self.factory.config = attrs.evolve(self.factory.config, idle_timeout=30)
        self.idle, self.idle_transport = self.connect()
        self.busy, self.busy_transport = self.connect()

    def test_an_idle_connection_is_closed_and_counted(self) -> None:
        self.clock.advance(29)
        assert self.ping_answered(self.busy, self.busy_transport)  # frames reset the clock
        self.clock.advance(1)
        assert self.idle_transport.disconnecting and not self.busy_transport.disconnecting
        assert self.refused() == {"idle_timeout": 1}
        self.clock.advance(28)  # 58 s: 29 since its last frame
        assert self.ping_answered(self.busy, self.busy_transport)

    def test_a_connection_waiting_for_a_reply_is_not_idle(self) -> None:
        self.send(self.idle, 1, InferRequest("tiny", {"x": X}))
        self.clock.advance(100)
        assert not self.idle_transport.disconnecting
        self.answer()
        self.clock.advance(30)
        assert self.idle_transport.disconnecting
        assert self.refused() == {"idle_timeout": 2}  # (the other one too)

    def test_zero_turns_the_timeout_off(self) -> None:
        self.factory.config = attrs.evolve(self.factory.config, idle_timeout=0)
        proto, transport = self.connect()
        self.clock.advance(10_000)
        assert not transport.disconnecting


class OptionTests(unittest.TestCase):
    def test_max_connections_option_overrides_the_configuration(self) -> None:
        options = tap.Options()
        options.parseOptions(["--max-connections", "5"])
        assert options.config.server.max_connections == 5
        defaults = tap.Options()
        defaults.parseOptions([])
        assert defaults.config.server.max_connections == 1024

    def test_max_connections_must_be_positive(self) -> None:
        with self.assertRaises(usage.UsageError):
            tap.Options().parseOptions(["--max-connections", "0"])


def test_the_budget_grants_waiters_in_order_as_bytes_are_released() -> None:
    budget = BufferBudget(100, small=10)
    granted: list[int] = []
    assert budget.try_reserve(80) and not budget.try_reserve(30)
    assert budget.try_reserve(10) and budget.used == 90  # small: never waits
    budget.wait(40, granted.append)
    budget.wait(20, granted.append)

    def gone(size: int) -> None:
        raise AssertionError("a forgotten waiter was granted")

    budget.wait(5, gone)
    budget.forget(gone)
    budget.release(40)
    assert granted == [40] and budget.used == 90  # the next 20 would pass 100
    budget.release(50)
    assert granted == [40, 20] and budget.used == 60 and budget.waiting == 0
    assert budget.fits(100) and not budget.fits(101)
