"""Fuzz target: the image path, Pillow decoding hostile files.

:func:`~twinfer.tasks.preprocess.decode_image` gets any bytes, a network
input size and resize mode the fuzzer picks, and a pixel limit
(``max_image_pixels``) of :data:`MAX_PIXELS`.  Allowed: a decoded image of
at most the limit's pixels, or :class:`~twinfer.errors.TwinferError`
``INVALID_INPUT``.  Bounded: the process's peak RSS stays below its level at
import plus :data:`RSS_BUDGET` (an image of the limit's size in RGB is 12 MiB).
"""

from __future__ import annotations

import resource

from twinfer.errors import ErrorCode, TwinferError
from twinfer.tasks.preprocess import decode_image

MAX_PIXELS = 4_000_000
#: Peak RSS allowed above the level at import, in KiB (``ru_maxrss``'s unit).
RSS_BUDGET = 512 * 1024
RSS_AT_IMPORT = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def TestOneInput(data: bytes) -> None:  # noqa: N802 (libFuzzer's name)
    # Network height and width (two bytes each, 1..1024), letterbox? (odd),
    # then the file.
    height = int.from_bytes(data[0:2], "little") % 1024 + 1
    width = int.from_bytes(data[2:4], "little") % 1024 + 1
    resize = "letterbox" if data[4:5] and data[4] & 1 else "stretch"
    image = data[5:]
    network_hw = (height, width)
    try:
        decoded = decode_image(image, network_hw, resize, MAX_PIXELS)
    except TwinferError as e:
        if e.code is not ErrorCode.INVALID_INPUT:
            raise AssertionError(f"refused with {e.code!r}, not INVALID_INPUT") from e
    else:
        if decoded.tensor.ndim != 4 or decoded.tensor.shape[3] != 3:
            raise AssertionError(f"decoded to a tensor of shape {decoded.tensor.shape}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if peak > RSS_AT_IMPORT + RSS_BUDGET:
        raise AssertionError(f"peak RSS {peak} KiB, {peak - RSS_AT_IMPORT} KiB above the start")
