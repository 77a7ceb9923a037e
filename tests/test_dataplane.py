"""The data plane: admission, outcome mapping and counting for every front end.

The unit tests run in memory over a dispatcher whose one worker never takes a
job by itself (the tests answer jobs by hand, as in test_protocol); the last
tests run real front ends on loopback and read the real metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from io import BytesIO
from pathlib import Path

import numpy as np
from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody

from http_support import Gate, HTTPServerTestCase, gated
from ops_support import OpsServerTestCase
from support import config_from
from tasks_support import blank_png
from test_protocol import HandOperatedWorker
from test_tasks_server import CONFIG as IMAGE_CONFIG
from test_tasks_server import _write_models
from twinfer.client import connect
from twinfer.dataplane import DataPlane
from twinfer.engines import builtin
from twinfer.engines.openvino import Signature
from twinfer.errors import ErrorCode, TwinferError
from twinfer.ops.control import Controller
from twinfer.ops.metrics import make_registry
from twinfer.outcomes import OK, outcome
from twinfer.scheduling import Dispatcher, InferResult, JobQueue, ModelEntry

X = np.arange(8, dtype=np.float32).reshape(2, 4)


class OutcomeTableTests(unittest.SynchronousTestCase):
    def test_every_error_code_has_an_outcome_on_every_front_end(self) -> None:
        for code in ErrorCode:
            result = outcome(code)
            assert result.name == code.name
            assert 400 <= result.http_status < 600, code
            assert result.grpc_status.isupper() and result.grpc_status != "OK", code

    def test_ok_and_unknown_codes(self) -> None:
        assert outcome(None) is OK and outcome(0) is OK and OK.http_status == 200
        assert outcome(999).name == "INTERNAL" and outcome(999).http_status == 500

    def test_temporary_refusals_say_retry(self) -> None:
        retryable = {code for code in ErrorCode if outcome(code).retryable}
        assert retryable == {ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE}


class DataPlaneTests(unittest.SynchronousTestCase):
    """Admission and counting, in memory."""

    def setUp(self) -> None:
        self.queue = JobQueue("tiny", size=2)
        entry = ModelEntry("tiny", Signature.of(builtin.tiny_model()), ("cpu",), (self.queue,))
        self.dispatcher = Dispatcher(
            {"tiny": entry},
            workers=[HandOperatedWorker(self.queue)],  # type: ignore[list-item]
        )
        self.dispatcher.start()
        self.plane = DataPlane(self.dispatcher, tasks=None)
        self.session = self.plane.open_session("binary", max_inflight=3)

    def error_of(self, d: Deferred[object]) -> TwinferError:
        failure = self.failureResultOf(d, TwinferError)
        return failure.value  # type: ignore[return-value]

    def counts(self) -> dict[tuple[str, str, str], int]:
        return dict(self.plane.stats.requests)

    def test_an_answered_request_is_counted_once_with_its_front_end(self) -> None:
        d = self.plane.infer(self.session, 1, "tiny", {"x": X})
        assert self.plane.inflight() == 1 and 1 in self.session.inflight
        job = self.queue.take()
        assert job is not None
        job.deferred.callback(InferResult({"y": X[:, :3]}, 5, 7, 2))
        result = self.successResultOf(d)
        assert result.compute_us == 7
        assert self.counts() == {("tiny", "OK", "binary"): 1}
        assert self.plane.stats.model("tiny").batch.count == 1
        assert self.plane.inflight() == 0

    def test_refusals_are_counted_before_the_dispatcher(self) -> None:
        cases = [
            ("nope", {"x": X}, ErrorCode.UNKNOWN_MODEL),
            ("tiny", {"x": X.astype(np.float64)}, ErrorCode.INVALID_DTYPE),
            ("tiny", {"x": X[:, :3]}, ErrorCode.INVALID_SHAPE),
            ("tiny", {"z": X}, ErrorCode.INVALID_INPUT),
        ]
        for key, (model, inputs, code) in enumerate(cases):
            assert self.error_of(self.plane.infer(self.session, key, model, inputs)).code is code
        assert self.counts() == {
            ("", "UNKNOWN_MODEL", "binary"): 1,  # not a served model: no table of its own
            ("tiny", "INVALID_DTYPE", "binary"): 1,
            ("tiny", "INVALID_SHAPE", "binary"): 1,
            ("tiny", "INVALID_INPUT", "binary"): 1,
        }
        assert "nope" not in self.plane.stats.models
        assert self.session.requests == 4 and self.plane.inflight() == 0

    def test_a_full_queue_is_overloaded_and_the_session_limit_too(self) -> None:
        other = self.plane.open_session("http")
        self.plane.infer(other, "a", "tiny", {"x": X})
        self.plane.infer(other, "b", "tiny", {"x": X})
        full = self.plane.infer(self.session, 1, "tiny", {"x": X})
        assert self.error_of(full).code is ErrorCode.OVERLOADED
        self.queue.take()  # room in the queue again
        limited = self.plane.open_session("binary", max_inflight=1)
        self.plane.infer(limited, 1, "tiny", {"x": X})
        error = self.error_of(self.plane.infer(limited, 2, "tiny", {"x": X}))
        assert error.code is ErrorCode.OVERLOADED and "1 requests in flight" in error.message
        assert self.counts() == {("tiny", "OVERLOADED", "binary"): 2}

    def test_a_key_in_flight_is_a_duplicate(self) -> None:
        self.plane.infer(self.session, 7, "tiny", {"x": X})
        error = self.error_of(self.plane.infer(self.session, 7, "tiny", {"x": X}))
        assert error.code is ErrorCode.DUPLICATE_REQUEST_ID and "7" in error.message

    def test_draining_refuses_new_requests_and_answers_the_old(self) -> None:
        d = self.plane.infer(self.session, 1, "tiny", {"x": X})
        self.plane.begin_drain()
        refused = self.plane.infer(self.session, 2, "tiny", {"x": X})
        assert self.error_of(refused).code is ErrorCode.UNAVAILABLE
        job = self.queue.take()
        assert job is not None
        job.deferred.callback(InferResult({"y": X[:, :3]}, 0, 0))
        self.successResultOf(d)
        assert self.counts() == {
            ("tiny", "OK", "binary"): 1,
            ("tiny", "UNAVAILABLE", "binary"): 1,
        }

    def test_drain_listeners_hear_the_drain_once(self) -> None:
        heard: list[str] = []
        self.plane.on_drain(lambda: heard.append("binary"))
        self.plane.on_drain(lambda: heard.append("http"))
        self.plane.begin_drain()
        self.plane.begin_drain()
        assert heard == ["binary", "http"] and self.plane.draining

    def test_cancel_and_close_answer_cancelled_and_withdraw_the_jobs(self) -> None:
        first = self.plane.infer(self.session, 1, "tiny", {"x": X})
        second = self.plane.infer(self.session, 2, "tiny", {"x": X})
        assert self.session.cancel(1) and not self.session.cancel(99)
        error = self.error_of(first)
        assert error.code is ErrorCode.CANCELLED and "request 1" in error.message
        closed = self.session.when_closed()
        self.assertNoResult(closed)
        self.session.close()
        self.successResultOf(closed)
        assert self.error_of(second).code is ErrorCode.CANCELLED
        assert self.queue.depth == 0  # withdrawn: no device will run them
        assert list(self.plane.sessions()) == []
        assert self.counts() == {("tiny", "CANCELLED", "binary"): 2}

    def test_an_unexpected_exception_becomes_internal(self) -> None:
        d = self.plane.infer(self.session, 1, "tiny", {"x": X})
        job = self.queue.take()
        assert job is not None
        job.deferred.errback(ZeroDivisionError("a bug"))
        error = self.error_of(d)
        assert error.code is ErrorCode.INTERNAL and "a bug" in error.message
        assert len(self.flushLoggedErrors(ZeroDivisionError)) == 1
        assert self.counts() == {("tiny", "INTERNAL", "binary"): 1}

    def test_image_requests_without_image_tasks_are_wrong_task(self) -> None:
        error = self.error_of(self.plane.predict_image(self.session, 1, "tiny", b"\x89PNG"))
        assert error.code is ErrorCode.WRONG_TASK
        assert self.counts() == {("tiny", "WRONG_TASK", "binary"): 1}

    def test_front_ends_report_their_connections_and_requests_in_flight(self) -> None:
        http = self.plane.open_session("http")
        self.plane.infer(http, "r", "tiny", {"x": X})
        assert {name: len(f.sessions) for name, f in self.plane.frontends.items()} == {
            "binary": 1,
            "http": 1,
        }
        assert self.plane.frontends["http"].inflight == 1
        assert self.plane.frontends["binary"].inflight == 0
        self.plane.protocol_error("binary", ErrorCode.MALFORMED_FRAME)
        assert self.plane.frontends["binary"].protocol_errors == {"MALFORMED_FRAME": 1}


def sample(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus text page."""
    found = re.search(re.escape(name) + r" ([0-9.e+-]+)\n", text)
    assert found is not None, f"{name} not in\n{text}"
    return float(found.group(1))


class MixedFrontEndMetricsTests(HTTPServerTestCase):
    """Binary and HTTP clients on one server: every outcome shows with its front end."""

    async def test_metrics_after_a_mixed_run(self) -> None:
        await self.start_http()
        controller = Controller(config_from(self.config_text), self.dataplane, reactor)
        registry = make_registry(controller)
        client = await connect(reactor, f"tcp:127.0.0.1:{self.port}")
        self.close_clients_on_cleanup(client)
        await client.infer("tiny", {"x": X})
        with self.assertRaises(TwinferError):
            await client.infer("nope", {"x": X})

        # One keep-alive HTTP connection for both HTTP requests.
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        url = f"{self.url}/v2/models/tiny/infer".encode()
        for shape in ([2, 4], [2, 3]):
            tensor = {"name": "x", "datatype": "FP32", "shape": shape}
            tensor["data"] = [0.5] * (shape[0] * shape[1])
            body = FileBodyProducer(BytesIO(json.dumps({"inputs": [tensor]}).encode()))
            response = await agent.request(b"POST", url, None, body)
            await readBody(response)
            assert response.code == (200 if shape == [2, 4] else 400)

        page = generate_latest(registry).decode()
        for labels, expected in [
            ('code="OK",frontend="binary",model="tiny"', 1),
            ('code="UNKNOWN_MODEL",frontend="binary",model=""', 1),
            ('code="OK",frontend="http",model="tiny"', 1),
            ('code="INVALID_SHAPE",frontend="http",model="tiny"', 1),
        ]:
            assert sample(page, f"twinfer_requests_total{{{labels}}}") == expected, labels
        assert sample(page, 'twinfer_connections{frontend="http"}') == 1
        assert sample(page, 'twinfer_connections{frontend="binary"}') == 1
        assert sample(page, 'twinfer_inflight{frontend="http"}') == 0


class ImageReplyAfterUnloadTests(OpsServerTestCase):
    """A model unloaded while its image job runs: the client still gets its
    answer (the reply carries the task; nothing is looked up after the job)."""

    async def test_image_reply_survives_an_unload_mid_request(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="twinfer-dataplane-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        _write_models(directory)
        gate = Gate()
        self.addCleanup(gate.open)
        port = await self.start_ops_server(
            IMAGE_CONFIG, engine_factory=gated(gate), base_dir=directory
        )
        client = await connect(reactor, f"tcp:127.0.0.1:{port}")
        self.close_clients_on_cleanup(client)
        answer = client.detect("det", blank_png(300, 200))
        await deferToThread(gate.started.acquire)  # the job is on the device
        unloading = self.controller.unload("det")
        gate.open()
        predictions = await answer
        assert [(p.label, p.box) for p in predictions] == [("car", (30.0, 40.0, 150.0, 120.0))]
        assert "unloaded det" in await unloading
        with self.assertRaises(TwinferError) as raised:
            await client.detect("det", blank_png(300, 200))
        assert raised.exception.code is ErrorCode.UNKNOWN_MODEL
