"""Helpers for the HTTP front end's tests: an in-process server and raw clients.

Everything is real: the models run on OpenVINO's CPU device, the HTTP front
end listens on 127.0.0.1, and requests travel over loopback sockets.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet import endpoints, reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from support import ServerTestCase, config_from
from twinfer.engines.openvino import Engine
from twinfer.frontends.http import HTTPFrontEnd
from twinfer.ops.control import Controller
from twinfer.registry import EngineFactory, LoadedModel, openvino_engine
from twistd_process import TWISTD_TINY_CONFIG, with_server_table

TINY_HTTP_CONFIG = with_server_table(TWISTD_TINY_CONFIG, http_max_body_size=65536)


#: Two image models (see :func:`write_image_models`) and ``tiny``.
IMAGE_CONFIG = """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 1
properties = { INFERENCE_PRECISION_HINT = "f32" }

[[models]]
name = "tiny"
path = "builtin:tiny"

[[models]]
name = "det"
path = "det.xml"
task = "detect"
labels = "coco.txt"
[models.detect]
decoder = "ssd"

[[models]]
name = "colours"
path = "colours.xml"
task = "classify"
labels = "colours.txt"
[models.preprocess]
scale = 255.0
[models.classify]
top_k = 3
"""

#: What ``det`` always finds: "car" (id 2) at [0.1, 0.2, 0.5, 0.6] of the image, 0.95.
SSD_ROWS = np.array([[0, 2, 0.95, 0.1, 0.2, 0.5, 0.6], [-1, 0, 0, 0, 0, 0, 0]], np.float32)[
    None, None
]


def write_image_models(directory: Path) -> Path:
    """Write IMAGE_CONFIG's models: an SSD-style detector with a known output
    (the graph still runs from the image) and a real classifier (the mean of
    each colour channel)."""
    import openvino as ov
    import openvino.opset13 as ops

    from tasks_support import constant_outputs_model

    model = constant_outputs_model([1, 3, 32, 32], {"detection_out": SSD_ROWS})
    ov.save_model(model, str(directory / "det.xml"), compress_to_fp16=False)
    image = ops.parameter([1, 3, 16, 16], ov.Type.f32, name="image")
    mean = ops.reduce_mean(image, ops.constant(np.array([2, 3])), keep_dims=False)
    mean.output(0).get_tensor().set_names({"scores"})
    ov.save_model(ov.Model([mean.output(0)], [image], "colours"), str(directory / "colours.xml"))
    (directory / "coco.txt").write_text("background\nperson\ncar\n")
    (directory / "colours.txt").write_text("red\ngreen\nblue\n")
    return directory


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
        base_dir: Path = Path("."),
        admin: bool = False,
        shared_regions: Any = None,
    ) -> int:
        """Start everything; return the HTTP port (``self.http_port`` too).

        ``tasks``: None for no image tasks (``POST /inference`` answers 501),
        True for the real :mod:`twinfer.tasks`, or a stand-in module.
        ``admin``: a controller serves Triton's load/unload, as with
        ``--allow-admin`` (``self.controller``).
        ``shared_regions``: the server-wide shared-memory regions (None: off).
        """
        text = config_text or self.config_text
        await self.start_server(text, engine_factory, base_dir=base_dir, tasks=tasks)
        self.controller = Controller(self.config, self.dataplane, reactor) if admin else None
        self.front = HTTPFrontEnd(
            self.dataplane,
            config_from(text, base_dir),
            reactor,
            controller=self.controller,
            allow_admin=admin,
            shared_regions=shared_regions,
        )
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
