"""Fuzz target: the frame decoder and the message decoders behind it.

The bytes (after two giving ``max_frame_size``) are fed to
:class:`~twinfer.wire.frames.FrameDecoder` in chunks the fuzzer chooses,
alternating between :meth:`feed` and the in-place
``read_buffer``/``buffer_filled`` path a transport uses for large bodies;
every completed frame goes through :func:`~twinfer.wire.decode.decode_message`.
Allowed: frames, a :class:`~twinfer.errors.CodecError` set as the decoder's
``error`` (``feed`` never raises), ``CodecError`` from ``decode_message``.
Bounded: the decoder never holds more than one header and one body of at most
``max_frame_size`` bytes.
"""

from __future__ import annotations

import contextlib

from twinfer.errors import CodecError
from twinfer.wire.decode import decode_message
from twinfer.wire.frames import HEADER_SIZE, FrameDecoder


def TestOneInput(data: bytes) -> None:  # noqa: N802 (libFuzzer's name)
    # Small limits keep each run fast; the checks are the same at 64 MiB.
    max_frame_size = int.from_bytes(data[:2], "little") % 4097
    decoder = FrameDecoder(max_frame_size)
    frames = []
    pos = 2
    while pos < len(data):
        # A control byte: the chunk's size - 1 (6 bits) and whether to
        # receive it in place (the top bit); then the chunk.
        control = data[pos]
        chunk = data[pos + 1 : pos + 2 + (control & 0x3F)]
        in_place = bool(control & 0x80)
        pos += 2 + (control & 0x3F)
        target = decoder.read_buffer()
        if in_place and target is not None:
            count = min(len(chunk), len(target))
            if count:
                target[:count] = chunk[:count]
                frames += decoder.buffer_filled(count)
                chunk = chunk[count:]
        if chunk:
            frames += decoder.feed(chunk)
        if decoder.buffered > HEADER_SIZE + max_frame_size:
            raise AssertionError(f"decoder holds {decoder.buffered} bytes")
    if decoder.error is not None and not isinstance(decoder.error, CodecError):
        raise AssertionError(f"decoder error {decoder.error!r}")
    for frame in frames:
        if len(frame.body) > max_frame_size:
            raise AssertionError(f"frame of {len(frame.body)} bytes passed the limit")
        with contextlib.suppress(CodecError):
            decode_message(frame)
