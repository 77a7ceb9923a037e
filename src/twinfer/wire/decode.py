"""Readers: a frame's body -> its message, one reader per message type.

:data:`READERS` maps each :class:`~twinfer.wire.messages.MessageType` to the
function that reads its body; :func:`decode_message` looks the frame's type up
and runs it.  Bad input raises :class:`~twinfer.errors.CodecError` and nothing
else.  Tensors are wrapped with ``numpy.frombuffer`` over the frame's body: no
per-element work and no copy (the field and tensor readers are in
:mod:`twinfer.wire.tensor_reader`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twinfer.errors import CodecError, ErrorCode
from twinfer.wire.frames import (
    ERROR_FIXED,
    FLAG_REGIONS,
    GOAWAY_FIXED,
    HELLO_FIXED,
    HELLO_MAGIC,
    INFER_REPLY_FIXED,
    INFER_REQUEST_FIXED,
    REGION_REF,
    Buffer,
    Frame,
)
from twinfer.wire.messages import (
    ADMIN_OPS,
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
    ModelInfo,
    ModelList,
    Ping,
    Pong,
    Prediction,
    Predictions,
    RegionInfo,
    RegionRef,
    RegionStatus,
    RegisterRegion,
    TensorSpec,
    UnregisterRegion,
)
from twinfer.wire.tensor_reader import Reader, read_kind, read_tensors


def _json_body(body: Buffer, what: str) -> dict[str, Any]:
    try:
        value = json.loads(bytes(body).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"{what} body is not UTF-8 JSON: {e}") from e
    if not isinstance(value, dict):
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"{what} body is not a JSON object")
    return value


def _spec_from_json(value: Any, what: str) -> TensorSpec:
    try:
        name, dtype, shape = value["name"], value["dtype"], value["shape"]
        if not (
            isinstance(name, str)
            and isinstance(dtype, str)
            and (
                shape is None
                or (isinstance(shape, list) and all(type(d) is int and d >= -1 for d in shape))
            )
        ):
            raise TypeError("wrong field types")
        return TensorSpec(name, DType.from_name(dtype), None if shape is None else tuple(shape))
    except (KeyError, TypeError) as e:
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"{what}: bad tensor spec {value!r}") from e


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"{what}: expected a list of strings")
    return tuple(value)


def _spec_list(value: Any, what: str) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list):
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"{what}: expected a list of tensor specs")
    return tuple(_spec_from_json(v, what) for v in value)


def decode_message(frame: Frame) -> Message:
    """Decode a frame's body into its message.

    Tensors in the result are views of ``frame.body`` (zero-copy).  Raises
    :class:`CodecError` with ``UNSUPPORTED_MESSAGE`` for an unknown type
    (the stream stays in sync) and ``MALFORMED_FRAME`` for a bad body.
    """
    try:
        mtype = MessageType(frame.type)
    except ValueError:
        raise CodecError(
            ErrorCode.UNSUPPORTED_MESSAGE, f"unknown message type 0x{frame.type:02x}"
        ) from None
    return READERS[mtype](Reader(frame.body, mtype.name))


def _decode_hello(r: Reader) -> Hello:
    magic, lo, hi, max_frame = r.unpack(HELLO_FIXED, "hello fields")
    if magic != HELLO_MAGIC:
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"HELLO magic is {magic!r}, expected b'TWNF'")
    agent = r.string("agent")
    r.end()
    return Hello(lo, hi, max_frame, agent)


def _decode_empty(cls: type) -> Any:
    def decode(r: Reader) -> Any:
        r.end()
        return cls()

    return decode


def _decode_infer_request(r: Reader) -> InferRequest:
    model = r.string("model name")
    timeout_ms, priority, n_in, n_out, flags = r.unpack(INFER_REQUEST_FIXED, "fixed fields")
    kinds = bool(flags & FLAG_REGIONS)
    names = []
    regions: dict[str, RegionRef] = {}
    for i in range(n_out):
        name = r.string(f"output name {i}")
        names.append(name)
        ref = read_kind(r, f"output {name!r}") if kinds else None
        if ref is not None:
            regions[name] = ref
    inputs = read_tensors(r, n_in, kinds)
    r.end()
    return InferRequest(model, inputs, tuple(names), timeout_ms, priority, regions)


def _decode_infer_reply(r: Reader) -> InferReply:
    queue_us, compute_us, n_out, flags = r.unpack(INFER_REPLY_FIXED, "fixed fields")
    outputs = read_tensors(r, n_out, bool(flags & FLAG_REGIONS))
    r.end()
    return InferReply(outputs, queue_us, compute_us)


def _decode_model_list(r: Reader) -> ModelList:
    body = _json_body(r.buf, r.what)
    models = body.get("models")
    if not isinstance(models, list):
        raise CodecError(ErrorCode.MALFORMED_FRAME, "MODEL_LIST: 'models' must be a list")
    infos = []
    for m in models:
        if not isinstance(m, dict) or not (
            isinstance(m.get("name"), str) and isinstance(m.get("ready"), bool)
        ):
            raise CodecError(ErrorCode.MALFORMED_FRAME, f"MODEL_LIST: bad entry {m!r}")
        infos.append(ModelInfo(m["name"], _str_tuple(m.get("devices"), r.what), m["ready"]))
    return ModelList(tuple(infos))


def _decode_get_metadata(r: Reader) -> GetMetadata:
    model = r.string("model name")
    r.end()
    return GetMetadata(model)


def _decode_metadata(r: Reader) -> Metadata:
    body = _json_body(r.buf, r.what)
    name = body.get("name")
    if not isinstance(name, str):
        raise CodecError(ErrorCode.MALFORMED_FRAME, "METADATA: 'name' must be a string")
    return Metadata(
        name,
        _spec_list(body.get("inputs"), r.what),
        _spec_list(body.get("outputs"), r.what),
        _str_tuple(body.get("devices"), r.what),
    )


def _decode_image_request(r: Reader) -> ImageRequest:
    model = r.string("model name")
    task = r.string("task")
    # The rest of the body is the image file, as a view (no copy).
    image = memoryview(r.buf)[r.pos :]
    return ImageRequest(model, image, task)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _decode_predictions(r: Reader) -> Predictions:
    body = _json_body(r.buf, r.what)
    task, entries = body.get("task"), body.get("predictions")
    if not isinstance(task, str) or not isinstance(entries, list):
        raise CodecError(
            ErrorCode.MALFORMED_FRAME, "PREDICTIONS: needs 'task' (string) and 'predictions' (list)"
        )
    predictions = []
    for p in entries:
        box = p.get("detection_box") if isinstance(p, dict) else None
        if not (
            isinstance(p, dict)
            and type(p.get("label_id")) is int
            and isinstance(p.get("label"), str)
            and _number(p.get("confidences"))
            and isinstance(box, list)
            and len(box) == 4
            and all(_number(v) for v in box)
        ):
            raise CodecError(ErrorCode.MALFORMED_FRAME, f"PREDICTIONS: bad entry {p!r}")
        predictions.append(
            Prediction(
                p["label_id"],
                p["label"],
                float(p["confidences"]),
                (float(box[0]), float(box[1]), float(box[2]), float(box[3])),
            )
        )
    return Predictions(task, tuple(predictions))


def _decode_health(r: Reader) -> Health:
    body = _json_body(r.buf, r.what)
    live, ready, detail = body.get("live"), body.get("ready"), body.get("detail", "")
    if not (isinstance(live, bool) and isinstance(ready, bool) and isinstance(detail, str)):
        raise CodecError(
            ErrorCode.MALFORMED_FRAME,
            "HEALTH: needs booleans 'live', 'ready' and a string 'detail'",
        )
    return Health(live, ready, detail)


def _decode_admin_request(r: Reader) -> AdminRequest:
    body = _json_body(r.buf, r.what)
    op = body.get("op")
    # Well-formed JSON that asks for something wrong is the request's error,
    # not the stream's: INVALID_INPUT keeps the connection.
    if op not in ADMIN_OPS:
        raise CodecError(
            ErrorCode.INVALID_INPUT,
            f"ADMIN_REQUEST: 'op' must be one of {', '.join(ADMIN_OPS)}, got {op!r}",
        )
    fields = {}
    for key in ("model", "path", "device"):
        value = body.get(key, "")
        if not isinstance(value, str):
            raise CodecError(ErrorCode.INVALID_INPUT, f"ADMIN_REQUEST: {key!r} must be a string")
        fields[key] = value
    devices = body.get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise CodecError(
            ErrorCode.INVALID_INPUT, "ADMIN_REQUEST: 'devices' must be a list of strings"
        )
    devices = tuple(devices)
    return AdminRequest(op, fields["model"], fields["path"], devices, fields["device"])


def _decode_admin_reply(r: Reader) -> AdminReply:
    body = _json_body(r.buf, r.what)
    message = body.get("message")
    if not isinstance(message, str):
        raise CodecError(ErrorCode.MALFORMED_FRAME, "ADMIN_REPLY: 'message' must be a string")
    return AdminReply(message)


def _decode_register_region(r: Reader) -> RegisterRegion:
    name = r.string("region name")
    key = r.string("key")
    offset, byte_size = r.unpack(REGION_REF, "offset and size")
    r.end()
    return RegisterRegion(name, key, offset, byte_size)


def _decode_region_name(cls: type) -> Any:
    def decode(r: Reader) -> Any:
        name = r.string("region name")
        r.end()
        return cls(name)

    return decode


def _decode_region_status(r: Reader) -> RegionStatus:
    body = _json_body(r.buf, r.what)
    entries = body.get("regions")
    if not isinstance(entries, list):
        raise CodecError(ErrorCode.MALFORMED_FRAME, "REGION_STATUS: 'regions' must be a list")
    regions = []
    for e in entries:
        if not (
            isinstance(e, dict)
            and isinstance(e.get("name"), str)
            and isinstance(e.get("key"), str)
            and type(e.get("offset")) is int
            and type(e.get("byte_size")) is int
        ):
            raise CodecError(ErrorCode.MALFORMED_FRAME, f"REGION_STATUS: bad entry {e!r}")
        regions.append(RegionInfo(e["name"], e["key"], e["offset"], e["byte_size"]))
    return RegionStatus(tuple(regions))


def _decode_goaway(r: Reader) -> GoAway:
    (last_request_id,) = r.unpack(GOAWAY_FIXED, "last request id")
    reason = r.string("reason")
    r.end()
    return GoAway(last_request_id, reason)


def _decode_error(r: Reader) -> Error:
    (code,) = r.unpack(ERROR_FIXED, "error code")
    message = r.string("error message")
    r.end()
    return Error(code, message)


#: The reader of each message type's body.
READERS: dict[MessageType, Callable[[Reader], Message]] = {
    MessageType.HELLO: _decode_hello,
    MessageType.PING: _decode_empty(Ping),
    MessageType.PONG: _decode_empty(Pong),
    MessageType.GOAWAY: _decode_goaway,
    MessageType.INFER_REQUEST: _decode_infer_request,
    MessageType.INFER_REPLY: _decode_infer_reply,
    MessageType.CANCEL: _decode_empty(Cancel),
    MessageType.LIST_MODELS: _decode_empty(ListModels),
    MessageType.MODEL_LIST: _decode_model_list,
    MessageType.GET_METADATA: _decode_get_metadata,
    MessageType.METADATA: _decode_metadata,
    MessageType.IMAGE_REQUEST: _decode_image_request,
    MessageType.PREDICTIONS: _decode_predictions,
    MessageType.GET_HEALTH: _decode_empty(GetHealth),
    MessageType.HEALTH: _decode_health,
    MessageType.ADMIN_REQUEST: _decode_admin_request,
    MessageType.ADMIN_REPLY: _decode_admin_reply,
    MessageType.REGISTER_REGION: _decode_register_region,
    MessageType.UNREGISTER_REGION: _decode_region_name(UnregisterRegion),
    MessageType.GET_REGION_STATUS: _decode_region_name(GetRegionStatus),
    MessageType.REGION_STATUS: _decode_region_status,
    MessageType.ERROR: _decode_error,
}
