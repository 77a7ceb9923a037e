"""Assemble the serving graph from a :class:`~twinfer.config.Config`.

Reads each model once, compiles it once per device it is placed on, gives
every device replica its own engine per model, and wires queues to workers:
one shared queue per model, or one queue per (model, device) for models with
``queue = "per-device"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import openvino as ov
from twisted.internet.interfaces import IReactorFromThreads

from twinfer.config import AUTO, QUEUE_SHARED, Config, DeviceConfig, ModelConfig
from twinfer.engines import openvino as backend
from twinfer.engines.openvino import Engine, OpenVINOEngine, Signature
from twinfer.scheduling import BatchPolicy, Dispatcher, JobQueue, ModelEntry, Worker
from twinfer.tasks import prepare


@attrs.frozen
class LoadedModel:
    """A model read and compiled for each of its devices."""

    name: str
    signature: Signature
    #: Compiled model per device name.
    compiled: Mapping[str, ov.CompiledModel]
    #: The image task (:class:`twinfer.tasks.ImageTask`) when the config sets one.
    task: Any = None


#: Makes the engine for one replica of one model on one device; tests swap
#: this to instrument the device.
EngineFactory = Callable[[LoadedModel, str, int], Engine]


def openvino_engine(model: LoadedModel, device: str, replica: int) -> Engine:
    """The real engine: one infer request on the device's compiled model."""
    return OpenVINOEngine(model.compiled[device], model.signature)


def load_models(config: Config, core: ov.Core | None = None) -> dict[str, LoadedModel]:
    """Read and compile every configured model; raises on the first failure.

    Errors are re-raised as ``ValueError`` naming the model and the device.
    """
    core = core or ov.Core()
    loaded: dict[str, LoadedModel] = {}
    for model_config in config.models:
        path = config.model_path(model_config)
        try:
            model = backend.read_model(core, path)
        except Exception as e:
            raise ValueError(f"model {model_config.name!r}: cannot read {path}: {e}") from e
        task = None
        if model_config.task is not None:
            try:
                # The image preprocessing becomes part of the compiled model.
                model, task = prepare(model_config.name, model, model_config.task)
            except Exception as e:
                raise ValueError(
                    f"model {model_config.name!r}: cannot set up task "
                    f"{model_config.task.kind!r}: {e}"
                ) from e
        try:
            if model_config.max_batch_size > 1:
                if task is not None:
                    raise ValueError("dynamic batching does not apply to image task models")
                make_batchable(model, model_config.max_batch_size)
            signature = Signature.of(model)
        except Exception as e:
            raise ValueError(f"model {model_config.name!r}: {e}") from e
        compiled = {}
        for device_name in model_config.devices:
            device = config.device(device_name)
            properties = {**device.properties, **model_config.properties}
            try:
                compiled[device_name] = backend.compile_model(
                    core, model, device.target, properties
                )
            except Exception as e:
                raise ValueError(
                    f"model {model_config.name!r}: cannot compile for device {device_name!r} "
                    f"({device.target}, properties {properties}): {e}"
                ) from e
        loaded[model_config.name] = LoadedModel(model_config.name, signature, compiled, task)
    return loaded


def make_batchable(model: ov.Model, max_batch_size: int) -> None:
    """Give every input a batch dimension ``1..max_batch_size`` (reshaping a
    static model at load time) and check every output follows it."""
    shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        if shape.rank.is_dynamic or len(shape) == 0:
            raise ValueError(f"input {port.any_name!r} has no batch dimension to batch along")
        if shape[0].is_static:
            shape[0] = ov.Dimension(1, max_batch_size)
            shapes[port] = shape
    if shapes:
        model.reshape(shapes)
    for port in model.outputs:
        shape = port.get_partial_shape()
        if shape.rank.is_dynamic or len(shape) == 0 or shape[0].is_static:
            raise ValueError(
                f"cannot batch: output {port.any_name!r} has shape {shape}, whose first "
                f"dimension does not follow the batch"
            )


def batch_policy(model_config: ModelConfig) -> BatchPolicy | None:
    """The model's dynamic batching policy, or ``None`` when batching is off."""
    if model_config.max_batch_size <= 1:
        return None
    return BatchPolicy(
        model_config.max_batch_size,
        model_config.max_queue_delay_us / 1e6,
        model_config.preferred_batch_sizes,
    )


def replica_counts(config: Config, loaded: Mapping[str, LoadedModel]) -> dict[str, int]:
    """Workers per device: the configured number, or OpenVINO's optimum for ``auto``."""
    counts = {}
    for device in config.devices:
        if device.replicas == AUTO:
            optimal = [
                backend.optimal_requests(m.compiled[device.name])
                for m in loaded.values()
                if device.name in m.compiled
            ]
            counts[device.name] = max(optimal, default=1)
        else:
            counts[device.name] = int(device.replicas)
    return counts


def make_queues(model_config: ModelConfig) -> dict[str, JobQueue]:
    """The model's queues by device: one shared queue, or one per device."""

    def new_queue(name: str) -> JobQueue:
        return JobQueue(
            name,
            model_config.queue_size,
            levels=model_config.priority_levels,
            aging=model_config.priority_aging_ms / 1000,
        )

    if model_config.queue == QUEUE_SHARED:
        shared = new_queue(model_config.name)
        return dict.fromkeys(model_config.devices, shared)
    return {d: new_queue(f"{model_config.name}@{d}") for d in model_config.devices}


def make_entry(
    model_config: ModelConfig, model: LoadedModel, queues: Mapping[str, JobQueue]
) -> ModelEntry:
    """The dispatcher's entry for a loaded model and its queues."""
    return ModelEntry(
        model.name,
        model.signature,
        model_config.devices,
        tuple(dict.fromkeys(queues.values())),  # distinct, in device order
        batching=batch_policy(model_config),
        default_timeout=model_config.default_timeout_ms / 1000,
        default_level=model_config.default_priority - 1,
        task=model.task,
    )


def make_worker(
    device: DeviceConfig,
    replica: int,
    reactor: IReactorFromThreads,
    engines: Mapping[str, Engine],
    queues: Sequence[JobQueue],
    models: Sequence[ModelConfig],
) -> Worker:
    """Replica ``replica`` of ``device``, serving ``models`` from ``queues``."""
    return Worker.on_own_thread(
        f"{device.name}#{replica}",
        device.name,
        reactor,
        engines,
        queues,
        batching={m.name: policy for m in models if (policy := batch_policy(m)) is not None},
        max_failures=device.max_consecutive_failures,
        probe_interval=device.health_check_interval_s,
    )


def build_dispatcher(
    config: Config,
    loaded: Mapping[str, LoadedModel],
    reactor: IReactorFromThreads,
    engine_factory: EngineFactory = openvino_engine,
) -> Dispatcher:
    """Create queues, workers and the dispatcher for ``loaded`` models."""
    entries: dict[str, ModelEntry] = {}
    # Device name -> the queues its workers take from.
    device_queues: dict[str, list[JobQueue]] = {d.name: [] for d in config.devices}
    for model_config in config.models:
        queues = make_queues(model_config)
        for device_name, queue in queues.items():
            device_queues[device_name].append(queue)
        entries[model_config.name] = make_entry(model_config, loaded[model_config.name], queues)

    workers = []
    counts = replica_counts(config, loaded)
    for device in config.devices:
        served = [m for m in config.models if device.name in m.devices]
        if not served:
            continue
        for replica in range(counts[device.name]):
            engines = {m.name: engine_factory(loaded[m.name], device.name, replica) for m in served}
            workers.append(
                make_worker(device, replica, reactor, engines, device_queues[device.name], served)
            )
    return Dispatcher(entries, workers, reactor)
