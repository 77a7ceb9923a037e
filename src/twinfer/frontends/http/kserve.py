"""The KServe v2 / Open Inference Protocol REST mapping, sans-I/O.

Nothing here imports Twisted: these functions turn request bodies into numpy
inputs and results back into response bodies, and raise
:class:`~twinfer.errors.TwinferError` (with the same codes as the binary
protocol) for anything malformed.  :mod:`twinfer.frontends.http` does the I/O.

Two tensor encodings are supported, per tensor:

* JSON: ``"data"`` holds the elements in row-major order, flat or nested.
  Conversion uses ``numpy.asarray`` on the parsed list (one C loop, no
  per-element Python code) and checks the element kind and range, so a
  float never silently becomes an integer and an out-of-range integer never
  wraps.
* The binary tensor extension: the body starts with a JSON header of
  ``Inference-Header-Content-Length`` bytes, followed by the raw
  little-endian bytes of each input that declares
  ``parameters.binary_data_size``, in input order.  Those bytes are wrapped
  with ``numpy.frombuffer`` (no copy).  Outputs are sent the same way when
  asked for (``binary_data`` on a requested output, or the request-level
  ``binary_data_output`` parameter).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np

import twinfer
from twinfer.errors import ErrorCode, TwinferError
from twinfer.sharedmem import region_ref
from twinfer.wire.messages import DType, Metadata, RegionRef, RegionTensor, TensorSpec

#: The response header (and request header) that splits JSON from binary data.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: The only version each model has: twinfer serves one version per name.
MODEL_VERSION = "1"
#: Protocol extensions listed in server metadata (the repository, statistics
#: and configuration ones are :mod:`twinfer.frontends.http.extensions`).
EXTENSIONS = (
    "binary_tensor_data",
    "model_repository",
    "statistics",
    "model_configuration",
    "system_shared_memory",
)

_KSERVE_BY_DTYPE = {
    DType.BOOL: "BOOL",
    DType.U8: "UINT8",
    DType.U16: "UINT16",
    DType.U32: "UINT32",
    DType.U64: "UINT64",
    DType.I8: "INT8",
    DType.I16: "INT16",
    DType.I32: "INT32",
    DType.I64: "INT64",
    DType.F16: "FP16",
    DType.F32: "FP32",
    DType.F64: "FP64",
}
_DTYPE_BY_KSERVE = {name: dtype for dtype, name in _KSERVE_BY_DTYPE.items()}
#: Element kinds a JSON list may hold for each target kind ("f" accepts
#: integers: ``1`` is a fine FP32 value; "i"/"u" do not accept floats).
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


def datatype_name(dtype: DType) -> str:
    """The KServe datatype string (``"FP32"``) for a twinfer wire type."""
    return _KSERVE_BY_DTYPE[dtype]


def parse_datatype(name: object, where: str) -> DType:
    """The twinfer wire type for a KServe datatype string, or ``INVALID_DTYPE``."""
    try:
        return _DTYPE_BY_KSERVE[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise TwinferError(
            ErrorCode.INVALID_DTYPE,
            f"{where}: datatype {name!r} is not supported "
            f"(supported: {', '.join(sorted(_DTYPE_BY_KSERVE))})",
        ) from None


@attrs.frozen
class RequestedOutput:
    """An entry of the request's ``outputs``: a name and how to send it."""

    name: str
    #: True: raw bytes after the JSON header; False: JSON ``data``;
    #: None: as the request-level ``binary_data_output`` says.
    binary: bool | None = None


@attrs.frozen(eq=False)
class InferRequest:
    """A decoded ``POST .../infer`` body."""

    #: Arrays, or :class:`RegionTensor` for inputs in shared memory
    #: (``parameters.shared_memory_region``).
    inputs: dict[str, Any]
    #: The outputs asked for, in order; empty means every output.
    outputs: tuple[RequestedOutput, ...] = ()
    #: Echoed in the response when given.
    id: str | None = None
    #: Request-level ``binary_data_output``: the default for every output.
    binary_output: bool = False
    #: Triton's ``timeout`` request parameter, in microseconds (None: no deadline).
    timeout_us: int | None = None
    #: Triton's ``priority`` request parameter: 1 is the highest, 0 the default.
    priority: int = 0
    #: Outputs to write into shared-memory regions instead of the response.
    output_regions: dict[str, RegionRef] = attrs.field(factory=dict)

    @property
    def uses_regions(self) -> bool:
        """Whether a tensor is in a shared-memory region (``--allow-shm``)."""
        return bool(self.output_regions) or any(
            type(v) is RegionTensor for v in self.inputs.values()
        )

    @property
    def output_names(self) -> tuple[str, ...]:
        """The names for :meth:`twinfer.dataplane.DataPlane.infer`."""
        return tuple(o.name for o in self.outputs)


def _invalid(message: str) -> TwinferError:
    return TwinferError(ErrorCode.INVALID_INPUT, message)


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _parameters(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    return _object(table.get("parameters", {}), f"{where}.parameters")


def _flag(parameters: Mapping[str, Any], key: str, where: str) -> bool | None:
    if key not in parameters:
        return None
    value = parameters[key]
    if not isinstance(value, bool):
        raise _invalid(f"{where}.parameters.{key}: expected true or false, got {value!r}")
    return value


def _shape(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise TwinferError(
            ErrorCode.INVALID_SHAPE,
            f"{where}.shape: expected a list of non-negative integers, got {value!r}",
        )
    if len(value) > 32:
        raise TwinferError(ErrorCode.INVALID_SHAPE, f"{where}.shape: more than 32 dimensions")
    return tuple(value)


def split_body(
    body: bytes | bytearray | memoryview, header_length: str | None
) -> tuple[memoryview, memoryview]:
    """Split a request body into its JSON header and its binary part.

    ``header_length`` is the ``Inference-Header-Content-Length`` header value
    (None when absent: the whole body is JSON).
    """
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view) :]
    # isascii: str.isdigit() also accepts digits that int() refuses, such as '¹'.
    if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(view):
        raise _invalid(
            f"{HEADER_LENGTH}: expected a byte count between 0 and the body's "
            f"{len(view)} bytes, got {header_length!r}"
        )
    n = int(header_length)
    return view[:n], view[n:]


def decode_infer_request(
    body: bytes | bytearray | memoryview, header_length: str | None = None
) -> InferRequest:
    """Decode an infer request body; raise :class:`TwinferError` if it is malformed.

    Binary tensors are views of ``body`` (pass a writable buffer to get
    writable arrays that OpenVINO can share without copying).
    """
    header, binary = split_body(body, header_length)
    try:
        document = json.loads(bytes(header))
    except (ValueError, UnicodeDecodeError) as e:
        raise _invalid(f"the request body is not valid JSON: {e}") from None
    request = _object(document, "request")
    parameters = _parameters(request, "request")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _invalid(f"request.id: expected a string, got {request_id!r}")
    timeout = _count(parameters, "timeout", "microseconds")
    priority = _count(parameters, "priority", "a level")

    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _invalid("request.inputs: expected a non-empty list of tensors")
    inputs: dict[str, Any] = {}
    offset = 0
    for i, raw in enumerate(raw_inputs):
        where = f"inputs[{i}]"
        tensor = _object(raw, where)
        name = tensor.get("name")
        if not isinstance(name, str):
            raise _invalid(f"{where}.name: expected a string, got {name!r}")
        where = f"input {name!r}"
        if name in inputs:
            raise _invalid(f"{where} is given twice")
        shape = _shape(tensor.get("shape"), where)
        dtype = parse_datatype(tensor.get("datatype"), f"{where}.datatype")
        input_parameters = _parameters(tensor, where)
        region = region_ref(input_parameters, where)
        size = _binary_size(input_parameters, where)
        if region is not None:
            if "data" in tensor or size is not None:
                raise _invalid(f"{where}: has both a shared-memory region and data")
            inputs[name] = RegionTensor(dtype, shape, region)
        elif size is None:
            if "data" not in tensor:
                raise _invalid(f"{where}: has neither data nor parameters.binary_data_size")
            inputs[name] = json_to_array(tensor["data"], dtype, shape, where)
        else:
            if "data" in tensor:
                raise _invalid(f"{where}: has both data and parameters.binary_data_size")
            if offset + size > len(binary):
                raise _invalid(
                    f"{where}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} binary bytes left)"
                )
            inputs[name] = binary_to_array(binary[offset : offset + size], dtype, shape, where)
            offset += size
    if offset != len(binary):
        raise _invalid(
            f"the body has {len(binary) - offset} bytes after the last binary input "
            f"(check {HEADER_LENGTH} and binary_data_size)"
        )

    outputs: list[RequestedOutput] = []
    output_regions: dict[str, RegionRef] = {}
    raw_outputs = request.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise _invalid("request.outputs: expected a list")
    for i, raw in enumerate(raw_outputs):
        tensor = _object(raw, f"outputs[{i}]")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise _invalid(f"outputs[{i}].name: expected a string, got {name!r}")
        where = f"output {name!r}"
        output_parameters = _parameters(tensor, where)
        if "classification" in output_parameters:
            # Triton's classification extension changes what the output
            # holds; answering with plain tensors instead would be wrong.
            raise _invalid(f"{where}.parameters.classification: not supported by twinfer")
        if any(o.name == name for o in outputs):
            raise _invalid(f"{where} is requested twice")
        outputs.append(RequestedOutput(name, _flag(output_parameters, "binary_data", where)))
        region = region_ref(output_parameters, where)
        if region is not None:
            output_regions[name] = region
    return InferRequest(
        inputs,
        tuple(outputs),
        request_id,
        bool(_flag(parameters, "binary_data_output", "request")),
        timeout or None,
        priority or 0,
        output_regions,
    )


def _count(parameters: Mapping[str, Any], key: str, what: str) -> int | None:
    value = parameters.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise _invalid(f"request.parameters.{key}: expected {what} >= 0, got {value!r}")
    return value


def _binary_size(parameters: Mapping[str, Any], where: str) -> int | None:
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where}.parameters.binary_data_size: expected bytes >= 0, got {size!r}")
    return size


def json_to_array(data: object, dtype: DType, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Convert a JSON ``data`` list (flat or nested, row-major) to an array."""
    if not isinstance(data, list):
        raise _invalid(f"{where}.data: expected a list, got {type(data).__name__}")
    target = dtype.numpy
    count = math.prod(shape)
    try:
        # No dtype here: numpy infers the elements' kind (bool, int, float,
        # str...), which is then checked, so that "1.5" or 1.5 never turn
        # into an integer tensor silently.
        parsed = np.asarray(data)
    except (ValueError, OverflowError) as e:
        raise _invalid(f"{where}.data: not a regular array of numbers: {e}") from None
    if parsed.size != count:
        raise TwinferError(
            ErrorCode.INVALID_SHAPE,
            f"{where}: shape [{','.join(map(str, shape))}] holds {count} elements, "
            f"data has {parsed.size}",
        )
    if count == 0:
        return np.zeros(shape, target)
    if target == np.uint64 and parsed.dtype.kind in "fO":
        # Integers above 2**63 - 1 make numpy infer float64 (or object):
        # parse them exactly instead (a rare case, so per element is fine).
        parsed = _exact_u64(data, where)
    if parsed.dtype.kind not in _JSON_KINDS[target.kind]:
        kind = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}[target.kind]
        raise TwinferError(
            ErrorCode.INVALID_DTYPE,
            f"{where}.data: {datatype_name(dtype)} takes {kind}, got {_describe(parsed)}",
        )
    if target.kind in "iu":
        info = np.iinfo(target)
        low, high = parsed.min(), parsed.max()
        if low < info.min or high > info.max:
            raise _invalid(f"{where}.data: values {low}..{high} do not fit {datatype_name(dtype)}")
    return parsed.astype(target, copy=False).reshape(shape)


def _exact_u64(data: list[object], where: str) -> np.ndarray:
    values = np.array(data, dtype=object)
    if not all(type(v) is int for v in values.flat):
        raise TwinferError(
            ErrorCode.INVALID_DTYPE, f"{where}.data: UINT64 takes integers, got floats"
        )
    try:
        return values.astype(np.uint64)
    except OverflowError:
        raise _invalid(f"{where}.data: values do not fit UINT64") from None


def _describe(parsed: np.ndarray) -> str:
    kinds = {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "U": "strings"}
    return kinds.get(parsed.dtype.kind, "mixed values")


def binary_to_array(
    data: memoryview, dtype: DType, shape: tuple[int, ...], where: str
) -> np.ndarray:
    """Wrap raw little-endian bytes as an array of ``dtype`` and ``shape`` (no copy)."""
    itemsize = dtype.numpy.itemsize
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        raise TwinferError(
            ErrorCode.INVALID_SHAPE,
            f"{where}: shape [{','.join(map(str, shape))}] of {datatype_name(dtype)} takes "
            f"{expected} bytes, binary_data_size is {len(data)}",
        )
    array = np.frombuffer(data, dtype.numpy).reshape(shape)
    if not array.flags.aligned:
        # The JSON header has any length, so tensor bytes may start at any
        # offset; devices want aligned memory, so only these get copied.
        array = array.copy()
    return array


def array_to_json(array: np.ndarray) -> list[Any]:
    """The elements of ``array`` as a flat row-major list (numpy's C loop)."""
    return array.ravel().tolist()  # type: ignore[no-any-return]


def _tensor_bytes(array: np.ndarray) -> bytes:
    base = array.base
    if type(base) is bytes and len(base) == array.nbytes and array.flags.c_contiguous:
        return base  # the backend's own copy of the output: send it as it is
    return np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()


def encode_infer_response(
    model: str,
    request: InferRequest,
    outputs: Mapping[str, Any],
) -> tuple[list[bytes], int | None]:
    """The response body for ``outputs`` as byte chunks, and the JSON header length.

    The length is None when every output is JSON (no
    ``Inference-Header-Content-Length`` header is sent then).
    """
    order: Sequence[RequestedOutput] = request.outputs or [
        RequestedOutput(name) for name in outputs
    ]
    tensors = []
    binaries: list[bytes] = []
    for wanted in order:
        array = outputs[wanted.name]
        if type(array) is RegionTensor:  # written into shared memory: no data here
            ref = array.ref
            tensors.append(
                {
                    "name": wanted.name,
                    "datatype": datatype_name(array.dtype),
                    "shape": list(array.shape),
                    "parameters": {
                        "shared_memory_region": ref.region,
                        "shared_memory_offset": ref.offset,
                        "shared_memory_byte_size": ref.byte_size,
                    },
                }
            )
            continue
        try:
            datatype = datatype_name(DType.from_numpy(array.dtype))
        except KeyError:
            raise TwinferError(
                ErrorCode.INTERNAL, f"output {wanted.name!r} has unsupported dtype {array.dtype}"
            ) from None
        tensor: dict[str, Any] = {
            "name": wanted.name,
            "datatype": datatype,
            "shape": list(array.shape),
        }
        binary = request.binary_output if wanted.binary is None else wanted.binary
        if binary:
            data = _tensor_bytes(array)
            tensor["parameters"] = {"binary_data_size": len(data)}
            binaries.append(data)
        else:
            tensor["data"] = array_to_json(array)
        tensors.append(tensor)
    document: dict[str, Any] = {"model_name": model, "model_version": MODEL_VERSION}
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = tensors
    header = json.dumps(document, separators=(",", ":")).encode()
    if not binaries:
        return [header], None
    return [header, *binaries], len(header)


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    # A dynamic rank has no list of dimensions: null, as in twinfer's own metadata.
    shape = None if spec.shape is None else list(spec.shape)
    return {"name": spec.name, "datatype": datatype_name(spec.dtype), "shape": shape}


def model_metadata(metadata: Metadata) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the model's name, versions and tensors (-1: dynamic)."""
    return {
        "name": metadata.name,
        "versions": [MODEL_VERSION],
        "platform": "openvino",
        "inputs": [_tensor_metadata(t) for t in metadata.inputs],
        "outputs": [_tensor_metadata(t) for t in metadata.outputs],
    }


def server_metadata() -> dict[str, Any]:
    """``GET /v2``: the server's name, version and protocol extensions."""
    return {"name": "twinfer", "version": twinfer.__version__, "extensions": list(EXTENSIONS)}


def priority_level(model: str, priority: int, levels: int) -> int:
    """twinfer's priority level (1 lowest; 0: the default) for Triton's
    ``priority`` (1 highest) on a model whose queue has ``levels`` levels."""
    if not priority:
        return 0
    if priority > levels:
        raise TwinferError(
            ErrorCode.INVALID_INPUT,
            f"request.parameters.priority: model {model!r} has priorities 1 (highest) "
            f"to {levels}, got {priority}",
        )
    return levels + 1 - priority
