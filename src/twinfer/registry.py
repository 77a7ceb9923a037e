"""Assemble the serving graph from a :class:`~twinfer.config.Config`.

Reads each model once, compiles it once per device it is placed on (twice
for ``execution = "adaptive"``: a latency and a throughput engine, timed at
load by :mod:`twinfer.engines.tuning`), gives every device replica its own
engine per model, one :class:`~twinfer.scheduling.execution.ExecutionPolicy`
per device, and wires queues to workers: one shared queue per model, or one
queue per (model, device) for models with ``queue = "per-device"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import openvino as ov
from twisted.internet.interfaces import IReactorFromThreads

from twinfer.config import (
    AUTO,
    EXECUTION_ADAPTIVE,
    EXECUTION_LATENCY,
    EXECUTION_THROUGHPUT,
    EXPLICIT_EXECUTION_PROPERTIES,
    QUEUE_SHARED,
    Config,
    DeviceConfig,
    ModelConfig,
)
from twinfer.engines import openvino as backend
from twinfer.engines.openvino import Engine, OpenVINOEngine, Signature
from twinfer.engines.tuning import Tuning, choose, sample_inputs, time_engine
from twinfer.scheduling import (
    BatchPolicy,
    Dispatcher,
    ExecutionPolicy,
    JobQueue,
    ModelEntry,
    Worker,
)
from twinfer.tasks import prepare


@attrs.frozen
class LoadedModel:
    """A model read and compiled for each of its devices."""

    name: str
    signature: Signature
    #: Compiled model per device name (the throughput engine of an adaptive model).
    compiled: Mapping[str, ov.CompiledModel]
    #: The image task (:class:`twinfer.tasks.ImageTask`) when the config sets one.
    task: Any = None
    #: The latency engine per device where the model runs adaptive.
    latency: Mapping[str, ov.CompiledModel] = attrs.field(factory=dict)
    #: How it runs per device: ``adaptive``, ``throughput``, ``latency`` or
    #: ``properties`` (compiled once with the configured properties).
    execution: Mapping[str, str] = attrs.field(factory=dict)
    #: What the load-time timing measured per device, where it ran.
    tuning: Mapping[str, Tuning] = attrs.field(factory=dict)

    def for_latency(self) -> LoadedModel:
        """This model with its latency engines as its compiled models, for an
        :data:`EngineFactory` to make the latency engines with."""
        return attrs.evolve(self, compiled=self.latency, latency={})


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
        compiled, latency, executions, timings = {}, {}, {}, {}
        for device_name in model_config.devices:
            device = config.device(device_name)
            execution = config.execution(model_config, device_name)
            engines = compile_engines(core, model, model_config, device, execution)
            if execution == EXECUTION_ADAPTIVE and device.tune_seconds > 0:
                timing = time_engines(engines, signature, device.tune_seconds)
                if timing is not None:
                    timings[device_name] = timing
                    execution = timing.choice
                    if execution != EXECUTION_ADAPTIVE:  # one wins on both: it alone
                        engines = {EXECUTION_THROUGHPUT: engines[execution]}
            compiled[device_name] = engines[EXECUTION_THROUGHPUT]
            if EXECUTION_LATENCY in engines:
                latency[device_name] = engines[EXECUTION_LATENCY]
            executions[device_name] = execution
        loaded[model_config.name] = LoadedModel(
            model_config.name, signature, compiled, task, latency, executions, timings
        )
    return loaded


def compile_engines(
    core: ov.Core, model: ov.Model, model_config: ModelConfig, device: DeviceConfig, execution: str
) -> dict[str, ov.CompiledModel]:
    """The compiled engines of ``model`` on ``device`` for ``execution``: the
    ``throughput`` one (the only one, whatever its hint, unless adaptive) and
    for ``adaptive`` the ``latency`` one."""
    properties = {**device.properties, **model_config.properties}
    hints = {EXECUTION_THROUGHPUT: "THROUGHPUT"}
    if execution == EXECUTION_LATENCY:
        hints = {EXECUTION_THROUGHPUT: "LATENCY"}
    elif execution == EXECUTION_ADAPTIVE:
        hints = {EXECUTION_THROUGHPUT: "THROUGHPUT", EXECUTION_LATENCY: "LATENCY"}
    elif execution != EXECUTION_THROUGHPUT:  # "properties": exactly as configured
        hints = {EXECUTION_THROUGHPUT: ""}
    engines = {}
    for role, hint in hints.items():
        with_hint = {**properties, "PERFORMANCE_HINT": hint} if hint else properties
        try:
            engines[role] = backend.compile_model(core, model, device.target, with_hint)
        except Exception as e:
            raise ValueError(
                f"model {model_config.name!r}: cannot compile for device {device.name!r} "
                f"({device.target}, properties {with_hint}): {e}"
            ) from e
    return engines


def time_engines(
    engines: Mapping[str, ov.CompiledModel], signature: Signature, seconds: float
) -> Tuning | None:
    """Time an adaptive model's two engines for about ``seconds`` each (see
    :mod:`twinfer.engines.tuning`); ``None`` when its inputs cannot be made up."""
    inputs = sample_inputs(signature)
    if inputs is None:
        return None
    through = engines[EXECUTION_THROUGHPUT]
    streams = backend.optimal_requests(through)
    timing = time_engine(through, inputs, streams, seconds)
    alone = time_engine(engines[EXECUTION_LATENCY], inputs, 1, seconds)
    return Tuning(choose(timing, alone), timing, alone)


def tune_model(
    config: Config, name: str, seconds: float, core: ov.Core | None = None
) -> dict[str, Tuning]:
    """Time model ``name``'s two engines on each of its devices for about
    ``seconds`` each, whatever its configured execution (a configured hint or
    stream count is left out, so that both engines are timed)."""
    [model] = [m for m in config.models if m.name == name]

    def unpinned(properties: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in properties.items() if k not in EXPLICIT_EXECUTION_PROPERTIES}

    devices = tuple(
        attrs.evolve(d, tune_seconds=seconds, properties=unpinned(d.properties))
        for d in config.devices
    )
    model = attrs.evolve(model, execution=EXECUTION_ADAPTIVE, properties=unpinned(model.properties))
    loaded = load_models(attrs.evolve(config, devices=devices, models=(model,)), core)
    return dict(loaded[name].tuning)


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
        execution=model.execution,
        tuning=model.tuning,
    )


def make_worker(
    device: DeviceConfig,
    replica: int,
    reactor: IReactorFromThreads,
    engines: Mapping[str, Engine],
    queues: Sequence[JobQueue],
    models: Sequence[ModelConfig],
    policy: ExecutionPolicy | None = None,
    latency_engines: Mapping[str, Engine | None] | None = None,
) -> Worker:
    """Replica ``replica`` of ``device``, serving ``models`` from ``queues``,
    sharing the device's execution ``policy``."""
    return Worker.on_own_thread(
        f"{device.name}#{replica}",
        device.name,
        reactor,
        engines,
        queues,
        batching={m.name: b for m in models if (b := batch_policy(m)) is not None},
        max_failures=device.max_consecutive_failures,
        probe_interval=device.health_check_interval_s,
        policy=policy,
        latency_engines=latency_engines,
    )


def make_policy(device: DeviceConfig, replicas: int, reactor: Any) -> ExecutionPolicy:
    """The execution policy shared by ``device``'s ``replicas`` workers: it
    enters THROUGHPUT mode when enough jobs wait to keep every stream busy."""
    return ExecutionPolicy(device.name, reactor, enter_waiting=max(2, replicas))


def latency_engines(
    models: Sequence[LoadedModel], device: str, replica: int, engine_factory: EngineFactory
) -> dict[str, Engine]:
    """Replica ``replica``'s latency engine per adaptive model on ``device``."""
    return {
        m.name: engine_factory(m.for_latency(), device, replica)
        for m in models
        if device in m.latency
    }


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
        policy = make_policy(device, counts[device.name], reactor)
        for replica in range(counts[device.name]):
            engines = {m.name: engine_factory(loaded[m.name], device.name, replica) for m in served}
            fast = latency_engines(
                [loaded[m.name] for m in served], device.name, replica, engine_factory
            )
            workers.append(
                make_worker(
                    device,
                    replica,
                    reactor,
                    engines,
                    device_queues[device.name],
                    served,
                    policy,
                    fast,
                )
            )
    return Dispatcher(entries, workers, reactor)
