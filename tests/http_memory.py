"""Helpers for the HTTP front end's tests in memory: no sockets, no threads, no sleeps.

:class:`MemoryHTTPTestCase` builds a real :class:`~twinfer.frontends.http.site.TwinferSite`
over a real data plane and dispatcher whose one worker never takes a job by
itself (the tests take jobs from the queue and answer them by hand, as in
test_protocol), with a :class:`~twisted.internet.task.Clock` as the site's
reactor.  :class:`Connection` is one client connection: raw HTTP bytes go in
through a real ``Channel`` over a ``StringTransport``, and the bytes the
server wrote come out parsed by :func:`parse_responses`.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from test_protocol import HandOperatedWorker
from twinfer.config import ModelConfig
from twinfer.dataplane import DataPlane, Session
from twinfer.engines import builtin
from twinfer.engines.openvino import Signature
from twinfer.frontends.http.extensions import TritonExtensionsAPI
from twinfer.frontends.http.site import Router, TwinferSite
from twinfer.frontends.http.v2 import KServeAPI
from twinfer.ops.repository import ModelRepository
from twinfer.scheduling import Dispatcher, Job, JobQueue, ModelEntry


@attrs.frozen
class RawResponse:
    """One HTTP response as the server wrote it."""

    status: int
    reason: str
    #: Header names in lower case.
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_responses(raw: bytes, head: bool = False) -> list[RawResponse]:
    """Split ``raw`` into the responses it holds (every one has a
    ``Content-Length``; ``head``: responses to HEAD, which carry no body)."""
    responses = []
    while raw:
        header, separator, rest = raw.partition(b"\r\n\r\n")
        assert separator, f"an incomplete response: {raw!r}"
        status_line, *lines = header.decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head else int(headers["content-length"])
        responses.append(RawResponse(int(status), reason, headers, rest[:length]))
        raw = rest[length:]
    return responses


class Connection:
    """One client connection to the site, driven by hand."""

    def __init__(self, site: TwinferSite, port: int) -> None:
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        assert protocol is not None
        self.channel: Protocol = protocol
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        self.channel.makeConnection(self.transport)

    @property
    def session(self) -> Session:
        """The data-plane session of this connection."""
        session: Session | None = getattr(self.channel, "session", None)
        assert session is not None
        return session

    def send(self, data: bytes) -> None:
        """Bytes from the client."""
        self.channel.dataReceived(data)

    def responses(self, head: bool = False) -> list[RawResponse]:
        """The responses written since the last call."""
        raw = self.transport.value()
        self.transport.clear()
        return parse_responses(raw, head)

    def response(self, head: bool = False) -> RawResponse:
        """The one response written since the last call."""
        [response] = self.responses(head)
        return response

    @property
    def closed_by_server(self) -> bool:
        """Whether the server asked for the connection to be closed."""
        return bool(self.transport.disconnecting)

    def hang_up(self) -> None:
        """The client goes away (what the reactor tells the channel)."""
        self.channel.connectionLost(Failure(ConnectionLost("the client hung up")))

    def closed(self) -> None:
        """The connection the server closed is gone (what the reactor then tells it)."""
        assert self.closed_by_server
        self.channel.connectionLost(Failure(ConnectionDone()))


def request_bytes(
    method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> bytes:
    """A raw HTTP/1.1 request (``Content-Length`` for a body)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines + ["", ""]).encode() + (body or b"")


class MemoryHTTPTestCase(unittest.SynchronousTestCase):
    """A site with the KServe v2 routes and Triton's extensions over a
    worker-less ``tiny`` model queue."""

    max_body_size = 1024
    body_timeout = 5.0
    queue_size = 2

    def setUp(self) -> None:
        self.clock = Clock()
        self.queue = JobQueue("tiny", size=self.queue_size)
        entry = ModelEntry("tiny", Signature.of(builtin.tiny_model()), ("cpu",), (self.queue,))
        self.dispatcher = Dispatcher(
            {"tiny": entry},
            workers=[HandOperatedWorker(self.queue)],  # type: ignore[list-item]
            clock=self.clock,
        )
        self.dispatcher.start()
        self.plane = DataPlane(self.dispatcher, tasks=None)
        self.router = Router()
        #: Triton's extensions, without a controller (load/unload: 403).
        self.repository = ModelRepository(
            self.plane, models={"tiny": ModelConfig("tiny", "builtin:tiny")}, targets={"cpu": "CPU"}
        )
        TritonExtensionsAPI(self.repository).install(self.router)
        # Small documents only: the codec pool is never started nor used.
        KServeAPI(self.plane, self.clock, ThreadPool()).install(self.router)
        self.site = TwinferSite(
            self.router,
            self.plane,
            max_body_size=self.max_body_size,
            body_timeout=self.body_timeout,
            reactor=self.clock,
        )
        self._ports = iter(range(40000, 50000))

    def connect(self) -> Connection:
        """A new client connection."""
        return Connection(self.site, next(self._ports))

    def take_job(self) -> Job:
        job = self.queue.take()
        assert job is not None, "no job is queued"
        return job

    def counts(self) -> dict[tuple[str, str, str], int]:
        """Requests counted by the data plane, by (model, outcome, front end)."""
        return dict(self.plane.stats.requests)
