"""The gRPC server in process: a real ``grpc.aio`` server on its own thread over
a data plane whose dispatcher never runs a job by itself (the tests take the
jobs and answer them), driven by a real gRPC client on loopback.

What only the server can show: overload refusals carry retry information,
a client's cancellation or deadline withdraws the queued job, a drain
answers UNAVAILABLE and lets calls in flight finish, and the port joins
the port file (or stops start-up when it cannot be bound).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from test_protocol import HandOperatedWorker
from twinfer import tap
from twinfer.dataplane import DataPlane
from twinfer.engines import builtin
from twinfer.engines.openvino import Signature
from twinfer.frontends.grpc import grpc_service_pb2 as pb
from twinfer.frontends.grpc import grpc_service_pb2_grpc as pb_grpc
from twinfer.frontends.grpc.service import GRPCService
from twinfer.scheduling import Dispatcher, InferResult, JobQueue, ModelEntry

X = np.arange(8, dtype=np.float32).reshape(2, 4)
LOOPBACK = "tcp:0:interface=127.0.0.1"


def infer_request(request_id: str = "") -> Any:
    request = pb.ModelInferRequest(model_name="tiny", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=X.shape)
    request.raw_input_contents.append(X.tobytes())
    return request


def settled(future: grpc.Future) -> Deferred[grpc.Future]:
    """A Deferred firing (on the reactor) with ``future`` once the call is over."""
    d: Deferred[grpc.Future] = Deferred()
    future.add_done_callback(lambda done: reactor.callFromThread(d.callback, done))
    return d


class GRPCServerTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.queue = JobQueue("tiny", size=8)
        entry = ModelEntry("tiny", Signature.of(builtin.tiny_model()), ("cpu",), (self.queue,))
        self.dispatcher = Dispatcher(
            {"tiny": entry},
            workers=[HandOperatedWorker(self.queue)],  # type: ignore[list-item]
            clock=reactor,
        )
        self.dispatcher.start()
        self.addCleanup(self.dispatcher.stop)  # answers what a test left queued
        self.plane = DataPlane(self.dispatcher, tasks=None)
        self.service = GRPCService(self.plane, reactor, LOOPBACK, max_inflight=1, grace=10)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        # Each submission fires the Deferred waiting for it (no polling).
        self.submitted: Deferred[Any] = Deferred()
        submit = self.service.adapter.infer

        def infer(*args: Any) -> Deferred[Any]:
            d = submit(*args)
            waiting, self.submitted = self.submitted, Deferred()
            waiting.callback(args[1])
            return d

        self.service.adapter.infer = infer  # type: ignore[method-assign]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.service.port}")
        self.addCleanup(self.channel.close)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def counts(self) -> dict[tuple[str, str, str], int]:
        return dict(self.plane.stats.requests)

    def next_count(self) -> Deferred[None]:
        """Fires once the data plane counts its next outcome."""
        counted: Deferred[None] = Deferred()
        count = self.plane.stats.request_done

        def request_done(*args: Any, **kwargs: Any) -> None:
            count(*args, **kwargs)
            if not counted.called:
                counted.callback(None)

        self.plane.stats.request_done = request_done  # type: ignore[method-assign]
        return counted

    def answer_next_job(self) -> None:
        job = self.queue.take()
        assert job is not None
        job.stop_timer()  # as a worker does when it starts a job
        job.deferred.callback(InferResult({"y": X[:, :3], "label": np.array([2, 2])}, 1, 1))

    async def test_a_call_is_answered_from_the_reactor(self) -> None:
        call = self.stub.ModelInfer.future(infer_request("one"), timeout=30)
        await self.submitted
        self.answer_next_job()
        response = (await settled(call)).result()
        assert response.id == "one" and [o.name for o in response.outputs] == ["y", "label"]
        assert self.counts() == {("tiny", "OK", "grpc"): 1}

    async def test_overload_is_resource_exhausted_with_retry_after(self) -> None:
        first = self.stub.ModelInfer.future(infer_request(), timeout=30)
        await self.submitted  # the connection's one request in flight
        refused = await settled(self.stub.ModelInfer.future(infer_request(), timeout=30))
        assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after", "1") in refused.trailing_metadata()
        assert "1 requests in flight" in refused.details()
        self.answer_next_job()
        assert (await settled(first)).code() is grpc.StatusCode.OK

    async def test_a_cancelled_call_withdraws_its_job(self) -> None:
        call = self.stub.ModelInfer.future(infer_request(), timeout=30)
        await self.submitted
        assert self.queue.depth == 1
        counted = self.next_count()
        call.cancel()
        await counted
        assert self.queue.depth == 0 and self.counts() == {("tiny", "CANCELLED", "grpc"): 1}

    async def test_the_calls_deadline_becomes_the_jobs(self) -> None:
        call = self.stub.ModelInfer.future(infer_request(), timeout=2.0)
        await self.submitted
        job = self.queue.take()
        assert (
            job is not None
            and job.deadline is not None
            and 0 < job.deadline - reactor.seconds() <= 2.0
        )
        assert (await settled(call)).code() is grpc.StatusCode.DEADLINE_EXCEEDED

    async def test_draining_answers_unavailable_and_stopping_lets_calls_finish(self) -> None:
        inflight = self.stub.ModelInfer.future(infer_request("kept"), timeout=30)
        await self.submitted
        self.plane.begin_drain()
        refused = await settled(self.stub.ModelInfer.future(infer_request(), timeout=30))
        assert refused.code() is grpc.StatusCode.UNAVAILABLE
        assert ("retry-after", "1") in refused.trailing_metadata()
        stopped = self.service.stopService()
        self.assertNoResult(stopped)  # the call in flight holds it
        self.answer_next_job()
        assert (await settled(inflight)).result().id == "kept"
        await stopped
        late = await settled(self.stub.ServerLive.future(pb.ServerLiveRequest(), timeout=5))
        assert late.code() is grpc.StatusCode.UNAVAILABLE

    async def test_a_stream_is_one_session_and_its_end_cancels_its_requests(self) -> None:
        self.service.adapter.max_inflight = 0
        replies = self.stub.ModelStreamInfer(iter([infer_request("s1"), infer_request("s2")]))
        await self.submitted
        await self.submitted
        assert len(self.plane.frontends["grpc"].sessions) == 1
        self.answer_next_job()
        first = next(replies)
        assert first.error_message == "" and first.infer_response.id == "s1"
        counted = self.next_count()
        replies.cancel()
        await counted
        assert self.queue.depth == 0
        assert self.counts() == {("tiny", "OK", "grpc"): 1, ("tiny", "CANCELLED", "grpc"): 1}


class GRPCPortTests(unittest.TestCase):
    timeout = 60

    def plane(self) -> DataPlane:
        queue = JobQueue("tiny", size=1)
        entry = ModelEntry("tiny", Signature.of(builtin.tiny_model()), ("cpu",), (queue,))
        return DataPlane(Dispatcher({"tiny": entry}, workers=[], clock=reactor), tasks=None)

    async def test_the_grpc_port_joins_the_port_file(self) -> None:
        path = Path(self.mktemp())
        top = tap.TwinferService(port_file=str(path))
        service = GRPCService(self.plane(), reactor, LOOPBACK)
        service.setServiceParent(top)
        top.privilegedStartService()
        top.startService()
        assert json.loads(path.read_text()) == {"grpc": service.port}
        assert top.bound_addresses()["grpc"].port == service.port  # type: ignore[attr-defined]
        await top.stopService()
        assert not path.exists()

    async def test_a_port_in_use_stops_start_up_in_one_line(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        description = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        top = tap.TwinferService()
        service = GRPCService(self.plane(), reactor, description)
        service.setServiceParent(top)
        with self.assertRaises(SystemExit) as exit:
            top.privilegedStartService()
        assert exit.exception.code == 1
        self.failureResultOf(service.when_listening())
        assert str(service._error) == (  # noqa: SLF001
            f"cannot listen on {description}: address already in use"
        )
        await top.stopService()
