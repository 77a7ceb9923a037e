"""One side of a twinfer connection, sans-I/O: the protocol's rules in one place.

A :class:`Connection` is fed the bytes received from the peer
(:meth:`~Connection.receive_data`) and hands back *events*
(:meth:`~Connection.next_event`; see :mod:`twinfer.wire.events`): the peer's
messages with their request id, the completed handshake, or the peer's
violations of the protocol.  Messages
to send go in through ``send_*`` methods and come out as chunks of bytes
(:meth:`~Connection.data_to_send`).  It does no I/O: the Twisted server
(:mod:`twinfer.frontends.binary`), the Twisted client (:mod:`twinfer.client`) and the
blocking client (:mod:`twinfer.blocking`) move its bytes.

What it owns (see ``docs/protocol.md`` §2, §5 and §7):

- the HELLO handshake and version negotiation.  Server: the first frame
  must be HELLO and a second HELLO is fatal.  Client: sends HELLO
  (:meth:`~Connection.start_handshake`) and checks the server's answer;
- the frame size limits: received frames are checked from their header
  before anything is buffered (a server's first frame, which must be
  HELLO, may be at most :data:`~twinfer.wire.frames.HELLO_MAX_FRAME_SIZE`);
  a client refuses to send a frame larger than the server accepts;
- request ids.  Client: allocates them and matches replies to the
  requests still in flight (late replies to cancelled requests are
  dropped).  Server: refuses a request whose id is still in flight; the
  server's in-flight requests are recorded in :attr:`Connection.in_flight`
  (the data plane's session for this connection keeps them there) and
  removed when they are answered;
- going away (``GOAWAY``, §7): a server announces the last request id it
  will answer (:meth:`~Connection.send_goaway`); a client that received it
  refuses to send new requests on the connection;
- which errors close the connection (:attr:`ErrorCode.closes_connection`;
  before the handshake, every error does) and which concern one request.

Errors the peer caused are :class:`~twinfer.errors.RemoteProtocolError`
(delivered as :class:`ProtocolViolation` events; a server connection has
already queued the ``ERROR`` frame that answers them).  Misuse by this side
raises :class:`~twinfer.errors.LocalProtocolError` and sends nothing.

Events are produced one at a time, so a server answers the frames received
before a broken one before it answers the break itself (h11's
``receive_data``/``next_event`` design).

The module runs over 500 lines on purpose: it is the protocol's state
machine for both roles, and splitting it would spread one set of rules over
several files (h11's ``_connection.py`` is one module for the same reason).
The message codecs and the events it uses live in their own modules.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from twinfer.errors import (
    CodecError,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    TwinferError,
)
from twinfer.wire.decode import decode_message
from twinfer.wire.encode import encode_message
from twinfer.wire.events import (
    Event,
    GoAwayReceived,
    HandshakeComplete,
    MessageReceived,
    ProtocolViolation,
    ServerClosing,
)
from twinfer.wire.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    HELLO_MAX_FRAME_SIZE,
    MAX_U64,
    Buffer,
    Chunk,
    Frame,
    FrameDecoder,
)
from twinfer.wire.messages import (
    PROTOCOL_VERSION,
    AdminReply,
    AdminRequest,
    Cancel,
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
    Metadata,
    ModelList,
    Ping,
    Pong,
    Predictions,
    RegionStatus,
    RegisterRegion,
    UnregisterRegion,
    needs_version,
    version_error,
)

#: The protocol versions this implementation speaks.
SUPPORTED_VERSIONS = range(1, PROTOCOL_VERSION + 1)
#: The request id of the client's HELLO (requests are numbered from 1).
HELLO_REQUEST_ID = 0
# "Not in flight", as opposed to in flight with the handle None.
_ABSENT = object()

#: Messages a client sends (besides HELLO, which both sides send).
CLIENT_MESSAGES: frozenset[type] = frozenset(
    {Ping, InferRequest, Cancel, ListModels, GetMetadata, ImageRequest, GetHealth, AdminRequest}
    | {RegisterRegion, UnregisterRegion, GetRegionStatus}
)
#: Messages a server sends (besides HELLO).
SERVER_MESSAGES: frozenset[type] = frozenset(
    {Pong, InferReply, ModelList, Metadata, Predictions, Health, AdminReply, Error, RegionStatus}
)
#: Requests whose ids the server tracks while they are in flight.
TRACKED_REQUESTS: frozenset[type] = frozenset({InferRequest, ImageRequest})


class Role(enum.Enum):
    """Which side of the connection a :class:`Connection` speaks for."""

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Where a connection is in its life."""

    #: A client that has not sent its HELLO yet.
    IDLE = "idle"
    #: Server: waiting for the client's HELLO; client: HELLO sent, waiting for the answer.
    HANDSHAKING = "handshaking"
    #: The handshake succeeded: requests and replies flow.
    OPEN = "open"
    #: Broken or closed: nothing more is received or sent.
    CLOSED = "closed"


def closes_connection(code: int) -> bool:
    """Whether an ``ERROR`` with ``code`` ends the connection: the rule of
    :attr:`ErrorCode.closes_connection`, applied to codes this version does not know too."""
    try:
        return ErrorCode(code).closes_connection
    except ValueError:
        return code < 100


def negotiate(offer: Hello, supported: range = SUPPORTED_VERSIONS) -> int:
    """Pick the highest protocol version both sides speak.

    Raises :class:`RemoteProtocolError` (``HANDSHAKE_FAILED``) when there is none.
    """
    common = [v for v in supported if offer.min_version <= v <= offer.max_version]
    if not common:
        raise RemoteProtocolError(
            ErrorCode.HANDSHAKE_FAILED,
            f"client speaks protocol versions {offer.min_version}..{offer.max_version}; "
            f"server speaks {supported.start}..{supported.stop - 1}",
        )
    return max(common)


class Connection:
    """The state of one side of one connection; see the module docstring.

    ``max_frame_size`` is the largest frame body this side accepts (a
    server announces it in its HELLO; a client raises it to the server's).
    ``agent`` is the software name sent in HELLO.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        agent: str = "",
        versions: range = SUPPORTED_VERSIONS,
    ) -> None:
        self.role = role
        self.agent = agent
        self.versions = versions
        self.state = State.IDLE if role is Role.CLIENT else State.HANDSHAKING
        #: The negotiated protocol version (0 until the handshake is complete).
        self.version = 0
        #: The peer's HELLO, once received.
        self.peer_hello: Hello | None = None
        #: Requests in flight: request id -> the adapter's handle for it.
        #: Client: filled by :meth:`send_request`, emptied as replies arrive.
        #: Server: the adapter adds the requests it accepted and removes them
        #: once answered; a request reusing an id in here is refused.
        self.in_flight: dict[int, Any] = {}
        # A server accepts only a HELLO-sized first frame: a client that has
        # not even said HELLO cannot make it buffer a large body.
        self._decoder = FrameDecoder(
            max_frame_size, HELLO_MAX_FRAME_SIZE if role is Role.SERVER else None
        )
        self._frames: deque[Frame] = deque()
        self._ready: deque[Event] = deque()
        self._outbox: list[Chunk] = []
        self._next_id = 1
        #: Server: the highest request id received from the client so far.
        self.last_request_id = 0
        #: The ``GOAWAY`` sent (server) or received (client), once there is one.
        self.going_away: GoAway | None = None

    # -- state ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (broken, refused or :meth:`close`\\ d)."""
        return self.state is State.CLOSED

    @property
    def max_frame_size(self) -> int:
        """The largest frame body this side accepts."""
        return self._decoder.max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        self._decoder.max_frame_size = value

    @property
    def peer_max_frame_size(self) -> int:
        """The largest frame body the peer accepts; 0 while unknown (or unlimited)."""
        return self.peer_hello.max_frame_size if self.peer_hello is not None else 0

    def close(self) -> dict[int, Any]:
        """Mark the connection closed (the transport is gone); returns the
        requests still in flight, which will never be answered."""
        self.state = State.CLOSED
        self._frames.clear()
        self._ready.clear()
        in_flight, self.in_flight = self.in_flight, {}
        return in_flight

    # -- sending ----------------------------------------------------------------

    def data_to_send(self) -> list[Chunk]:
        """The chunks queued for the peer since the last call, in order (for
        ``writeSequence`` or ``sendmsg``); the caller now owns them."""
        out, self._outbox = self._outbox, []
        return out

    def start_handshake(self) -> None:
        """(Client.) Queue the HELLO offering :attr:`versions`.

        Requests may follow at once, before the server's answer arrives.
        """
        self._require(Role.CLIENT, "start the handshake")
        if self.state is not State.IDLE:
            raise LocalProtocolError(
                ErrorCode.HANDSHAKE_FAILED,
                f"HELLO was already sent (the connection is {self.state.value})",
            )
        offer = Hello(self.versions.start, self.versions.stop - 1, 0, self.agent)
        self._outbox += encode_message(HELLO_REQUEST_ID, offer)
        self.state = State.HANDSHAKING

    def send_request(
        self, message: Message, handle: Any = None, request_id: int | None = None
    ) -> int:
        """(Client.) Queue a request; returns its request id.

        ``handle`` comes back with the reply's :class:`MessageReceived` (a
        Deferred, say).  The id is allocated unless given, in which case it
        must not be in flight.  Raises :class:`LocalProtocolError` before the
        HELLO, on a closed connection, for a message a client does not send
        and for a frame larger than the server accepts, and
        :class:`~twinfer.errors.CodecError` for a message the protocol cannot
        carry; nothing is queued then.
        """
        self._require(Role.CLIENT, "send requests")
        self._require_sendable()
        if self.going_away is not None:
            raise LocalProtocolError(
                ErrorCode.UNAVAILABLE,
                f"the server is going away ({self.going_away.reason or 'no reason given'}): "
                f"send new requests on another connection",
            )
        if type(message) not in CLIENT_MESSAGES or isinstance(message, Cancel):
            raise LocalProtocolError(
                ErrorCode.UNSUPPORTED_MESSAGE,
                f"a client does not send {type(message).__name__} as a request",
            )
        # Before the server's HELLO arrives, requests are sent on the hope
        # of the highest version offered (the server refuses them if not).
        version = self.version or self.versions.stop - 1
        if needs_version(message) > version:
            raise LocalProtocolError(ErrorCode.UNSUPPORTED_MESSAGE, version_error(message, version))
        if request_id is None:
            request_id = self._allocate_id()
        elif request_id in self.in_flight:
            raise LocalProtocolError(
                ErrorCode.DUPLICATE_REQUEST_ID, f"request id {request_id} is still in flight"
            )
        chunks = encode_message(request_id, message)
        limit = self.peer_max_frame_size
        if limit:
            size = sum(len(c) for c in chunks) - HEADER_SIZE
            if size > limit:
                # Refused here: the server would drop the whole connection.
                raise LocalProtocolError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"request of {size} bytes exceeds the server's limit of {limit} bytes",
                )
        self.in_flight[request_id] = handle
        self._outbox += chunks
        return request_id

    def cancel(self, request_id: int) -> bool:
        """(Client.) Give up on a request in flight: queue CANCEL for it and
        drop its reply if one still comes.  Returns whether it was in flight
        (``False``: already answered, say, and nothing is queued)."""
        self._require(Role.CLIENT, "cancel requests")
        if self.in_flight.pop(request_id, _ABSENT) is _ABSENT:
            return False
        if self.state is not State.CLOSED:
            self._outbox += encode_message(request_id, Cancel())
        return True

    def send_reply(self, request_id: int, message: Message) -> None:
        """(Server.) Queue the answer to request ``request_id``.

        On a closed connection the reply is dropped: its client is gone.
        Raises :class:`LocalProtocolError` before the handshake and for a
        message a server does not send, and
        :class:`~twinfer.errors.CodecError` for a message the protocol cannot
        carry (an output dtype without a wire code, say); nothing is queued then.
        """
        self._require(Role.SERVER, "send replies")
        if self.state is State.CLOSED:
            return
        if self.state is not State.OPEN:
            raise LocalProtocolError(
                ErrorCode.HANDSHAKE_FAILED, "no reply may be sent before the handshake"
            )
        if type(message) not in SERVER_MESSAGES:
            raise LocalProtocolError(
                ErrorCode.UNSUPPORTED_MESSAGE, f"a server does not send {type(message).__name__}"
            )
        self._outbox += encode_message(request_id, message)

    def send_goaway(self, reason: str) -> GoAway | None:
        """(Server.) Queue ``GOAWAY`` (request id 0) naming the highest request
        id received so far as the last one this server answers; returns it.

        Only once per connection, and only once the handshake is done (a
        connection still handshaking or closed gets none: ``None``).  The
        connection goes on: requests still in flight are answered, and the
        server answers what the client sends meanwhile as it likes
        (``UNAVAILABLE`` for new inference while draining).
        """
        self._require(Role.SERVER, "send GOAWAY")
        if self.state is not State.OPEN or self.going_away is not None:
            return None
        self.going_away = GoAway(self.last_request_id, reason)
        self._outbox += encode_message(HELLO_REQUEST_ID, self.going_away)
        return self.going_away

    def send_error(self, request_id: int, code: ErrorCode | int, message: str) -> None:
        """(Server.) Queue an ``ERROR`` answering request ``request_id``; see :meth:`send_reply`."""
        self.send_reply(request_id, Error(code, message))

    def _require(self, role: Role, action: str) -> None:
        if self.role is not role:
            raise LocalProtocolError(
                ErrorCode.UNSUPPORTED_MESSAGE, f"only a {role.value} may {action}"
            )

    def _require_sendable(self) -> None:
        if self.state is State.CLOSED:
            raise LocalProtocolError(ErrorCode.UNAVAILABLE, "the connection is closed")
        if self.state is State.IDLE:
            raise LocalProtocolError(
                ErrorCode.HANDSHAKE_FAILED, "a request cannot be sent before HELLO"
            )

    def _allocate_id(self) -> int:
        request_id = self._next_id
        while request_id in self.in_flight or request_id == HELLO_REQUEST_ID:
            request_id = request_id + 1 if request_id < MAX_U64 else 1
        self._next_id = request_id + 1 if request_id < MAX_U64 else 1
        return request_id

    # -- receiving --------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Add bytes received from the peer; then take the events from :meth:`next_event`."""
        if self.state is not State.CLOSED:
            self._frames.extend(self._decoder.feed(data))

    def read_buffer(self) -> memoryview | None:
        """Where a transport may receive the rest of a large frame's body in
        place (``recv_into``); then call :meth:`buffer_filled`.  ``None``
        when no body is being reassembled."""
        if self.state is State.CLOSED:
            return None
        return self._decoder.read_buffer()

    def buffer_filled(self, count: int) -> None:
        """``count`` bytes were received into :meth:`read_buffer`."""
        self._frames.extend(self._decoder.buffer_filled(count))

    def set_admission(self, admit: Callable[[int], bool] | None) -> None:
        """Ask ``admit(length)`` before a received frame's body is allocated
        (a memory budget): when it returns False, decoding stops (the bytes
        received meanwhile are held, unparsed) until :meth:`admitted`.  It
        may raise :class:`~twinfer.errors.CodecError` to refuse the frame,
        which breaks the connection like an oversize frame."""
        self._decoder.admit = admit

    @property
    def awaiting_admission(self) -> int:
        """The body length waiting for admission (0: none)."""
        return self._decoder.waiting

    @property
    def body_in_progress(self) -> int:
        """The length of the frame body allocated and being received (0: none)."""
        return self._decoder.body_in_progress

    def admitted(self) -> None:
        """The body awaited (:attr:`awaiting_admission`) may now be allocated:
        decode on; then take the events from :meth:`next_event`."""
        if self.state is not State.CLOSED:
            self._frames.extend(self._decoder.resume())

    def next_event(self) -> Event | None:
        """The next event from the bytes received so far; ``None`` when more are needed."""
        while not self._ready:
            if self.state is State.CLOSED:
                return None
            if self._frames:
                self._frame_received(self._frames.popleft())
            elif self._decoder.error is not None:
                error = self._decoder.error
                self._violation(0, RemoteProtocolError(error.code, error.message))
            else:
                return None
        return self._ready.popleft()

    def events(self) -> Iterator[Event]:
        """:meth:`next_event` until it returns ``None``."""
        while (event := self.next_event()) is not None:
            yield event

    def _frame_received(self, frame: Frame) -> None:
        try:
            message = decode_message(frame)
        except CodecError as e:
            # An unknown type keeps the stream in sync, but only once the
            # handshake is done, and only a server can answer it.
            keeps = (
                self.role is Role.SERVER
                and self.state is State.OPEN
                and isinstance(e.code, ErrorCode)
                and not e.code.closes_connection
            )
            self._violation(
                frame.request_id,
                RemoteProtocolError(e.code, e.message, closes_connection=not keeps),
            )
        else:
            if self.role is Role.SERVER:
                self._server_received(frame.request_id, message)
            else:
                self._client_received(frame.request_id, message)

    def _server_received(self, request_id: int, message: Message) -> None:
        name = type(message).__name__
        if self.state is State.HANDSHAKING:
            if not isinstance(message, Hello):
                self._violation(
                    request_id,
                    RemoteProtocolError(
                        ErrorCode.HANDSHAKE_FAILED, f"the first frame must be HELLO, got {name}"
                    ),
                )
                return
            try:
                self.version = negotiate(message, self.versions)
            except RemoteProtocolError as e:
                self._violation(request_id, e)
                return
            self.peer_hello = message
            self.state = State.OPEN
            answer = Hello(self.version, self.version, self.max_frame_size, self.agent)
            self._outbox += encode_message(request_id, answer)
            self._ready.append(HandshakeComplete(request_id, message))
        elif isinstance(message, Hello):
            self._violation(
                request_id, RemoteProtocolError(ErrorCode.HANDSHAKE_FAILED, "HELLO sent twice")
            )
        elif type(message) not in CLIENT_MESSAGES:
            self._violation(
                request_id,
                RemoteProtocolError(
                    ErrorCode.UNSUPPORTED_MESSAGE, f"the server does not accept {name} messages"
                ),
            )
        elif needs_version(message) > self.version:
            error = RemoteProtocolError(
                ErrorCode.UNSUPPORTED_MESSAGE, version_error(message, self.version)
            )
            self._violation(request_id, error, message)
        elif type(message) in TRACKED_REQUESTS and request_id in self.in_flight:
            error = RemoteProtocolError(
                ErrorCode.DUPLICATE_REQUEST_ID,
                f"request id {request_id} is already in flight on this connection",
            )
            self._violation(request_id, error, message)
        else:
            if not isinstance(message, Cancel):
                self.last_request_id = max(self.last_request_id, request_id)
            self._ready.append(MessageReceived(request_id, message))

    def _client_received(self, request_id: int, message: Message) -> None:
        name = type(message).__name__
        if self.state is State.HANDSHAKING:
            if isinstance(message, Error):
                self.state = State.CLOSED
                error = TwinferError(message.code, message.message)
                self._ready.append(ServerClosing(request_id, error))
            elif not isinstance(message, Hello):
                self._violation(
                    request_id,
                    RemoteProtocolError(
                        ErrorCode.HANDSHAKE_FAILED, f"the server answered HELLO with {name}"
                    ),
                )
            elif message.min_version != message.max_version or (
                message.max_version not in self.versions
            ):
                self._violation(
                    request_id,
                    RemoteProtocolError(
                        ErrorCode.HANDSHAKE_FAILED,
                        f"the server chose protocol versions "
                        f"{message.min_version}..{message.max_version}; this client speaks "
                        f"{self.versions.start}..{self.versions.stop - 1}",
                    ),
                )
            else:
                self.version = message.max_version
                self.peer_hello = message
                self.state = State.OPEN
                # The server may send frames up to its own limit.
                self.max_frame_size = max(self.max_frame_size, message.max_frame_size)
                self._ready.append(HandshakeComplete(request_id, message))
            return
        if isinstance(message, GoAway):
            self.going_away = message
            self._ready.append(GoAwayReceived(request_id, message))
            return
        if isinstance(message, Hello) or type(message) not in SERVER_MESSAGES:
            error = RemoteProtocolError(
                ErrorCode.UNSUPPORTED_MESSAGE,
                f"the server sent a {name} message",
                closes_connection=True,  # whatever the server meant, it is not a twinfer server
            )
            self._violation(request_id, error)
            return
        if request_id in self.in_flight:
            self._ready.append(MessageReceived(request_id, message, self.in_flight.pop(request_id)))
        # (Anything else is a late reply to a cancelled request: dropped.)
        if isinstance(message, Error) and closes_connection(message.code):
            self.state = State.CLOSED
            self._ready.append(
                ServerClosing(request_id, TwinferError(message.code, message.message))
            )

    def _violation(
        self, request_id: int, error: RemoteProtocolError, message: Message | None = None
    ) -> None:
        if self.role is Role.SERVER:
            self._outbox += encode_message(request_id, Error(error.code, error.message))
        if error.closes_connection:
            self.state = State.CLOSED
        self._ready.append(ProtocolViolation(request_id, error, message))
