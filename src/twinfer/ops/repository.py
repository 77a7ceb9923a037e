"""The model repository as Triton's extensions see it, for every front end.

Triton's clients (``tritonclient.http``, ``tritonclient.grpc``) call a few
extensions besides inference: the repository index, model load and unload,
per-model statistics and the model configuration.  :class:`ModelRepository`
answers them once, as plain attrs objects; the HTTP front end
(:mod:`twinfer.frontends.http.extensions`) and the gRPC one translate these into
their own JSON or protobuf messages, so the two cannot disagree.  Failures
are :class:`~twinfer.errors.TwinferError` only, mapped per front end by
:mod:`twinfer.outcomes` (unknown model: 404 / ``NOT_FOUND``).

Load and unload change what is served through the
:class:`~twinfer.ops.control.Controller`, the same code path as the binary
protocol's ``ADMIN_REQUEST`` messages, and only when administration is on
(``--allow-admin``); otherwise they fail with :class:`AdminDisabled`.

What twinfer reports in Triton's terms:

* statistics come from the data plane's per-model counts
  (:class:`~twinfer.ops.stats.ModelStats`): ``success``/``fail`` are the
  requests answered and their end-to-end time, ``queue`` the time waiting for
  a device, ``compute_infer`` the device time (a request in a dynamic batch is
  charged the whole batch's time, as Triton does).  twinfer sets inputs and
  reads outputs inside that device time, so ``compute_input`` and
  ``compute_output`` carry the count with 0 ns.  ``inference_count`` is the
  successful requests (twinfer does not count the rows inside a request),
  ``execution_count`` the device executions (a batch counts once);
* the configuration's ``max_batch_size`` is the model's dynamic batching
  limit, 0 when batching is off (then ``dims`` are the whole shape, as in
  Triton; with batching, ``dims`` leave out the batch dimension);
  ``instance_group`` has one group per device, ``count`` its replicas.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, fail

from twinfer.config import Config, ModelConfig
from twinfer.dataplane import DataPlane
from twinfer.errors import ErrorCode, TwinferError
from twinfer.ops.stats import ModelStats
from twinfer.wire.messages import DType, TensorSpec

if TYPE_CHECKING:
    from twinfer.ops.control import Controller

__all__ = [
    "AdminDisabled",
    "BatchStatistics",
    "Duration",
    "InstanceGroup",
    "ModelRepository",
    "ModelStatistics",
    "RepositoryModel",
    "TensorConfig",
    "TritonModelConfig",
    "check_load_parameters",
    "triton_datatype",
]

#: The only version of each model twinfer serves.
MODEL_VERSION = "1"

#: Index states (Triton's names).
READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"

_TRITON_TYPES = {
    DType.BOOL: "TYPE_BOOL",
    DType.U8: "TYPE_UINT8",
    DType.U16: "TYPE_UINT16",
    DType.U32: "TYPE_UINT32",
    DType.U64: "TYPE_UINT64",
    DType.I8: "TYPE_INT8",
    DType.I16: "TYPE_INT16",
    DType.I32: "TYPE_INT32",
    DType.I64: "TYPE_INT64",
    DType.F16: "TYPE_FP16",
    DType.F32: "TYPE_FP32",
    DType.F64: "TYPE_FP64",
}


def triton_datatype(dtype: DType) -> str:
    """Triton's model-configuration type name (``"TYPE_FP32"``) for a wire type."""
    return _TRITON_TYPES.get(dtype, "TYPE_INVALID")


class AdminDisabled(TwinferError):
    """Load or unload asked of a server started without ``--allow-admin``.

    Its code is ``UNSUPPORTED_MESSAGE`` (as the binary protocol answers an
    ``ADMIN_REQUEST`` then); front ends that have a permission status use it
    (HTTP 403, gRPC ``PERMISSION_DENIED``).
    """

    def __init__(self, operation: str) -> None:
        super().__init__(
            ErrorCode.UNSUPPORTED_MESSAGE,
            f"{operation} is disabled on this server (start it with --allow-admin)",
        )


def check_load_parameters(names: Iterable[str]) -> None:
    """Refuse (``INVALID_INPUT``) a load request's parameters that would
    replace the model's configuration or files: twinfer loads models from
    its own configuration."""
    overrides = sorted(k for k in names if k == "config" or k.startswith("file:"))
    if overrides:
        raise TwinferError(
            ErrorCode.INVALID_INPUT,
            f"parameters {overrides}: twinfer loads models from its own configuration, "
            "not from a config or files sent with the request",
        )


@attrs.frozen
class RepositoryModel:
    """One entry of the repository index."""

    name: str
    #: ``"READY"``, ``"UNAVAILABLE"`` or ``"LOADING"``.
    state: str
    #: Why it is not ready (``""`` when it is).
    reason: str = ""
    version: str = MODEL_VERSION


@attrs.frozen
class Duration:
    """A count of events and their total time."""

    count: int = 0
    ns: int = 0


@attrs.frozen
class BatchStatistics:
    """Device executions of one batch size (rows)."""

    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@attrs.frozen
class ModelStatistics:
    """One model's statistics, in Triton's terms (see the module's docstring)."""

    name: str
    #: Milliseconds since the epoch of the last answered request (0: none yet).
    last_inference: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batch_stats: tuple[BatchStatistics, ...] = ()
    version: str = MODEL_VERSION


@attrs.frozen
class TensorConfig:
    """An input or output in the model configuration."""

    name: str
    #: ``"TYPE_FP32"``...
    data_type: str
    #: Dimensions without the batch dimension when the model batches; -1: dynamic.
    dims: tuple[int, ...]


@attrs.frozen
class InstanceGroup:
    """The replicas of one model on one device."""

    name: str
    #: ``"KIND_CPU"``, ``"KIND_GPU"`` or ``"KIND_MODEL"`` (any other target).
    kind: str
    count: int
    #: GPU indices for ``KIND_GPU`` (``GPU.1`` is 1, ``GPU`` 0).
    gpus: tuple[int, ...] = ()


@attrs.frozen
class TritonModelConfig:
    """A model's configuration, in Triton's terms (see the module's docstring)."""

    name: str
    max_batch_size: int
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    instance_groups: tuple[InstanceGroup, ...]
    platform: str = "openvino"
    backend: str = "openvino"
    #: Dynamic batching (None when off): ``preferred_batch_size`` and
    #: ``max_queue_delay_microseconds``, and the priority levels if several.
    dynamic_batching: Mapping[str, Any] | None = None


def _duration(count: int, seconds: float) -> Duration:
    return Duration(count, max(0, round(seconds * 1e9)))


def model_statistics(name: str, stats: ModelStats) -> ModelStatistics:
    """Triton's statistics for one model from the data plane's counts."""
    succeeded = stats.codes.get("OK", 0)
    failed = stats.count - succeeded
    ran = stats.compute.count
    nothing = Duration(ran, 0)
    batches = tuple(
        BatchStatistics(
            size,
            Duration(round(executions), 0),
            _duration(round(executions), seconds),
            Duration(round(executions), 0),
        )
        for size, (executions, seconds) in sorted(stats.by_batch.items())
    )
    return ModelStatistics(
        name=name,
        last_inference=round(stats.last_request * 1000),
        inference_count=succeeded,
        execution_count=stats.execution_count,
        success=_duration(succeeded, stats.latency.sum - stats.failed_seconds),
        fail=_duration(failed, stats.failed_seconds),
        queue=_duration(stats.queue.count, stats.queue.sum),
        compute_input=nothing,
        compute_infer=_duration(ran, stats.compute.sum),
        compute_output=nothing,
        batch_stats=batches,
    )


def _kind(target: str) -> tuple[str, tuple[int, ...]]:
    family, _, index = target.partition(".")
    if family == "CPU":
        return "KIND_CPU", ()
    if family == "GPU":
        return "KIND_GPU", (int(index) if index.isdigit() else 0,)
    return "KIND_MODEL", ()


class ModelRepository:
    """Triton's repository, statistics and configuration extensions over one server.

    ``controller`` (a :class:`~twinfer.ops.control.Controller`) knows the
    configured and unloaded models and performs load and unload; without one
    (a front end tested alone) the served models are those of ``models``
    and load/unload fail with :class:`AdminDisabled`.  ``allow_admin`` is
    ``--allow-admin``.  ``targets`` maps device names to their OpenVINO
    targets (``"CPU"``, ``"GPU.1"``...).
    """

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        controller: Controller | None = None,
        models: Mapping[str, ModelConfig] | None = None,
        targets: Mapping[str, str] | None = None,
        allow_admin: bool = False,
    ) -> None:
        self.dataplane = dataplane
        self.dispatcher = dataplane.dispatcher
        self.controller = controller
        self._models = dict(models or {})
        self._targets = dict(targets or {})
        if controller is not None:
            self._targets.update({d.name: d.target for d in controller.config.devices})
        self.allow_admin = allow_admin

    @classmethod
    def for_server(
        cls,
        dataplane: DataPlane,
        config: Config,
        *,
        controller: Controller | None = None,
        allow_admin: bool = False,
    ) -> ModelRepository:
        """The repository of a server running ``config``: one per server,
        shared by its front ends (HTTP and gRPC answer from the same one)."""
        return cls(
            dataplane,
            controller=controller,
            models={m.name: m for m in config.models},
            targets={d.name: d.target for d in config.devices},
            allow_admin=allow_admin,
        )

    # -- repository ---------------------------------------------------------

    def _configured(self) -> Mapping[str, ModelConfig]:
        """The models that should be served, by name."""
        if self.controller is not None:
            return self.controller.models
        return self._models

    def _unloaded(self) -> Mapping[str, ModelConfig]:
        return self.controller.unloaded if self.controller is not None else {}

    def index(self, ready_only: bool = False) -> list[RepositoryModel]:
        """Every model the server knows (served, being loaded, or unloaded),
        sorted by name, with its state; only the ready ones if ``ready_only``."""
        names = set(self._configured()) | set(self._unloaded()) | set(self.dispatcher.model_names())
        busy = self.controller.busy_with if self.controller is not None else ""
        entries = []
        for name in sorted(names):
            if self.dispatcher.model_ready(name):
                entry = RepositoryModel(name, READY)
            elif busy == f"load {name}":
                entry = RepositoryModel(name, LOADING, "being loaded")
            elif self.dispatcher.model(name) is None:
                entry = RepositoryModel(name, UNAVAILABLE, "unloaded")
            elif not self.dispatcher.started:
                entry = RepositoryModel(name, UNAVAILABLE, "the server is not started")
            else:
                entry = RepositoryModel(name, UNAVAILABLE, "no healthy device serves it")
            if entry.state == READY or not ready_only:
                entries.append(entry)
        return entries

    def load(self, name: str) -> Deferred[str]:
        """Load ``name`` (again): a model that is served is reloaded (compiled
        again and swapped in, no request fails), an unloaded one is loaded as
        it was last configured.

        Fires with the controller's one-line summary once the model serves;
        fails with :class:`AdminDisabled` without ``--allow-admin``,
        ``UNKNOWN_MODEL`` for a name the server never served, or what the
        load itself raised (``INVALID_INPUT``: the model file is gone...).
        """
        controller = self.controller
        if controller is None or not self.allow_admin:
            return fail(AdminDisabled("loading models"))
        if name in controller.models:
            return controller.reload(name)
        if name in controller.unloaded:
            return controller.restore(name)
        return fail(self._unknown(name))

    def unload(self, name: str) -> Deferred[str]:
        """Stop serving ``name`` (it stays in the index, ``UNAVAILABLE``).

        Fires with the controller's one-line summary once the requests it was
        running are answered (queued ones get ``UNAVAILABLE``); fails with
        :class:`AdminDisabled` without ``--allow-admin`` or ``UNKNOWN_MODEL``
        if it is not served.
        """
        controller = self.controller
        if controller is None or not self.allow_admin:
            return fail(AdminDisabled("unloading models"))
        if self.dispatcher.model(name) is None:
            return fail(self._unknown(name))
        return controller.unload(name)

    def _unknown(self, name: str) -> TwinferError:
        known = ", ".join(m.name for m in self.index()) or "none"
        return TwinferError(
            ErrorCode.UNKNOWN_MODEL, f"model {name!r} is not in the repository (models: {known})"
        )

    # -- statistics and configuration ---------------------------------------

    def statistics(self, name: str = "") -> list[ModelStatistics]:
        """Statistics of ``name``, or of every served model for ``""``.

        ``UNKNOWN_MODEL`` if ``name`` is not served.  A model reloaded keeps
        its counts; one never asked for reads all zeros.
        """
        if name:
            self.dispatcher.entry(name)  # UNKNOWN_MODEL
            names = [name]
        else:
            names = sorted(self.dispatcher.model_names())
        counted = self.dataplane.stats.models
        return [model_statistics(n, counted.get(n) or ModelStats()) for n in names]

    def config(self, name: str) -> TritonModelConfig:
        """The configuration ``name`` is served with; ``UNKNOWN_MODEL`` if it is not served."""
        entry = self.dispatcher.entry(name)
        policy = entry.batching
        batching = policy is not None
        metadata = entry.signature.metadata(name, entry.devices)

        def tensor(spec: TensorSpec) -> TensorConfig:
            dims = (-1,) if spec.shape is None else tuple(spec.shape)
            if batching and dims:
                dims = dims[1:]
            return TensorConfig(spec.name, triton_datatype(spec.dtype), dims)

        groups = []
        for device in entry.devices:
            workers = {
                worker
                for queue in entry.queues
                for worker in entry.workers_of.get(queue.name, ())
                if worker.device == device and worker.alive
            }
            kind, gpus = _kind(self._targets.get(device, ""))
            groups.append(InstanceGroup(f"{name}_{device}", kind, len(workers), gpus))
        dynamic: dict[str, Any] | None = None
        if policy is not None:
            dynamic = {
                "preferred_batch_size": list(policy.preferred_batch_sizes),
                "max_queue_delay_microseconds": round(policy.max_queue_delay * 1e6),
            }
            configured = self._configured().get(name)
            if configured is not None and configured.priority_levels > 1:
                # Triton's level 1 is the highest; twinfer's 1 the lowest.
                levels = configured.priority_levels
                dynamic["priority_levels"] = levels
                dynamic["default_priority_level"] = levels + 1 - configured.default_priority
        return TritonModelConfig(
            name=name,
            max_batch_size=policy.max_batch_size if policy is not None else 0,
            inputs=tuple(tensor(t) for t in metadata.inputs),
            outputs=tuple(tensor(t) for t in metadata.outputs),
            instance_groups=tuple(groups),
            dynamic_batching=dynamic,
        )
