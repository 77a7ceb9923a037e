"""Triton's extensions as gRPC messages, sans-I/O.

What the extensions answer is computed once for every front end: the model
repository, statistics and configuration by
:class:`~twinfer.ops.repository.ModelRepository`, the system shared-memory
regions by :class:`~twinfer.sharedmem.RegionTable`.  These functions only
turn those attrs results into the ``inference`` protobuf messages (the HTTP
front end turns the same results into Triton's JSON documents in
:mod:`twinfer.frontends.http.extensions`), so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twinfer.frontends.grpc import grpc_service_pb2 as pb
from twinfer.ops.repository import (
    Duration,
    ModelStatistics,
    RepositoryModel,
    TensorConfig,
    TritonModelConfig,
)
from twinfer.wire.messages import RegionInfo

__all__ = [
    "config_response",
    "index_response",
    "region_status_response",
    "statistics_response",
]


def _duration(value: Duration) -> Any:
    return pb.StatisticDuration(count=value.count, ns=value.ns)


def _statistics(stats: ModelStatistics) -> Any:
    return pb.ModelStatistics(
        name=stats.name,
        version=stats.version,
        last_inference=stats.last_inference,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
            # twinfer has no response cache: cache_hit and cache_miss stay empty.
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=batch.batch_size,
                compute_input=_duration(batch.compute_input),
                compute_infer=_duration(batch.compute_infer),
                compute_output=_duration(batch.compute_output),
            )
            for batch in stats.batch_stats
        ],
    )


def statistics_response(stats: Iterable[ModelStatistics]) -> Any:
    """A ``ModelStatisticsResponse`` with one entry per model."""
    return pb.ModelStatisticsResponse(model_stats=[_statistics(s) for s in stats])


def _data_type(name: str) -> int:
    """The ``DataType`` enum value of a Triton type name (``"TYPE_FP32"``)."""
    return int(pb.DataType.Value(name))


def _input(tensor: TensorConfig) -> Any:
    return pb.ModelInput(name=tensor.name, data_type=_data_type(tensor.data_type), dims=tensor.dims)


def _output(tensor: TensorConfig) -> Any:
    return pb.ModelOutput(
        name=tensor.name, data_type=_data_type(tensor.data_type), dims=tensor.dims
    )


def config_response(config: TritonModelConfig) -> Any:
    """A ``ModelConfigResponse`` for ``config`` (the fields twinfer has)."""
    message = pb.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        version_policy=pb.ModelVersionPolicy(latest=pb.ModelVersionPolicy.Latest(num_versions=1)),
        max_batch_size=config.max_batch_size,
        input=[_input(t) for t in config.inputs],
        output=[_output(t) for t in config.outputs],
        instance_group=[
            pb.ModelInstanceGroup(
                name=group.name,
                kind=pb.ModelInstanceGroup.Kind.Value(group.kind),
                count=group.count,
                gpus=group.gpus,
            )
            for group in config.instance_groups
        ],
    )
    if config.dynamic_batching is not None:
        # Its keys are the message's field names (preferred_batch_size...).
        message.dynamic_batching.CopyFrom(pb.ModelDynamicBatching(**config.dynamic_batching))
    return pb.ModelConfigResponse(config=message)


def index_response(models: Iterable[RepositoryModel]) -> Any:
    """A ``RepositoryIndexResponse``: each model's name, version, state and reason."""
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=m.name, version=m.version, state=m.state, reason=m.reason
            )
            for m in models
        ]
    )


def region_status_response(regions: Iterable[RegionInfo]) -> Any:
    """A ``SystemSharedMemoryStatusResponse``: the regions by name."""
    response = pb.SystemSharedMemoryStatusResponse()
    for region in regions:
        response.regions[region.name].CopyFrom(
            pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=region.name,
                key=region.key,
                offset=region.offset,
                byte_size=region.byte_size,
            )
        )
    return response
