"""The OpenVINO backend: reading formats, signatures, validation, running."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import openvino.opset13 as ops
import pytest
from onnx import TensorProto, helper

from support import save_identity_model
from twinfer.engines import builtin
from twinfer.engines import openvino as backend
from twinfer.errors import ErrorCode, TwinferError
from twinfer.wire.messages import DType, TensorSpec


@pytest.fixture(scope="module")
def core() -> ov.Core:
    return ov.Core()


def test_tiny_signature_publishes_dynamic_dims_as_minus_one() -> None:
    signature = backend.Signature.of(builtin.tiny_model())
    metadata = signature.metadata("tiny", ("cpu",))
    assert metadata.inputs == (TensorSpec("x", DType.F32, (-1, 4)),)
    assert metadata.outputs == (
        TensorSpec("y", DType.F32, (-1, 3)),
        TensorSpec("label", DType.I64, (-1,)),
    )


@pytest.mark.parametrize(
    ("inputs", "outputs", "code", "fragment"),
    [
        ({}, (), ErrorCode.INVALID_INPUT, "missing ['x']"),
        (
            {"x": np.ones((1, 4), np.float32), "z": np.ones(1, np.float32)},
            (),
            ErrorCode.INVALID_INPUT,
            "unexpected ['z']",
        ),
        (
            {"X": np.ones((1, 4), np.float32)},
            (),
            ErrorCode.INVALID_INPUT,
            "missing ['x'], unexpected ['X']",
        ),
        ({"x": np.ones((1, 4), np.float64)}, (), ErrorCode.INVALID_DTYPE, "takes f32, got f64"),
        (
            {"x": np.ones((1, 5), np.float32)},
            (),
            ErrorCode.INVALID_SHAPE,
            "takes shape [?,4], got [1,5]",
        ),
        ({"x": np.ones(4, np.float32)}, (), ErrorCode.INVALID_SHAPE, "got [4]"),
        ({"x": np.ones((1, 4), np.float32)}, ("z",), ErrorCode.UNKNOWN_OUTPUT, "no output 'z'"),
    ],
)
def test_validation_names_what_is_wrong(inputs, outputs, code, fragment) -> None:  # type: ignore[no-untyped-def]
    signature = backend.Signature.of(builtin.tiny_model())
    with pytest.raises(TwinferError) as e:
        signature.validate("tiny", inputs, outputs)
    assert e.value.code is code
    assert fragment in e.value.message and "'tiny'" in e.value.message


def test_validation_accepts_any_batch_for_a_dynamic_dimension() -> None:
    signature = backend.Signature.of(builtin.tiny_model())
    for batch in (0, 1, 7, 300):
        signature.validate("tiny", {"x": np.zeros((batch, 4), np.float32)}, ("y",))


def test_bounded_dimensions_are_checked() -> None:
    x = ops.parameter(ov.PartialShape([ov.Dimension(1, 8), 3]), ov.Type.f32, name="x")
    x.output(0).get_tensor().set_names({"x"})
    model = ov.Model([ops.relu(x).output(0)], [x])
    signature = backend.Signature.of(model)
    signature.validate("b", {"x": np.zeros((8, 3), np.float32)}, ())
    with pytest.raises(TwinferError, match=r"takes shape \[1..8,3\], got \[9,3\]"):
        signature.validate("b", {"x": np.zeros((9, 3), np.float32)}, ())


def test_unsupported_element_types_are_refused_at_load() -> None:
    x = ops.parameter(ov.PartialShape([2]), ov.Type.bf16, name="x")
    model = ov.Model([ops.relu(x).output(0)], [x])
    with pytest.raises(ValueError, match="element type bf16"):
        backend.Signature.of(model)


def test_reads_openvino_ir(tmp_path: Path, core: ov.Core) -> None:
    path = save_identity_model(tmp_path / "identity.xml", np.int16, [-1, 2])
    model = backend.read_model(core, str(path))
    assert backend.Signature.of(model).inputs[0].dtype is DType.I16


def test_reads_onnx_and_runs_it_like_openvino_does(tmp_path: Path, core: ov.Core) -> None:
    node = helper.make_node("Mul", ["a", "b"], ["c"])
    graph = helper.make_graph(
        [node],
        "mul",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 3]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", 3])],
    )
    path = tmp_path / "mul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    model = backend.read_model(core, str(path))
    signature = backend.Signature.of(model)
    compiled = backend.compile_model(core, model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    engine = backend.OpenVINOEngine(compiled, signature)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = engine.run({"a": a, "b": a}, ())
    np.testing.assert_array_equal(out["c"], a * a)


def test_engine_outputs_are_bytes_backed_copies(core: ov.Core) -> None:
    model = builtin.tiny_model()
    compiled = backend.compile_model(core, model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    engine = backend.OpenVINOEngine(compiled, backend.Signature.of(model))
    x1 = np.ones((2, 4), np.float32)
    first = engine.run({"x": x1}, ())
    kept = first["y"].copy()
    engine.run({"x": x1 * 10}, ())  # reuses the infer request's output memory
    np.testing.assert_array_equal(first["y"], kept)
    assert type(first["y"].base) is bytes
    np.testing.assert_allclose(first["y"], builtin.tiny_reference(x1)["y"], atol=1e-5)


def test_engine_returns_only_the_requested_outputs(core: ov.Core) -> None:
    model = builtin.tiny_model()
    compiled = backend.compile_model(core, model, "CPU", {})
    engine = backend.OpenVINOEngine(compiled, backend.Signature.of(model))
    assert list(engine.run({"x": np.ones((1, 4), np.float32)}, ("label",))) == ["label"]


def test_unknown_builtin_is_named(core: ov.Core) -> None:
    with pytest.raises(ValueError, match="unknown builtin model 'nope'"):
        backend.read_model(core, "builtin:nope")
