"""Helpers for the image-task tests: opset models with known outputs, encoded images."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from PIL import Image

from twinfer.config import loads_config
from twinfer.engines.openvino import OpenVINOEngine, Signature
from twinfer.tasks import ImageTask, prepare


def constant_outputs_model(
    input_shape: list[int], outputs: Mapping[str, np.ndarray], name: str = "known"
) -> ov.Model:
    """A model whose outputs are the given arrays, whatever the image.

    Each output is ``constant + 0 * mean(image)``: it depends on the input,
    so the graph really runs from the (preprocessed) image to the outputs,
    yet its values are exactly the known tensors the decoders are tested on.
    """
    image = ops.parameter(ov.PartialShape(input_shape), ov.Type.f32, name="image")
    image.output(0).get_tensor().set_names({"image"})
    axes = ops.constant(np.arange(len(input_shape), dtype=np.int64))
    zero = ops.multiply(ops.reduce_mean(image, axes, keep_dims=False), ops.constant(np.float32(0)))
    results = []
    for out_name, value in outputs.items():
        node = ops.add(ops.constant(np.asarray(value, np.float32)), zero)
        node.output(0).get_tensor().set_names({out_name})
        results.append(node.output(0))
    return ov.Model(results, [image], name)


def task_config(toml: str, base_dir: str = ".") -> object:
    """The TaskConfig of a one-model config whose ``[[models]]`` body is ``toml``."""
    from pathlib import Path

    text = (
        '[[devices]]\nname = "cpu"\ntarget = "CPU"\n\n'
        f'[[models]]\nname = "m"\npath = "builtin:tiny"\n{toml}'
    )
    return loads_config(text, Path(base_dir)).models[0].task


def runnable(model: ov.Model, toml: str, base_dir: str = ".") -> tuple[ImageTask, OpenVINOEngine]:
    """Prepare ``model`` for the task configured by ``toml`` and compile it on the CPU."""
    config = task_config(toml, base_dir)
    prepared, task = prepare("m", model, config)  # type: ignore[arg-type]
    compiled = ov.Core().compile_model(prepared, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return task, OpenVINOEngine(compiled, Signature.of(prepared))


def png(pixels: np.ndarray) -> bytes:
    """``pixels`` (u8 HxWx3) encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def blank_png(width: int, height: int, colour: tuple[int, int, int] = (90, 120, 150)) -> bytes:
    """A plain image of ``width`` x ``height``."""
    return png(np.full((height, width, 3), colour, np.uint8))
