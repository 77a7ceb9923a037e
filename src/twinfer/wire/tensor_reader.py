"""Bounds-checked reading of a frame body, and of the tensors it carries.

:class:`Reader` reads a body field by field; :func:`read_tensors` reads a
list of tensor descriptors (name, dtype, shape, and in v2 bodies a kind:
in the frame or in a shared-memory region) and wraps each tensor's bytes with
``numpy.frombuffer`` (no copy).  :mod:`twinfer.wire.decode` builds the
messages on top of these.  Bad input raises :class:`~twinfer.errors.CodecError`.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from twinfer.errors import CodecError, ErrorCode
from twinfer.wire.frames import (
    KIND_FRAME,
    KIND_REGION,
    MAX_NDIM,
    REGION_REF,
    U8,
    U16,
    U64,
    Buffer,
    aligned,
)
from twinfer.wire.messages import DType, RegionRef, RegionTensor


class Reader:
    """Bounds-checked sequential reads from a frame body."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: Buffer, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def need(self, n: int, field: str) -> None:
        if self.pos + n > len(self.buf):
            raise CodecError(
                ErrorCode.MALFORMED_FRAME,
                f"{self.what} body truncated reading {field} at byte {self.pos} "
                f"(needs {n}, body has {len(self.buf)})",
            )

    def unpack(self, st: struct.Struct, field: str) -> tuple[Any, ...]:
        self.need(st.size, field)
        values = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return values

    def u8(self, field: str) -> int:
        return int(self.unpack(U8, field)[0])

    def u64(self, field: str) -> int:
        return int(self.unpack(U64, field)[0])

    def string(self, field: str) -> str:
        (n,) = self.unpack(U16, field)
        self.need(n, field)
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


def read_region_ref(r: Reader, what: str) -> RegionRef:
    region = r.string(f"{what} region name")
    offset, byte_size = r.unpack(REGION_REF, f"{what} region offset and size")
    return RegionRef(region, offset, byte_size)


def read_kind(r: Reader, what: str) -> RegionRef | None:
    """(v2 bodies) A kind byte, then a region reference for :data:`KIND_REGION`."""
    kind = r.u8(f"{what} kind")
    if kind == KIND_FRAME:
        return None
    if kind != KIND_REGION:
        raise CodecError(ErrorCode.MALFORMED_FRAME, f"{r.what}: {what} has unknown kind {kind}")
    return read_region_ref(r, what)


def read_descriptors(
    r: Reader, count: int, kinds: bool = False
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
        ref = read_kind(r, f"tensor {name!r}") if kinds else None
        out.append((name, dtype, tuple(int(d) for d in dims), ref))
    return out


#: ``struct`` formats for a tensor's dims, by rank (built once, not per tensor).
_DIMS = tuple(struct.Struct(f"<{ndim}Q") for ndim in range(MAX_NDIM + 1))
#: A tensor's dtype code and rank, read together on the fast path.
_DTYPE_RANK = struct.Struct("<BB")
#: Wire dtype codes -> (DType, numpy dtype), for the fast path.
_DTYPES = {int(code): (code, code.numpy) for code in DType}


def read_descriptors_fast(
    r: Reader, count: int, kinds: bool = False
) -> list[tuple[str, DType, tuple[int, ...], RegionRef | None]] | None:
    """:func:`read_descriptors` for well-formed descriptors of tensors carried
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


def read_tensors(r: Reader, count: int, kinds: bool = False) -> dict[str, Any]:
    descriptors = read_descriptors_fast(r, count, kinds)
    if descriptors is None:
        descriptors = read_descriptors(r, count, kinds)
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
            r.need(nbytes, f"tensor {name!r} data ({nbytes} bytes)")
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
