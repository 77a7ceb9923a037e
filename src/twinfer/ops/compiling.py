"""Compiling a model at run time, off the reactor, for :class:`~twinfer.ops.control.Controller`.

:func:`compile_model` reads a model file, compiles it for its devices and
makes its engines (in a pool thread: it blocks); :func:`file_stamp` tells
whether a model file changed since it was loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from twinfer.config import AUTO, Config, ModelConfig
from twinfer.engines import openvino as backend
from twinfer.engines.openvino import Engine
from twinfer.errors import ErrorCode, TwinferError
from twinfer.registry import EngineFactory, LoadedModel, load_models


def file_stamp(path: str) -> tuple[float, int] | None:
    """``(mtime, size)`` of a model file (None for builtin models and missing files)."""
    if path.startswith("builtin:"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime, st.st_size)


def check_model_path(path: str) -> None:
    """Raise ``INVALID_INPUT`` unless ``path`` is a builtin model or a file."""
    if not path.startswith("builtin:") and not Path(path).is_file():
        raise TwinferError(ErrorCode.INVALID_INPUT, f"no such model file: {path}")


@attrs.frozen
class Compiled:
    """A model read and compiled, with its engines, ready to install."""

    loaded: LoadedModel
    #: Engines per device for workers that exist, or for new workers to create.
    engines: dict[str, list[Engine]]
    #: Latency engines per device likewise (``None`` where the model has none).
    latency: dict[str, list[Engine | None]]


def compile_model(
    config: Config, model: ModelConfig, counts: dict[str, int], engine_factory: EngineFactory
) -> Compiled:
    """Read and compile ``model`` and make its engines: ``counts[device]``
    of them on a device with workers, else as many as the device's replicas
    (or OpenVINO's optimal number).  Blocking: runs in a pool thread."""
    loaded = load_models(config)[model.name]
    engines: dict[str, list[Engine]] = {}
    latency: dict[str, list[Engine | None]] = {}
    for device in model.devices:
        count = counts.get(device)
        if count is None:
            replicas = config.device(device).replicas
            count = (
                backend.optimal_requests(loaded.compiled[device])
                if replicas == AUTO
                else int(replicas)
            )
        engines[device] = [engine_factory(loaded, device, i) for i in range(count)]
        fast = loaded.for_latency() if device in loaded.latency else None
        latency[device] = [
            None if fast is None else engine_factory(fast, device, i) for i in range(count)
        ]
    return Compiled(loaded, engines, latency)
