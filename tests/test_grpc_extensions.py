"""The gRPC front end's Triton extensions and shared-memory tensors, in memory:
Triton's ``shared_memory_*`` parameters in messages, replies that describe
outputs written into regions, the extension messages (read back with
tritonclient's own generated classes: wire compatibility) and the adapter's
calls on the server's repository and regions.

End to end with tritonclient.grpc against a real twistd: test_grpc_tritonclient.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import InferResult
from tritonclient.grpc import model_config_pb2 as model_config
from tritonclient.grpc import service_pb2 as triton_pb
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from test_protocol import HandOperatedWorker
from twinfer.dataplane import DataPlane
from twinfer.engines import builtin
from twinfer.engines.openvino import Signature
from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.grpc import codec, extensions
from twinfer.frontends.grpc import grpc_service_pb2 as pb
from twinfer.frontends.grpc.adapter import GRPCAdapter
from twinfer.frontends.grpc.servicer import status_of
from twinfer.frontends.http import kserve
from twinfer.ops.repository import (
    AdminDisabled,
    BatchStatistics,
    Duration,
    InstanceGroup,
    ModelStatistics,
    RepositoryModel,
    TensorConfig,
    TritonModelConfig,
)
from twinfer.scheduling import Dispatcher, JobQueue, ModelEntry
from twinfer.scheduling import InferResult as JobResult
from twinfer.sharedmem import DISABLED, SharedMemory
from twinfer.wire.messages import DType, RegionInfo, RegionRef, RegionTensor

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def in_region(tensor: Any, region: str, byte_size: int, offset: int | None = None) -> None:
    """Set Triton's shm parameters as tritonclient.grpc does (string, int64s)."""
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset is not None:
        tensor.parameters["shared_memory_offset"].int64_param = offset


def code_of(call: Any, *args: Any) -> ErrorCode:
    with pytest.raises(TwinferError) as info:
        call(*args)
    return info.value.code


# -- shared-memory parameters in ModelInferRequest ------------------------------------


def test_region_inputs_have_no_raw_entry_and_region_outputs_are_references() -> None:
    request = pb.ModelInferRequest(model_name="m")
    in_region(request.inputs.add(name="a", datatype="FP32", shape=[2, 4]), "in", 32, 64)
    request.inputs.add(name="b", datatype="INT64", shape=[2])
    request.raw_input_contents.append(np.array([5, 6], np.int64).tobytes())  # b's, not a's
    in_region(request.outputs.add(name="y"), "out", 24)
    request.outputs.add(name="label")
    decoded = codec.decode_infer_request(request)
    assert decoded.inputs["a"] == RegionTensor(DType.F32, (2, 4), RegionRef("in", 64, 32))
    np.testing.assert_array_equal(decoded.inputs["b"], [5, 6])
    assert decoded.output_regions == {"y": RegionRef("out", 0, 24)}
    assert decoded.output_names == ("y", "label") and decoded.uses_regions


def test_bad_shared_memory_parameters_are_precise_errors() -> None:
    def request_with(**parameters: Any) -> Any:
        request = pb.ModelInferRequest(model_name="m")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
        for key, value in parameters.items():
            tensor.parameters[key].CopyFrom(pb.InferParameter(**value))
        return request

    region = {"shared_memory_region": {"string_param": "in"}}
    size = {"shared_memory_byte_size": {"int64_param": 32}}
    cases = [
        ({"shared_memory_region": {"int64_param": 3}, **size}, "expected a string"),
        ({**region}, "shared_memory_byte_size: expected bytes >= 0, got None"),
        ({**region, "shared_memory_byte_size": {"string_param": "32"}}, "got '32'"),
        ({**region, **size, "shared_memory_offset": {"int64_param": -8}}, "got -8"),
    ]
    for parameters, words in cases:
        with pytest.raises(TwinferError) as info:
            codec.decode_infer_request(request_with(**parameters))
        assert info.value.code is ErrorCode.INVALID_REGION and words in info.value.message
        assert "input 'x'.parameters.shared_memory_" in info.value.message
    both = request_with(**region, **size)
    both.inputs[0].contents.fp32_contents.extend(X.ravel().tolist())
    assert code_of(codec.decode_infer_request, both) is ErrorCode.INVALID_INPUT
    extra = request_with(**region, **size)
    extra.raw_input_contents.append(X.tobytes())  # a raw entry for an input in a region
    with pytest.raises(TwinferError, match="1 entries for 0 inputs not in shared memory"):
        codec.decode_infer_request(extra)


def test_a_reply_describes_region_outputs_and_tritonclient_reads_the_others() -> None:
    request = pb.ModelInferRequest(model_name="tiny", id="r")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(X.tobytes())
    in_region(request.outputs.add(name="y"), "out", 64, 8)
    request.outputs.add(name="label")
    decoded = codec.decode_infer_request(request)
    label = np.array([2, 0], np.int64)
    written = RegionTensor(DType.F32, (2, 3), RegionRef("out", 8, 24))
    response = codec.encode_infer_response("tiny", decoded, {"y": written, "label": label})
    y = response.outputs[0]
    assert (y.name, y.datatype, list(y.shape)) == ("y", "FP32", [2, 3])
    assert codec.plain_parameters(y.parameters) == {
        "shared_memory_region": "out",
        "shared_memory_offset": 8,
        "shared_memory_byte_size": 24,
    }
    assert response.raw_output_contents == [b"", label.tobytes()]  # one entry per output
    # tritonclient.grpc finds each output's bytes by its index.
    result = InferResult(triton_pb.ModelInferResponse.FromString(response.SerializeToString()))
    np.testing.assert_array_equal(result.as_numpy("label"), label)


# -- the extension messages, read by tritonclient's generated classes ------------------


def wire(message: Any, triton_class: Any) -> Any:
    return triton_class.FromString(message.SerializeToString())


def test_model_config_response() -> None:
    config = TritonModelConfig(
        name="tiny",
        max_batch_size=8,
        inputs=(TensorConfig("x", "TYPE_FP32", (4,)),),
        outputs=(TensorConfig("y", "TYPE_FP32", (3,)), TensorConfig("label", "TYPE_INT64", ())),
        instance_groups=(
            InstanceGroup("tiny_cpu", "KIND_CPU", 2),
            InstanceGroup("tiny_gpu", "KIND_GPU", 1, (1,)),
        ),
        dynamic_batching={
            "preferred_batch_size": [4, 8],
            "max_queue_delay_microseconds": 2000,
            "priority_levels": 2,
            "default_priority_level": 1,
        },
    )
    read = wire(extensions.config_response(config), triton_pb.ModelConfigResponse).config
    assert (read.name, read.platform, read.backend, read.max_batch_size) == (
        "tiny",
        "openvino",
        "openvino",
        8,
    )
    assert read.version_policy.latest.num_versions == 1
    tensors = [*read.input, *read.output]
    assert [(t.name, model_config.DataType.Name(t.data_type), list(t.dims)) for t in tensors] == [
        ("x", "TYPE_FP32", [4]),
        ("y", "TYPE_FP32", [3]),
        ("label", "TYPE_INT64", []),
    ]
    kind = type(read.instance_group[0]).Kind
    assert [(g.name, kind.Name(g.kind), g.count, list(g.gpus)) for g in read.instance_group] == [
        ("tiny_cpu", "KIND_CPU", 2, []),
        ("tiny_gpu", "KIND_GPU", 1, [1]),
    ]
    batching = read.dynamic_batching
    assert list(batching.preferred_batch_size) == [4, 8]
    assert (batching.max_queue_delay_microseconds, batching.priority_levels) == (2000, 2)
    unbatched = TritonModelConfig("m", 0, (), (), ())
    assert not extensions.config_response(unbatched).config.HasField("dynamic_batching")


def test_statistics_index_and_region_status_responses() -> None:
    stats = ModelStatistics(
        name="tiny",
        last_inference=1_700_000_000_000,
        inference_count=5,
        execution_count=3,
        success=Duration(5, 5000),
        fail=Duration(1, 70),
        queue=Duration(6, 600),
        compute_input=Duration(3, 0),
        compute_infer=Duration(3, 3000),
        compute_output=Duration(3, 0),
        batch_stats=(BatchStatistics(2, Duration(3), Duration(3, 3000), Duration(3)),),
    )
    read = wire(extensions.statistics_response([stats]), triton_pb.ModelStatisticsResponse)
    [model] = read.model_stats
    assert (model.name, model.version, model.last_inference) == ("tiny", "1", 1_700_000_000_000)
    assert (model.inference_count, model.execution_count) == (5, 3)
    inference = model.inference_stats
    assert (inference.success.count, inference.success.ns) == (5, 5000)
    assert (inference.fail.count, inference.queue.ns, inference.compute_infer.ns) == (1, 600, 3000)
    assert [(b.batch_size, b.compute_infer.ns) for b in model.batch_stats] == [(2, 3000)]

    models = [RepositoryModel("a", "READY"), RepositoryModel("b", "UNAVAILABLE", "unloaded")]
    index = wire(extensions.index_response(models), triton_pb.RepositoryIndexResponse)
    assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [
        ("a", "1", "READY", ""),
        ("b", "1", "UNAVAILABLE", "unloaded"),
    ]

    regions = [RegionInfo("in", "/k1", 0, 64), RegionInfo("out", "/k2", 16, 32)]
    status = wire(
        extensions.region_status_response(regions), triton_pb.SystemSharedMemoryStatusResponse
    )
    assert {n: (r.name, r.key, r.offset, r.byte_size) for n, r in status.regions.items()} == {
        "in": ("in", "/k1", 0, 64),
        "out": ("out", "/k2", 16, 32),
    }


def test_admin_disabled_is_permission_denied_and_shm_disabled_unimplemented() -> None:
    status, trailers = status_of(AdminDisabled("loading models"))
    assert (status, trailers) == (grpc.StatusCode.PERMISSION_DENIED, ())
    disabled = TwinferError(ErrorCode.UNSUPPORTED_MESSAGE, DISABLED)
    assert status_of(disabled)[0] is grpc.StatusCode.UNIMPLEMENTED


# -- the adapter over the server's repository and regions ------------------------------


class AdapterExtensionTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.queue = JobQueue("tiny", size=4)
        entry = ModelEntry("tiny", Signature.of(builtin.tiny_model()), ("cpu",), (self.queue,))
        self.dispatcher = Dispatcher(
            {"tiny": entry},
            workers=[HandOperatedWorker(self.queue)],  # type: ignore[list-item]
            clock=Clock(),
        )
        self.dispatcher.start()
        self.plane = DataPlane(self.dispatcher, tasks=None)
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.table = SharedMemory(str(self.directory)).table(4, 4096, "the server-wide regions")
        self.adapter = GRPCAdapter(self.plane, shared_regions=self.table)

    def infer(self, adapter: GRPCAdapter, x: Any, **fields: Any) -> Deferred[Any]:
        request = kserve.InferRequest({"x": x}, **fields)
        return adapter.infer("peer", 1, "tiny", "", request, None)

    def test_region_inputs_are_views_of_the_servers_regions(self) -> None:
        (self.directory / "k").write_bytes(X.tobytes() + bytes(224))
        self.adapter.register_region("in", "/k", 0, 256)
        assert self.adapter.region_status("") == [RegionInfo("in", "/k", 0, 256)]
        x = RegionTensor(DType.F32, (2, 4), RegionRef("in", 0, 32))
        d = self.infer(self.adapter, x)
        job = self.queue.take()
        assert job is not None
        np.testing.assert_array_equal(job.inputs["x"], X)  # read from the region
        job.deferred.callback(JobResult({"y": X[:, :3]}, 1, 2))
        assert self.successResultOf(d).outputs["y"].shape == (2, 3)
        self.adapter.unregister_region("")
        assert self.adapter.region_status("") == []

    def test_refusals_name_the_region_or_the_flag_and_are_counted(self) -> None:
        assert code_of(self.adapter.unregister_region, "nope") is ErrorCode.UNKNOWN_REGION
        assert code_of(self.adapter.register_region, "r", "/a/b", 0, 8) is ErrorCode.INVALID_REGION
        off = GRPCAdapter(self.plane)
        for call, args in [
            (off.register_region, ("r", "/k", 0, 8)),
            (off.region_status, ("",)),
            (off.unregister_region, ("r",)),
        ]:
            with pytest.raises(TwinferError, match="start it with --allow-shm"):
                call(*args)  # type: ignore[operator]
        assert self.plane.frontends["grpc"].protocol_errors == {
            "UNKNOWN_REGION": 1,
            "INVALID_REGION": 1,
            "UNSUPPORTED_MESSAGE": 3,
        }
        x = RegionTensor(DType.F32, (2, 4), RegionRef("in", 0, 32))
        failure = self.failureResultOf(self.infer(off, x), TwinferError)
        assert failure.value.code is ErrorCode.UNSUPPORTED_MESSAGE  # type: ignore[attr-defined]
        assert self.plane.stats.requests == {("tiny", "UNSUPPORTED_MESSAGE", "grpc"): 1}
        assert self.queue.depth == 0

    def test_statistics_config_and_index_come_from_the_repository(self) -> None:
        d = self.infer(self.adapter, X)
        job = self.queue.take()
        assert job is not None
        job.deferred.callback(JobResult({"y": X[:, :3]}, 1, 2))
        self.successResultOf(d)
        [stats] = self.adapter.statistics("tiny", "1")
        assert (stats.name, stats.inference_count, stats.execution_count) == ("tiny", 1, 1)
        assert [s.name for s in self.adapter.statistics("", "")] == ["tiny"]
        assert code_of(self.adapter.statistics, "tiny", "2") is ErrorCode.UNKNOWN_MODEL
        assert code_of(self.adapter.config, "nope", "") is ErrorCode.UNKNOWN_MODEL
        config = self.adapter.config("tiny", "")
        assert [t.name for t in config.inputs] == ["x"] and config.max_batch_size == 0
        assert self.adapter.repository_index(True) == [RepositoryModel("tiny", "READY")]
        # No controller (and no --allow-admin): load and unload are refused.
        refused = self.failureResultOf(self.adapter.load("tiny"), AdminDisabled)
        assert "--allow-admin" in refused.value.message  # type: ignore[attr-defined]
        self.failureResultOf(self.adapter.unload("tiny"), AdminDisabled)
