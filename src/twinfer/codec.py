"""The twinfer wire codec: frames and messages, sans-I/O.

Nothing here imports Twisted or touches a socket.  :class:`FrameDecoder` is a
small state machine fed with whatever bytes arrive (any chunking) and
returning complete :class:`Frame` objects (a broken stream sets its
``error``); :func:`decode_message` turns a frame
into a message from :mod:`twinfer.messages`; :func:`encode_message` turns a
message back into a list of byte chunks ready for ``writeSequence``.  Bad input
raises :class:`~twinfer.errors.CodecError` and nothing else.

Frame layout (little-endian; see ``docs/protocol.md`` for the full spec)::

    offset  size  field
    0       2     magic  b"TW"
    2       1     message type (MessageType)
    3       1     flags (reserved, 0)
    4       4     body length in bytes (header excluded)
    8       8     request id
    16      ...   body

Tensors are sent as a descriptor (name, dtype, dims) followed, after all the
descriptors, by the raw C-order bytes of each tensor, each starting at an
offset that is a multiple of 8 within the body.  Decoding wraps those bytes
with ``numpy.frombuffer``: no per-element work and no copy.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from twinfer.errors import CodecError, ErrorCode
from twinfer.messages import (
    ADMIN_OPS,
    AdminReply,
    AdminRequest,
    Cancel,
    DType,
    Error,
    GetHealth,
    GetMetadata,
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
    TensorSpec,
)

MAGIC = b"TW"
HEADER = struct.Struct("<2sBBIQ")
HEADER_SIZE = HEADER.size
#: Default largest frame body a peer accepts: 64 MiB.
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
#: Hard cap on tensor rank; numpy itself stops at 64.
MAX_NDIM = 32
#: Tensor data starts at body offsets that are multiples of this.
ALIGNMENT = 8
MAX_U64 = 2**64 - 1

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HELLO = struct.Struct("<4sHHI")
_HELLO_MAGIC = b"TWNF"
_INFER_REQUEST_FIXED = struct.Struct("<IBBBB")  # timeout_ms priority n_in n_out reserved
_INFER_REPLY_FIXED = struct.Struct("<IIBxxx")  # queue_us compute_us n_out
_ERROR_FIXED = struct.Struct("<H")
_MAX_STR = 0xFFFF
_PADDING = bytes(ALIGNMENT)

Buffer = bytes | bytearray | memoryview
Chunk = bytes | memoryview


@attrs.frozen(eq=False)
class Frame:
    """One complete frame: header fields plus the body's bytes."""

    type: int
    flags: int
    request_id: int
    #: The body; a fresh ``bytearray`` from :class:`FrameDecoder`, so tensors
    #: decoded from it are writable and can be shared with OpenVINO.
    body: Buffer


class FrameDecoder:
    """Reassemble frames from a byte stream chunked in any way.

    The body of each frame is collected in one buffer allocated when its
    header arrives (the length is known then), so a large tensor costs one
    copy from the socket's chunks, never a quadratic concatenation.  The
    declared length is checked against ``max_frame_size`` *before* anything
    is allocated.

    :meth:`feed` never raises: when the stream turns out to be broken (bad
    magic, oversize frame) it still returns the frames completed before the
    break, and sets :attr:`error`; the stream is then unrecoverable and
    further input is ignored.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        #: Why the stream broke, once it has; ``None`` while it is healthy.
        self.error: CodecError | None = None
        self._header = bytearray()
        self._body: bytearray | None = None
        self._filled = 0
        self._pending: tuple[int, int, int] = (0, 0, 0)

    @property
    def buffered(self) -> int:
        """Bytes held for the frame being reassembled (for memory accounting)."""
        return len(self._header) + (len(self._body) if self._body is not None else 0)

    def feed(self, data: Buffer) -> list[Frame]:
        """Add received bytes; return the frames they complete, in order."""
        frames: list[Frame] = []
        if self.error is None:
            try:
                self._feed(memoryview(data), frames)
            except CodecError as e:
                self.error = e
                self._header.clear()
                self._body = None
        return frames

    def read_buffer(self) -> memoryview | None:
        """The unfilled rest of the frame body being reassembled, if any.

        A transport may receive straight into it (``socket.recv_into``) and
        then call :meth:`buffer_filled`: the body is then never copied by
        twinfer at all. It never extends past the current frame.
        """
        if self.error is None and self._body is not None:
            return memoryview(self._body)[self._filled :]
        return None

    def buffer_filled(self, count: int) -> list[Frame]:
        """Account for ``count`` bytes received into :meth:`read_buffer`; returns
        the frame they complete, if they do."""
        body = self._body
        if body is None or not 0 < count <= len(body) - self._filled:
            raise ValueError(f"buffer_filled({count}) without a matching read_buffer()")
        self._filled += count
        if self._filled < len(body):
            return []
        mtype, flags, request_id = self._pending
        self._body = None
        return [Frame(mtype, flags, request_id, body)]

    def _feed(self, view: memoryview, frames: list[Frame]) -> None:
        end = len(view)
        pos = 0
        while pos < end:
            if self._body is None:
                if not self._header and end - pos >= HEADER_SIZE:
                    fields = HEADER.unpack_from(view, pos)
                    pos += HEADER_SIZE
                else:
                    take = min(HEADER_SIZE - len(self._header), end - pos)
                    self._header += view[pos : pos + take]
                    pos += take
                    if len(self._header) < HEADER_SIZE:
                        break
                    fields = HEADER.unpack(self._header)
                    self._header.clear()
                magic, mtype, flags, length, request_id = fields
                if magic != MAGIC:
                    raise CodecError(
                        ErrorCode.MALFORMED_FRAME,
                        f"not a twinfer frame: header starts with {bytes(magic)!r}, "
                        f"expected {MAGIC!r}",
                    )
                if length > self.max_frame_size:
                    raise CodecError(
                        ErrorCode.FRAME_TOO_LARGE,
                        f"frame body of {length} bytes exceeds the limit of "
                        f"{self.max_frame_size} bytes",
                    )
                if end - pos >= length:
                    # The whole body is already here: one copy, no state.
                    frames.append(
                        Frame(mtype, flags, request_id, bytearray(view[pos : pos + length]))
                    )
                    pos += length
                    continue
                self._body = bytearray(length)
                self._filled = 0
                self._pending = (mtype, flags, request_id)
            body = self._body
            take = min(len(body) - self._filled, end - pos)
            body[self._filled : self._filled + take] = view[pos : pos + take]
            self._filled += take
            pos += take
            if self._filled == len(body):
                mtype, flags, request_id = self._pending
                frames.append(Frame(mtype, flags, request_id, body))
                self._body = None


# --------------------------------------------------------------------------
# Decoding


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
        return int(self.unpack(_U8, field)[0])

    def u64(self, field: str) -> int:
        return int(self.unpack(_U64, field)[0])

    def string(self, field: str) -> str:
        (n,) = self.unpack(_U16, field)
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
        self.pos = _aligned(self.pos)

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise CodecError(
                ErrorCode.MALFORMED_FRAME,
                f"{self.what} body has {len(self.buf) - self.pos} trailing bytes",
            )


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


def _read_descriptors(r: _Reader, count: int) -> list[tuple[str, DType, tuple[int, ...]]]:
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
        out.append((name, dtype, tuple(int(d) for d in dims)))
    return out


def _read_tensors(r: _Reader, count: int) -> dict[str, np.ndarray]:
    descriptors = _read_descriptors(r, count)
    r.align()
    tensors: dict[str, np.ndarray] = {}
    for name, dtype, shape in descriptors:
        if name in tensors:
            raise CodecError(ErrorCode.MALFORMED_FRAME, f"{r.what}: tensor {name!r} sent twice")
        npdtype = dtype.numpy
        elements = 1
        for d in shape:
            elements *= d
        nbytes = elements * npdtype.itemsize
        r._need(nbytes, f"tensor {name!r} data ({nbytes} bytes)")
        array = np.frombuffer(r.buf, dtype=npdtype, count=elements, offset=r.pos).reshape(shape)
        if dtype is DType.BOOL and elements and array.view(np.uint8).max() > 1:
            raise CodecError(
                ErrorCode.MALFORMED_FRAME,
                f"{r.what}: bool tensor {name!r} holds bytes other than 0 and 1",
            )
        tensors[name] = array
        r.pos = _aligned(r.pos + nbytes)
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
        return TensorSpec(
            name, DType.from_name(dtype), None if shape is None else tuple(shape)
        )
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
    decoder = _DECODERS[mtype]
    return decoder(_Reader(frame.body, mtype.name))


def _decode_hello(r: _Reader) -> Hello:
    magic, lo, hi, max_frame = r.unpack(_HELLO, "hello fields")
    if magic != _HELLO_MAGIC:
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
    timeout_ms, priority, n_in, n_out, _reserved = r.unpack(_INFER_REQUEST_FIXED, "fixed fields")
    outputs = tuple(r.string(f"output name {i}") for i in range(n_out))
    inputs = _read_tensors(r, n_in)
    r.end()
    return InferRequest(model, inputs, outputs, timeout_ms, priority)


def _decode_infer_reply(r: _Reader) -> InferReply:
    queue_us, compute_us, n_out = r.unpack(_INFER_REPLY_FIXED, "fixed fields")
    outputs = _read_tensors(r, n_out)
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


def _decode_error(r: _Reader) -> Error:
    (code,) = r.unpack(_ERROR_FIXED, "error code")
    message = r.string("error message")
    r.end()
    return Error(code, message)


_DECODERS: dict[MessageType, Any] = {
    MessageType.HELLO: _decode_hello,
    MessageType.PING: _decode_empty(Ping),
    MessageType.PONG: _decode_empty(Pong),
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
    MessageType.ERROR: _decode_error,
}


# --------------------------------------------------------------------------
# Encoding


def _string(value: str, field: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > _MAX_STR:
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"{field} is longer than {_MAX_STR} bytes")
    return _U16.pack(len(raw)) + raw


def wire_array(value: Any, name: str) -> tuple[DType, np.ndarray]:
    """Coerce ``value`` to a C-contiguous little-endian array of a wire dtype."""
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


def _tensors(tensors: Mapping[str, Any], prefix_len: int) -> tuple[bytes, list[Chunk]]:
    """Descriptors (as bytes, padded) and the data chunks of ``tensors``.

    ``prefix_len`` is the number of body bytes before the descriptors, so
    padding puts every tensor's data on an 8-byte boundary of the body.
    """
    descriptors = bytearray()
    arrays = []
    for name, value in tensors.items():
        dtype, array = wire_array(value, name)
        descriptors += _string(name, "tensor name")
        descriptors += struct.pack(f"<BB{array.ndim}Q", dtype, array.ndim, *array.shape)
        arrays.append(array)
    offset = prefix_len + len(descriptors)
    descriptors += _PADDING[: _aligned(offset) - offset]
    chunks: list[Chunk] = []
    for array in arrays:
        if array.nbytes:
            chunks.append(tensor_payload(array))
        pad = _aligned(array.nbytes) - array.nbytes
        if pad:
            chunks.append(_PADDING[:pad])
    return bytes(descriptors), chunks


def _frame(mtype: MessageType, request_id: int, body: Sequence[Chunk]) -> list[Chunk]:
    length = sum(len(c) for c in body)
    if length > 0xFFFFFFFF:
        raise CodecError(ErrorCode.FRAME_TOO_LARGE, f"{mtype.name} body of {length} bytes")
    if not 0 <= request_id <= MAX_U64:
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"request id {request_id} is not a u64")
    return [HEADER.pack(MAGIC, mtype, 0, length, request_id), *body]


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    shape = None if spec.shape is None else list(spec.shape)
    return {"name": spec.name, "dtype": spec.dtype.short_name, "shape": shape}


def encode_message(request_id: int, message: Message) -> list[Chunk]:
    """Encode ``message`` as a frame: a list of chunks for ``writeSequence``.

    The first chunk is the header (and small fields); tensor data follow as
    separate chunks that reference the arrays' memory.
    """
    body: list[Chunk]
    if isinstance(message, InferRequest):
        if len(message.inputs) > 255 or len(message.outputs) > 255:
            raise CodecError(ErrorCode.INVALID_INPUT, "at most 255 inputs and 255 outputs")
        head = bytearray(_string(message.model, "model name"))
        head += _INFER_REQUEST_FIXED.pack(
            message.timeout_ms, message.priority, len(message.inputs), len(message.outputs), 0
        )
        for name in message.outputs:
            head += _string(name, "output name")
        descriptors, data = _tensors(message.inputs, len(head))
        body = [bytes(head) + descriptors, *data]
        return _frame(MessageType.INFER_REQUEST, request_id, body)
    if isinstance(message, InferReply):
        if len(message.outputs) > 255:
            raise CodecError(ErrorCode.INVALID_INPUT, "at most 255 outputs")
        fixed = _INFER_REPLY_FIXED.pack(
            min(message.queue_us, 0xFFFFFFFF),
            min(message.compute_us, 0xFFFFFFFF),
            len(message.outputs),
        )
        descriptors, data = _tensors(message.outputs, len(fixed))
        return _frame(MessageType.INFER_REPLY, request_id, [fixed + descriptors, *data])
    if isinstance(message, Error):
        text = message.message.encode("utf-8")[:_MAX_STR].decode("utf-8", "ignore")
        body = [_ERROR_FIXED.pack(message.code) + _string(text, "error message")]
        return _frame(MessageType.ERROR, request_id, body)
    if isinstance(message, Hello):
        fixed = _HELLO.pack(
            _HELLO_MAGIC, message.min_version, message.max_version, message.max_frame_size
        )
        return _frame(MessageType.HELLO, request_id, [fixed + _string(message.agent, "agent")])
    if isinstance(message, GetMetadata):
        return _frame(MessageType.GET_METADATA, request_id, [_string(message.model, "model")])
    if isinstance(message, ModelList):
        models = [
            {"name": m.name, "devices": list(m.devices), "ready": m.ready} for m in message.models
        ]
        return _frame(MessageType.MODEL_LIST, request_id, [_json({"models": models})])
    if isinstance(message, Metadata):
        value = {
            "name": message.name,
            "inputs": [_spec_json(s) for s in message.inputs],
            "outputs": [_spec_json(s) for s in message.outputs],
            "devices": list(message.devices),
        }
        return _frame(MessageType.METADATA, request_id, [_json(value)])
    if isinstance(message, ImageRequest):
        names = _string(message.model, "model name") + _string(message.task, "task")
        image = message.image if type(message.image) is bytes else memoryview(message.image)
        return _frame(MessageType.IMAGE_REQUEST, request_id, [names, image])
    if isinstance(message, Predictions):
        value = {"task": message.task, "predictions": [p.as_dict() for p in message.predictions]}
        return _frame(MessageType.PREDICTIONS, request_id, [_json(value)])
    if isinstance(message, Health):
        health = {"live": message.live, "ready": message.ready, "detail": message.detail}
        return _frame(MessageType.HEALTH, request_id, [_json(health)])
    if isinstance(message, AdminRequest):
        value = {
            "op": message.op,
            "model": message.model,
            "path": message.path,
            "devices": list(message.devices),
            "device": message.device,
        }
        return _frame(MessageType.ADMIN_REQUEST, request_id, [_json(value)])
    if isinstance(message, AdminReply):
        return _frame(MessageType.ADMIN_REPLY, request_id, [_json({"message": message.message})])
    for cls, mtype in _EMPTY_TYPES.items():
        if isinstance(message, cls):
            return _frame(mtype, request_id, [])
    raise TypeError(f"not a twinfer message: {message!r}")


_EMPTY_TYPES: dict[type, MessageType] = {
    Ping: MessageType.PING,
    Pong: MessageType.PONG,
    Cancel: MessageType.CANCEL,
    ListModels: MessageType.LIST_MODELS,
    GetHealth: MessageType.GET_HEALTH,
}


def encode_bytes(request_id: int, message: Message) -> bytes:
    """Encode ``message`` as one ``bytes`` object (convenient for blocking I/O and tests)."""
    return b"".join(encode_message(request_id, message))


def negotiate(offer: Hello, supported: range = range(1, 2)) -> int:
    """Pick the highest protocol version both sides speak.

    Raises :class:`CodecError` (``HANDSHAKE_FAILED``) when there is none.
    """
    common = [v for v in supported if offer.min_version <= v <= offer.max_version]
    if not common:
        raise CodecError(
            ErrorCode.HANDSHAKE_FAILED,
            f"client speaks protocol versions {offer.min_version}..{offer.max_version}; "
            f"server speaks {supported.start}..{supported.stop - 1}",
        )
    return max(common)
