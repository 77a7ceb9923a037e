"""Frames: the 16-byte header, the layout constants, and reassembly from a byte stream.

This is the lowest module of :mod:`twinfer.wire` after the message classes:
the readers (:mod:`twinfer.wire.decode`) and writers
(:mod:`twinfer.wire.encode`) share the constants defined here, so neither
imports the other.  Nothing here imports Twisted or touches a socket.

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
offset that is a multiple of 8 within the body.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import attrs

from twinfer.errors import CodecError, ErrorCode

MAGIC = b"TW"
HEADER = struct.Struct("<2sBBIQ")
HEADER_SIZE = HEADER.size
#: Default largest frame body a peer accepts: 64 MiB.
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
#: Largest first frame a server accepts, before the handshake: a HELLO is a
#: dozen bytes plus an agent string, so anything bigger is not one and is
#: refused from its header, before a byte of its body is buffered.
HELLO_MAX_FRAME_SIZE = 4096
#: The largest body length the header can carry.
MAX_BODY = 0xFFFFFFFF
MAX_U64 = 2**64 - 1

# -- body layouts shared by the readers and the writers ----------------------

#: Hard cap on tensor rank; numpy itself stops at 64.
MAX_NDIM = 32
#: Tensor data starts at body offsets that are multiples of this.
ALIGNMENT = 8
#: Zero bytes to pad with (slice it).
PADDING = bytes(ALIGNMENT)
#: Longest ``str`` field (its length is a u16).
MAX_STR = 0xFFFF
U8 = struct.Struct("<B")
U16 = struct.Struct("<H")
U64 = struct.Struct("<Q")
#: HELLO: magic, min_version, max_version, max_frame_size (then the agent string).
HELLO_FIXED = struct.Struct("<4sHHI")
HELLO_MAGIC = b"TWNF"
#: INFER_REQUEST after the model name: timeout_ms priority n_in n_out flags.
INFER_REQUEST_FIXED = struct.Struct("<IBBBB")
#: INFER_REPLY: queue_us compute_us n_out flags (then 2 reserved bytes).
INFER_REPLY_FIXED = struct.Struct("<IIBBxx")
#: The INFER_REQUEST / INFER_REPLY flag (v2) of bodies whose every tensor
#: descriptor and output name ends with a kind byte (:data:`KIND_FRAME` or
#: :data:`KIND_REGION`, then a region reference).
FLAG_REGIONS = 0x01
KIND_FRAME = 0
KIND_REGION = 1
#: A region reference after its region name: offset, byte_size.
REGION_REF = struct.Struct("<QQ")
#: GOAWAY: the last request id the server answers (then the reason string).
GOAWAY_FIXED = struct.Struct("<Q")
#: ERROR: the code (then the message string).
ERROR_FIXED = struct.Struct("<H")

Buffer = bytes | bytearray | memoryview
Chunk = bytes | memoryview


def aligned(n: int) -> int:
    """``n`` rounded up to the next multiple of :data:`ALIGNMENT`."""
    return (n + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


@attrs.frozen(eq=False)
class Frame:
    """One complete frame: header fields plus the body's bytes."""

    type: int
    flags: int
    request_id: int
    #: The body; a fresh ``bytearray`` from :class:`FrameDecoder`, so tensors
    #: decoded from it are writable and can be shared with OpenVINO.
    body: Buffer


def frame_header(mtype: int, request_id: int, length: int) -> bytes:
    """The 16 header bytes of a frame; raises :class:`CodecError` for a length
    or request id the header cannot carry."""
    if length > MAX_BODY:
        raise CodecError(ErrorCode.FRAME_TOO_LARGE, f"frame body of {length} bytes")
    if not 0 <= request_id <= MAX_U64:
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"request id {request_id} is not a u64")
    return HEADER.pack(MAGIC, mtype, 0, length, request_id)


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

    def __init__(
        self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, first_frame_max: int | None = None
    ) -> None:
        self.max_frame_size = max_frame_size
        #: A tighter limit for the first frame only (a server's HELLO), if any.
        self.first_frame_max = first_frame_max
        self._first = True
        #: Called with a frame body's length before it is allocated: True to
        #: go on; False to wait (the input from there is held, and nothing
        #: more is decoded, until :meth:`resume`).  It may raise CodecError.
        self.admit: Callable[[int], bool] | None = None
        self._stalled: tuple[int, int, int, int] | None = None
        self._held = bytearray()
        #: Why the stream broke, once it has; ``None`` while it is healthy.
        self.error: CodecError | None = None
        self._header = bytearray()
        self._body: bytearray | None = None
        self._filled = 0
        self._pending: tuple[int, int, int] = (0, 0, 0)

    @property
    def waiting(self) -> int:
        """The body length whose admission is awaited (0: none)."""
        return self._stalled[3] if self._stalled is not None else 0

    @property
    def body_in_progress(self) -> int:
        """The length of the body allocated and being filled (0: none)."""
        return len(self._body) if self._body is not None else 0

    def resume(self) -> list[Frame]:
        """The body awaited (:attr:`waiting`) was admitted: allocate it and
        decode the input held meanwhile; returns the frames completed."""
        frames: list[Frame] = []
        if self._stalled is None or self.error is not None:
            return frames
        mtype, flags, request_id, length = self._stalled
        self._stalled = None
        view = memoryview(bytes(self._held))
        self._held = bytearray()
        try:
            pos = self._begin(mtype, flags, request_id, length, view, 0, frames)
            self._feed(view, frames, pos)
        except CodecError as e:
            self._broken(e)
        return frames

    @property
    def buffered(self) -> int:
        """Bytes held for the frame being reassembled (for memory accounting)."""
        return len(self._header) + (len(self._body) if self._body is not None else 0)

    def feed(self, data: Buffer) -> list[Frame]:
        """Add received bytes; return the frames they complete, in order."""
        frames: list[Frame] = []
        if self.error is None and self._stalled is not None:
            self._held += data  # (the transport was asked to stop reading)
        elif self.error is None:
            try:
                self._feed(memoryview(data), frames)
            except CodecError as e:
                self._broken(e)
        return frames

    def _broken(self, error: CodecError) -> None:
        self.error = error
        self._header.clear()
        self._body = None
        self._stalled = None
        self._held = bytearray()

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

    def _check_header(self, magic: bytes, length: int) -> None:
        if magic != MAGIC:
            raise CodecError(
                ErrorCode.MALFORMED_FRAME,
                f"not a twinfer frame: header starts with {bytes(magic)!r}, expected {MAGIC!r}",
            )
        first, self._first = self._first, False
        if first and self.first_frame_max is not None and length > self.first_frame_max:
            raise CodecError(
                ErrorCode.FRAME_TOO_LARGE,
                f"the first frame must be a HELLO of at most {self.first_frame_max} bytes; "
                f"its header announces {length} bytes",
            )
        if length > self.max_frame_size:
            raise CodecError(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame body of {length} bytes exceeds the limit of {self.max_frame_size} bytes",
            )

    def _begin(
        self,
        mtype: int,
        flags: int,
        request_id: int,
        length: int,
        view: memoryview,
        pos: int,
        frames: list[Frame],
    ) -> int:
        """Start an admitted body at ``view[pos:]``; returns the position after
        what it took."""
        if len(view) - pos >= length:
            # The whole body is already here: one copy, no state.
            frames.append(Frame(mtype, flags, request_id, bytearray(view[pos : pos + length])))
            return pos + length
        self._body = bytearray(length)
        self._filled = 0
        self._pending = (mtype, flags, request_id)
        return pos

    def _feed(self, view: memoryview, frames: list[Frame], pos: int = 0) -> None:
        end = len(view)
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
                self._check_header(magic, length)  # before allocating anything
                if self.admit is not None and not self.admit(length):
                    self._stalled = (mtype, flags, request_id, length)
                    self._held += view[pos:]
                    return
                pos = self._begin(mtype, flags, request_id, length, view, pos, frames)
                continue
            body = self._body
            assert body is not None  # set by _begin, or the loop would have continued
            take = min(len(body) - self._filled, end - pos)
            body[self._filled : self._filled + take] = view[pos : pos + take]
            self._filled += take
            pos += take
            if self._filled == len(body):
                mtype, flags, request_id = self._pending
                frames.append(Frame(mtype, flags, request_id, body))
                self._body = None
