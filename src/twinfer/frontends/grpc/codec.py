"""The KServe v2 gRPC messages <-> numpy tensors, sans-I/O.

Nothing here touches gRPC's server or Twisted: these functions turn a
``ModelInferRequest`` into the :class:`~twinfer.frontends.http.kserve.InferRequest`
the HTTP front end also builds (so both front ends hand the data plane the
same thing), and results back into ``ModelInferResponse`` messages, raising
:class:`~twinfer.errors.TwinferError` with the binary protocol's codes for
anything malformed.  Datatype names, the model version and the metadata
documents are :mod:`twinfer.frontends.http.kserve`'s, so the two front ends
cannot drift apart.

Copies: ``raw_input_contents`` arrive as ``bytes`` objects protobuf has
already copied out of the HTTP/2 frames; inputs are read-only numpy views of
them (``numpy.frombuffer``, no copy), and the device copies them into its
own tensor as it would any read-only array.  Typed ``contents`` are
converted from protobuf's repeated fields with one ``numpy.array`` call (a
copy, per element in C).  Each output is written once into the
``raw_output_contents`` bytes the response carries (``tobytes``), which
protobuf copies again when it serialises the response.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.grpc import grpc_service_pb2 as pb
from twinfer.frontends.http import kserve
from twinfer.sharedmem import region_ref
from twinfer.wire.messages import DType, Metadata, RegionRef, RegionTensor

__all__ = [
    "CONTENTS_FIELD",
    "decode_infer_request",
    "encode_infer_response",
    "model_metadata",
    "plain_parameters",
    "server_metadata",
]

#: The ``InferTensorContents`` field that holds each datatype's elements
#: (FP16 has none: it travels as raw bytes only, as on Triton).
CONTENTS_FIELD: dict[DType, str] = {
    DType.BOOL: "bool_contents",
    DType.I8: "int_contents",
    DType.I16: "int_contents",
    DType.I32: "int_contents",
    DType.I64: "int64_contents",
    DType.U8: "uint_contents",
    DType.U16: "uint_contents",
    DType.U32: "uint_contents",
    DType.U64: "uint64_contents",
    DType.F32: "fp32_contents",
    DType.F64: "fp64_contents",
}
#: Triton's request parameters twinfer obeys; others are ignored, as over HTTP.
_COUNT_PARAMETERS = ("timeout", "priority")


def _invalid(message: str) -> TwinferError:
    return TwinferError(ErrorCode.INVALID_INPUT, message)


def _parameter_count(parameters: Mapping[str, Any], key: str, what: str) -> int:
    """An integer request parameter (``timeout``, ``priority``), 0 if absent."""
    if key not in parameters:
        return 0
    value = parameters[key]
    choice = value.WhichOneof("parameter_choice")
    number = getattr(value, choice) if choice in ("int64_param", "uint64_param") else None
    if number is None or number < 0:
        shown = getattr(value, choice) if choice else None
        raise _invalid(f"request.parameters.{key}: expected {what} >= 0, got {shown!r}")
    return int(number)


def plain_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A tensor's ``InferParameter`` map as plain values (``int64_param`` 5 -> 5),
    as KServe's JSON has them, for the checks both front ends share."""
    plain = {}
    for key, value in parameters.items():
        choice = value.WhichOneof("parameter_choice")
        plain[key] = getattr(value, choice) if choice else None
    return plain


def _region(parameters: Mapping[str, Any], where: str) -> RegionRef | None:
    """Triton's shared-memory parameters of one tensor (tritonclient.grpc sends
    ``shared_memory_region`` as a string, offset and byte size as int64)."""
    if "shared_memory_region" not in parameters:
        return None
    return region_ref(plain_parameters(parameters), where)


def _shape(dims: Any, where: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise TwinferError(
            ErrorCode.INVALID_SHAPE, f"{where}.shape: dimensions must be >= 0, got {list(shape)}"
        )
    if len(shape) > 32:
        raise TwinferError(ErrorCode.INVALID_SHAPE, f"{where}.shape: more than 32 dimensions")
    return shape


def contents_to_array(
    contents: Any, dtype: DType, shape: tuple[int, ...], where: str
) -> np.ndarray:
    """The typed ``contents`` of an input as an array of ``dtype`` and ``shape``."""
    field = CONTENTS_FIELD.get(dtype)
    if field is None:
        raise TwinferError(
            ErrorCode.INVALID_DTYPE,
            f"{where}: {kserve.datatype_name(dtype)} has no typed contents field; "
            f"send it in raw_input_contents",
        )
    used = [f.name for f, _ in contents.ListFields()]
    if used and used != [field]:
        raise TwinferError(
            ErrorCode.INVALID_DTYPE,
            f"{where}: {kserve.datatype_name(dtype)} takes contents.{field}, "
            f"got contents.{', contents.'.join(used)}",
        )
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise TwinferError(
            ErrorCode.INVALID_SHAPE,
            f"{where}: shape [{','.join(map(str, shape))}] holds {count} elements, "
            f"contents.{field} has {len(values)}",
        )
    target = dtype.numpy
    # The field's own width (int64 for every signed kind, uint64 for the
    # unsigned ones): mixing them would make numpy go through float64.
    wide = np.array(values, dtype={"i": np.int64, "u": np.uint64}.get(target.kind))
    if count and target.kind in "iu":
        # int_contents is int32 for INT8 and INT16 too: check the range, never wrap.
        info = np.iinfo(target)
        low, high = wide.min(), wide.max()
        if low < info.min or high > info.max:
            raise _invalid(
                f"{where}: values {low}..{high} do not fit {kserve.datatype_name(dtype)}"
            )
    return wide.astype(target, copy=False).reshape(shape)


def decode_infer_request(request: Any) -> kserve.InferRequest:
    """Decode a ``ModelInferRequest``; raise :class:`TwinferError` if it is malformed.

    Inputs from ``raw_input_contents`` are read-only views of the message's
    bytes (see the module's docstring for the copies).
    """
    if not request.model_name:
        raise _invalid("request.model_name: empty")
    parameters = request.parameters
    timeout_us = _parameter_count(parameters, "timeout", "microseconds")
    priority = _parameter_count(parameters, "priority", "a level")
    if not request.inputs:
        raise _invalid("request.inputs: expected at least one tensor")
    raw = request.raw_input_contents
    # Inputs in a shared-memory region have no raw entry (tritonclient.grpc
    # appends one per input that carries its bytes): raw entries go, in
    # order, to the other inputs.
    regions = [
        _region(tensor.parameters, f"input {tensor.name!r}" if tensor.name else f"inputs[{i}]")
        for i, tensor in enumerate(request.inputs)
    ]
    carried = sum(region is None for region in regions)
    if raw and len(raw) != carried:
        raise _invalid(
            f"request.raw_input_contents: {len(raw)} entries for {carried} inputs not in "
            f"shared memory (when used, it holds every such input's bytes, in input order)"
        )
    raw_index = 0
    inputs: dict[str, Any] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        where = f"input {name!r}" if name else f"inputs[{i}]"
        if not name:
            raise _invalid(f"{where}.name: empty")
        if name in inputs:
            raise _invalid(f"{where} is given twice")
        shape = _shape(tensor.shape, where)
        dtype = kserve.parse_datatype(tensor.datatype, f"{where}.datatype")
        region = regions[i]
        if region is not None:
            if tensor.HasField("contents"):
                raise _invalid(f"{where}: has both a shared-memory region and contents")
            inputs[name] = RegionTensor(dtype, shape, region)
        elif raw:
            if tensor.HasField("contents"):
                raise _invalid(f"{where}: has both contents and raw_input_contents")
            data = memoryview(raw[raw_index])
            raw_index += 1
            inputs[name] = kserve.binary_to_array(data, dtype, shape, where)
        elif tensor.HasField("contents"):
            inputs[name] = contents_to_array(tensor.contents, dtype, shape, where)
        else:
            raise _invalid(f"{where}: has neither contents nor raw_input_contents")
    outputs: list[kserve.RequestedOutput] = []
    output_regions: dict[str, RegionRef] = {}
    for i, wanted in enumerate(request.outputs):
        if not wanted.name:
            raise _invalid(f"outputs[{i}].name: empty")
        where = f"output {wanted.name!r}"
        if "classification" in wanted.parameters:
            raise _invalid(f"{where}.parameters.classification: not supported by twinfer")
        if any(o.name == wanted.name for o in outputs):
            raise _invalid(f"{where} is requested twice")
        outputs.append(kserve.RequestedOutput(wanted.name, True))
        region = _region(wanted.parameters, where)
        if region is not None:
            output_regions[wanted.name] = region
    return kserve.InferRequest(
        inputs,
        tuple(outputs),
        request.id or None,
        True,
        timeout_us or None,
        priority,
        output_regions,
    )


def encode_infer_response(
    model: str, request: kserve.InferRequest, outputs: Mapping[str, np.ndarray]
) -> Any:
    """A ``ModelInferResponse`` carrying ``outputs`` (in the order asked for,
    else the model's) as ``raw_output_contents``, as Triton answers.

    An output written into a shared-memory region (a :class:`RegionTensor`)
    is described with its region parameters and an empty raw entry, so that
    each output's raw entry stays at its own index.
    """
    order = request.output_names or tuple(outputs)
    response = pb.ModelInferResponse(
        model_name=model, model_version=kserve.MODEL_VERSION, id=request.id or ""
    )
    raw = []
    for name in order:
        array = outputs[name]
        if type(array) is RegionTensor:  # written into shared memory: no data here
            tensor = response.outputs.add(
                name=name, datatype=kserve.datatype_name(array.dtype), shape=array.shape
            )
            ref = array.ref
            tensor.parameters["shared_memory_region"].string_param = ref.region
            tensor.parameters["shared_memory_offset"].int64_param = ref.offset
            tensor.parameters["shared_memory_byte_size"].int64_param = ref.byte_size
            raw.append(b"")
            continue
        try:
            datatype = kserve.datatype_name(DType.from_numpy(array.dtype))
        except KeyError:
            raise TwinferError(
                ErrorCode.INTERNAL, f"output {name!r} has unsupported dtype {array.dtype}"
            ) from None
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        raw.append(np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
    response.raw_output_contents.extend(raw)
    return response


def model_metadata(metadata: Metadata) -> Any:
    """A ``ModelMetadataResponse`` (-1 for dynamic dimensions; none for a dynamic rank)."""
    document = kserve.model_metadata(metadata)
    response = pb.ModelMetadataResponse(
        name=document["name"], versions=document["versions"], platform=document["platform"]
    )
    for key in ("inputs", "outputs"):
        for tensor in document[key]:
            getattr(response, key).add(
                name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"] or ()
            )
    return response


def server_metadata() -> Any:
    """A ``ServerMetadataResponse``: name, version and protocol extensions."""
    document = kserve.server_metadata()
    return pb.ServerMetadataResponse(
        name=document["name"], version=document["version"], extensions=document["extensions"]
    )
