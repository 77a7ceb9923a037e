"""Helpers for the operations tests: a console client and an in-process ops server."""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints, reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

from support import ServerTestCase
from twinfer.frontends.console import PROMPT, ConsoleFactory, make_portal
from twinfer.ops.control import Controller

_ENDINGS = (PROMPT, b"Username: ", b"Password: ")


class ConsoleClient(Protocol):
    """Talks to the debug console like a person at ``telnet``: one line, one answer.

    :meth:`send` fires with the text received up to the next prompt
    (``twinfer> ``, ``Username: `` or ``Password: ``), or up to the close.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: Deferred[str] | None = None
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._check()

    def _check(self) -> None:
        if self.waiting is not None and self.buffer.endswith(_ENDINGS):
            text, self.buffer = self.buffer.decode(), b""
            d, self.waiting = self.waiting, None
            d.callback(text)

    def connectionLost(self, reason: Any = None) -> None:
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            d.callback(self.buffer.decode())
        self.closed.callback(None)

    def read(self) -> Deferred[str]:
        """Fires with the text up to the next prompt."""
        self.waiting = Deferred()
        d = self.waiting
        self._check()
        return d

    def send(self, line: str | bytes) -> Deferred[str]:
        """Send one line (telnet-style CRLF); fires with the reply up to the next prompt."""
        raw = line if isinstance(line, bytes) else line.encode()
        self.transport.write(raw + b"\r\n")
        return self.read()


class OpsServerTestCase(ServerTestCase):
    """A real in-process server plus its controller (and optionally a console)."""

    async def start_ops_server(self, config_text: str | None = None, **kwargs: Any) -> int:
        port = await self.start_server(config_text, **kwargs)
        self.controller = Controller(self.config, self.dataplane, reactor)
        self.stats = self.dataplane.stats
        self.factory.controller = self.controller
        return port

    async def start_console(self, credentials: str | None = None) -> int:
        portal = make_portal(credentials) if credentials else None
        self.console_factory = ConsoleFactory(self.controller, portal)
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await endpoint.listen(self.console_factory)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def console(self, port: int) -> ConsoleClient:
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client: ConsoleClient = await endpoint.connect(Factory.forProtocol(ConsoleClient))

        async def close() -> None:
            if client.transport.connected:
                client.transport.loseConnection()
                await client.closed

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        return client
