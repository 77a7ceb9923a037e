"""The clients of the chaos soak (``chaos.py``): well-behaved load and vandals, and the ledger.

Every inference request a client sends completely is opened in the
:class:`Ledger` and closed exactly once: answered (``OK`` or an error code)
or withdrawn by its own client (``cancelled``, or ``client_left`` when the
client vanished with it in flight).  What is still open at the end is
unanswered.

Clients that vanish half-close their socket (``FIN``) and keep reading until
the server closes: a full close with unread replies would make the kernel
send ``RST``, which may discard requests the server has not read yet, and
the accounting would then count TCP's loss as the server's.  Vandals that
send no complete request may reset (``RST``) the connection instead.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
from twisted.internet import defer, task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from twinfer.client import ConnectionDropped, connect
from twinfer.errors import TwinferError
from twinfer.wire.encode import encode_bytes
from twinfer.wire.frames import HEADER
from twinfer.wire.messages import Hello, InferRequest, MessageType


class Ledger:
    """Every complete request sent, and how it ended."""

    def __init__(self) -> None:
        #: Complete requests sent, by front end.
        self.sent: Counter[str] = Counter()
        #: Answers received, by front end and code (binary: the ErrorCode name;
        #: HTTP: the status).
        self.answered: defaultdict[str, Counter[str]] = defaultdict(Counter)
        #: Requests withdrawn by their own client, by front end and reason.
        self.withdrawn: defaultdict[str, Counter[str]] = defaultdict(Counter)
        #: Open requests: token -> front end.
        self.pending: dict[int, str] = {}
        #: Chaos actions done, and anomalies seen by the clients.
        self.events: Counter[str] = Counter()
        self._next = 0

    def open(self, frontend: str) -> int:
        self._next += 1
        self.pending[self._next] = frontend
        self.sent[frontend] += 1
        return self._next

    def _close(self, token: int) -> str:
        frontend = self.pending.pop(token, None)
        if frontend is None:
            self.events["ANOMALY: a request ended twice"] += 1
            return "?"
        return frontend

    def answer(self, token: int, code: str) -> None:
        self.answered[self._close(token)][code] += 1

    def withdraw(self, token: int, reason: str) -> None:
        self.withdrawn[self._close(token)][reason] += 1


class Inputs:
    """Request payloads per model: numpy arrays and KServe bodies."""

    def __init__(self, specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
        rng = np.random.default_rng(0)
        self.arrays = {
            model: {name: rng.random(shape, dtype=np.float32)}
            for model, (name, shape) in specs.items()
        }
        self.http: dict[str, tuple[bytes, dict[str, str]]] = {}
        for model, (name, shape) in specs.items():
            x = self.arrays[model][name]
            tensor = {"name": name, "shape": list(shape), "datatype": "FP32"}
            if x.size <= 64:
                body = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
                self.http[model] = (body, {"Content-Type": "application/json"})
            else:  # the binary tensor extension
                header = json.dumps(
                    {
                        "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                        "parameters": {"binary_data_output": True},
                    }
                ).encode()
                self.http[model] = (
                    header + x.tobytes(),
                    {"Inference-Header-Content-Length": str(len(header))},
                )


class Mix:
    """What the load clients do, at random."""

    def __init__(self, rng: random.Random, light: str, heavy: str) -> None:
        self.rng = rng
        self.light = light
        self.heavy = heavy

    def model(self) -> str:
        """The heavy model for 20 % of the requests, the light one for the others."""
        return self.heavy if self.rng.random() < 0.2 else self.light

    def deadline_ms(self) -> int:
        """A deadline most requests cannot meet, for 5 % of them."""
        return 1 if self.rng.random() < 0.05 else 0

    def cancels(self) -> bool:
        return self.rng.random() < 0.03


class BinaryUser:
    """One binary connection at a time with ``pipeline`` requests in flight;
    vanishes now and then (half-close with requests in flight) and reconnects."""

    def __init__(
        self, reactor: Any, port: int, ledger: Ledger, inputs: Inputs, mix: Mix, pipeline: int
    ) -> None:
        self.reactor = reactor
        self.endpoint = f"tcp:127.0.0.1:{port}"
        self.ledger = ledger
        self.inputs = inputs
        self.mix = mix
        self.pipeline = pipeline
        self.stopping = False
        self.mean_life = 8.0  # seconds between vanishings

    async def run(self) -> None:
        while not self.stopping:
            try:
                client = await connect(self.reactor, self.endpoint)
            except Exception as e:
                self.ledger.events[f"ANOMALY: binary connect failed: {type(e).__name__}"] += 1
                await task.deferLater(self.reactor, 0.2)
                continue
            state = {"vanishing": False}
            protocol: Any = client.protocol
            life = self.mix.rng.expovariate(1 / self.mean_life)

            def vanish(state: dict[str, bool] = state, protocol: Any = protocol) -> None:
                if not self.stopping and protocol.usable:
                    state["vanishing"] = True
                    self.ledger.events["binary client vanished with requests in flight"] += 1
                    protocol.transport.loseWriteConnection()

            timer = self.reactor.callLater(life, vanish)
            await defer.gatherResults(
                [defer.ensureDeferred(self._loop(client, state)) for _ in range(self.pipeline)]
            )
            if timer.active():
                timer.cancel()
            if state["vanishing"]:
                await protocol.when_closed()
            else:
                await client.close()

    async def _loop(self, client: Any, state: dict[str, bool]) -> None:
        protocol = client.protocol
        while not self.stopping and not state["vanishing"] and protocol.usable:
            model = self.mix.model()
            deadline = self.mix.deadline_ms() if model == self.mix.heavy else 0
            token = self.ledger.open("binary")
            d = client.infer(model, self.inputs.arrays[model], timeout_ms=deadline)
            if self.mix.cancels():
                self.ledger.events["binary cancel"] += 1
                self.reactor.callLater(self.mix.rng.uniform(0, 0.01), d.cancel)
            try:
                await d
                self.ledger.answer(token, "OK")
            except CancelledError:
                self.ledger.withdraw(token, "cancelled")
            except ConnectionDropped:
                if state["vanishing"]:
                    self.ledger.withdraw(token, "client_left")
                else:
                    self.ledger.answer(token, "CONNECTION_LOST")
                    self.ledger.events["ANOMALY: the server dropped a binary connection"] += 1
            except TwinferError as e:
                self.ledger.answer(token, getattr(e.code, "name", str(e.code)))


class HTTPResponseReader(Protocol):
    """A minimal HTTP/1.1 keep-alive client: one request at a time, bodies by Content-Length."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: Deferred[tuple[int, bytes]] | None = None
        self.closed: Deferred[None] = Deferred()
        self.transport: Any = None

    def request(
        self, path: str, body: bytes, headers: Mapping[str, str]
    ) -> Deferred[tuple[int, bytes]]:
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.waiting = Deferred()
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return self.waiting

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                length = int(value.strip())
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        status = int(head[0].split()[1])
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.callback((status, body))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.errback(reason)
        self.closed.callback(None)


class HTTPUser:
    """KServe v2 requests (JSON for the small model, the binary extension for the
    heavy one) on keep-alive connections; cancels by hanging up mid-request."""

    def __init__(self, reactor: Any, port: int, ledger: Ledger, inputs: Inputs, mix: Mix) -> None:
        self.reactor = reactor
        self.port = port
        self.ledger = ledger
        self.inputs = inputs
        self.mix = mix
        self.stopping = False

    async def run(self) -> None:
        while not self.stopping:
            endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port)
            try:
                conn: HTTPResponseReader = await connectProtocol(endpoint, HTTPResponseReader())
            except Exception as e:
                self.ledger.events[f"ANOMALY: http connect failed: {type(e).__name__}"] += 1
                await task.deferLater(self.reactor, 0.2)
                continue
            left = await self._requests(conn)
            if not left:
                conn.transport.loseConnection()
            await conn.closed

    async def _requests(self, conn: HTTPResponseReader) -> bool:
        """Send requests until stopping or hanging up; returns whether it hung up."""
        while not self.stopping:
            model = self.mix.model()
            body, headers = self.inputs.http[model]
            rng = self.mix.rng
            garbage = rng.random() < 0.02
            if garbage:  # a valid HTTP request whose body is not a KServe document
                body, headers = bytes(rng.randbytes(64)), {"Content-Type": "application/json"}
                self.ledger.events["http garbage body"] += 1
            elif model == self.mix.heavy and self.mix.deadline_ms():
                document = json.loads(body[: int(headers["Inference-Header-Content-Length"])])
                document["parameters"]["timeout"] = 1000  # microseconds
                header = json.dumps(document).encode()
                body = header + body[int(headers["Inference-Header-Content-Length"]) :]
                headers = {"Inference-Header-Content-Length": str(len(header))}
            hang_up = self.mix.cancels()
            token = self.ledger.open("http")
            d = conn.request(f"/v2/models/{model}/infer", body, headers)
            if hang_up:
                self.ledger.events["http client hung up with a request in flight"] += 1
                self.reactor.callLater(
                    rng.uniform(0, 0.01), lambda: conn.transport.loseWriteConnection()
                )
            try:
                status, _ = await d
                self.ledger.answer(token, str(status))
            except Exception:
                if hang_up:
                    self.ledger.withdraw(token, "client_left")
                else:
                    self.ledger.answer(token, "CONNECTION_LOST")
                    self.ledger.events["ANOMALY: the server dropped an HTTP connection"] += 1
                return True
            if hang_up:
                return True
        return False


class RawConnection(Protocol):
    """Writes what it is told and collects what the server sends until it closes."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()
        self.transport: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.closed.callback(None)


class Vandals:
    """One-shot misbehaving connections: half frames, garbage bytes, half bodies."""

    def __init__(
        self, reactor: Any, ports: Mapping[str, int], ledger: Ledger, inputs: Inputs, mix: Mix
    ) -> None:
        self.reactor = reactor
        self.ports = ports
        self.ledger = ledger
        self.inputs = inputs
        self.mix = mix
        self.running: set[Deferred[None]] = set()

    def launch(self) -> None:
        kind = self.mix.rng.choice(
            [self.binary_half_frame, self.binary_garbage, self.http_half_body, self.http_garbage]
        )
        d = defer.ensureDeferred(kind())
        self.running.add(d)
        d.addErrback(self._failed)
        d.addBoth(lambda _: self.running.discard(d))

    def _failed(self, failure: Failure) -> None:
        self.ledger.events[f"ANOMALY: vandal failed: {failure.getErrorMessage()}"] += 1

    async def _open(self, port: str) -> RawConnection:
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.ports[port])
        return await connectProtocol(endpoint, RawConnection())

    async def _until_closed(self, conn: RawConnection, what: str) -> None:
        """Wait for the server to close; a server that does not within 30 s is an anomaly."""
        timer = self.reactor.callLater(30, conn.transport.abortConnection)
        await conn.closed
        if timer.active():
            timer.cancel()
        else:
            self.ledger.events[f"ANOMALY: server kept a {what} connection open"] += 1

    async def binary_half_frame(self) -> None:
        """HELLO, 0-3 complete requests, then half a request, then gone."""
        rng = self.mix.rng
        conn = await self._open("binary")
        model = self.mix.model()
        full = rng.randrange(4)
        frames = [encode_bytes(0, Hello(agent="chaos-vandal"))]
        frames += [
            encode_bytes(i + 1, InferRequest(model, self.inputs.arrays[model])) for i in range(full)
        ]
        last = encode_bytes(full + 1, InferRequest(model, self.inputs.arrays[model]))
        cut = rng.randrange(1, len(last))
        conn.transport.write(b"".join(frames) + last[:cut])
        for _ in range(full):
            self.ledger.withdraw(self.ledger.open("binary"), "client_left")
        if full == 0 and rng.random() < 0.5:
            self.ledger.events["binary vandal: half a frame, then RST"] += 1
            await task.deferLater(self.reactor, 0.01)
            conn.transport.abortConnection()
            await conn.closed
            return
        self.ledger.events[f"binary vandal: {full} requests + half a frame, then FIN"] += 1
        conn.transport.loseWriteConnection()
        await self._until_closed(conn, "half-frame")

    async def binary_garbage(self) -> None:
        """Garbage instead of a HELLO, or a well-framed request with a garbage body."""
        rng = self.mix.rng
        conn = await self._open("binary")
        if rng.random() < 0.5:
            data = b"XX" + rng.randbytes(rng.randrange(14, 200))
            self.ledger.events["binary garbage: bytes instead of HELLO"] += 1
        else:
            # A model name longer than the body: malformed whatever follows.
            body = b"\xff\xff" + rng.randbytes(rng.randrange(8, 200))
            data = (
                encode_bytes(0, Hello(agent="chaos-vandal"))
                + HEADER.pack(b"TW", MessageType.INFER_REQUEST, 0, len(body), 1)
                + body
            )
            self.ledger.events["binary garbage: request frame with a garbage body"] += 1
        self.ledger.events["binary garbage connections"] += 1
        conn.transport.write(data)
        await self._until_closed(conn, "garbage binary")
        if b"TW" + bytes([MessageType.ERROR]) not in conn.received:
            self.ledger.events["ANOMALY: binary garbage closed without an ERROR frame"] += 1

    async def http_half_body(self) -> None:
        """Headers announcing a body, half of it, then gone."""
        conn = await self._open("http")
        body, headers = self.inputs.http[self.mix.model()]
        lines = ["POST /v2/models/tiny/infer HTTP/1.1", "Host: x", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body[: len(body) // 2]
        conn.transport.write(data)
        self.ledger.events["http vandal: half a body, then FIN"] += 1
        conn.transport.loseWriteConnection()
        await self._until_closed(conn, "half-body HTTP")

    async def http_garbage(self) -> None:
        """Bytes that are not HTTP: twisted.web answers 400 and closes."""
        conn = await self._open("http")
        conn.transport.write(self.mix.rng.randbytes(100).replace(b"\n", b"") + b"\r\n\r\n")
        self.ledger.events["http garbage connections"] += 1
        await self._until_closed(conn, "garbage HTTP")
        if not conn.received.startswith(b"HTTP/1.1 400"):
            self.ledger.events["ANOMALY: HTTP garbage not answered 400"] += 1
