"""Fuzz target: the sans-I/O :class:`~twinfer.wire.connection.Connection`, both roles.

The first byte picks the role (odd: server); the rest is received in chunks the fuzzer
chooses.  A server plays its adapter's part (records the tracked requests it
accepts in ``in_flight`` and answers some of them); a client has sent HELLO
and, once open, a few requests.  Allowed events: the protocol's own, with
peer errors only as :class:`~twinfer.errors.RemoteProtocolError`; nothing
may raise out of ``receive_data``/``next_event``.  Bounded: no more events
than frames, at most one buffered frame, and the bytes queued for the peer
stay proportional to the input.
"""

from __future__ import annotations

from twinfer.errors import ErrorCode, RemoteProtocolError
from twinfer.wire.connection import TRACKED_REQUESTS, Connection, Role, State
from twinfer.wire.events import (
    GoAwayReceived,
    HandshakeComplete,
    MessageReceived,
    ProtocolViolation,
    ServerClosing,
)
from twinfer.wire.frames import HEADER_SIZE
from twinfer.wire.messages import GetHealth, Ping

MAX_FRAME_SIZE = 4096
EVENTS = (HandshakeComplete, MessageReceived, ProtocolViolation, ServerClosing, GoAwayReceived)


def _handle(connection: Connection, control: int, event: object) -> None:
    if not isinstance(event, EVENTS):
        raise AssertionError(f"unexpected event {event!r}")
    if isinstance(event, ProtocolViolation) and not isinstance(event.error, RemoteProtocolError):
        raise AssertionError(f"violation carries {event.error!r}")
    if isinstance(event, HandshakeComplete) and connection.role is Role.CLIENT:
        # A client accepts frames up to the limit its server announces (by
        # design, up to 4 GiB): keep this run's allocations small.
        connection.max_frame_size = min(connection.max_frame_size, MAX_FRAME_SIZE)
    if connection.role is Role.SERVER:
        if isinstance(event, MessageReceived) and type(event.message) in TRACKED_REQUESTS:
            connection.in_flight[event.request_id] = None
        if connection.in_flight and control & 0x40:
            request_id = next(iter(connection.in_flight))
            del connection.in_flight[request_id]
            connection.send_error(request_id, ErrorCode.UNAVAILABLE, "answered by the fuzzer")
        if connection.state is State.OPEN and control & 0xC0 == 0xC0:
            connection.send_goaway("the fuzzer is leaving")
    elif connection.state is State.OPEN and connection.going_away is None and control & 0x80:
        connection.send_request(Ping() if control & 1 else GetHealth())
        if connection.in_flight and control & 0x40:
            connection.cancel(next(iter(connection.in_flight)))


def TestOneInput(data: bytes) -> None:  # noqa: N802 (libFuzzer's name)
    role = Role.SERVER if data[:1] and data[0] & 1 else Role.CLIENT
    connection = Connection(role, max_frame_size=MAX_FRAME_SIZE, agent="fuzz")
    if role is Role.CLIENT:
        connection.start_handshake()
    received = 0
    events = 0
    sent = sum(len(c) for c in connection.data_to_send())
    pos = 1
    while pos < len(data) and not connection.closed:
        # A control byte: the chunk's size - 1 (6 bits) and two bits that
        # choose what this side does after each event; then the chunk.
        control = data[pos]
        chunk = data[pos + 1 : pos + 2 + (control & 0x3F)]
        pos += 2 + (control & 0x3F)
        received += len(chunk)
        connection.receive_data(chunk)
        while (event := connection.next_event()) is not None:
            events += 1
            _handle(connection, control, event)
        sent += sum(len(c) for c in connection.data_to_send())
    frames = received // HEADER_SIZE + 1  # each event answers at least one frame
    if events > frames:
        raise AssertionError(f"{events} events from {received} bytes")
    body = connection.read_buffer()
    if body is not None and len(body) > connection.max_frame_size:
        raise AssertionError("a body larger than the limit is being reassembled")
    # Each frame is answered by at most one reply and one ERROR of bounded size.
    if sent > 4096 + frames * 2 * (HEADER_SIZE + 512):
        raise AssertionError(f"{sent} bytes queued for {received} received")
