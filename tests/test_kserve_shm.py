"""KServe v2 bodies with Triton's shared-memory tensor parameters, in memory:
decoded into region references, answered without data, and precise errors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.http import kserve
from twinfer.wire.messages import DType, RegionRef, RegionTensor


def body(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]] | None = None) -> bytes:
    document: dict[str, Any] = {"inputs": inputs}
    if outputs is not None:
        document["outputs"] = outputs
    return json.dumps(document).encode()


def shm(region: str = "in", byte_size: Any = 32, **extra: Any) -> dict[str, Any]:
    return {"shared_memory_region": region, "shared_memory_byte_size": byte_size, **extra}


X = {"name": "x", "shape": [2, 4], "datatype": "FP32"}


def test_inputs_and_outputs_in_regions_are_decoded_as_references() -> None:
    request = kserve.decode_infer_request(
        body(
            [{**X, "parameters": shm(shared_memory_offset=64)}],
            [{"name": "y", "parameters": shm("out", 24)}, {"name": "label"}],
        )
    )
    assert request.inputs == {"x": RegionTensor(DType.F32, (2, 4), RegionRef("in", 64, 32))}
    assert request.output_regions == {"y": RegionRef("out", 0, 24)}
    assert request.output_names == ("y", "label") and request.uses_regions


def test_a_request_without_regions_does_not_use_them() -> None:
    data = {**X, "data": list(range(8))}
    assert not kserve.decode_infer_request(body([data])).uses_regions


@pytest.mark.parametrize(
    ("parameters", "text"),
    [
        (shm(region=7), "shared_memory_region: expected a string"),
        ({"shared_memory_region": "in"}, "shared_memory_byte_size: expected bytes >= 0, got None"),
        (shm(byte_size=-1), "shared_memory_byte_size: expected bytes >= 0"),
        (shm(shared_memory_offset=True), "shared_memory_offset: expected bytes >= 0"),
    ],
)
def test_bad_region_parameters_are_invalid_region(parameters: dict[str, Any], text: str) -> None:
    with pytest.raises(TwinferError) as e:
        kserve.decode_infer_request(body([{**X, "parameters": parameters}]))
    assert e.value.code is ErrorCode.INVALID_REGION and text in e.value.message


def test_a_region_and_data_together_are_refused() -> None:
    with pytest.raises(TwinferError) as e:
        kserve.decode_infer_request(body([{**X, "data": [0] * 8, "parameters": shm()}]))
    assert "both a shared-memory region and data" in e.value.message


def test_outputs_in_regions_are_answered_without_data() -> None:
    request = kserve.decode_infer_request(
        body([{**X, "data": list(range(8))}], [{"name": "y", "parameters": shm("out", 64)}])
    )
    written = RegionTensor(DType.F32, (2, 3), RegionRef("out", 0, 24))
    chunks, header = kserve.encode_infer_response("tiny", request, {"y": written})
    assert header is None
    [output] = json.loads(b"".join(chunks))["outputs"]
    assert output == {
        "name": "y",
        "datatype": "FP32",
        "shape": [2, 3],
        "parameters": {
            "shared_memory_region": "out",
            "shared_memory_offset": 0,
            "shared_memory_byte_size": 24,
        },
    }
    assert np.prod(output["shape"]) * 4 == 24
