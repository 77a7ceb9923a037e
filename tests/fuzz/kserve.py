"""Fuzz target: the KServe v2 JSON request parser and its binary tensor extension.

:func:`~twinfer.frontends.http.kserve.decode_infer_request` gets a body and,
at the fuzzer's choice, an ``Inference-Header-Content-Length`` value (absent,
the right length, or any Latin-1 text, as an HTTP header arrives).
Allowed: an :class:`~twinfer.wire.messages.InferRequest` or a
:class:`~twinfer.errors.TwinferError`.  Bounded: the decoded tensors never
hold more bytes than the body's binary part unless their data came as JSON.
"""

from __future__ import annotations

from twinfer.errors import TwinferError
from twinfer.frontends.http.kserve import decode_infer_request
from twinfer.wire.messages import RegionTensor


def TestOneInput(data: bytes) -> None:  # noqa: N802 (libFuzzer's name)
    # The first byte chooses the header: 0 absent, 1 a length from the next
    # two bytes, 2 a value of the next byte's count of bytes; then the body.
    choice = data[0] % 3 if data else 0
    header_length: str | None
    if choice == 0:
        header_length = None
        body = data[1:]
    elif choice == 1:
        body = data[3:]
        header_length = str(min(int.from_bytes(data[1:3], "little"), len(body)))
    else:
        size = data[1] % 9 if len(data) > 1 else 0
        header_length = data[2 : 2 + size].decode("latin-1")
        body = data[2 + size :]
    try:
        request = decode_infer_request(bytearray(body), header_length)
    except TwinferError:
        return
    for name, array in request.inputs.items():
        if isinstance(array, RegionTensor):
            continue  # a reference to shared memory holds no bytes of the body
        # A JSON "data" list makes at most one element per byte of the body.
        if array.size > len(body) + 1 and array.nbytes > 8 * len(body):
            raise AssertionError(f"input {name!r} of {array.nbytes} bytes from {len(body)}")
