"""One table: what each outcome of a request means on every front end.

A request ends ``OK`` or with an :class:`~twinfer.errors.ErrorCode`.  The
binary protocol sends the code itself; HTTP (KServe v2 and the seed API)
answers the HTTP status in this table; gRPC answers the status code named
here (the names of ``grpc.StatusCode``, kept as strings so that this module
needs no gRPC import).  Front ends look outcomes up here and nowhere else, so
a new error code is mapped for all of them in one place.
"""

from __future__ import annotations

import attrs

from twinfer.errors import ErrorCode

__all__ = ["OK", "PERMISSION_DENIED", "Outcome", "outcome"]


@attrs.frozen
class Outcome:
    """How one outcome is reported on each front end."""

    #: ``"OK"`` or the ErrorCode's name: the ``code`` label of the metrics.
    name: str
    #: The HTTP status (both REST APIs).
    http_status: int
    #: The gRPC status code's name (``grpc.StatusCode[...]``).
    grpc_status: str
    #: A temporary refusal: the client should retry later (HTTP ``Retry-After``,
    #: gRPC retry info).
    retryable: bool = False


#: The outcome of a request that was answered with its result.
OK = Outcome("OK", 200, "OK")
#: A request the server was not started to allow (load and unload without
#: ``--allow-admin``).  Not an error code: the binary protocol answers those
#: ``UNSUPPORTED_MESSAGE``; the front ends that have a permission status
#: answer this one (:class:`~twinfer.ops.repository.AdminDisabled`).
PERMISSION_DENIED = Outcome("PERMISSION_DENIED", 403, "PERMISSION_DENIED")

_BY_CODE: dict[ErrorCode, Outcome] = {
    code: Outcome(code.name, status, grpc, retryable)
    for code, status, grpc, retryable in (
        # Connection-level codes: HTTP and gRPC meet them only as what they
        # mean for one request (a body or message they could not parse).
        (ErrorCode.MALFORMED_FRAME, 400, "INVALID_ARGUMENT", False),
        (ErrorCode.FRAME_TOO_LARGE, 413, "RESOURCE_EXHAUSTED", False),
        (ErrorCode.HANDSHAKE_FAILED, 400, "FAILED_PRECONDITION", False),
        (ErrorCode.UNSUPPORTED_MESSAGE, 501, "UNIMPLEMENTED", False),
        (ErrorCode.UNKNOWN_MODEL, 404, "NOT_FOUND", False),
        (ErrorCode.INVALID_INPUT, 400, "INVALID_ARGUMENT", False),
        (ErrorCode.INVALID_DTYPE, 400, "INVALID_ARGUMENT", False),
        (ErrorCode.INVALID_SHAPE, 400, "INVALID_ARGUMENT", False),
        (ErrorCode.UNKNOWN_OUTPUT, 400, "INVALID_ARGUMENT", False),
        (ErrorCode.DUPLICATE_REQUEST_ID, 400, "ALREADY_EXISTS", False),
        # An image sent to a model without an image task (or the other task).
        (ErrorCode.WRONG_TASK, 400, "INVALID_ARGUMENT", False),
        # 429 Too Many Requests: come back later.
        # Shared-memory regions (Triton's system shared-memory extension).
        (ErrorCode.UNKNOWN_REGION, 404, "NOT_FOUND", False),
        (ErrorCode.INVALID_REGION, 400, "INVALID_ARGUMENT", False),
        (ErrorCode.REGION_LIMIT, 400, "RESOURCE_EXHAUSTED", False),
        (ErrorCode.OVERLOADED, 429, "RESOURCE_EXHAUSTED", True),
        (ErrorCode.UNAVAILABLE, 503, "UNAVAILABLE", True),
        (ErrorCode.DEADLINE_EXCEEDED, 504, "DEADLINE_EXCEEDED", False),
        # nginx's "client closed request": the client is gone and never sees it.
        (ErrorCode.CANCELLED, 499, "CANCELLED", False),
        (ErrorCode.INFERENCE_FAILED, 500, "INTERNAL", False),
        (ErrorCode.INTERNAL, 500, "INTERNAL", False),
    )
}

#: Any code this table does not know (a newer peer's) is an internal error.
_UNKNOWN = Outcome("INTERNAL", 500, "INTERNAL")


def outcome(code: ErrorCode | int | None) -> Outcome:
    """The :class:`Outcome` of ``code`` (``None`` or 0: :data:`OK`)."""
    if not code:
        return OK
    if isinstance(code, ErrorCode):
        return _BY_CODE[code]
    try:
        return _BY_CODE[ErrorCode(code)]
    except ValueError:
        return _UNKNOWN
