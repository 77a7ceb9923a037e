"""The gRPC front end in memory: messages <-> tensors, outcomes -> status codes,
the adapter's data-plane calls, the reactor bridge and ``--grpc-port`` parsing.

The end-to-end tests (tritonclient.grpc against a real twistd) are in
test_grpc_tritonclient.py; the in-process server tests in test_grpc_server.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from test_protocol import HandOperatedWorker
from twinfer.dataplane import DataPlane
from twinfer.engines import builtin
from twinfer.engines.openvino import Signature
from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.grpc import codec
from twinfer.frontends.grpc import grpc_service_pb2 as pb
from twinfer.frontends.grpc.adapter import GRPCAdapter, ReactorBridge
from twinfer.frontends.grpc.service import GRPCEndpoint, parse_endpoint
from twinfer.frontends.grpc.servicer import status_of
from twinfer.frontends.http import kserve
from twinfer.outcomes import outcome
from twinfer.scheduling import Dispatcher, InferResult, JobQueue, ModelEntry

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def raw_request(x: np.ndarray = X, datatype: str = "FP32", **fields: Any) -> Any:
    request = pb.ModelInferRequest(model_name="tiny", **fields)
    request.inputs.add(name="x", datatype=datatype, shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


def code_of(call: Any, *args: Any) -> ErrorCode:
    with pytest.raises(TwinferError) as info:
        call(*args)
    return info.value.code


# -- codec ---------------------------------------------------------------------------


def test_raw_inputs_are_read_only_views_of_the_message_bytes() -> None:
    request = raw_request(id="a", parameters={"timeout": pb.InferParameter(int64_param=2500)})
    decoded = codec.decode_infer_request(request)
    x = decoded.inputs["x"]
    np.testing.assert_array_equal(x, X)
    assert not x.flags.writeable and x.base is not None  # no copy of its own
    assert (decoded.id, decoded.timeout_us, decoded.priority, decoded.output_names) == (
        "a",
        2500,
        0,
        (),
    )


def test_typed_contents_of_every_kind() -> None:
    cases = [
        ("FP32", "fp32_contents", [1.5, -2.0], np.float32),
        ("FP64", "fp64_contents", [1.5, -2.0], np.float64),
        ("INT8", "int_contents", [-128, 127], np.int8),
        ("INT32", "int_contents", [-(2**31), 2**31 - 1], np.int32),
        ("INT64", "int64_contents", [-(2**63), 2**63 - 1], np.int64),
        ("UINT8", "uint_contents", [0, 255], np.uint8),
        ("UINT64", "uint64_contents", [0, 2**64 - 1], np.uint64),
        ("BOOL", "bool_contents", [True, False], np.bool_),
    ]
    for datatype, field, values, dtype in cases:
        request = pb.ModelInferRequest(model_name="m")
        tensor = request.inputs.add(name="t", datatype=datatype, shape=[2])
        getattr(tensor.contents, field).extend(values)
        array = codec.decode_infer_request(request).inputs["t"]
        assert array.dtype == dtype and array.tolist() == values, datatype


def test_malformed_requests_are_refused_with_the_binary_protocols_codes() -> None:
    def typed(datatype: str, field: str, values: list[Any], shape: list[int]) -> Any:
        request = pb.ModelInferRequest(model_name="tiny")
        tensor = request.inputs.add(name="x", datatype=datatype, shape=shape)
        getattr(tensor.contents, field).extend(values)
        return request

    both = raw_request()
    both.inputs[0].contents.fp32_contents.append(1.0)
    extra_raw = raw_request()
    extra_raw.raw_input_contents.append(b"")
    twice = raw_request()
    twice.outputs.add(name="y")
    twice.outputs.add(name="y")
    classification = raw_request()
    classification.outputs.add(name="y").parameters["classification"].int64_param = 3
    negative = raw_request(parameters={"timeout": pb.InferParameter(int64_param=-1)})
    text = raw_request(parameters={"priority": pb.InferParameter(string_param="high")})
    cases = [
        (pb.ModelInferRequest(), ErrorCode.INVALID_INPUT),  # no model
        (pb.ModelInferRequest(model_name="tiny"), ErrorCode.INVALID_INPUT),  # no inputs
        (raw_request(datatype="FP8"), ErrorCode.INVALID_DTYPE),
        (raw_request(datatype="FP64"), ErrorCode.INVALID_SHAPE),  # 32 bytes are not 2x4 f64
        (both, ErrorCode.INVALID_INPUT),
        (extra_raw, ErrorCode.INVALID_INPUT),
        (twice, ErrorCode.INVALID_INPUT),
        (classification, ErrorCode.INVALID_INPUT),
        (negative, ErrorCode.INVALID_INPUT),
        (text, ErrorCode.INVALID_INPUT),
        (typed("FP32", "int_contents", [1, 2], [2]), ErrorCode.INVALID_DTYPE),
        (typed("FP32", "fp32_contents", [1.0], [2]), ErrorCode.INVALID_SHAPE),
        (typed("INT8", "int_contents", [1, 300], [2]), ErrorCode.INVALID_INPUT),  # no wrap
        (typed("FP16", "fp32_contents", [1.0], [1]), ErrorCode.INVALID_DTYPE),  # raw only
    ]
    for request, code in cases:
        assert code_of(codec.decode_infer_request, request) is code, request


def test_outputs_are_raw_in_the_order_asked_for() -> None:
    outputs = {"y": X[:, :3].copy(), "label": np.array([2, 0], np.int64)}
    request = raw_request(id="r")
    request.outputs.add(name="label")
    request.outputs.add(name="y")
    decoded = codec.decode_infer_request(request)
    response = codec.encode_infer_response("tiny", decoded, outputs)
    assert (response.model_name, response.model_version, response.id) == ("tiny", "1", "r")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("label", "INT64", [2]),
        ("y", "FP32", [2, 3]),
    ]
    assert response.raw_output_contents == [outputs["label"].tobytes(), outputs["y"].tobytes()]
    every = codec.encode_infer_response("tiny", codec.decode_infer_request(raw_request()), outputs)
    assert [o.name for o in every.outputs] == ["y", "label"] and every.id == ""


def test_metadata_messages_carry_the_http_documents() -> None:
    metadata = Signature.of(builtin.tiny_model()).metadata("tiny", ("cpu",))
    response = codec.model_metadata(metadata)
    document = kserve.model_metadata(metadata)
    assert [(t.name, t.datatype, list(t.shape)) for t in response.inputs] == [
        (t["name"], t["datatype"], t["shape"]) for t in document["inputs"]
    ]
    assert list(response.versions) == ["1"] and response.platform == "openvino"
    assert codec.server_metadata().name == "twinfer"


# -- outcomes ------------------------------------------------------------------------


def test_every_outcome_has_its_status_and_only_temporary_ones_say_retry() -> None:
    for code in ErrorCode:
        status, trailers = status_of(TwinferError(code, "x"))
        assert status is grpc.StatusCode[outcome(code).grpc_status]
        assert bool(trailers) is outcome(code).retryable
    assert status_of(TwinferError(ErrorCode.OVERLOADED, "full")) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        (("retry-after", "1"),),
    )
    assert status_of(TwinferError(ErrorCode.UNKNOWN_MODEL, "x"))[0] is grpc.StatusCode.NOT_FOUND
    assert status_of(TwinferError(ErrorCode.UNAVAILABLE, "x"))[0] is grpc.StatusCode.UNAVAILABLE
    deadline = status_of(TwinferError(ErrorCode.DEADLINE_EXCEEDED, "x"))[0]
    assert deadline is grpc.StatusCode.DEADLINE_EXCEEDED


# -- endpoints -----------------------------------------------------------------------


def test_grpc_endpoints_take_the_other_ports_syntax(tmp_path: Any) -> None:
    key, cert, ca = (tmp_path / name for name in ("key.pem", "cert.pem", "ca.pem"))
    for path in (key, cert, ca):
        path.write_text("")
    assert parse_endpoint("8001") == GRPCEndpoint(8001)
    assert parse_endpoint("tcp:8001").address == "0.0.0.0:8001"
    assert parse_endpoint("tcp:0:interface=127.0.0.1").address == "127.0.0.1:0"
    assert parse_endpoint("tcp:8001:interface=\\:\\:1").address == "[::1]:8001"
    tls = parse_endpoint(f"ssl:8443:privateKey={key}:certKey={cert}", client_ca=str(ca))
    assert (tls.private_key, tls.certificate, tls.client_ca) == (str(key), str(cert), str(ca))
    own_ca = parse_endpoint(f"ssl:8443:privateKey={key}:clientCA={key}", client_ca=str(ca))
    assert (own_ca.certificate, own_ca.client_ca) == (str(key), str(key))
    for bad in (
        "unix:/tmp/s",
        "tcp:http",
        "tcp:1:backlog=5",
        "ssl:8443",
        f"ssl:8443:privateKey={tmp_path / 'missing.pem'}",
    ):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


# -- the reactor bridge --------------------------------------------------------------


class ImmediateReactor:
    """``callFromThread`` that runs at once (the test has one thread)."""

    def callFromThread(self, function: Any, *args: Any) -> None:
        function(*args)


def test_the_bridge_delivers_results_failures_and_deferreds_to_the_loop() -> None:
    later: Deferred[str] = Deferred()

    def broken() -> None:
        raise TwinferError(ErrorCode.UNKNOWN_MODEL, "nope")

    async def main() -> list[Any]:
        bridge = ReactorBridge(ImmediateReactor(), asyncio.get_running_loop())
        plain = await bridge.call(lambda a, b: a + b, 2, 3)
        with pytest.raises(TwinferError):
            await bridge.call(broken)
        pending = bridge.call(lambda: later)
        abandoned = bridge.call(lambda: later)
        abandoned.cancel()  # cancelling only stops the waiting
        later.callback("fired")
        return [plain, await pending, abandoned.cancelled()]

    assert asyncio.run(main()) == [5, "fired", True]


# -- the adapter (reactor side), over a hand-operated dispatcher ------------------------


class AdapterTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.queue = JobQueue("tiny", size=4, levels=2)
        entry = ModelEntry("tiny", Signature.of(builtin.tiny_model()), ("cpu",), (self.queue,))
        self.clock = Clock()
        self.dispatcher = Dispatcher(
            {"tiny": entry},
            workers=[HandOperatedWorker(self.queue)],  # type: ignore[list-item]
            clock=self.clock,
        )
        self.dispatcher.start()
        self.plane = DataPlane(self.dispatcher, tasks=None)
        self.adapter = GRPCAdapter(self.plane, max_inflight=2)

    def infer(self, owner: str = "peer-a", key: int = 1, **kwargs: Any) -> Deferred[Any]:
        request = kserve.InferRequest({"x": X}, **kwargs.pop("fields", {}))
        version = kwargs.pop("version", "")
        return self.adapter.infer(
            owner, key, "tiny", version, request, kwargs.pop("remaining", None)
        )

    def error_of(self, d: Deferred[Any]) -> ErrorCode:
        return self.failureResultOf(d, TwinferError).value.code  # type: ignore[attr-defined,no-any-return]

    def counts(self) -> dict[tuple[str, str, str], int]:
        return dict(self.plane.stats.requests)

    def test_a_request_is_counted_under_grpc_on_its_peers_session(self) -> None:
        d = self.infer()
        (session,) = self.plane.frontends["grpc"].sessions
        assert session.max_inflight == 2 and list(session.inflight) == [1]
        job = self.queue.take()
        assert job is not None and job.deadline is None
        job.deferred.callback(InferResult({"y": X[:, :3]}, 1, 2))
        assert self.successResultOf(d).outputs["y"].shape == (2, 3)
        assert self.counts() == {("tiny", "OK", "grpc"): 1}
        assert not self.plane.frontends["grpc"].sessions  # the peer has nothing in flight

    def test_the_grpc_deadline_and_tritons_timeout_bound_the_job(self) -> None:
        self.infer(key=1, remaining=0.25)
        self.infer(key=2, remaining=10.0, fields={"timeout_us": 40_000})
        deadlines = [job.deadline for job in (self.queue.take(), self.queue.take()) if job]
        assert deadlines == [0.25, 0.04]
        passed = self.infer(key=3, remaining=0.0)
        assert self.error_of(passed) is ErrorCode.DEADLINE_EXCEEDED
        assert self.counts() == {("tiny", "DEADLINE_EXCEEDED", "grpc"): 1}

    def test_the_per_connection_limit_holds_per_peer(self) -> None:
        self.infer(key=1)
        self.infer(key=2)
        assert self.error_of(self.infer(key=3)) is ErrorCode.OVERLOADED
        self.infer("peer-b", key=4)  # another connection has its own limit
        assert len(self.plane.frontends["grpc"].sessions) == 2
        assert self.counts() == {("tiny", "OVERLOADED", "grpc"): 1}

    def test_cancel_withdraws_the_job_and_a_closed_stream_its_requests(self) -> None:
        d = self.infer(key=1)
        self.adapter.cancel("peer-a", 1)
        assert self.error_of(d) is ErrorCode.CANCELLED and self.queue.depth == 0
        self.adapter.acquire("stream-1")
        streamed = self.infer("stream-1", key=2)
        self.adapter.release("stream-1")
        self.assertNoResult(streamed)  # the request still holds the session
        self.adapter.cancel("stream-1", 2)
        assert self.error_of(streamed) is ErrorCode.CANCELLED
        assert not self.plane.frontends["grpc"].sessions
        assert self.counts() == {("tiny", "CANCELLED", "grpc"): 2}

    def test_versions_priorities_and_draining(self) -> None:
        assert self.error_of(self.infer(version="2")) is ErrorCode.UNKNOWN_MODEL
        assert self.error_of(self.infer(fields={"priority": 3})) is ErrorCode.INVALID_INPUT
        self.infer(key=5, version="1", fields={"priority": 1})  # Triton's highest
        job = self.queue.take()
        assert job is not None and job.level == 1  # twinfer's highest of 2 levels (index 1)
        self.plane.begin_drain()
        assert self.error_of(self.infer(key=6)) is ErrorCode.UNAVAILABLE
        self.adapter.refuse("peer-a", "tiny", TwinferError(ErrorCode.INVALID_DTYPE, "x"))
        assert self.counts() == {
            ("tiny", "UNKNOWN_MODEL", "grpc"): 1,
            ("tiny", "INVALID_INPUT", "grpc"): 1,
            ("tiny", "UNAVAILABLE", "grpc"): 1,
            ("tiny", "INVALID_DTYPE", "grpc"): 1,
        }
        assert not self.adapter.server_ready()

    def test_metadata_and_readiness(self) -> None:
        assert self.adapter.model_ready("tiny", "1") and self.adapter.server_ready()
        assert self.adapter.metadata("tiny", "").name == "tiny"
        assert code_of(self.adapter.metadata, "nope", "") is ErrorCode.UNKNOWN_MODEL
