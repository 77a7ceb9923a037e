"""twinfer's configuration: a TOML file parsed into attrs classes.

A wrong configuration stops start-up with one :class:`ConfigError` whose
message names the offending key (``models[1].devices``) and the problem.
See ``etc/twinfer.toml`` for a documented example.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from twinfer.wire.frames import DEFAULT_MAX_FRAME_SIZE

if TYPE_CHECKING:
    from twinfer.tasks.config import TaskConfig

#: ``replicas = "auto"``: as many as OpenVINO's OPTIMAL_NUMBER_OF_INFER_REQUESTS.
AUTO = "auto"
QUEUE_SHARED = "shared"
QUEUE_PER_DEVICE = "per-device"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem."""


@attrs.frozen
class ServerConfig:
    """Limits that apply to every connection."""

    #: Largest frame body accepted, in bytes; checked before buffering.
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    #: Requests one connection may have queued or running at once.
    max_inflight_per_connection: int = 1024
    #: Largest HTTP request body accepted, in bytes; checked (from
    #: ``Content-Length``, or as chunks arrive) before buffering.
    http_max_body_size: int = DEFAULT_MAX_FRAME_SIZE
    #: Seconds an HTTP connection may stay idle, and that a request body may
    #: take to arrive in full, before the connection is closed.
    http_timeout: int = 60
    #: Model that ``POST /inference`` uses without ``?model=``; None: the first model.
    http_default_model: str | None = None


@attrs.frozen
class DeviceConfig:
    """One device: an OpenVINO target and how many single-thread workers drive it."""

    name: str
    #: OpenVINO device name: ``CPU``, ``GPU``, ``GPU.1``, ``NPU``, ``AUTO``...
    target: str
    #: Worker count (each one thread, one infer request per model), or ``"auto"``.
    replicas: int | str = AUTO
    #: OpenVINO compile properties, e.g. ``{"PERFORMANCE_HINT": "THROUGHPUT"}``.
    properties: Mapping[str, str] = attrs.field(factory=dict)
    #: Failed inferences in a row that take a replica out of rotation.
    max_consecutive_failures: int = 3
    #: Seconds between health probes of an idle (or failed) replica; 0 = never.
    health_check_interval_s: float = 10.0


@attrs.frozen
class ModelConfig:
    """One served model."""

    name: str
    #: A model file (IR ``.xml``, ``.onnx``, ``.tflite``, ``.pdmodel``) or
    #: ``builtin:NAME`` (see :mod:`twinfer.builtin`).
    path: str
    #: Names of the devices that serve it.
    devices: tuple[str, ...]
    #: Jobs that may wait in one of its queues; beyond that, OVERLOADED.
    queue_size: int = 256
    #: ``"shared"``: one queue that all its devices take from (the default);
    #: ``"per-device"``: one queue per device, requests go to the shortest.
    queue: str = QUEUE_SHARED
    #: OpenVINO compile properties for this model, over its devices' own.
    properties: Mapping[str, str] = attrs.field(factory=dict)
    #: Dynamic batching: most rows per inference (1 = off).
    max_batch_size: int = 1
    #: Dynamic batching: microseconds a partial batch may wait for more.
    max_queue_delay_us: int = 500
    #: Dynamic batching: sizes launched at once without waiting.
    preferred_batch_sizes: tuple[int, ...] = ()
    #: Milliseconds a request may wait for a device when it names no timeout (0 = forever).
    default_timeout_ms: int = 0
    #: Number of priority levels (1 = no priorities).
    priority_levels: int = 1
    #: Level of requests that name none (1 = lowest).
    default_priority: int = 1
    #: Milliseconds after which a waiting request is taken before higher levels.
    priority_aging_ms: int = 100
    #: The image task (``task = "classify"`` or ``"detect"`` and its
    #: sub-tables, see :mod:`twinfer.tasks.config`); ``None`` for a plain model.
    task: TaskConfig | None = None


@attrs.frozen
class Config:
    """The whole configuration."""

    server: ServerConfig
    devices: tuple[DeviceConfig, ...]
    models: tuple[ModelConfig, ...]
    #: Directory that relative model paths are resolved against.
    base_dir: Path = Path(".")

    def device(self, name: str) -> DeviceConfig:
        """The device called ``name``."""
        return next(d for d in self.devices if d.name == name)

    def model_path(self, model: ModelConfig) -> str:
        """The model's path, resolved against the config file's directory."""
        if model.path.startswith("builtin:"):
            return model.path
        return str((self.base_dir / model.path).resolve())


def _check_keys(
    table: Mapping[str, Any], where: str, allowed: set[str], required: set[str]
) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(allowed))})")
    for key in required:
        if key not in table:
            raise ConfigError(f"{where}.{key}: required key is missing")


def _typed(table: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    value = table[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}.{key}: expected {names}, got {value!r}")
    return value


def _positive(table: Mapping[str, Any], key: str, where: str, default: int) -> int:
    if key not in table:
        return default
    value = _typed(table, key, where, int)
    if value < 1:
        raise ConfigError(f"{where}.{key}: must be at least 1, got {value}")
    return int(value)


def _name(table: Mapping[str, Any], where: str) -> str:
    name = _typed(table, "name", where, str)
    if not name or len(name) > 200 or any(c.isspace() for c in name):
        raise ConfigError(f"{where}.name: {name!r} must be 1-200 characters without spaces")
    return str(name)


def _properties(table: Mapping[str, Any], where: str) -> dict[str, str]:
    properties = table.get("properties", {})
    if not isinstance(properties, dict):
        raise ConfigError(f"{where}.properties: expected a table")
    for key, value in properties.items():
        if not isinstance(value, (str, int, bool, float)):
            raise ConfigError(f"{where}.properties.{key}: expected a scalar, got {value!r}")
    return {k: str(v) for k, v in properties.items()}


def _non_negative(table: Mapping[str, Any], key: str, where: str, default: float) -> float:
    if key not in table:
        return default
    value = _typed(table, key, where, (int, float))
    if isinstance(value, bool) or value < 0:
        raise ConfigError(f"{where}.{key}: must be a number >= 0, got {value!r}")
    return float(value)


def _scheduling(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The dynamic batching, deadline and priority keys of a model."""
    max_batch = _positive(table, "max_batch_size", where, 1)
    preferred = table.get("preferred_batch_sizes", [])
    if not isinstance(preferred, list) or not all(
        type(n) is int and 1 <= n <= max_batch for n in preferred
    ):
        raise ConfigError(
            f"{where}.preferred_batch_sizes: expected a list of sizes from 1 to "
            f"max_batch_size ({max_batch}), got {preferred!r}"
        )
    levels = _positive(table, "priority_levels", where, 1)
    if levels > 16:
        raise ConfigError(f"{where}.priority_levels: at most 16, got {levels}")
    default_priority = _positive(table, "default_priority", where, 1)
    if default_priority > levels:
        raise ConfigError(
            f"{where}.default_priority: must be between 1 and priority_levels ({levels}), "
            f"got {default_priority}"
        )
    return {
        "max_batch_size": max_batch,
        "max_queue_delay_us": int(_non_negative(table, "max_queue_delay_us", where, 500)),
        "preferred_batch_sizes": tuple(sorted(set(preferred))),
        "default_timeout_ms": int(_non_negative(table, "default_timeout_ms", where, 0)),
        "priority_levels": levels,
        "default_priority": default_priority,
        "priority_aging_ms": int(_non_negative(table, "priority_aging_ms", where, 100)),
    }


def parse_config(data: Mapping[str, Any], base_dir: Path = Path(".")) -> Config:
    """Build a :class:`Config` from parsed TOML, or raise :class:`ConfigError`."""
    _check_keys(data, "config", {"server", "devices", "models"}, {"devices", "models"})

    server_table = data.get("server", {})
    if not isinstance(server_table, dict):
        raise ConfigError("server: expected a table")
    _check_keys(
        server_table,
        "server",
        {
            "max_frame_size",
            "max_inflight_per_connection",
            "http_max_body_size",
            "http_timeout",
            "http_default_model",
        },
        set(),
    )
    default_model = None
    if "http_default_model" in server_table:
        default_model = _typed(server_table, "http_default_model", "server", str)
    server = ServerConfig(
        max_frame_size=_positive(server_table, "max_frame_size", "server", DEFAULT_MAX_FRAME_SIZE),
        max_inflight_per_connection=_positive(
            server_table, "max_inflight_per_connection", "server", 1024
        ),
        http_max_body_size=_positive(
            server_table, "http_max_body_size", "server", DEFAULT_MAX_FRAME_SIZE
        ),
        http_timeout=_positive(server_table, "http_timeout", "server", 60),
        http_default_model=default_model,
    )
    if server.max_frame_size > 0xFFFFFFFF:
        raise ConfigError("server.max_frame_size: at most 4294967295 (it travels as a u32)")

    if not isinstance(data["devices"], list) or not data["devices"]:
        raise ConfigError("devices: expected a non-empty array of tables ([[devices]])")
    devices: list[DeviceConfig] = []
    for i, table in enumerate(data["devices"]):
        where = f"devices[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        _check_keys(
            table,
            where,
            {
                "name",
                "target",
                "replicas",
                "properties",
                "max_consecutive_failures",
                "health_check_interval_s",
            },
            {"name", "target"},
        )
        name = _name(table, where)
        if any(d.name == name for d in devices):
            raise ConfigError(f"{where}.name: device {name!r} is defined twice")
        replicas: int | str = AUTO
        if "replicas" in table:
            replicas = _typed(table, "replicas", where, (int, str))
            if isinstance(replicas, str) and replicas != AUTO:
                raise ConfigError(
                    f'{where}.replicas: expected a number or "auto", got {replicas!r}'
                )
            if isinstance(replicas, int) and not 1 <= replicas <= 64:
                raise ConfigError(f"{where}.replicas: must be between 1 and 64, got {replicas}")
        properties = _properties(table, where)
        devices.append(
            DeviceConfig(
                name=name,
                target=_typed(table, "target", where, str),
                replicas=replicas,
                properties=properties,
                max_consecutive_failures=_positive(table, "max_consecutive_failures", where, 3),
                health_check_interval_s=_non_negative(
                    table, "health_check_interval_s", where, 10.0
                ),
            )
        )

    if not isinstance(data["models"], list) or not data["models"]:
        raise ConfigError("models: expected a non-empty array of tables ([[models]])")
    # Imported here: twinfer.tasks imports the serving stack, which imports this module.
    from twinfer.tasks.config import MODEL_KEYS as task_keys
    from twinfer.tasks.config import parse_task

    models: list[ModelConfig] = []
    known = [d.name for d in devices]
    for i, table in enumerate(data["models"]):
        where = f"models[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        _check_keys(
            table,
            where,
            {
                "name",
                "path",
                "devices",
                "queue_size",
                "queue",
                "properties",
                "max_batch_size",
                "max_queue_delay_us",
                "preferred_batch_sizes",
                "default_timeout_ms",
                "priority_levels",
                "default_priority",
                "priority_aging_ms",
            }
            | task_keys,
            {"name", "path"},
        )
        name = _name(table, where)
        if any(m.name == name for m in models):
            raise ConfigError(f"{where}.name: model {name!r} is defined twice")
        model_devices = table.get("devices", known[:1] if len(known) == 1 else None)
        if model_devices is None:
            raise ConfigError(f"{where}.devices: required when more than one device is defined")
        if (
            not isinstance(model_devices, list)
            or not model_devices
            or not all(isinstance(d, str) for d in model_devices)
        ):
            raise ConfigError(f"{where}.devices: expected a non-empty list of device names")
        for device in model_devices:
            if device not in known:
                raise ConfigError(
                    f"{where}.devices: unknown device {device!r} (defined: {', '.join(known)})"
                )
        if len(set(model_devices)) != len(model_devices):
            raise ConfigError(f"{where}.devices: a device is listed twice")
        queue = table.get("queue", QUEUE_SHARED)
        if queue not in (QUEUE_SHARED, QUEUE_PER_DEVICE):
            raise ConfigError(
                f'{where}.queue: expected "{QUEUE_SHARED}" or "{QUEUE_PER_DEVICE}", '
                f"got {queue!r}"
            )
        path = _typed(table, "path", where, str)
        if not path.startswith("builtin:") and not (base_dir / path).exists():
            raise ConfigError(f"{where}.path: no such file: {(base_dir / path)}")
        models.append(
            ModelConfig(
                name=name,
                path=path,
                devices=tuple(model_devices),
                queue_size=_positive(table, "queue_size", where, 256),
                queue=queue,
                properties=_properties(table, where),
                **_scheduling(table, where),
                task=parse_task(table, where, base_dir),
            )
        )
    names = [m.name for m in models]
    if server.http_default_model is not None and server.http_default_model not in names:
        raise ConfigError(
            f"server.http_default_model: unknown model {server.http_default_model!r} "
            f"(defined: {', '.join(names)})"
        )
    return Config(server, tuple(devices), tuple(models), base_dir)


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
