"""The front-end-neutral model repository (Triton's index, load/unload,
statistics and configuration extensions): :mod:`twinfer.ops.repository`.

In memory first: a real data plane and dispatcher over the real ``tiny``
model's signature, a worker the tests operate by hand and a Clock, so every
count and duration is exact.  Then with a real controller, real OpenVINO
engines and device threads on the reactor.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from ops_support import OpsServerTestCase
from test_protocol import HandOperatedWorker
from twinfer.config import ModelConfig
from twinfer.dataplane import DataPlane
from twinfer.engines import builtin
from twinfer.engines.builtin import tiny_reference
from twinfer.engines.openvino import Signature
from twinfer.errors import ErrorCode, TwinferError
from twinfer.ops.repository import (
    AdminDisabled,
    BatchStatistics,
    Duration,
    InstanceGroup,
    ModelRepository,
    RepositoryModel,
    TensorConfig,
    model_statistics,
    triton_datatype,
)
from twinfer.ops.stats import ModelStats, Stats
from twinfer.scheduling import BatchPolicy, Dispatcher, InferResult, Job, JobQueue, ModelEntry
from twinfer.wire.messages import DType

X = np.ones((2, 4), np.float32)


class Replica(HandOperatedWorker):
    """A hand-operated replica that can be on any device and can fail."""

    alive = True

    def __init__(self, queue: JobQueue, device: str = "cpu", available: bool = True) -> None:
        super().__init__(queue)
        self.device = device
        self.available = available


def answer(job: Job, queue_us: int, compute_us: int, rows: int = 2, requests: int = 1) -> None:
    """Answer ``job`` as the device thread would have, with these timings."""
    outputs = tiny_reference(np.asarray(job.inputs["x"]))
    job.deferred.callback(
        InferResult(outputs, queue_us, compute_us, rows, job.model, "cpu", requests)
    )


class MemoryRepositoryTests(unittest.SynchronousTestCase):
    """One ``tiny`` model queue, a hand-operated replica, a Clock."""

    def build(
        self,
        *,
        batching: BatchPolicy | None = None,
        devices: tuple[str, ...] = ("cpu",),
        available: bool = True,
        models: dict[str, ModelConfig] | None = None,
        targets: dict[str, str] | None = None,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)  # a wall-clock time, in seconds
        self.queue = JobQueue("tiny", size=8)
        signature = Signature.of(builtin.tiny_model())
        entry = ModelEntry("tiny", signature, devices, (self.queue,), batching)
        workers = [Replica(self.queue, device, available) for device in devices]
        self.dispatcher = Dispatcher(
            {"tiny": entry},
            workers=workers,  # type: ignore[arg-type]
            clock=self.clock,
        )
        self.dispatcher.start()
        self.plane = DataPlane(
            self.dispatcher,
            stats=Stats(wall=self.clock.seconds),
            tasks=None,
            clock=self.clock.seconds,
        )
        self.session = self.plane.open_session("test")
        self.repository = ModelRepository(
            self.plane,
            models=models if models is not None else {"tiny": ModelConfig("tiny", "builtin:tiny")},
            targets=targets if targets is not None else {"cpu": "CPU"},
        )

    def infer(self, key: int, x: np.ndarray = X, model: str = "tiny") -> Deferred[Any]:
        d = self.plane.infer(self.session, key, model, {"x": x})
        d.addErrback(lambda f: f.value)  # failures are looked at, not logged
        return d

    def take(self) -> Job:
        job = self.queue.take()
        assert job is not None
        return job

    def test_statistics_count_and_time_a_known_sequence_exactly(self) -> None:
        self.build()
        [before] = self.repository.statistics("tiny")
        assert (before.inference_count, before.execution_count, before.last_inference) == (0, 0, 0)
        assert before.success == before.fail == before.queue == Duration(0, 0)

        # One request alone: 250 ms end to end, 1 ms queued, 2 ms on the device.
        self.infer(1)
        self.clock.advance(0.25)
        answer(self.take(), queue_us=1000, compute_us=2000, rows=2)
        # Two requests in one batch of 4 rows: 3 ms on the device, charged to each.
        self.infer(2)
        self.infer(3)
        self.clock.advance(0.5)
        answer(self.take(), queue_us=500, compute_us=3000, rows=4, requests=2)
        answer(self.take(), queue_us=700, compute_us=3000, rows=4, requests=2)
        # A request the device fails after 125 ms, and one refused at once.
        failing = self.infer(4)
        self.clock.advance(0.125)
        self.take().deferred.errback(TwinferError(ErrorCode.INFERENCE_FAILED, "device fell over"))
        assert isinstance(self.successResultOf(failing), TwinferError)
        self.infer(5, np.ones((2, 5), np.float32))  # INVALID_SHAPE: never queued
        self.infer(6, model="nope")  # not counted under any model

        [stats] = self.repository.statistics("tiny")
        assert stats.name == "tiny" and stats.version == "1"
        assert stats.inference_count == 3
        assert stats.execution_count == 2  # the batch of two ran once
        assert stats.last_inference == 1_700_000_000_875  # ms: the refusal, the last answer
        assert stats.success == Duration(3, 1_250_000_000)
        assert stats.fail == Duration(2, 125_000_000)
        assert stats.queue == Duration(3, 2_200_000)
        assert stats.compute_infer == Duration(3, 8_000_000)
        assert stats.compute_input == stats.compute_output == Duration(3, 0)
        assert stats.batch_stats == (
            BatchStatistics(2, Duration(1, 0), Duration(1, 2_000_000), Duration(1, 0)),
            BatchStatistics(4, Duration(1, 0), Duration(1, 3_000_000), Duration(1, 0)),
        )
        assert self.repository.statistics() == [stats]  # "": every served model

    def test_statistics_of_an_unknown_model_is_unknown_model(self) -> None:
        self.build()
        with pytest.raises(TwinferError) as info:
            self.repository.statistics("nope")
        assert info.value.code == ErrorCode.UNKNOWN_MODEL
        assert "'nope'" in info.value.message

    def test_model_statistics_from_bare_counts(self) -> None:
        stats = ModelStats()
        assert model_statistics("m", stats).success == Duration(0, 0)
        stats.executions = 2.9999999999  # three thirds of a batch, as floats add up
        assert model_statistics("m", stats).execution_count == 3

    def test_index_lists_each_known_model_with_its_state(self) -> None:
        models = {name: ModelConfig(name, "builtin:tiny") for name in ("tiny", "gone")}
        self.build(models=models)
        assert self.repository.index() == [
            RepositoryModel("gone", "UNAVAILABLE", "unloaded"),
            RepositoryModel("tiny", "READY"),
        ]
        assert self.repository.index(ready_only=True) == [RepositoryModel("tiny", "READY")]
        self.dispatcher.stop()
        assert self.repository.index()[1] == RepositoryModel(
            "tiny", "UNAVAILABLE", "the server is not started"
        )

    def test_a_model_without_a_healthy_device_is_unavailable(self) -> None:
        self.build(available=False)
        assert self.repository.index() == [
            RepositoryModel("tiny", "UNAVAILABLE", "no healthy device serves it")
        ]

    def test_config_without_batching_has_whole_shapes(self) -> None:
        self.build()
        config = self.repository.config("tiny")
        metadata = self.dispatcher.metadata("tiny")
        assert (config.name, config.platform, config.max_batch_size) == ("tiny", "openvino", 0)
        assert config.inputs == (TensorConfig("x", "TYPE_FP32", (-1, 4)),)
        assert config.outputs == (
            TensorConfig("y", "TYPE_FP32", (-1, 3)),
            TensorConfig("label", "TYPE_INT64", (-1,)),
        )
        assert [t.dims for t in config.inputs + config.outputs] == [
            t.shape for t in metadata.inputs + metadata.outputs
        ]
        assert config.instance_groups == (InstanceGroup("tiny_cpu", "KIND_CPU", 1),)
        assert config.dynamic_batching is None

    def test_config_with_batching_leaves_out_the_batch_dimension(self) -> None:
        policy = BatchPolicy(8, 0.0005, (4,))
        model = ModelConfig("tiny", "builtin:tiny", priority_levels=3, default_priority=1)
        self.build(
            batching=policy,
            devices=("cpu", "gpu", "npu"),
            models={"tiny": model},
            targets={"cpu": "CPU", "gpu": "GPU.1", "npu": "NPU"},
        )
        config = self.repository.config("tiny")
        assert config.max_batch_size == 8
        assert config.inputs == (TensorConfig("x", "TYPE_FP32", (4,)),)
        assert config.outputs[1] == TensorConfig("label", "TYPE_INT64", ())
        assert config.instance_groups == (
            InstanceGroup("tiny_cpu", "KIND_CPU", 1),
            InstanceGroup("tiny_gpu", "KIND_GPU", 1, (1,)),
            InstanceGroup("tiny_npu", "KIND_MODEL", 1),
        )
        assert config.dynamic_batching == {
            "preferred_batch_size": [4],
            "max_queue_delay_microseconds": 500,
            "priority_levels": 3,
            "default_priority_level": 3,  # twinfer's lowest is Triton's 3 of 3
        }

    def test_config_of_an_unknown_model_is_unknown_model(self) -> None:
        self.build()
        with pytest.raises(TwinferError) as info:
            self.repository.config("nope")
        assert info.value.code == ErrorCode.UNKNOWN_MODEL

    def test_load_and_unload_need_admin(self) -> None:
        self.build()
        for d in (self.repository.load("tiny"), self.repository.unload("tiny")):
            error = self.failureResultOf(d, AdminDisabled).value
            assert error.code == ErrorCode.UNSUPPORTED_MESSAGE
            assert "--allow-admin" in error.message
        assert self.repository.index()[0].state == "READY"  # nothing changed

    def test_datatype_names(self) -> None:
        assert triton_datatype(DType.F16) == "TYPE_FP16"
        assert triton_datatype(DType.BOOL) == "TYPE_BOOL"
        assert triton_datatype(DType.U64) == "TYPE_UINT64"


class ControllerRepositoryTests(OpsServerTestCase):
    """With a real controller: load and unload, and statistics of real inferences."""

    async def start(self, allow_admin: bool = True) -> ModelRepository:
        await self.start_ops_server()
        return ModelRepository(self.dataplane, controller=self.controller, allow_admin=allow_admin)

    async def test_unload_then_load_by_name(self) -> None:
        repository = await self.start()
        summary = await repository.unload("tiny")
        assert summary.startswith("unloaded tiny")
        assert repository.index() == [RepositoryModel("tiny", "UNAVAILABLE", "unloaded")]
        with self.assertRaises(TwinferError) as caught:
            await repository.unload("tiny")
        assert caught.exception.code == ErrorCode.UNKNOWN_MODEL

        loading = repository.load("tiny")
        # The controller's lock runs it at once: the index shows it loading.
        assert repository.index() == [RepositoryModel("tiny", "LOADING", "being loaded")]
        assert (await loading).startswith("loaded tiny from builtin:tiny on cpu")
        assert repository.index() == [RepositoryModel("tiny", "READY")]
        session = self.dataplane.open_session("test")
        result = await self.dataplane.infer(session, 1, "tiny", {"x": X})
        np.testing.assert_allclose(result.outputs["y"], tiny_reference(X)["y"], rtol=1e-5)

        # A served model is loaded again: compiled and swapped in.
        assert (await repository.load("tiny")).startswith("reloaded tiny")
        with self.assertRaises(TwinferError) as caught:
            await repository.load("resnet")
        assert caught.exception.code == ErrorCode.UNKNOWN_MODEL
        assert caught.exception.message == (
            "model 'resnet' is not in the repository (models: tiny)"
        )

    async def test_admin_off_changes_nothing(self) -> None:
        repository = await self.start(allow_admin=False)
        with self.assertRaises(AdminDisabled):
            await repository.unload("tiny")
        with self.assertRaises(AdminDisabled):
            await repository.load("tiny")
        assert repository.index() == [RepositoryModel("tiny", "READY")]

    async def test_statistics_of_real_inferences_match_their_results(self) -> None:
        repository = await self.start()
        session = self.dataplane.open_session("test")
        results: list[InferResult] = []
        for i in range(5):
            results.append(await self.dataplane.infer(session, i, "tiny", {"x": X}))
        [stats] = repository.statistics("tiny")
        assert (stats.inference_count, stats.execution_count) == (5, 5)
        assert stats.queue == Duration(5, sum(r.queue_us for r in results) * 1000)
        assert stats.compute_infer == Duration(5, sum(r.compute_us for r in results) * 1000)
        assert stats.fail == Duration(0, 0) and stats.success.count == 5
        assert stats.success.ns >= stats.compute_infer.ns  # end to end includes the device
        config = repository.config("tiny")
        replicas = len(self.dispatcher.workers_on("cpu"))
        assert config.instance_groups == (InstanceGroup("tiny_cpu", "KIND_CPU", replicas),)
        assert attrs.asdict(config.inputs[0]) == {
            "name": "x",
            "data_type": "TYPE_FP32",
            "dims": (-1, 4),
        }
