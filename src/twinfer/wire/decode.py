"""Readers: a frame's body -> its message, one reader per message type.

:data:`READERS` maps each :class:`~twinfer.wire.messages.MessageType` to the
function that reads its body; :func:`decode_message` looks the frame's type up
and runs it.  Bad input raises :class:`~twinfer.errors.CodecError` and nothing
else.  Tensors are wrapped with ``numpy.frombuffer`` over the frame's body: no
per-element work and no copy.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
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
    REGION_REF,
    U8,
    U16,
    U64,
    Buffer,
    Frame,
    aligned,
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
    RegionTensor,
    RegisterRegion,
    TensorSpec,
    UnregisterRegion,
)


class _Reader:
    """Bounds-checked sequential reads from a frame body."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: Buffer, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def _need(self, n: int, field: str) -> None:
        if self.pos + n > len(self.buf):
            raise CodecError(
                ErrorCode.MALFORMED_FRAME,
                f"{self.what} body truncated reading {field} at byte {self.pos} "
                f"(needs {n}, body has {len(self.buf)})",
            )

    def unpack(self, st: struct.Struct, field: str) -> tuple[Any, ...]:
        self._need(st.size, field)
        values = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return values

    def u8(self, field: str) -> int:
        return int(self.unpack(U8, field)[0])

    def u64(self, field: str) -> int:
        return int(self.unpack(U64, field)[0])

    def string(self, field: str) -> str:
        (n,) = self.unpack(U16, field)
        self._need(n, field)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CodecError(
                ErrorCode.MALFORMED_FRAME, f"{self.what}: {field} is not valid UTF-8"
            ) from e

    def align(self) -> None:
        self.pos = aligned(self.pos)

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise CodecError(
                ErrorCode.MALFORMED_FRAME,
                f"{self.what} body has {len(self.buf) - self.pos} trailing bytes",
            )


def _read_region_ref(r: _Reader, what: str) -> RegionRef:
    region = r.string(f"{what} region name")
    offset, byte_size = r.unpack(REGION_REF, f"{what} region offset and size")
    return RegionRef(region, offset, byte_size)


def _read_kind(r: _Reader, what: str) -> RegionRef | None:
    """(v2 bodies) A kind byte, then a region reference for :data:`KIND_REGION`."""
    kind = r.u8(f"{what} kind")
    if kind == KIND_FRAME:
        return None
    if kind != KIND_REGION:
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"{r.what}: {what} has unknown kind {kind}")
    return _read_region_ref(r, what)


def _read_descriptors(
    r: _Reader, count: int, kinds: bool = False
) -> list[tuple[str, DType, tuple[int, ...], RegionRef | None]]:
    out = []
    for i in range(count):
        name = r.string(f"tensor {i} name")
        code = r.u8(f"tensor {name!r} dtype")
        try:
            dtype = DType(code)
        except ValueError:
            raise CodecError(
                ErrorCode.MALFORMED_FRAME, f"{r.what}: tensor {name!r} has unknown dtype {code}"
            ) from None
        ndim = r.u8(f"tensor {name!r} rank")
        if ndim > MAX_NDIM:
            raise CodecError(
                ErrorCode.MALFORMED_FRAME,
                f"{r.what}: tensor {name!r} has rank {ndim}, the limit is {MAX_NDIM}",
            )
        dims = r.unpack(struct.Struct(f"<{ndim}Q"), f"tensor {name!r} dims")
        ref = _read_kind(r, f"tensor {name!r}") if kinds else None
        out.append((name, dtype, tuple(int(d) for d in dims), ref))
    return out


#: ``struct`` formats for a tensor's dims, by rank (built once, not per tensor).
_DIMS = tuple(struct.Struct(f"<{ndim}Q") for ndim in range(MAX_NDIM + 1))
#: A tensor's dtype code and rank, read together on the fast path.
_DTYPE_RANK = struct.Struct("<BB")
#: Wire dtype codes -> (DType, numpy dtype), for the fast path.
_DTYPES = {int(code): (code, code.numpy) for code in DType}


def _read_descriptors_fast(
    r: _Reader, count: int, kinds: bool = False
) -> list[tuple[str, DType, tuple[int, ...], RegionRef | None]] | None:
    """:func:`_read_descriptors` for well-formed descriptors of tensors carried
    in the frame, without building a field description per read; ``None``
    (``r.pos`` untouched) at the first thing that is not (a region reference
    included), so that the careful reader reads it or raises the precise error."""
    buf, pos = r.buf, r.pos
    size = len(buf)
    out: list[tuple[str, DType, tuple[int, ...], RegionRef | None]] = []
    for _ in range(count):
        if pos + 2 > size:
            return None
        (n,) = U16.unpack_from(buf, pos)
        pos += 2
        if pos + n + 2 > size:
            return None
        try:
            name = bytes(buf[pos : pos + n]).decode("utf-8")
        except UnicodeDecodeError:
            return None
        pos += n
        code, ndim = _DTYPE_RANK.unpack_from(buf, pos)
        pos += 2
        dims = _DIMS[ndim] if ndim <= MAX_NDIM else None
        if code not in _DTYPES or dims is None or pos + dims.size + kinds > size:
            return None
        shape = dims.unpack_from(buf, pos)
        pos += dims.size
        if kinds:
            if buf[pos] != KIND_FRAME:
                return None
            pos += 1
        out.append((name, _DTYPES[code][0], shape, None))
    r.pos = pos
    return out


def _read_tensors(r: _Reader, count: int, kinds: bool = False) -> dict[str, Any]:
    descriptors = _read_descriptors_fast(r, count, kinds)
    if descriptors is None:
        descriptors = _read_descriptors(r, count, kinds)
    r.align()
    tensors: dict[str, Any] = {}
    for name, dtype, shape, ref in descriptors:
        if name in tensors:
            raise CodecError(ErrorCode.MALFORMED_FRAME, f"{r.what}: tensor {name!r} sent twice")
        if ref is not None:
            tensors[name] = RegionTensor(dtype, shape, ref)
            continue
        npdtype = _DTYPES[dtype][1]  # (the enum property is slow on a hot path)
        elements = 1
        for d in shape:
            elements *= d
        nbytes = elements * npdtype.itemsize
        if r.pos + nbytes > len(r.buf):
            r._need(nbytes, f"tensor {name!r} data ({nbytes} bytes)")
        try:
            array = np.frombuffer(r.buf, dtype=npdtype, count=elements, offset=r.pos)
            array = array.reshape(shape)
        except ValueError as e:
            # An empty tensor passes the size check with any other dims, but
            # numpy refuses dims beyond its index range.
            raise CodecError(
                ErrorCode.MALFORMED_FRAME, f"{r.what}: tensor {name!r} of shape {shape}: {e}"
            ) from None
        if dtype is DType.BOOL and elements and array.view(np.uint8).max() > 1:
            raise CodecError(
                ErrorCode.MALFORMED_FRAME,
                f"{r.what}: bool tensor {name!r} holds bytes other than 0 and 1",
            )
        tensors[name] = array
        r.pos = aligned(r.pos + nbytes)
    if r.pos > len(r.buf):
        # Only the final padding can overrun; the sender must send it.
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"{r.what}: final tensor padding missing")
    return tensors


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
    return READERS[mtype](_Reader(frame.body, mtype.name))


def _decode_hello(r: _Reader) -> Hello:
    magic, lo, hi, max_frame = r.unpack(HELLO_FIXED, "hello fields")
    if magic != HELLO_MAGIC:
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"HELLO magic is {magic!r}, expected b'TWNF'")
    agent = r.string("agent")
    r.end()
    return Hello(lo, hi, max_frame, agent)


def _decode_empty(cls: type) -> Any:
    def decode(r: _Reader) -> Any:
        r.end()
        return cls()

    return decode


def _decode_infer_request(r: _Reader) -> InferRequest:
    model = r.string("model name")
    timeout_ms, priority, n_in, n_out, flags = r.unpack(INFER_REQUEST_FIXED, "fixed fields")
    kinds = bool(flags & FLAG_REGIONS)
    names = []
    regions: dict[str, RegionRef] = {}
    for i in range(n_out):
        name = r.string(f"output name {i}")
        names.append(name)
        ref = _read_kind(r, f"output {name!r}") if kinds else None
        if ref is not None:
            regions[name] = ref
    inputs = _read_tensors(r, n_in, kinds)
    r.end()
    return InferRequest(model, inputs, tuple(names), timeout_ms, priority, regions)


def _decode_infer_reply(r: _Reader) -> InferReply:
    queue_us, compute_us, n_out, flags = r.unpack(INFER_REPLY_FIXED, "fixed fields")
    outputs = _read_tensors(r, n_out, bool(flags & FLAG_REGIONS))
    r.end()
    return InferReply(outputs, queue_us, compute_us)


def _decode_model_list(r: _Reader) -> ModelList:
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


def _decode_get_metadata(r: _Reader) -> GetMetadata:
    model = r.string("model name")
    r.end()
    return GetMetadata(model)


def _decode_metadata(r: _Reader) -> Metadata:
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


def _decode_image_request(r: _Reader) -> ImageRequest:
    model = r.string("model name")
    task = r.string("task")
    # The rest of the body is the image file, as a view (no copy).
    image = memoryview(r.buf)[r.pos :]
    return ImageRequest(model, image, task)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _decode_predictions(r: _Reader) -> Predictions:
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


def _decode_health(r: _Reader) -> Health:
    body = _json_body(r.buf, r.what)
    live, ready, detail = body.get("live"), body.get("ready"), body.get("detail", "")
    if not (isinstance(live, bool) and isinstance(ready, bool) and isinstance(detail, str)):
        raise CodecError(
            ErrorCode.MALFORMED_FRAME,
            "HEALTH: needs booleans 'live', 'ready' and a string 'detail'",
        )
    return Health(live, ready, detail)


def _decode_admin_request(r: _Reader) -> AdminRequest:
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


def _decode_admin_reply(r: _Reader) -> AdminReply:
    body = _json_body(r.buf, r.what)
    message = body.get("message")
    if not isinstance(message, str):
        raise CodecError(ErrorCode.MALFORMED_FRAME, "ADMIN_REPLY: 'message' must be a string")
    return AdminReply(message)


def _decode_register_region(r: _Reader) -> RegisterRegion:
    name = r.string("region name")
    key = r.string("key")
    offset, byte_size = r.unpack(REGION_REF, "offset and size")
    r.end()
    return RegisterRegion(name, key, offset, byte_size)


def _decode_region_name(cls: type) -> Any:
    def decode(r: _Reader) -> Any:
        name = r.string("region name")
        r.end()
        return cls(name)

    return decode


def _decode_region_status(r: _Reader) -> RegionStatus:
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


def _decode_goaway(r: _Reader) -> GoAway:
    (last_request_id,) = r.unpack(GOAWAY_FIXED, "last request id")
    reason = r.string("reason")
    r.end()
    return GoAway(last_request_id, reason)


def _decode_error(r: _Reader) -> Error:
    (code,) = r.unpack(ERROR_FIXED, "error code")
    message = r.string("error message")
    r.end()
    return Error(code, message)


#: The reader of each message type's body.
READERS: dict[MessageType, Callable[[_Reader], Message]] = {
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
