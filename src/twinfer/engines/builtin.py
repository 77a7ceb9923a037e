"""Models twinfer can serve without any file: ``path = "builtin:NAME"``.

``squeezenet`` and ``resnet50`` are the real architectures the ``onnx``
package ships as "light" test models (placeholder weights, so the outputs are
uniform, but every layer runs); ``tiny`` is a small dense layer built here
with OpenVINO's opset, with known weights, so its answers can be checked by
hand.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops

PREFIX = "builtin:"


def onnx_light_model_path(name: str) -> Path:
    """Path of ``light_<name>.onnx`` inside the installed ``onnx`` package."""
    import onnx  # imported lazily: only the builtin models need it

    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    if not path.exists():
        raise FileNotFoundError(f"the installed onnx package has no {path.name}")
    return path


#: Weights of the ``tiny`` model (x @ TINY_WEIGHTS + TINY_BIAS).
TINY_WEIGHTS = np.array(
    [[1.0, 0.0, -1.0], [0.5, 1.0, 0.0], [0.0, -0.5, 2.0], [0.25, 0.25, 0.25]], dtype=np.float32
)
TINY_BIAS = np.array([0.0, 0.5, -0.5], dtype=np.float32)


def tiny_model() -> ov.Model:
    """``x`` f32 [?, 4] -> ``y`` = x @ W + b (f32 [?, 3]) and ``label`` = argmax(y) (i64 [?])."""
    x = ops.parameter(ov.PartialShape([-1, 4]), ov.Type.f32, name="x")
    x.output(0).get_tensor().set_names({"x"})
    y = ops.add(ops.matmul(x, ops.constant(TINY_WEIGHTS), False, False), ops.constant(TINY_BIAS))
    y.output(0).get_tensor().set_names({"y"})
    top = ops.topk(
        y,
        ops.constant(np.int64(1)),
        axis=1,
        mode="max",
        sort="value",
        index_element_type=ov.Type.i64,
    )
    label = ops.squeeze(top.output(1), ops.constant(np.array([1], dtype=np.int64)))
    label.output(0).get_tensor().set_names({"label"})
    return ov.Model([y.output(0), label.output(0)], [x], "tiny")


def tiny_reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """What ``tiny`` computes, in numpy (for tests and the docs)."""
    y = x.astype(np.float32) @ TINY_WEIGHTS + TINY_BIAS
    return {"y": y, "label": y.argmax(axis=1).astype(np.int64)}


_BUILDERS: dict[str, Callable[[ov.Core], ov.Model]] = {
    "tiny": lambda core: tiny_model(),
    "squeezenet": lambda core: core.read_model(onnx_light_model_path("squeezenet")),
    "resnet50": lambda core: core.read_model(onnx_light_model_path("resnet50")),
}

#: Names accepted after ``builtin:``.
NAMES = tuple(sorted(_BUILDERS))


def read_builtin(core: ov.Core, path: str) -> ov.Model:
    """Build or read the builtin model named by ``path`` (``builtin:NAME``)."""
    name = path[len(PREFIX) :]
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown builtin model {name!r} (known: {', '.join(NAMES)})") from None
    return builder(core)
