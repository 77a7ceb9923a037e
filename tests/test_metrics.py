"""The Prometheus collector and the health resources, in memory.

A Controller over a data plane whose one device worker is real but runs its
thread by hand (a :class:`HandRunner` with the real ``tiny`` engine) under a
Clock; the binary and HTTP front ends are real protocols over
StringTransports.  The page is what ``prometheus_client`` would serve
(``generate_latest``), parsed back into samples.  The same metrics over
loopback sockets are in test_dataplane.py.
"""

from __future__ import annotations

import json

import attrs
import numpy as np
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from http_memory import Connection, request_bytes
from scheduling_support import HandRunner, tiny_engine, tiny_signature
from support import config_from
from twinfer.config import ServerConfig
from twinfer.dataplane import DataPlane
from twinfer.errors import TwinferError
from twinfer.frontends.binary import TwinferFactory, TwinferProtocol
from twinfer.frontends.http.site import Router, TwinferSite
from twinfer.frontends.http.v2 import KServeAPI
from twinfer.ops.control import Controller
from twinfer.ops.metrics import HealthResource, make_registry
from twinfer.scheduling import Dispatcher, JobQueue, ModelEntry, Worker
from twinfer.wire.encode import encode_bytes
from twinfer.wire.messages import Hello

CONFIG = """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 1

[[models]]
name = "tiny"
path = "builtin:tiny"
queue_size = 4
"""

X = np.arange(8, dtype=np.float32).reshape(2, 4)

Labels = frozenset[tuple[str, str]]


def infer_request(x: np.ndarray, model: str = "tiny") -> bytes:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    body = json.dumps({"inputs": [tensor]}).encode()
    return request_bytes("POST", f"/v2/models/{model}/infer", body)


class MetricsTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = HandRunner()
        self.queue = JobQueue("tiny", size=4)
        self.worker = Worker(
            "cpu#0", "cpu", {"tiny": tiny_engine()}, [self.queue],
            clock=self.clock, runner=self.runner,
        )  # fmt: skip
        entry = ModelEntry("tiny", tiny_signature(), ("cpu",), (self.queue,))
        self.dispatcher = Dispatcher({"tiny": entry}, [self.worker], clock=self.clock)
        self.dispatcher.start()
        self.addCleanup(self.dispatcher.stop)
        self.plane = DataPlane(self.dispatcher, tasks=None)
        self.controller = Controller(config_from(CONFIG), self.plane, self.clock)
        self.registry = make_registry(self.controller)
        router = Router()
        KServeAPI(self.plane, self.clock, ThreadPool()).install(router)
        self.site = TwinferSite(router, self.plane, 65536, 5.0, reactor=self.clock)
        self.binary = TwinferFactory(
            self.plane, ServerConfig(max_frame_size=4096, max_inflight_per_connection=5)
        )
        self._ports = iter(range(40000, 50000))

    # -- the page --------------------------------------------------------------

    def samples(self) -> dict[tuple[str, Labels], float]:
        """Every sample of the page Prometheus would scrape."""
        page = generate_latest(self.registry).decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(page)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value (None if the page does not have it)."""
        return self.samples().get((name, frozenset(labels.items())))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """The samples of ``name``, by the value of one of their labels."""
        return {
            dict(labels)[label]: value
            for (sample, labels), value in self.samples().items()
            if sample == name
        }

    # -- clients ---------------------------------------------------------------

    def http(self) -> Connection:
        return Connection(self.site, next(self._ports))

    def binary_client(self) -> tuple[TwinferProtocol, StringTransport]:
        proto = self.binary.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        assert isinstance(proto, TwinferProtocol)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", next(self._ports)))
        proto.makeConnection(transport)
        proto.dataReceived(encode_bytes(0, Hello(agent="test")))
        transport.clear()
        return proto, transport

    def run_device(self) -> None:
        """Run everything the worker handed to its thread."""
        while self.runner.handed:
            self.runner.run_next()

    # -- tests -----------------------------------------------------------------

    def test_refusals_by_server_limits_are_counted_by_front_end_and_limit(self) -> None:
        assert self.by_label("twinfer_refused_total", "limit") == {}
        self.binary.config = attrs.evolve(self.binary.config, max_connections=1)
        self.site.max_connections = 1
        self.binary_client()
        _, refused = self.binary_client()
        assert refused.disconnecting
        self.http()
        assert self.http().closed_by_server
        assert self.value("twinfer_refused_total", frontend="binary", limit="max_connections") == 1
        assert self.value("twinfer_refused_total", frontend="http", limit="max_connections") == 1
        assert self.value("twinfer_buffered_bytes") == 0
        self.plane.budget.take(123)
        assert self.value("twinfer_buffered_bytes") == 123

    def test_requests_are_counted_by_model_code_and_front_end(self) -> None:
        proto, _ = self.binary_client()
        assert proto.session is not None
        answered = self.plane.infer(proto.session, 1, "tiny", {"x": X})
        self.run_device()
        self.successResultOf(answered)
        self.failureResultOf(self.plane.infer(proto.session, 2, "nope", {"x": X}), TwinferError)
        http = self.http()
        http.send(infer_request(X))
        self.run_device()
        http.send(infer_request(np.ones((2, 5), np.float32)))
        assert [r.status for r in http.responses()] == [200, 400]

        requests = {
            (labels["model"], labels["code"], labels["frontend"]): value
            for (name, frozen), value in self.samples().items()
            if name == "twinfer_requests_total"
            for labels in [dict(frozen)]
        }
        assert requests == {
            ("tiny", "OK", "binary"): 1,
            ("", "UNKNOWN_MODEL", "binary"): 1,
            ("tiny", "OK", "http"): 1,
            ("tiny", "INVALID_SHAPE", "http"): 1,
        }
        # Requests that ran are in the device histograms; the refusal is not.
        assert self.value("twinfer_compute_seconds_count", model="tiny") == 2
        assert self.value("twinfer_batch_size_count", model="tiny") == 2
        assert self.value("twinfer_request_seconds_count", model="tiny") == 3
        assert self.value("twinfer_device_jobs_total", device="cpu") == 2

    def test_connections_and_requests_in_flight_per_front_end(self) -> None:
        # Both front ends registered themselves: their gauges read 0, not nothing.
        assert self.by_label("twinfer_connections", "frontend") == {"http": 0, "binary": 0}
        proto, transport = self.binary_client()
        first, second = self.http(), self.http()
        assert self.by_label("twinfer_connections", "frontend") == {"http": 2, "binary": 1}
        assert self.by_label("twinfer_inflight", "frontend") == {"http": 0, "binary": 0}

        first.send(infer_request(X))
        assert proto.session is not None
        binary_request = self.plane.infer(proto.session, 1, "tiny", {"x": X})
        assert self.by_label("twinfer_inflight", "frontend") == {"http": 1, "binary": 1}

        first.hang_up()  # its job is dropped, its session closed
        assert self.by_label("twinfer_connections", "frontend") == {"http": 1, "binary": 1}
        assert self.by_label("twinfer_inflight", "frontend") == {"http": 0, "binary": 1}
        self.run_device()
        self.successResultOf(binary_request)
        proto.connectionLost()
        second.hang_up()
        assert self.by_label("twinfer_connections", "frontend") == {"http": 0, "binary": 0}
        assert self.by_label("twinfer_inflight", "frontend") == {"http": 0, "binary": 0}
        assert self.value("twinfer_requests_total", model="tiny", code="CANCELLED",
                          frontend="http") == 1  # fmt: skip

    def test_protocol_errors_are_counted_by_front_end_and_code(self) -> None:
        assert self.by_label("twinfer_protocol_errors_total", "code") == {}
        proto, transport = self.binary_client()
        proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")  # HTTP on the binary port
        assert transport.disconnecting
        assert (
            self.value("twinfer_protocol_errors_total", frontend="binary", code="MALFORMED_FRAME")
            == 1
        )
        assert self.by_label("twinfer_requests_total", "code") == {}  # not a request

    def test_queue_depth_counts_what_waits_behind_the_device(self) -> None:
        session = self.plane.open_session("binary")
        assert self.value("twinfer_queue_depth", model="tiny", queue="tiny") == 0
        requests = [self.plane.infer(session, i, "tiny", {"x": X}) for i in range(5)]
        # The idle worker took the first; the others wait until it is done.
        assert self.runner.handed == 1
        assert self.value("twinfer_queue_depth", model="tiny", queue="tiny") == 4
        self.runner.run_next()  # then two on its thread (running and next)
        assert self.runner.handed == 2
        assert self.value("twinfer_queue_depth", model="tiny", queue="tiny") == 2
        self.run_device()
        assert self.value("twinfer_queue_depth", model="tiny", queue="tiny") == 0
        for d in requests:
            self.successResultOf(d)

    def test_device_workers_by_state(self) -> None:
        def states() -> dict[str, float]:
            return self.by_label("twinfer_device_workers", "state")

        assert states() == {"serving": 1, "drained": 0}
        self.controller.drain("cpu")
        assert states() == {"serving": 0, "drained": 1}
        self.controller.undrain("cpu")
        assert states() == {"serving": 1, "drained": 0}
        self.worker.stop()  # a stopped worker is in neither state
        assert states() == {"serving": 0, "drained": 0}

    def test_ready_gauge_follows_the_health(self) -> None:
        assert self.value("twinfer_ready") == 1
        self.controller.begin_drain()
        assert self.value("twinfer_ready") == 0


class HealthResourceTests(unittest.SynchronousTestCase):
    """``/healthz`` and ``/readyz`` rendered with a DummyRequest."""

    def setUp(self) -> None:
        self.clock = Clock()
        queue = JobQueue("tiny", size=4)
        self.worker = Worker(
            "cpu#0", "cpu", {"tiny": tiny_engine()}, [queue], clock=self.clock, runner=HandRunner()
        )
        entry = ModelEntry("tiny", tiny_signature(), ("cpu",), (queue,))
        dispatcher = Dispatcher({"tiny": entry}, [self.worker], clock=self.clock)
        dispatcher.start()
        self.addCleanup(dispatcher.stop)
        self.controller = Controller(
            config_from(CONFIG), DataPlane(dispatcher, tasks=None), self.clock
        )

    def render(self, ready: bool) -> tuple[int, bytes, DummyRequest]:
        request = DummyRequest([b""])
        body = HealthResource(self.controller, ready=ready).render(request)
        assert isinstance(body, bytes)
        # DummyRequest leaves responseCode None unless the resource set one: 200.
        return request.responseCode or 200, body, request

    def test_live_and_ready(self) -> None:
        status, body, request = self.render(ready=False)
        assert (status, body) == (200, b"ok\n")
        assert request.responseHeaders.getRawHeaders(b"cache-control") == [b"no-store"]
        assert self.render(ready=True)[:2] == (200, b"ready\n")

    def test_draining_is_live_but_not_ready_and_says_why(self) -> None:
        self.controller.begin_drain()
        assert self.render(ready=False)[:2] == (200, b"ok\n")
        status, body, request = self.render(ready=True)
        assert (status, body) == (503, b"not ready: the server is shutting down\n")
        assert request.responseHeaders.getRawHeaders(b"content-type") == [
            b"text/plain; charset=utf-8"
        ]

    def test_a_model_without_a_healthy_device_is_not_ready(self) -> None:
        self.controller.drain("cpu")
        status, body, _ = self.render(ready=True)
        assert (status, body) == (503, b"not ready: model 'tiny' has no healthy device\n")
