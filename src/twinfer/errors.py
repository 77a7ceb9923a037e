"""Error codes shared by the server, the clients and the wire codec.

Codes travel on the wire in ``ERROR`` frames as an unsigned 16-bit integer;
their numbers are part of the protocol (see ``docs/protocol.md``) and must
never be reused for a different meaning.
"""

from __future__ import annotations

import contextlib
import enum
from typing import TypeVar

M = TypeVar("M")


class ErrorCode(enum.IntEnum):
    """Why a request (or a connection) failed.

    Codes below 100 are connection-level: the server sends the error frame
    and then closes the connection.  Codes from 100 up concern one request:
    the connection stays usable.
    """

    #: A frame could not be parsed (bad magic, truncated or inconsistent body).
    MALFORMED_FRAME = 1
    #: A frame's declared length exceeds the negotiated maximum frame size.
    FRAME_TOO_LARGE = 2
    #: The first frame was not a HELLO, or no common protocol version exists.
    HANDSHAKE_FAILED = 3

    #: The message type is not known to this server (framing is intact).
    UNSUPPORTED_MESSAGE = 100
    #: The named model is not served here.
    UNKNOWN_MODEL = 101
    #: An input is missing, unexpected or duplicated.
    INVALID_INPUT = 102
    #: An input has the wrong element type.
    INVALID_DTYPE = 103
    #: An input has a shape the model cannot accept.
    INVALID_SHAPE = 104
    #: A requested output name does not exist.
    UNKNOWN_OUTPUT = 105
    #: The request id is already in use by a pending request on this connection.
    DUPLICATE_REQUEST_ID = 106
    #: An image request for a model without an image task (``task`` in its
    #: config), or with a different one (``detect`` on a classifier).
    WRONG_TASK = 107
    #: A shared-memory region named by a request is not registered (for this
    #: connection, or server-wide over HTTP).
    UNKNOWN_REGION = 108
    #: A shared-memory registration or reference is invalid: a key that is not
    #: a shm object's name, an offset and size beyond the region or object, a
    #: byte size that does not match the tensor, a name already registered.
    INVALID_REGION = 109
    #: The model's queue (or the connection's in-flight limit) is full; retry later.
    OVERLOADED = 110
    #: No device can serve the model right now (failed, draining, shutting down).
    UNAVAILABLE = 111
    #: The request's deadline passed before it could run.
    DEADLINE_EXCEEDED = 112
    #: The request was cancelled by the client.
    CANCELLED = 113
    #: A per-client shared-memory limit (regions or mapped bytes) is reached.
    REGION_LIMIT = 114
    #: The device raised while running the model.
    INFERENCE_FAILED = 120
    #: A bug in twinfer; the message says what happened.
    INTERNAL = 121

    @property
    def closes_connection(self) -> bool:
        """Whether the server closes the connection after sending this error."""
        return self.value < 100


class TwinferError(Exception):
    """A failure with a wire :class:`ErrorCode` and a human-readable message.

    Raised by the server's validation and dispatch layers (and turned into an
    ``ERROR`` frame), and by the clients when the server answers with one.
    """

    def __init__(self, code: ErrorCode | int, message: str) -> None:
        # An unknown code from a newer peer stays a plain int.
        with contextlib.suppress(ValueError):
            code = ErrorCode(code)
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, ErrorCode) else f"code {self.code}"
        return f"{name}: {self.message}"


def expect_reply(message: object, kind: type[M]) -> M:
    """``message`` if it is a ``kind`` (the reply a client waited for), else
    raise ``INTERNAL``: the server answered with another message."""
    if not isinstance(message, kind):
        raise TwinferError(
            ErrorCode.INTERNAL, f"expected {kind.__name__} from the server, got {message!r}"
        )
    return message


class ProtocolError(TwinferError):
    """A rule of the binary protocol was broken (see :mod:`twinfer.wire.connection`)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: bad bytes, no HELLO first, a duplicate request id...

    ``code`` is the :class:`ErrorCode` the server answers with.
    """

    def __init__(
        self, code: ErrorCode | int, message: str, *, closes_connection: bool | None = None
    ) -> None:
        super().__init__(code, message)
        if closes_connection is None:
            closes_connection = not isinstance(self.code, ErrorCode) or self.code.closes_connection
        #: Whether the connection cannot go on after this (it is then closed).
        self.closes_connection = closes_connection


class LocalProtocolError(ProtocolError):
    """This side tried something the protocol forbids: a request before HELLO,
    a request id still in use, a frame larger than the peer accepts, a
    message in the wrong direction, or sending on a closed connection.

    Nothing was sent; the connection is unchanged.
    """


class CodecError(TwinferError):
    """The bytes on the wire do not form a valid twinfer frame or message.

    The wire codec raises this and nothing else for bad input.
    """


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem.

    Defined here, below both :mod:`twinfer.config` and :mod:`twinfer.taskconfig`,
    so that neither has to import the other for it.
    """
