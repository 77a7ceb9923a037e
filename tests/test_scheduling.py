"""Scheduling on real models over loopback: batching, placement, failover, probes."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from twisted.internet import defer, reactor

from support import ServerTestCase
from twinfer.client import TwinferClient, connect
from twinfer.engines import builtin
from twinfer.engines.openvino import Engine, OpenVINOEngine, Signature
from twinfer.errors import ErrorCode, TwinferError
from twinfer.registry import LoadedModel, openvino_engine
from twinfer.scheduling import DeviceError, WorkerState
from waiting import workers_reach


def conv_net_ir(path: str) -> None:
    """A small real CNN with a *static* batch of 1 and fixed random weights:
    conv 3x3 -> relu -> global average pool -> dense, 1x3x16x16 -> 1x5."""
    rng = np.random.default_rng(3)
    x = ops.parameter([1, 3, 16, 16], ov.Type.f32, name="image")
    x.output(0).get_tensor().set_names({"image"})
    weights = ops.constant(rng.standard_normal((8, 3, 3, 3)).astype(np.float32))
    conv = ops.convolution(x, weights, [1, 1], [1, 1], [1, 1], [1, 1])
    pooled = ops.reduce_mean(ops.relu(conv), ops.constant(np.array([2, 3])), keep_dims=False)
    dense = ops.matmul(
        pooled, ops.constant(rng.standard_normal((8, 5)).astype(np.float32)), False, False
    )
    dense.output(0).get_tensor().set_names({"scores"})
    ov.save_model(ov.Model([dense.output(0)], [x], "convnet"), path, compress_to_fp16=False)


def doubler_model() -> ov.Model:
    """x f32 [?, ?] -> y = 2x: any row length, so shapes decide what may share a batch."""
    x = ops.parameter(ov.PartialShape([-1, -1]), ov.Type.f32, name="x")
    x.output(0).get_tensor().set_names({"x"})
    y = ops.multiply(x, ops.constant(np.float32(2)))
    y.output(0).get_tensor().set_names({"y"})
    return ov.Model([y.output(0)], [x], "doubler")


class FlakyDevice:
    """Test double around the REAL engine: a device that breaks for good after
    ``healthy_calls`` inferences (raising DeviceError) until ``repair()``; its
    health probe fails while it is broken."""

    def __init__(self, inner: Engine, healthy_calls: int) -> None:
        self._inner = inner
        self.healthy_calls = healthy_calls
        self.calls = 0
        self.broken = False
        self._lock = threading.Lock()

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        with self._lock:
            self.calls += 1
            if self.calls > self.healthy_calls:
                self.broken = True
            broken = self.broken
        if broken:
            raise DeviceError("device stopped answering")
        return self._inner.run(inputs, outputs)

    def probe(self) -> None:
        if self.broken:
            raise DeviceError("probe: device stopped answering")

    def repair(self) -> None:
        with self._lock:
            self.broken = False
            self.healthy_calls = 10**9


#: Two one-replica devices with one engine each (execution "throughput"): the
#: tests count the calls each device's one (flaky) engine answers.
TWO_DEVICES = """
[[devices]]
name = "a"
target = "CPU"
replicas = 1
execution = "throughput"
properties = {{ INFERENCE_PRECISION_HINT = "f32" }}
health_check_interval_s = {probe}

[[devices]]
name = "b"
target = "CPU"
replicas = 1
execution = "throughput"
properties = {{ INFERENCE_PRECISION_HINT = "f32" }}
health_check_interval_s = {probe}

[[models]]
name = "tiny"
path = "builtin:tiny"
devices = ["a", "b"]
queue = "{queue}"
queue_size = 1000
"""


class SchedulingTests(ServerTestCase):
    async def client(self) -> TwinferClient:
        client = await connect(reactor, f"tcp:127.0.0.1:{self.port}")
        self.addCleanup(client.close)
        return client

    def workers(self, device: str) -> list:  # type: ignore[type-arg]
        return [w for w in self.dispatcher.workers if w.device == device]

    # -- dynamic batching -------------------------------------------------------

    async def test_batching_stacks_concurrent_requests_and_splits_the_answers(self) -> None:
        await self.start_server(
            """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 1
properties = { INFERENCE_PRECISION_HINT = "f32" }
[[models]]
name = "tiny"
path = "builtin:tiny"
max_batch_size = 16
max_queue_delay_us = 2000
queue_size = 500
"""
        )
        clients = [await self.client() for _ in range(4)]
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(96)]
        replies = await defer.gatherResults(
            [clients[i % 4].infer_reply("tiny", {"x": x}) for i, x in enumerate(inputs)]
        )
        for x, reply in zip(inputs, replies):
            expected = builtin.tiny_reference(x)
            np.testing.assert_allclose(reply.outputs["y"], expected["y"], atol=1e-5)
            np.testing.assert_array_equal(reply.outputs["label"], expected["label"])
        [worker] = self.dispatcher.workers
        assert worker.jobs_done == 96
        assert worker.batches_run <= 96 // 3  # batches of several requests really ran

    async def test_a_static_model_is_reshaped_to_batch_and_answers_like_unbatched(self) -> None:
        path = self.mktemp() + ".xml"
        conv_net_ir(path)
        await self.start_server(
            f"""
[[devices]]
name = "cpu"
target = "CPU"
replicas = 1
properties = {{ INFERENCE_PRECISION_HINT = "f32" }}
[[models]]
name = "convnet"
path = "{path}"
max_batch_size = 8
max_queue_delay_us = 5000
"""
        )
        metadata = self.dispatcher.metadata("convnet")
        assert metadata.inputs[0].shape == (-1, 3, 16, 16)
        core = ov.Core()
        unbatched = core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        images = np.random.default_rng(1).random((8, 1, 3, 16, 16), dtype=np.float32)
        client = await self.client()
        results = await defer.gatherResults(
            [client.infer("convnet", {"image": image}) for image in images]
        )
        for image, out in zip(images, results):
            want = unbatched.create_infer_request().infer({"image": image})[0]
            np.testing.assert_allclose(out["scores"], want, atol=1e-5)
        assert self.dispatcher.workers[0].batches_run < 8

    async def test_requests_of_different_shapes_never_share_a_batch(self) -> None:
        def factory(model: LoadedModel, device: str, replica: int) -> Engine:
            return openvino_engine(model, device, replica)

        # One engine (execution "throughput"): the test swaps it for another model.
        await self.start_server(
            """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 1
execution = "throughput"
[[models]]
name = "tiny"
path = "builtin:tiny"
max_batch_size = 8
max_queue_delay_us = 3000
"""
        )
        # Swap in a model with free row length, served by the same machinery.
        entry = self.dispatcher.models["tiny"]
        model = doubler_model()
        compiled = ov.Core().compile_model(model, "CPU")
        signature = Signature.of(model)
        entry.signature = signature
        worker = self.dispatcher.workers[0]
        worker.engines["tiny"] = OpenVINOEngine(compiled, signature)
        client = await self.client()
        xs = [np.full((1, 3 + i % 2), i, np.float32) for i in range(12)]
        results = await defer.gatherResults([client.infer("tiny", {"x": x}) for x in xs])
        for x, out in zip(xs, results):
            np.testing.assert_array_equal(out["y"], 2 * x)
        assert 2 <= worker.batches_run < 12

    async def test_a_request_larger_than_the_batch_limit_is_refused(self) -> None:
        await self.start_server(
            """
[[devices]]
name = "cpu"
target = "CPU"
[[models]]
name = "tiny"
path = "builtin:tiny"
max_batch_size = 4
"""
        )
        client = await self.client()
        with self.assertRaises(TwinferError) as e:
            await client.infer("tiny", {"x": np.zeros((5, 4), np.float32)})
        assert e.exception.code == ErrorCode.INVALID_SHAPE
        assert "5 rows" in e.exception.message and "at most 4" in e.exception.message

    # -- placement and failover ---------------------------------------------------

    async def test_a_failing_device_loses_no_request_and_the_survivor_carries_on(self) -> None:
        devices: dict[str, FlakyDevice] = {}

        def factory(model: LoadedModel, device: str, replica: int) -> Engine:
            healthy = 10 if device == "a" else 10**9
            devices[device] = FlakyDevice(openvino_engine(model, device, replica), healthy)
            return devices[device]

        await self.start_server(TWO_DEVICES.format(probe=0, queue="shared"), factory)
        clients = [await self.client() for _ in range(4)]
        xs = [np.full((2, 4), i, np.float32) for i in range(200)]
        results = await defer.gatherResults(
            [clients[i % 4].infer("tiny", {"x": x}) for i, x in enumerate(xs)]
        )
        for x, out in zip(xs, results):  # every request answered, and correctly
            np.testing.assert_allclose(out["y"], builtin.tiny_reference(x)["y"], atol=1e-5)
        [a], [b] = self.workers("a"), self.workers("b")
        assert a.state is WorkerState.FAILED and "stopped answering" in a.failure_reason
        assert b.state is WorkerState.READY and b.jobs_done >= 190
        assert self.dispatcher.counters.device_failures == 1
        assert self.dispatcher.counters.retried >= 1
        [info] = await clients[0].models()
        assert info.ready
        self.flushLoggedErrors(DeviceError)

    async def test_per_device_queues_move_their_jobs_when_their_device_fails(self) -> None:
        devices: dict[str, FlakyDevice] = {}

        def factory(model: LoadedModel, device: str, replica: int) -> Engine:
            healthy = 5 if device == "a" else 10**9
            devices[device] = FlakyDevice(openvino_engine(model, device, replica), healthy)
            return devices[device]

        await self.start_server(TWO_DEVICES.format(probe=0, queue="per-device"), factory)
        client = await self.client()
        xs = [np.full((1, 4), i, np.float32) for i in range(100)]
        results = await defer.gatherResults([client.infer("tiny", {"x": x}) for x in xs])
        assert len(results) == 100
        assert self.workers("a")[0].state is WorkerState.FAILED
        entry = self.dispatcher.models["tiny"]
        assert [q.name for q in entry.ready_queues()] == ["tiny@b"]
        self.flushLoggedErrors(DeviceError)

    async def test_requests_fail_unavailable_only_when_no_device_is_left(self) -> None:
        def factory(model: LoadedModel, device: str, replica: int) -> Engine:
            return FlakyDevice(openvino_engine(model, device, replica), healthy_calls=0)

        await self.start_server(TWO_DEVICES.format(probe=0, queue="shared"), factory)
        client = await self.client()
        outcomes = []
        for _ in range(3):
            try:
                await client.infer("tiny", {"x": np.zeros((1, 4), np.float32)})
            except TwinferError as e:
                outcomes.append((e.code, e.message))
        assert outcomes[0][0] == ErrorCode.INFERENCE_FAILED  # both tried, both failed
        for code, message in outcomes[1:]:
            assert code == ErrorCode.UNAVAILABLE
            assert "no healthy device serves model 'tiny'" in message
            assert "a#0 failed" in message and "b#0 failed" in message
        [info] = await client.models()
        assert not info.ready
        self.flushLoggedErrors(DeviceError)

    async def test_a_failed_device_comes_back_when_its_probe_passes(self) -> None:
        devices: dict[str, FlakyDevice] = {}

        def factory(model: LoadedModel, device: str, replica: int) -> Engine:
            devices[device] = FlakyDevice(openvino_engine(model, device, replica), 3)
            return devices[device]

        await self.start_server(TWO_DEVICES.format(probe=0.05, queue="shared"), factory)
        client = await self.client()
        outcomes = await defer.DeferredList(
            [client.infer("tiny", {"x": np.ones((1, 4), np.float32)}) for _ in range(20)],
            consumeErrors=True,
        )
        assert sum(ok for ok, _ in outcomes) == 6  # three healthy calls on each device
        assert all(w.state is WorkerState.FAILED for w in self.dispatcher.workers)
        for device in devices.values():
            device.repair()
        # The next probe of each device passes.
        await workers_reach(self.dispatcher.workers, WorkerState.READY)
        assert all(w.state is WorkerState.READY for w in self.dispatcher.workers)
        out = await client.infer("tiny", {"x": np.ones((1, 4), np.float32)})
        np.testing.assert_allclose(
            out["y"], builtin.tiny_reference(np.ones((1, 4)))["y"], atol=1e-5
        )
        self.flushLoggedErrors(DeviceError)
