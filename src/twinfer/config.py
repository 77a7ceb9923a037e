"""twinfer's configuration: a TOML file structured into attrs classes by cattrs.

The file has an optional ``[server]`` table (:class:`ServerConfig`), one or
more ``[[devices]]`` (:class:`DeviceConfig`) and ``[[models]]``
(:class:`ModelConfig`; an image model's ``task`` keys are in
:mod:`twinfer.taskconfig`).  Each table's keys are its class's fields; their
types and ``Annotated`` checks say what each key takes (see
:mod:`twinfer.schema`).  A wrong configuration stops start-up with one
:class:`ConfigError` whose message names the offending key and the problem::

    models[1].devices: unknown device 'gpu' (defined: cpu)

See ``etc/twinfer.toml`` for a documented example using every key.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from twinfer.budget import DEFAULT_MAX_BUFFERED_BYTES
from twinfer.errors import ConfigError
from twinfer.schema import (
    Invalid,
    PositiveInt,
    Raw,
    a_table,
    at,
    at_least,
    at_most,
    between,
    config_errors,
    each,
    non_empty,
    one_of,
    rule,
    structure,
    table,
    unique,
)
from twinfer.taskconfig import MODEL_KEYS, TaskConfig, read_labels, structure_task
from twinfer.wire.frames import DEFAULT_MAX_FRAME_SIZE

#: ``replicas = "auto"``: as many as OpenVINO's OPTIMAL_NUMBER_OF_INFER_REQUESTS.
AUTO = "auto"
QUEUE_SHARED = "shared"
QUEUE_PER_DEVICE = "per-device"
#: ``execution``: a latency and a throughput engine, chosen per job by the load.
EXECUTION_ADAPTIVE = "adaptive"
#: ``execution``: the model compiled with ``PERFORMANCE_HINT = THROUGHPUT`` alone.
EXECUTION_THROUGHPUT = "throughput"
#: ``execution``: the model compiled with ``PERFORMANCE_HINT = LATENCY`` alone.
EXECUTION_LATENCY = "latency"
EXECUTIONS = (EXECUTION_ADAPTIVE, EXECUTION_THROUGHPUT, EXECUTION_LATENCY)
#: Properties that choose the engines themselves: when a device or a model
#: sets one, it is compiled once with exactly its properties.
EXPLICIT_EXECUTION_PROPERTIES = ("PERFORMANCE_HINT", "NUM_STREAMS")


_name = rule(
    lambda name: len(name) <= 200 and not any(c.isspace() for c in name),
    "{!r} must be 1-200 characters without spaces",
)


def _replicas(value: Any) -> int | str:
    if value == AUTO:
        return AUTO
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(f'expected a number or "auto", got {value!r}')
    return between(1, 64)(value)  # type: ignore[no-any-return]


def _properties(value: Any) -> dict[str, str]:
    """OpenVINO properties: a table of scalars, kept as text (``NUM_STREAMS = 2`` -> "2")."""
    scalar = rule(lambda v: isinstance(v, (str, int, float)), "expected a scalar, got {!r}")
    return {key: str(at(key, scalar, v)) for key, v in a_table(value).items()}


def _whole(value: Any) -> int:
    """A number >= 0, fractions dropped (a time in ms or us)."""
    structure(value, float)
    return int(at_least(0)(value))


def _execution(value: Any) -> str:
    return one_of(*EXECUTIONS)(value)  # type: ignore[no-any-return]


Name = Annotated[str, _name]
Execution = Annotated[str | None, Raw(_execution)]
Properties = Annotated[Mapping[str, str], Raw(_properties)]
Duration = Annotated[int, Raw(_whole)]


@attrs.frozen
class ServerConfig:
    """Limits that apply to every connection (the ``[server]`` table)."""

    #: Largest frame body accepted, in bytes; checked before buffering.
    max_frame_size: Annotated[int, at_least(1), at_most(0xFFFFFFFF, " (it travels as a u32)")] = (
        DEFAULT_MAX_FRAME_SIZE
    )
    #: Requests one connection may have queued or running at once.
    max_inflight_per_connection: PositiveInt = 1024
    #: Largest HTTP request body accepted, in bytes; checked (from
    #: ``Content-Length``, or as chunks arrive) before buffering.
    http_max_body_size: PositiveInt = DEFAULT_MAX_FRAME_SIZE
    #: Seconds an HTTP connection may stay idle, and that a request body may
    #: take to arrive in full, before the connection is closed.
    http_timeout: PositiveInt = 60
    #: Request bytes buffered at once over every connection and front end;
    #: beyond it reading pauses until requests are answered.
    max_buffered_bytes: PositiveInt = DEFAULT_MAX_BUFFERED_BYTES
    #: Seconds from an HTTP connection's start (or its previous response) in
    #: which a request's headers must arrive in full, else 408 and close.
    http_header_timeout: PositiveInt = 10
    #: Client connections each port (binary, HTTP) holds at once; the next
    #: one is refused at once (binary: ERROR OVERLOADED; HTTP: 503).
    max_connections: PositiveInt = 1024
    #: Seconds a binary connection may go without a frame while it has
    #: nothing in flight before it is closed; 0: never.
    idle_timeout: Annotated[int, at_least(0)] = 300
    #: Model that ``POST /inference`` uses without ``?model=``; None: the first model.
    http_default_model: str | None = None
    #: Connections a balancer should open to this node at once, advertised by
    #: the HAProxy agent (``--agent-port``) as ``maxconn:N``; 0: none advertised.
    #: Advisory: twinfer itself accepts connections beyond it.
    agent_maxconn: Annotated[int, at_least(0)] = 0
    #: Shared-memory regions (``--allow-shm``) one binary connection may
    #: register at once, and their byte sizes summed.
    shm_max_regions: PositiveInt = 16
    shm_max_bytes: PositiveInt = 256 * 1024 * 1024
    #: The same for the server-wide regions registered over HTTP or gRPC
    #: (Triton's semantics: every HTTP and gRPC client sees them).
    http_shm_max_regions: PositiveInt = 64
    http_shm_max_bytes: PositiveInt = 1024 * 1024 * 1024


@attrs.frozen
class DeviceConfig:
    """One device: an OpenVINO target and how many single-thread workers drive it."""

    name: Name
    #: OpenVINO device name: ``CPU``, ``GPU``, ``GPU.1``, ``NPU``, ``AUTO``...
    target: str
    #: Worker count (each one thread, one infer request per model), or ``"auto"``.
    replicas: Annotated[int | str, Raw(_replicas)] = AUTO
    #: OpenVINO compile properties, e.g. ``{"PERFORMANCE_HINT": "THROUGHPUT"}``.
    properties: Properties = attrs.field(factory=dict)
    #: Failed inferences in a row that take a replica out of rotation.
    max_consecutive_failures: PositiveInt = 3
    #: Seconds between health probes of an idle (or failed) replica; 0 = never.
    health_check_interval_s: Annotated[float, at_least(0)] = 10.0
    #: ``"adaptive"`` (a latency and a throughput engine, chosen per job by
    #: the load), ``"throughput"`` or ``"latency"`` (that hint alone); a
    #: model's own ``execution`` wins.  Default: adaptive on a CPU target,
    #: throughput elsewhere.  ``PERFORMANCE_HINT`` or ``NUM_STREAMS`` in
    #: ``properties`` win over both.
    execution: Execution = None
    #: Seconds each engine of an adaptive model is timed at load (0: not
    #: timed, both engines kept).
    tune_seconds: Annotated[float, between(0, 60)] = 0.5

    @property
    def default_execution(self) -> str:
        """This device's ``execution``, or the default for its target."""
        if self.execution is not None:
            return self.execution
        cpu = self.target.split(".")[0].upper() == "CPU"
        return EXECUTION_ADAPTIVE if cpu else EXECUTION_THROUGHPUT


@attrs.frozen
class ModelConfig:
    """One served model."""

    name: Name
    #: A model file (IR ``.xml``, ``.onnx``, ``.tflite``, ``.pdmodel``) or
    #: ``builtin:NAME`` (see :mod:`twinfer.engines.builtin`).
    path: str
    #: Names of the devices that serve it; may be left out when there is one device.
    devices: Annotated[tuple[str, ...], non_empty, unique] = ()
    #: Jobs that may wait in one of its queues; beyond that, OVERLOADED.
    queue_size: PositiveInt = 256
    #: ``"shared"``: one queue that all its devices take from (the default);
    #: ``"per-device"``: one queue per device, requests go to the shortest.
    queue: Annotated[str, one_of(QUEUE_SHARED, QUEUE_PER_DEVICE)] = QUEUE_SHARED
    #: OpenVINO compile properties for this model, over its devices' own.
    properties: Properties = attrs.field(factory=dict)
    #: ``"adaptive"``, ``"throughput"`` or ``"latency"`` on all its devices,
    #: over each device's own ``execution``.
    execution: Execution = None
    #: Dynamic batching: most rows per inference (1 = off).
    max_batch_size: PositiveInt = 1
    #: Dynamic batching: microseconds a partial batch may wait for more.
    max_queue_delay_us: Duration = 500
    #: Dynamic batching: sizes launched at once without waiting (1 to max_batch_size).
    preferred_batch_sizes: Annotated[tuple[int, ...], each(at_least(1))] = ()
    #: Milliseconds a request may wait for a device when it names no timeout (0 = forever).
    default_timeout_ms: Duration = 0
    #: Number of priority levels (1 = no priorities).
    priority_levels: Annotated[int, at_least(1), at_most(16)] = 1
    #: Level of requests that name none (1 = lowest).
    default_priority: PositiveInt = 1
    #: Milliseconds after which a waiting request is taken before higher levels.
    priority_aging_ms: Duration = 100
    #: The image task (``task = "classify"`` or ``"detect"`` and its
    #: sub-tables, see :mod:`twinfer.taskconfig`); ``None`` for a plain model.
    task: TaskConfig | None = None


def _check_model(model: ModelConfig, toml: Mapping[str, Any]) -> ModelConfig:
    """Keys that depend on each other, and the image task's keys in the same table."""
    largest = model.max_batch_size
    if any(n > largest for n in model.preferred_batch_sizes):
        raise Invalid(
            f"expected a list of sizes from 1 to max_batch_size ({largest}), "
            f"got {list(model.preferred_batch_sizes)}",
            "preferred_batch_sizes",
        )
    if model.default_priority > model.priority_levels:
        raise Invalid(
            f"must be between 1 and priority_levels ({model.priority_levels}), "
            f"got {model.default_priority}",
            "default_priority",
        )
    return attrs.evolve(
        model,
        preferred_batch_sizes=tuple(sorted(set(model.preferred_batch_sizes))),
        task=structure_task(toml),
    )


@attrs.frozen
class Config:
    """The whole configuration."""

    server: ServerConfig
    devices: Annotated[tuple[DeviceConfig, ...], non_empty]
    models: Annotated[tuple[ModelConfig, ...], non_empty]
    #: Directory that relative model paths are resolved against.
    base_dir: Path = Path(".")

    def device(self, name: str) -> DeviceConfig:
        """The device called ``name``."""
        return next(d for d in self.devices if d.name == name)

    def execution(self, model: ModelConfig, device_name: str) -> str:
        """How ``model`` runs on device ``device_name``: the model's
        ``execution``, else the device's, else the device's default; a hint or
        a stream count in the properties makes it ``"properties"``."""
        device = self.device(device_name)
        properties = {**device.properties, **model.properties}
        if any(key in properties for key in EXPLICIT_EXECUTION_PROPERTIES):
            return "properties"
        return model.execution or device.default_execution

    def model_path(self, model: ModelConfig) -> str:
        """The model's path, resolved against the config file's directory."""
        if model.path.startswith("builtin:"):
            return model.path
        return str((self.base_dir / model.path).resolve())


def _check_config(config: Config, _: Mapping[str, Any]) -> Config:
    """What one table cannot know: names defined twice, and names of other tables."""
    devices = [d.name for d in config.devices]
    models = [m.name for m in config.models]
    for kind, names in (("devices", devices), ("models", models)):
        for i, name in enumerate(names):
            if name in names[:i]:
                raise Invalid(f"{kind[:-1]} {name!r} is defined twice", kind, i, "name")
    default = config.server.http_default_model
    if default is not None and default not in models:
        message = f"unknown model {default!r} (defined: {', '.join(models)})"
        raise Invalid(message, "server", "http_default_model")
    for i, model in enumerate(config.models):
        if not model.devices and len(devices) != 1:
            raise Invalid("required when more than one device is defined", "models", i, "devices")
        for device in [d for d in model.devices if d not in devices]:
            message = f"unknown device {device!r} (defined: {', '.join(devices)})"
            raise Invalid(message, "models", i, "devices")
    return attrs.evolve(
        config,
        models=tuple(attrs.evolve(m, devices=m.devices or tuple(devices)) for m in config.models),
    )


table(ModelConfig, check=_check_model, omit={"task"}, extra=MODEL_KEYS)
table(Config, check=_check_config, omit={"base_dir"})


def _with_files(model: ModelConfig, base_dir: Path) -> ModelConfig:
    """``model`` with its model file checked and its labels read, relative to ``base_dir``."""
    if not model.path.startswith("builtin:"):
        try:
            found = (base_dir / model.path).exists()
        except OSError as e:  # a name too long, say: exists() only hides "not found"
            raise Invalid(f"cannot read {base_dir / model.path}: {e.strerror}", "path") from e
        if not found:
            raise Invalid(f"no such file: {base_dir / model.path}", "path")
    return attrs.evolve(model, task=model.task and read_labels(model.task, base_dir))


def parse_config(data: Mapping[str, Any], base_dir: Path = Path(".")) -> Config:
    """Build a :class:`Config` from parsed TOML, or raise :class:`ConfigError`."""
    with config_errors():
        config = structure({"server": {}, **data}, Config)
        models = (
            at(("models", i), lambda m: _with_files(m, base_dir), m)
            for i, m in enumerate(config.models)
        )
        return attrs.evolve(config, models=tuple(models), base_dir=base_dir)


def load_config(path: str | Path) -> Config:
    """Read and validate the TOML file at ``path``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    return loads_config(raw.decode("utf-8", "replace"), path.parent, str(path))


def loads_config(text: str, base_dir: Path = Path("."), origin: str = "<config>") -> Config:
    """Parse and validate TOML ``text``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{origin}: not valid TOML: {e}") from e
    return parse_config(data, base_dir)


def default_config() -> Config:
    """The embedded default: real SqueezeNet and ResNet-50 plus a tiny model on the CPU."""
    text = resources.files("twinfer").joinpath("default.toml").read_text("utf-8")
    return loads_config(text, Path("."), "embedded default config")
