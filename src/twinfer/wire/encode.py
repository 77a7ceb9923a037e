"""Writers: a message -> the chunks of its frame, one writer per message class.

:data:`WRITERS` maps each message class to its type byte and the function that
writes its body; :func:`encode_message` looks the message's class up, runs it
and puts the header in front.  The result is a list of chunks for
``writeSequence`` (or ``sendmsg``): tensor data are separate chunks that
reference the arrays' memory, never copies.  A message the protocol cannot
carry raises :class:`~twinfer.errors.CodecError`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from twinfer.errors import CodecError, ErrorCode
from twinfer.wire.frames import (
    ERROR_FIXED,
    FLAG_REGIONS,
    GOAWAY_FIXED,
    HELLO_FIXED,
    HELLO_MAGIC,
    INFER_REPLY_FIXED,
    INFER_REQUEST_FIXED,
    KIND_FRAME,
    KIND_REGION,
    MAX_NDIM,
    MAX_STR,
    PADDING,
    REGION_REF,
    U16,
    Chunk,
    aligned,
    frame_header,
)
from twinfer.wire.messages import (
    AdminReply,
    AdminRequest,
    Cancel,
    DType,
    Error,
    GetHealth,
    GetMetadata,
    GetRegionStatus,
    GoAway,
    Health,
    Hello,
    ImageRequest,
    InferReply,
    InferRequest,
    ListModels,
    Message,
    MessageType,
    Metadata,
    ModelList,
    Ping,
    Pong,
    Predictions,
    RegionRef,
    RegionStatus,
    RegionTensor,
    RegisterRegion,
    TensorSpec,
    UnregisterRegion,
)


def _string(value: str, field: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > MAX_STR:
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"{field} is longer than {MAX_STR} bytes")
    return U16.pack(len(raw)) + raw


#: Each wire type by its exact numpy dtype (little-endian where it matters).
_EXACT_DTYPES = {code.numpy: code for code in DType}


def wire_array(value: Any, name: str) -> tuple[DType, np.ndarray]:
    """Coerce ``value`` to a C-contiguous little-endian array of a wire dtype."""
    if type(value) is np.ndarray and value.flags.c_contiguous and value.ndim <= MAX_NDIM:
        # The usual case, a backend's output: already an array the wire carries as it is.
        known = _EXACT_DTYPES.get(value.dtype)
        if known is not None:
            return known, value
    array = np.asarray(value)
    try:
        dtype = DType.from_numpy(array.dtype)
    except (KeyError, TypeError):
        raise CodecError(
            ErrorCode.INVALID_DTYPE,
            f"tensor {name!r} has dtype {array.dtype}, which the protocol cannot carry",
        ) from None
    if array.ndim > MAX_NDIM:
        raise CodecError(ErrorCode.INVALID_SHAPE, f"tensor {name!r} has rank above {MAX_NDIM}")
    if array.dtype != dtype.numpy or not array.flags.c_contiguous:
        # (np.ascontiguousarray would turn a 0-d array into a 1-d one.)
        array = np.array(array, dtype=dtype.numpy, order="C")
    return dtype, array


def tensor_payload(array: np.ndarray) -> Chunk:
    """The raw bytes of a C-contiguous array, without copying.

    An array made by ``numpy.frombuffer`` over a ``bytes`` object (as the
    OpenVINO backend makes its outputs) yields that ``bytes`` object itself,
    which byte-only transports accept as it is.
    """
    base = array.base
    if type(base) is bytes and len(base) == array.nbytes:
        return base
    # reshape(-1) is a view for a C-contiguous array; .data is its memoryview.
    return array.reshape(-1).view(np.uint8).data


def _region_ref(ref: RegionRef) -> bytes:
    if not (0 <= ref.offset < 2**64 and 0 <= ref.byte_size < 2**64):
        raise CodecError(ErrorCode.INVALID_REGION, f"region {ref.region!r}: offset or size")
    return _string(ref.region, "region name") + REGION_REF.pack(ref.offset, ref.byte_size)


#: Tensor names as encoded on the wire, kept for the next frame (the same
#: few names recur in every request and reply of a model); bounded, so a
#: client sending ever new names cannot grow it.
_NAMES: dict[str, bytes] = {}
_MAX_NAMES = 1024
#: A tensor descriptor's dtype, rank and dims, by rank.
_DESCRIPTOR = tuple(struct.Struct(f"<BB{ndim}Q") for ndim in range(MAX_NDIM + 1))


def _tensors(
    tensors: Mapping[str, Any], prefix_len: int, kinds: bool = False
) -> tuple[bytes, list[Chunk]]:
    """Descriptors (as bytes, padded) and the data chunks of ``tensors``.

    ``prefix_len`` is the number of body bytes before the descriptors, so
    padding puts every tensor's data on an 8-byte boundary of the body.
    ``kinds`` (v2, :data:`FLAG_REGIONS`): each descriptor ends with its kind
    byte, and a :class:`RegionTensor` has a region reference and no data.
    """
    descriptors = bytearray()
    arrays = []
    for name, value in tensors.items():
        if type(value) is RegionTensor:
            if not kinds:
                raise CodecError(ErrorCode.INVALID_REGION, f"tensor {name!r}: region tensor")
            shape = value.shape
            descriptors += _string(name, "tensor name")
            descriptors += struct.pack(f"<BB{len(shape)}Q", value.dtype, len(shape), *shape)
            descriptors += bytes([KIND_REGION]) + _region_ref(value.ref)
            continue
        dtype, array = wire_array(value, name)
        encoded = _NAMES.get(name)
        if encoded is None:
            encoded = _string(name, "tensor name")
            if len(_NAMES) < _MAX_NAMES:
                _NAMES[name] = encoded
        descriptors += encoded
        descriptors += _DESCRIPTOR[array.ndim].pack(dtype, array.ndim, *array.shape)
        if kinds:
            descriptors.append(KIND_FRAME)
        arrays.append(array)
    offset = prefix_len + len(descriptors)
    descriptors += PADDING[: aligned(offset) - offset]
    chunks: list[Chunk] = []
    for array in arrays:
        if array.nbytes:
            chunks.append(tensor_payload(array))
        pad = aligned(array.nbytes) - array.nbytes
        if pad:
            chunks.append(PADDING[:pad])
    return bytes(descriptors), chunks


def _json(value: Any) -> list[Chunk]:
    return [json.dumps(value, separators=(",", ":")).encode("utf-8")]


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    shape = None if spec.shape is None else list(spec.shape)
    return {"name": spec.name, "dtype": spec.dtype.short_name, "shape": shape}


# -- one writer per message class: message -> body chunks ----------------------


def _write_empty(message: Any) -> list[Chunk]:
    return []


def _write_hello(message: Hello) -> list[Chunk]:
    fixed = HELLO_FIXED.pack(
        HELLO_MAGIC, message.min_version, message.max_version, message.max_frame_size
    )
    return [fixed + _string(message.agent, "agent")]


def _write_infer_request(message: InferRequest) -> list[Chunk]:
    if len(message.inputs) > 255 or len(message.outputs) > 255:
        raise CodecError(ErrorCode.INVALID_INPUT, "at most 255 inputs and 255 outputs")
    regions = message.uses_regions
    head = bytearray(_string(message.model, "model name"))
    head += INFER_REQUEST_FIXED.pack(
        message.timeout_ms,
        message.priority,
        len(message.inputs),
        len(message.outputs),
        FLAG_REGIONS if regions else 0,
    )
    for name in message.outputs:
        head += _string(name, "output name")
        if regions:
            ref = message.output_regions.get(name)
            head += bytes([KIND_FRAME]) if ref is None else bytes([KIND_REGION]) + _region_ref(ref)
    if set(message.output_regions) - set(message.outputs):
        raise CodecError(ErrorCode.INVALID_REGION, "output_regions names outputs not in outputs")
    descriptors, data = _tensors(message.inputs, len(head), regions)
    return [bytes(head) + descriptors, *data]


def _write_infer_reply(message: InferReply) -> list[Chunk]:
    if len(message.outputs) > 255:
        raise CodecError(ErrorCode.INVALID_INPUT, "at most 255 outputs")
    regions = any(type(v) is RegionTensor for v in message.outputs.values())
    fixed = INFER_REPLY_FIXED.pack(
        min(message.queue_us, 0xFFFFFFFF),
        min(message.compute_us, 0xFFFFFFFF),
        len(message.outputs),
        FLAG_REGIONS if regions else 0,
    )
    descriptors, data = _tensors(message.outputs, len(fixed), regions)
    return [fixed + descriptors, *data]


def _write_error(message: Error) -> list[Chunk]:
    # A message too long for a str field is cut (at a character boundary).
    text = message.message.encode("utf-8")[:MAX_STR].decode("utf-8", "ignore")
    return [ERROR_FIXED.pack(message.code) + _string(text, "error message")]


def _write_goaway(message: GoAway) -> list[Chunk]:
    if not 0 <= message.last_request_id < 2**64:
        raise CodecError(ErrorCode.MALFORMED_FRAME, "GOAWAY: last request id is not a u64")
    text = message.reason.encode("utf-8")[:MAX_STR].decode("utf-8", "ignore")
    return [GOAWAY_FIXED.pack(message.last_request_id) + _string(text, "reason")]


def _write_get_metadata(message: GetMetadata) -> list[Chunk]:
    return [_string(message.model, "model")]


def _write_model_list(message: ModelList) -> list[Chunk]:
    models = [
        {"name": m.name, "devices": list(m.devices), "ready": m.ready} for m in message.models
    ]
    return _json({"models": models})


def _write_metadata(message: Metadata) -> list[Chunk]:
    return _json(
        {
            "name": message.name,
            "inputs": [_spec_json(s) for s in message.inputs],
            "outputs": [_spec_json(s) for s in message.outputs],
            "devices": list(message.devices),
        }
    )


def _write_image_request(message: ImageRequest) -> list[Chunk]:
    names = _string(message.model, "model name") + _string(message.task, "task")
    image = message.image if type(message.image) is bytes else memoryview(message.image)
    return [names, image]


def _write_predictions(message: Predictions) -> list[Chunk]:
    return _json({"task": message.task, "predictions": [p.as_dict() for p in message.predictions]})


def _write_health(message: Health) -> list[Chunk]:
    return _json({"live": message.live, "ready": message.ready, "detail": message.detail})


def _write_admin_request(message: AdminRequest) -> list[Chunk]:
    return _json(
        {
            "op": message.op,
            "model": message.model,
            "path": message.path,
            "devices": list(message.devices),
            "device": message.device,
        }
    )


def _write_admin_reply(message: AdminReply) -> list[Chunk]:
    return _json({"message": message.message})


def _write_register_region(message: RegisterRegion) -> list[Chunk]:
    if not (0 <= message.offset < 2**64 and 0 <= message.byte_size < 2**64):
        raise CodecError(ErrorCode.INVALID_REGION, f"region {message.name!r}: offset or size")
    names = _string(message.name, "region name") + _string(message.key, "key")
    return [names + REGION_REF.pack(message.offset, message.byte_size)]


def _write_region_name(message: UnregisterRegion | GetRegionStatus) -> list[Chunk]:
    return [_string(message.name, "region name")]


def _write_region_status(message: RegionStatus) -> list[Chunk]:
    return _json(
        {
            "regions": [
                {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                for r in message.regions
            ]
        }
    )


#: Each message class's type byte and the writer of its body.
WRITERS: dict[type, tuple[MessageType, Callable[[Any], list[Chunk]]]] = {
    Hello: (MessageType.HELLO, _write_hello),
    Ping: (MessageType.PING, _write_empty),
    Pong: (MessageType.PONG, _write_empty),
    GoAway: (MessageType.GOAWAY, _write_goaway),
    InferRequest: (MessageType.INFER_REQUEST, _write_infer_request),
    InferReply: (MessageType.INFER_REPLY, _write_infer_reply),
    Cancel: (MessageType.CANCEL, _write_empty),
    ListModels: (MessageType.LIST_MODELS, _write_empty),
    ModelList: (MessageType.MODEL_LIST, _write_model_list),
    GetMetadata: (MessageType.GET_METADATA, _write_get_metadata),
    Metadata: (MessageType.METADATA, _write_metadata),
    ImageRequest: (MessageType.IMAGE_REQUEST, _write_image_request),
    Predictions: (MessageType.PREDICTIONS, _write_predictions),
    GetHealth: (MessageType.GET_HEALTH, _write_empty),
    Health: (MessageType.HEALTH, _write_health),
    AdminRequest: (MessageType.ADMIN_REQUEST, _write_admin_request),
    AdminReply: (MessageType.ADMIN_REPLY, _write_admin_reply),
    RegisterRegion: (MessageType.REGISTER_REGION, _write_register_region),
    UnregisterRegion: (MessageType.UNREGISTER_REGION, _write_region_name),
    GetRegionStatus: (MessageType.GET_REGION_STATUS, _write_region_name),
    RegionStatus: (MessageType.REGION_STATUS, _write_region_status),
    Error: (MessageType.ERROR, _write_error),
}


def encode_message(request_id: int, message: Message) -> list[Chunk]:
    """Encode ``message`` as a frame: a list of chunks for ``writeSequence``.

    The first chunk is the header; the body's small fields follow as one
    chunk and tensor data as separate chunks that reference the arrays'
    memory.  Raises ``TypeError`` for an object that is not a message.
    """
    try:
        mtype, write = WRITERS[type(message)]
    except KeyError:
        raise TypeError(f"not a twinfer message: {message!r}") from None
    body = write(message)
    return [frame_header(mtype, request_id, sum(len(c) for c in body)), *body]


def encode_bytes(request_id: int, message: Message) -> bytes:
    """Encode ``message`` as one ``bytes`` object (convenient for blocking I/O and tests)."""
    return b"".join(encode_message(request_id, message))
