"""Assemble the serving graph from a :class:`~twinfer.config.Config`.

Reads each model once, compiles it once per device it is placed on, gives
every device replica its own engine per model, and wires queues to workers:
one shared queue per model, or one queue per (model, device) for models with
``queue = "per-device"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import openvino as ov
from twisted.internet.interfaces import IReactorFromThreads

from twinfer import backend
from twinfer.backend import Engine, OpenVINOEngine, Signature
from twinfer.config import AUTO, QUEUE_SHARED, Config
from twinfer.dispatcher import Dispatcher, JobQueue, ModelEntry, Worker
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
            signature = Signature.of(model)
        except Exception as e:
            raise ValueError(f"model {model_config.name!r}: cannot read {path}: {e}") from e
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


def build_dispatcher(
    config: Config,
    loaded: Mapping[str, LoadedModel],
    reactor: IReactorFromThreads,
    engine_factory: EngineFactory = openvino_engine,
) -> Dispatcher:
    """Create queues, workers and the dispatcher for ``loaded`` models."""
    entries: dict[str, ModelEntry] = {}
    # (device name) -> queues its workers take from, with the model each serves.
    device_queues: dict[str, list[JobQueue]] = {d.name: [] for d in config.devices}
    for model_config in config.models:
        model = loaded[model_config.name]
        if model_config.queue == QUEUE_SHARED:
            shared = JobQueue(model_config.name, model_config.queue_size)
            queues: tuple[JobQueue, ...] = (shared,)
            for device in model_config.devices:
                device_queues[device].append(shared)
        else:
            queues = tuple(
                JobQueue(f"{model_config.name}@{device}", model_config.queue_size)
                for device in model_config.devices
            )
            for device, queue in zip(model_config.devices, queues):
                device_queues[device].append(queue)
        entries[model.name] = ModelEntry(
            model.name, model.signature, model_config.devices, queues, model.task
        )

    workers = []
    counts = replica_counts(config, loaded)
    for device in config.devices:
        served = [m for m in config.models if device.name in m.devices]
        if not served:
            continue
        for replica in range(counts[device.name]):
            engines = {
                m.name: engine_factory(loaded[m.name], device.name, replica) for m in served
            }
            workers.append(
                Worker(
                    f"{device.name}#{replica}",
                    device.name,
                    reactor,
                    engines,
                    device_queues[device.name],
                )
            )
    return Dispatcher(entries, workers)
