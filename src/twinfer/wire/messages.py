"""The messages of the twinfer wire protocol, as plain attrs classes.

The readers (:mod:`twinfer.wire.decode`) turn frames into these objects and
the writers (:mod:`twinfer.wire.encode`) turn them back; nothing here does
I/O and nothing here imports the rest of :mod:`twinfer.wire`.  Every message
travels in a frame that also carries a ``request_id`` chosen by the client;
replies carry the id of the request they answer.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

#: The protocol versions this implementation speaks (1..this).
PROTOCOL_VERSION = 2
#: The first version with shared-memory regions (messages 0x50-0x53 and
#: region references in INFER_REQUEST / INFER_REPLY).
SHM_VERSION = 2


class MessageType(enum.IntEnum):
    """The one-byte message type in every frame header."""

    HELLO = 0x01
    PING = 0x02
    PONG = 0x03
    GOAWAY = 0x04
    INFER_REQUEST = 0x10
    INFER_REPLY = 0x11
    CANCEL = 0x12
    LIST_MODELS = 0x20
    MODEL_LIST = 0x21
    GET_METADATA = 0x22
    METADATA = 0x23
    IMAGE_REQUEST = 0x30
    PREDICTIONS = 0x31
    GET_HEALTH = 0x24
    HEALTH = 0x25
    ADMIN_REQUEST = 0x40
    ADMIN_REPLY = 0x41
    REGISTER_REGION = 0x50
    REGION_STATUS = 0x51
    UNREGISTER_REGION = 0x52
    GET_REGION_STATUS = 0x53
    ERROR = 0x7F


class DType(enum.IntEnum):
    """Tensor element types on the wire (always little-endian, C order)."""

    F32 = 1
    F16 = 2
    F64 = 3
    I8 = 4
    U8 = 5
    I16 = 6
    U16 = 7
    I32 = 8
    U32 = 9
    I64 = 10
    U64 = 11
    BOOL = 12

    @property
    def numpy(self) -> np.dtype:
        """The little-endian numpy dtype for this wire type."""
        return _NUMPY_BY_DTYPE[self]

    @classmethod
    def from_numpy(cls, dtype: np.dtype | type) -> DType:
        """The wire type for a numpy dtype; raises ``KeyError`` if there is none."""
        found = _DTYPE_BY_NUMPY.get(dtype) if isinstance(dtype, np.dtype) else None  # fast path
        if found is not None:
            return found
        return _DTYPE_BY_NUMPY[np.dtype(dtype).newbyteorder("<")]

    @classmethod
    def from_name(cls, name: str) -> DType:
        """The wire type for a short name such as ``"f32"`` or ``"bool"``."""
        return _DTYPE_BY_NAME[name]

    @property
    def short_name(self) -> str:
        """The short lower-case name used in metadata and docs (``"f32"``)."""
        return self.name.lower()


_NUMPY_BY_DTYPE: dict[DType, np.dtype] = {
    DType.F32: np.dtype("<f4"),
    DType.F16: np.dtype("<f2"),
    DType.F64: np.dtype("<f8"),
    DType.I8: np.dtype("i1"),
    DType.U8: np.dtype("u1"),
    DType.I16: np.dtype("<i2"),
    DType.U16: np.dtype("<u2"),
    DType.I32: np.dtype("<i4"),
    DType.U32: np.dtype("<u4"),
    DType.I64: np.dtype("<i8"),
    DType.U64: np.dtype("<u8"),
    DType.BOOL: np.dtype("?"),
}
_DTYPE_BY_NUMPY = {dt.newbyteorder("<"): code for code, dt in _NUMPY_BY_DTYPE.items()}
_DTYPE_BY_NAME = {code.short_name: code for code in DType}

#: A tensor shape in metadata: ``-1`` marks a dynamic dimension.
Shape = tuple[int, ...]


@attrs.frozen
class TensorSpec:
    """What a model accepts or produces at one port (used in metadata)."""

    name: str
    dtype: DType
    #: Dimensions, ``-1`` for a dynamic dimension; ``None`` when even the
    #: rank is dynamic (``()`` is a scalar).
    shape: Shape | None


@attrs.frozen
class Hello:
    """The first frame in each direction.

    The client offers ``min_version..max_version``; the server answers with
    the version it chose in both fields and its ``max_frame_size``.
    """

    min_version: int = PROTOCOL_VERSION
    max_version: int = PROTOCOL_VERSION
    #: Largest frame (header excluded) the sender accepts; 0 from a client.
    max_frame_size: int = 0
    #: Free-form software name, e.g. ``"twinfer/0.1.0"``.
    agent: str = ""


@attrs.frozen
class Ping:
    """Liveness probe; answered with :class:`Pong` carrying the same id."""


@attrs.frozen
class Pong:
    """Answer to :class:`Ping`."""


@attrs.frozen
class GoAway:
    """(Server to client, request id 0.) The server is going away: it answers
    the requests it has accepted on this connection, up to and including
    ``last_request_id``, and nothing new; the client should send new requests
    on another connection."""

    #: The highest request id the server accepted on this connection (0: none).
    last_request_id: int
    #: Why, for people: "the server is shutting down".
    reason: str = ""


@attrs.frozen
class RegionRef:
    """``byte_size`` bytes at ``offset`` in the shared-memory region ``region``
    (an offset within the region, not within the shm object)."""

    region: str
    offset: int
    byte_size: int


@attrs.frozen
class RegionTensor:
    """A tensor whose bytes are in a shared-memory region instead of the frame
    (protocol version 2): an input to read there, or an output written there."""

    dtype: DType
    shape: tuple[int, ...]
    ref: RegionRef


@attrs.frozen(eq=False)
class InferRequest:
    """Run ``model`` on ``inputs``; reply with ``outputs`` (all when empty)."""

    model: str
    #: Inputs: arrays carried in the frame, or (v2) :class:`RegionTensor`
    #: read from a region (typed Any so that v1 code reads them as arrays).
    inputs: Mapping[str, Any]
    #: Names of the outputs wanted; empty means every output.
    outputs: tuple[str, ...] = ()
    #: Give up if not started within this many milliseconds; 0 = server default.
    timeout_ms: int = 0
    #: Scheduling priority; 0 = the model's default.
    priority: int = 0
    #: (v2) Outputs to write into a region instead of the reply, each also
    #: named in ``outputs``.
    output_regions: Mapping[str, RegionRef] = attrs.field(factory=dict)

    @property
    def uses_regions(self) -> bool:
        """Whether the request references a shared-memory region (v2 only)."""
        return bool(self.output_regions) or any(
            type(v) is RegionTensor for v in self.inputs.values()
        )


@attrs.frozen(eq=False)
class InferReply:
    """The outputs of one inference, with the server's own timings."""

    #: Outputs: arrays carried in the frame, or (v2) :class:`RegionTensor`
    #: for those written into a region.
    outputs: Mapping[str, Any]
    #: Microseconds the job waited in the queue.
    queue_us: int = 0
    #: Microseconds the device spent on it (including copies in the device thread).
    compute_us: int = 0


@attrs.frozen
class Cancel:
    """Cancel the pending request whose id is this frame's request id."""


@attrs.frozen
class ListModels:
    """Ask for the served models."""


@attrs.frozen
class ModelInfo:
    """One entry of :class:`ModelList`."""

    name: str
    devices: tuple[str, ...]
    ready: bool = True


@attrs.frozen
class ModelList:
    """The served models."""

    models: tuple[ModelInfo, ...]


@attrs.frozen
class GetMetadata:
    """Ask for one model's metadata."""

    model: str


@attrs.frozen
class Metadata:
    """A model's inputs, outputs and the devices serving it."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    devices: tuple[str, ...] = ()


@attrs.frozen(eq=False)
class ImageRequest:
    """Classify or detect on one encoded image (JPEG, PNG...) with an image model.

    Answered with :class:`Predictions`.  The image is decoded by the server,
    in the model's device thread.
    """

    model: str
    #: The encoded image file's bytes (a view of the frame when decoded).
    image: bytes | bytearray | memoryview
    #: ``"classify"`` or ``"detect"`` to insist on the model's task; ``""``: any.
    task: str = ""


@attrs.frozen
class Prediction:
    """One labelled box (detection) or label (classification, whole-image box)."""

    label_id: int
    label: str
    confidence: float
    #: (x1, y1, x2, y2) in pixels of the original image.
    box: tuple[float, float, float, float]

    def as_dict(self) -> dict[str, object]:
        """The JSON form used on the wire and by the HTTP front end."""
        return {
            "label_id": self.label_id,
            "label": self.label,
            "confidences": self.confidence,
            "detection_box": list(self.box),
        }


@attrs.frozen
class Predictions:
    """The answer to :class:`ImageRequest`, best first."""

    #: ``"classify"`` or ``"detect"``: the model's task.
    task: str
    predictions: tuple[Prediction, ...]


@attrs.frozen
class GetHealth:
    """Ask whether the server is live and ready."""


@attrs.frozen
class Health:
    """The answer to :class:`GetHealth`.

    ``ready`` is true when every configured model is loaded on at least one
    healthy (running, not drained) device and the server is not shutting down.
    """

    live: bool
    ready: bool
    #: Why the server is not ready (empty when it is).
    detail: str = ""


#: The operations an :class:`AdminRequest` may ask for.
ADMIN_OPS = ("load", "unload", "reload", "drain", "undrain")


@attrs.frozen
class AdminRequest:
    """A runtime control operation; servers refuse it unless started with ``--allow-admin``.

    ``load`` takes ``model``, ``path`` and optionally ``devices``; ``unload``
    takes ``model``; ``reload`` takes ``model`` and optionally a new ``path``;
    ``drain`` and ``undrain`` take ``device``.
    """

    op: str
    model: str = ""
    path: str = ""
    devices: tuple[str, ...] = ()
    device: str = ""


@attrs.frozen
class AdminReply:
    """An :class:`AdminRequest` succeeded; ``message`` says what was done."""

    message: str


@attrs.frozen
class RegisterRegion:
    """(v2) Map ``byte_size`` bytes at ``offset`` of the POSIX shared-memory
    object ``key`` as the region ``name``, for this connection; answered with
    :class:`RegionStatus` listing it.  Refused unless the server runs with
    ``--allow-shm``."""

    name: str
    key: str
    offset: int
    byte_size: int


@attrs.frozen
class UnregisterRegion:
    """(v2) Forget the region ``name`` (``""``: every region of this
    connection); answered with :class:`RegionStatus` listing those removed."""

    name: str = ""


@attrs.frozen
class GetRegionStatus:
    """(v2) Ask for the region ``name`` (``""``: every region of this connection)."""

    name: str = ""


@attrs.frozen
class RegionInfo:
    """One registered region, as :class:`RegionStatus` lists it."""

    name: str
    key: str
    offset: int
    byte_size: int


@attrs.frozen
class RegionStatus:
    """(v2) Regions: those registered, removed or asked for."""

    regions: tuple[RegionInfo, ...]


@attrs.frozen
class Error:
    """A failure; see :class:`twinfer.errors.ErrorCode` for ``code``."""

    code: int
    message: str


#: Messages that exist from protocol version 2 (shared-memory regions).
REGION_MESSAGES: frozenset[type] = frozenset({RegisterRegion, UnregisterRegion, GetRegionStatus})


def needs_version(message: object) -> int:
    """The lowest protocol version that can carry ``message`` (2 for
    shared-memory messages and region references, else 1)."""
    if type(message) in REGION_MESSAGES or (
        isinstance(message, InferRequest) and message.uses_regions
    ):
        return SHM_VERSION
    return 1


def version_error(message: object, version: int) -> str:
    """Why ``message`` cannot travel on a connection of protocol ``version``."""
    what = type(message).__name__
    if isinstance(message, InferRequest) and message.uses_regions:
        what = "an InferRequest with shared-memory region references"
    needed = needs_version(message)
    return f"{what} needs protocol version {needed}; this connection negotiated version {version}"


#: Any message of the protocol.
Message = (
    Hello
    | Ping
    | Pong
    | GoAway
    | InferRequest
    | InferReply
    | Cancel
    | ListModels
    | ModelList
    | GetMetadata
    | Metadata
    | ImageRequest
    | Predictions
    | GetHealth
    | Health
    | AdminRequest
    | AdminReply
    | RegisterRegion
    | UnregisterRegion
    | GetRegionStatus
    | RegionStatus
    | Error
)
