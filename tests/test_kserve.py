"""The sans-I/O KServe v2 mapping: JSON and binary tensors in and out, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.http import kserve
from twinfer.wire.messages import DType, Metadata, TensorSpec


def body(document: object, *binaries: bytes) -> tuple[bytearray, str | None]:
    header = json.dumps(document).encode()
    if not binaries:
        return bytearray(header), None
    return bytearray(header + b"".join(binaries)), str(len(header))


def decode(document: object, *binaries: bytes) -> kserve.InferRequest:
    return kserve.decode_infer_request(*body(document, *binaries))


def error(document: object, *binaries: bytes) -> TwinferError:
    with pytest.raises(TwinferError) as info:
        decode(document, *binaries)
    return info.value


def tensor(name: str = "x", shape: list[int] | None = None, datatype: str = "FP32", **kw: object):
    return {"name": name, "shape": [2, 2] if shape is None else shape, "datatype": datatype, **kw}


def test_json_data_flat_and_nested_give_the_same_row_major_array() -> None:
    flat = decode({"inputs": [tensor(data=[1, 2.5, 3, 4])]})
    nested = decode({"inputs": [tensor(data=[[1, 2.5], [3, 4]])]})
    expected = np.array([[1, 2.5], [3, 4]], np.float32)
    for request in (flat, nested):
        array = request.inputs["x"]
        assert array.dtype == np.float32 and array.shape == (2, 2)
        np.testing.assert_array_equal(array, expected)


def test_every_datatype_decodes_from_json() -> None:
    for dtype in DType:
        name = kserve.datatype_name(dtype)
        data = [True, False] if dtype is DType.BOOL else [0, 1]
        array = decode({"inputs": [tensor(shape=[2], datatype=name, data=data)]}).inputs["x"]
        assert array.dtype == dtype.numpy
        np.testing.assert_array_equal(array, np.array(data, dtype.numpy))


@pytest.mark.parametrize(
    ("datatype", "data", "code", "needle"),
    [
        ("INT64", [1.5, 2], ErrorCode.INVALID_DTYPE, "INT64 takes integers, got floats"),
        ("FP32", ["1", "2"], ErrorCode.INVALID_DTYPE, "FP32 takes numbers, got strings"),
        ("BOOL", [1, 0], ErrorCode.INVALID_DTYPE, "BOOL takes booleans, got integers"),
        ("UINT8", [255, 256], ErrorCode.INVALID_INPUT, "values 255..256 do not fit UINT8"),
        ("INT8", [-129, 0], ErrorCode.INVALID_INPUT, "do not fit INT8"),
        ("FP32", [1, 2, 3], ErrorCode.INVALID_SHAPE, "holds 2 elements, data has 3"),
        ("FP32", [[1], [2, 3]], ErrorCode.INVALID_INPUT, "not a regular array"),
        ("BYTES", ["a", "b"], ErrorCode.INVALID_DTYPE, "datatype 'BYTES' is not supported"),
    ],
)
def test_bad_json_data_is_named_precisely(
    datatype: str, data: list[object], code: ErrorCode, needle: str
) -> None:
    e = error({"inputs": [tensor(shape=[2], datatype=datatype, data=data)]})
    assert e.code is code
    assert needle in e.message and "input 'x'" in e.message


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ([1, 2], "request: expected a JSON object"),
        ({}, "request.inputs: expected a non-empty list"),
        ({"inputs": [tensor(data=[1, 2, 3, 4]), tensor(data=[1, 2, 3, 4])]}, "given twice"),
        ({"inputs": [tensor()]}, "neither data nor parameters.binary_data_size"),
        ({"inputs": [tensor(shape=[-1], data=[])]}, "non-negative integers"),
        ({"inputs": [tensor(data=5)]}, "data: expected a list, got int"),
        ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, "inputs[0].name"),
        (
            {"inputs": [tensor(data=[1, 2, 3, 4])], "outputs": [{"name": "y"}, {"name": "y"}]},
            "requested twice",
        ),
        (
            {
                "inputs": [tensor(data=[1, 2, 3, 4])],
                "outputs": [{"name": "y", "parameters": {"classification": 3}}],
            },
            "classification: not supported",
        ),
        (
            {"inputs": [tensor(data=[1, 2, 3, 4])], "parameters": {"binary_data_output": 1}},
            "binary_data_output: expected true or false",
        ),
        ({"inputs": [tensor(data=[1, 2, 3, 4])], "parameters": {"timeout": -5}}, "timeout"),
        ({"inputs": [tensor(data=[1, 2, 3, 4])], "parameters": {"priority": "hi"}}, "priority"),
        ({"inputs": [tensor(data=[1, 2, 3, 4])], "id": 7}, "request.id: expected a string"),
    ],
)
def test_malformed_requests_are_invalid_input(document: object, needle: str) -> None:
    e = error(document)
    assert e.code in (ErrorCode.INVALID_INPUT, ErrorCode.INVALID_SHAPE)
    assert needle in e.message


def test_invalid_json_is_reported() -> None:
    with pytest.raises(TwinferError, match="not valid JSON") as info:
        kserve.decode_infer_request(b'{"inputs": [')
    assert info.value.code is ErrorCode.INVALID_INPUT


def test_binary_inputs_are_views_of_the_body_without_copy() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    flags = np.array([True, False], dtype=np.bool_)
    # Pad the JSON so that the tensor bytes start at an 8-byte boundary.
    document = {
        "inputs": [
            tensor(shape=[2, 4], parameters={"binary_data_size": x.nbytes}),
            tensor("flags", shape=[2], datatype="BOOL", parameters={"binary_data_size": 2}),
        ]
    }
    header = json.dumps(document).encode()
    header += b" " * (-len(header) % 8)
    raw = bytearray(header + x.tobytes() + flags.tobytes())
    request = kserve.decode_infer_request(raw, str(len(header)))
    np.testing.assert_array_equal(request.inputs["x"], x)
    np.testing.assert_array_equal(request.inputs["flags"], flags)
    assert np.shares_memory(request.inputs["x"], np.frombuffer(raw, np.uint8))
    assert request.inputs["x"].flags.writeable


def test_unaligned_binary_input_is_copied_to_aligned_memory() -> None:
    x = np.arange(4, dtype=np.float64)
    document = {
        "inputs": [tensor(shape=[4], datatype="FP64", parameters={"binary_data_size": x.nbytes})]
    }
    header = json.dumps(document).encode()
    header += b" " * ((-len(header) % 8) + 3)  # deliberately misaligned by 3 bytes
    raw = bytearray(header + x.tobytes())
    array = kserve.decode_infer_request(raw, str(len(header))).inputs["x"]
    assert array.flags.aligned
    np.testing.assert_array_equal(array, x)


@pytest.mark.parametrize(
    ("size", "binary", "header", "needle"),
    [
        (20, 12, None, "binary_data_size 20 runs past the end"),
        (12, 12, None, "shape [4] of FP32 takes 16 bytes, binary_data_size is 12"),
        (16, 20, None, "4 bytes after the last binary input"),
        (16, 16, "abc", "Inference-Header-Content-Length: expected a byte count"),
        (16, 16, "99999", "Inference-Header-Content-Length: expected a byte count"),
    ],
)
def test_inconsistent_binary_sizes_are_rejected(
    size: int, binary: int, header: str | None, needle: str
) -> None:
    document = {"inputs": [tensor(shape=[4], parameters={"binary_data_size": size})]}
    raw, header_length = body(document, bytes(binary))
    with pytest.raises(TwinferError) as info:
        kserve.decode_infer_request(raw, header or header_length)
    assert info.value.code in (ErrorCode.INVALID_INPUT, ErrorCode.INVALID_SHAPE)
    assert needle in info.value.message


def test_outputs_and_parameters_are_read() -> None:
    request = decode(
        {
            "id": "r1",
            "inputs": [tensor(data=[1, 2, 3, 4])],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "label"}],
            "parameters": {"binary_data_output": False, "timeout": 2500, "priority": 3},
        }
    )
    assert request.id == "r1"
    assert request.outputs == (
        kserve.RequestedOutput("y", True),
        kserve.RequestedOutput("label", None),
    )
    assert request.output_names == ("y", "label")
    assert request.timeout_us == 2500 and request.binary_output is False
    assert request.priority == 3


def parse_response(chunks: list[bytes], header_length: int | None) -> dict[str, np.ndarray]:
    """A minimal independent reader of the response format (JSON + binary tail)."""
    raw = b"".join(chunks)
    split = len(raw) if header_length is None else header_length
    document = json.loads(raw[:split])
    offset = split
    arrays = {}
    for output in document["outputs"]:
        dtype = DType.from_name(
            {v: k for k, v in kserve._KSERVE_BY_DTYPE.items()}[output["datatype"]].short_name
        ).numpy
        if "data" in output:
            arrays[output["name"]] = np.array(output["data"], dtype).reshape(output["shape"])
        else:
            size = output["parameters"]["binary_data_size"]
            arrays[output["name"]] = np.frombuffer(raw[offset : offset + size], dtype).reshape(
                output["shape"]
            )
            offset += size
    assert offset == len(raw)
    return arrays


def test_response_mixes_json_and_binary_outputs_as_requested() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3) / 3
    label = np.array([2, 1], dtype=np.int64)
    request = decode(
        {
            "inputs": [tensor(data=[1, 2, 3, 4])],
            "id": "abc",
            "outputs": [{"name": "label"}, {"name": "y", "parameters": {"binary_data": True}}],
        }
    )
    chunks, header_length = kserve.encode_infer_response("tiny", request, {"y": y, "label": label})
    assert header_length is not None
    document = json.loads(b"".join(chunks)[:header_length])
    assert document["model_name"] == "tiny" and document["id"] == "abc"
    assert [o["name"] for o in document["outputs"]] == ["label", "y"]
    got = parse_response(chunks, header_length)
    np.testing.assert_array_equal(got["y"], y)
    np.testing.assert_array_equal(got["label"], label)


def test_all_json_response_has_no_header_length() -> None:
    request = decode({"inputs": [tensor(data=[1, 2, 3, 4])]})
    chunks, header_length = kserve.encode_infer_response(
        "m", request, {"y": np.array([[1.5, 2.0]], np.float32)}
    )
    assert header_length is None
    assert json.loads(b"".join(chunks))["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2.0]}
    ]


dtypes = st.sampled_from([d for d in DType])


@given(dtype=dtypes, data=st.data(), binary=st.booleans())
def test_any_array_survives_a_round_trip(dtype: DType, data: st.DataObject, binary: bool) -> None:
    """Encode as a response, re-read it as a request's input: the same array comes back."""
    array = data.draw(
        hnp.arrays(
            dtype.numpy,
            hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4),
            elements={"allow_nan": False} if dtype.numpy.kind == "f" else None,
        )
    )
    request = kserve.InferRequest({}, (), None, binary)
    chunks, header_length = kserve.encode_infer_response("m", request, {"out": array})
    raw = b"".join(chunks)
    document = json.loads(raw[: header_length or len(raw)])
    output = document["outputs"][0]
    output["name"] = "x"
    decoded = kserve.decode_infer_request(
        bytearray(json.dumps({"inputs": [output]}).encode() + raw[header_length or len(raw) :]),
        None if header_length is None else str(len(json.dumps({"inputs": [output]}))),
    ).inputs["x"]
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_model_and_server_metadata() -> None:
    metadata = Metadata(
        "tiny",
        (TensorSpec("x", DType.F32, (-1, 4)),),
        (TensorSpec("y", DType.F32, (-1, 3)), TensorSpec("label", DType.I64, (-1,))),
    )
    assert kserve.model_metadata(metadata) == {
        "name": "tiny",
        "versions": ["1"],
        "platform": "openvino",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
    }
    assert kserve.server_metadata()["extensions"] == [
        "binary_tensor_data",
        "model_repository",
        "statistics",
        "model_configuration",
        "system_shared_memory",
    ]
