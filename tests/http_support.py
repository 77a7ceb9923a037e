"""Helpers for the HTTP front end's tests: an in-process server and raw clients.

Everything is real: the models run on OpenVINO's CPU device, the HTTP front
end listens on 127.0.0.1, and requests travel over loopback sockets.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from io import BytesIO
from typing import Any

import numpy as np
from twisted.internet import endpoints, reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from support import ServerTestCase, config_from
from twinfer.backend import Engine
from twinfer.http import HTTPFrontEnd
from twinfer.registry import EngineFactory, LoadedModel, openvino_engine

TINY_HTTP_CONFIG = """
[server]
http_max_body_size = 65536

[[devices]]
name = "cpu"
target = "CPU"
replicas = 2
properties = { INFERENCE_PRECISION_HINT = "f32" }

[[models]]
name = "tiny"
path = "builtin:tiny"
"""


class HTTPResult:
    """A response as the tests look at it."""

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class HTTPServerTestCase(ServerTestCase):
    """Runs the dispatcher, the binary port and the HTTP front end in-process."""

    config_text = TINY_HTTP_CONFIG

    async def start_http(
        self,
        config_text: str | None = None,
        engine_factory: EngineFactory = openvino_engine,
        tasks: Any = None,
    ) -> int:
        """Start everything; return the HTTP port (``self.http_port`` too)."""
        text = config_text or self.config_text
        await self.start_server(text, engine_factory)
        self.front = HTTPFrontEnd(self.dispatcher, config_from(text), reactor, tasks=tasks)
        self.front.startService()
        self.addCleanup(self.front.stopService)
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await endpoint.listen(self.front.site)
        self.addCleanup(port.stopListening)
        self.http_port: int = port.getHost().port
        self.url = f"http://127.0.0.1:{self.http_port}"
        return self.http_port

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> HTTPResult:
        """One request with a real HTTP client (twisted.web's Agent)."""
        agent = Agent(reactor)
        raw_headers = Headers({k: [v] for k, v in (headers or {}).items()})
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        response = await agent.request(
            method.encode(), f"{self.url}{path}".encode(), raw_headers, producer
        )
        data = await readBody(response)
        return HTTPResult(response.code, response.headers, data)

    async def connect_raw(self) -> RawClient:
        """A plain TCP connection to the HTTP port."""
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.http_port)
        client = RawClient()
        await endpoints.connectProtocol(endpoint, client)
        self.addCleanup(client.transport.loseConnection)
        return client

    async def raw(self, data: bytes) -> bytes:
        """Send ``data`` on a fresh connection; return everything the server
        sent until it closed the connection."""
        client = await self.connect_raw()
        client.transport.write(data)
        return await client.done


class RawClient(Protocol):
    """Collects what the server sends; :attr:`done` fires with it on disconnect."""

    def __init__(self) -> None:
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(self.received)


class Gate:
    """Holds every device run until :meth:`open` (for overload and deadline tests)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.started = threading.Semaphore(0)

    def open(self) -> None:
        self.event.set()


class GatedEngine:
    """Test double around the REAL engine: a device that stays busy until the
    test opens its gate, so queues fill up deterministically (a slow device
    cannot be made on demand otherwise)."""

    def __init__(self, inner: Engine, gate: Gate) -> None:
        self._inner = inner
        self._gate = gate

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        self._gate.started.release()
        self._gate.event.wait(30)
        return self._inner.run(inputs, outputs)


def gated(gate: Gate) -> EngineFactory:
    """An engine factory whose engines wait for ``gate``."""

    def factory(model: LoadedModel, device: str, replica: int) -> Engine:
        return GatedEngine(openvino_engine(model, device, replica), gate)

    return factory
