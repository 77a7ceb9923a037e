"""The issue's memory attack in small, over loopback: clients that announce
large frames cost the server at most its buffer budget, and another client
is still served.

Six connections each complete the handshake, then send the header of a 4 MiB
request and 1 MiB of its body; the budget is 8 MiB, so at most two bodies are
allocated and the other connections are not read.  (The same over HTTP, and
each pause and release, are in test_http_limits and test_limits, in memory.)
"""

from __future__ import annotations

import numpy as np
from twisted.internet import endpoints, reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from support import ServerTestCase
from twinfer.budget import BufferBudget
from twinfer.client import connect
from twinfer.engines import builtin
from twinfer.wire.encode import encode_bytes
from twinfer.wire.frames import HEADER, MAGIC
from twinfer.wire.messages import Hello, MessageType

MiB = 1 << 20
BUDGET = 8 * MiB
ATTACKERS = 6
FRAME = 4 * MiB


class Attacker(Protocol):
    """Says HELLO, then announces a large request and sends only part of it."""

    def __init__(self) -> None:
        self.answered: Deferred[None] = Deferred()
        self.gone: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(encode_bytes(0, Hello(agent="attacker")))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.answered.called:
            self.answered.callback(None)

    def announce(self) -> None:
        header = HEADER.pack(MAGIC, MessageType.INFER_REQUEST, 0, FRAME, 1)
        self.transport.write(header + bytes(MiB))  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.gone.callback(None)


class BufferBudgetLoopbackTests(ServerTestCase):
    async def test_large_frames_from_many_clients_stay_within_the_budget(self) -> None:
        port = await self.start_server()
        budget = self.dataplane.budget = BufferBudget(BUDGET)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        attackers = [
            await endpoints.connectProtocol(endpoint, Attacker()) for _ in range(ATTACKERS)
        ]
        await gatherResults([a.answered for a in attackers])
        for attacker in attackers:
            attacker.announce()

        client = await connect(reactor, f"tcp:127.0.0.1:{port}")
        self.addCleanup(client.close)
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        out = await client.infer("tiny", {"x": x})
        np.testing.assert_allclose(out["y"], builtin.tiny_reference(x)["y"], atol=1e-5)

        # At most two 4 MiB bodies fit in 8 MiB: the others wait, unread.
        assert budget.used <= BUDGET
        assert budget.waiting == ATTACKERS - BUDGET // FRAME
        refused = self.dataplane.frontend("binary").refused
        assert refused["max_buffered_bytes"] == ATTACKERS - BUDGET // FRAME

        # Every byte goes back once the server has seen them all go.
        closed = [p.session.when_closed() for p in self.factory.connections if p.session]
        for attacker in attackers:
            attacker.transport.loseConnection()  # type: ignore[union-attr]
        await client.close()
        await gatherResults([a.gone for a in attackers] + closed)
        assert (budget.used, budget.waiting) == (0, 0)
