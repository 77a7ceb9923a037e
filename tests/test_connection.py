"""The sans-I/O Connection, both roles, in memory: handshake, ids, limits and the close rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from twinfer.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from twinfer.wire.connection import Connection, Role, State, negotiate
from twinfer.wire.decode import decode_message
from twinfer.wire.encode import encode_bytes
from twinfer.wire.events import (
    Event,
    GoAwayReceived,
    HandshakeComplete,
    MessageReceived,
    ProtocolViolation,
    ServerClosing,
)
from twinfer.wire.frames import HEADER, HEADER_SIZE, HELLO_MAX_FRAME_SIZE, MAGIC, FrameDecoder
from twinfer.wire.messages import (
    PROTOCOL_VERSION,
    Cancel,
    Error,
    GetMetadata,
    GoAway,
    Hello,
    ImageRequest,
    InferReply,
    InferRequest,
    ListModels,
    Message,
    ModelList,
    Ping,
    Pong,
)

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def sent(connection: Connection) -> list[tuple[int, Message]]:
    """Decode what ``connection`` queued for its peer (and take it)."""
    data = b"".join(bytes(c) for c in connection.data_to_send())
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    assert decoder.error is None and decoder.buffered == 0
    return [(f.request_id, decode_message(f)) for f in frames]


def receive(connection: Connection, data: bytes) -> list[Event]:
    connection.receive_data(data)
    return list(connection.events())


def server(max_frame_size: int = 4096, handshake: bool = True) -> Connection:
    connection = Connection(Role.SERVER, max_frame_size=max_frame_size, agent="test-server")
    if handshake:
        [event] = receive(connection, encode_bytes(0, Hello(agent="test-client")))
        assert isinstance(event, HandshakeComplete)
        connection.data_to_send()
    return connection


SERVER_HELLO = Hello(1, 1, 4096, "test-server")


def client(server_hello: Hello | None = SERVER_HELLO) -> Connection:
    connection = Connection(Role.CLIENT, agent="test-client")
    connection.start_handshake()
    connection.data_to_send()
    if server_hello is not None:
        [event] = receive(connection, encode_bytes(0, server_hello))
        assert isinstance(event, HandshakeComplete)
    return connection


def violation(events: list[Event]) -> ProtocolViolation:
    [event] = events
    assert isinstance(event, ProtocolViolation), event
    return event


# -- server: handshake -----------------------------------------------------------


def test_server_handshake_answers_hello_with_the_chosen_version_and_its_limit() -> None:
    connection = server(handshake=False)
    assert connection.state is State.HANDSHAKING
    [event] = receive(connection, encode_bytes(7, Hello(1, 3, 0, "test-client")))
    assert event == HandshakeComplete(7, Hello(1, 3, 0, "test-client"))
    # The highest version both speak: this server's own (2, shared memory).
    assert connection.state is State.OPEN and connection.version == PROTOCOL_VERSION == 2
    assert sent(connection) == [(7, Hello(2, 2, 4096, "test-server"))]


def test_server_refuses_a_first_frame_that_is_not_hello_and_closes() -> None:
    connection = server(handshake=False)
    event = violation(receive(connection, encode_bytes(9, Ping())))
    assert event.request_id == 9 and event.error.code is ErrorCode.HANDSHAKE_FAILED
    assert "got Ping" in event.error.message and event.error.closes_connection
    assert connection.closed
    [(rid, error)] = sent(connection)
    assert rid == 9 and error == Error(ErrorCode.HANDSHAKE_FAILED, event.error.message)
    # Nothing more is read from a closed connection.
    assert receive(connection, encode_bytes(0, Hello())) == []
    assert sent(connection) == []


def test_server_refuses_a_version_it_does_not_speak() -> None:
    connection = server(handshake=False)
    event = violation(receive(connection, encode_bytes(0, Hello(7, 9))))
    assert event.error.code is ErrorCode.HANDSHAKE_FAILED and "7..9" in event.error.message
    assert connection.closed and [m.code for _, m in sent(connection)] == [3]  # type: ignore[union-attr]


def test_hello_twice_is_fatal() -> None:
    connection = server()
    event = violation(receive(connection, encode_bytes(3, Hello())))
    assert event.error.code is ErrorCode.HANDSHAKE_FAILED and "twice" in event.error.message
    assert connection.closed


def test_before_the_handshake_even_an_unknown_type_closes() -> None:
    connection = server(handshake=False)
    event = violation(receive(connection, HEADER.pack(MAGIC, 0x66, 0, 0, 1)))
    assert event.error.code is ErrorCode.UNSUPPORTED_MESSAGE and event.error.closes_connection
    assert connection.closed


# -- server: per-request errors and ids ----------------------------------------------


def test_after_the_handshake_an_unknown_type_concerns_only_its_request() -> None:
    connection = server()
    event = violation(receive(connection, HEADER.pack(MAGIC, 0x66, 0, 0, 12)))
    assert (event.request_id, event.error.code) == (12, ErrorCode.UNSUPPORTED_MESSAGE)
    assert not event.error.closes_connection and not connection.closed
    assert sent(connection) == [(12, Error(ErrorCode.UNSUPPORTED_MESSAGE, event.error.message))]
    assert receive(connection, encode_bytes(13, Ping())) == [MessageReceived(13, Ping())]


def test_a_reply_message_from_a_client_is_unsupported() -> None:
    connection = server()
    event = violation(receive(connection, encode_bytes(2, Pong())))
    assert event.error.code is ErrorCode.UNSUPPORTED_MESSAGE and "Pong" in event.error.message
    assert not connection.closed


def test_duplicate_request_id_is_refused_while_the_first_is_in_flight() -> None:
    connection = server()
    [first] = receive(connection, encode_bytes(5, InferRequest("tiny", {"x": X})))
    assert isinstance(first, MessageReceived)
    connection.in_flight[5] = "job 5"  # the adapter accepted it
    event = violation(receive(connection, encode_bytes(5, ImageRequest("tiny", b"jpeg"))))
    assert (event.request_id, event.error.code) == (5, ErrorCode.DUPLICATE_REQUEST_ID)
    assert not event.error.closes_connection
    assert isinstance(event.message, ImageRequest) and event.message.model == "tiny"
    assert sent(connection) == [(5, Error(ErrorCode.DUPLICATE_REQUEST_ID, event.error.message))]
    assert connection.in_flight == {5: "job 5"}
    # Ids of untracked requests are only echoed, and an answered id is free again.
    assert receive(connection, encode_bytes(5, Ping())) == [MessageReceived(5, Ping())]
    del connection.in_flight[5]
    [again] = receive(connection, encode_bytes(5, InferRequest("tiny", {"x": X})))
    assert isinstance(again, MessageReceived)


def test_a_well_formed_admin_request_for_an_unknown_op_keeps_the_connection() -> None:
    connection = server()
    body = b'{"op":"explode"}'
    event = violation(receive(connection, HEADER.pack(MAGIC, 0x40, 0, len(body), 3) + body))
    assert (event.request_id, event.error.code) == (3, ErrorCode.INVALID_INPUT)
    assert not connection.closed


# -- framing ----------------------------------------------------------------------


STREAM = b"".join(
    [
        encode_bytes(0, Hello(agent="c")),
        encode_bytes(1, Ping()),
        encode_bytes(2, InferRequest("tiny", {"x": X}, ("y",), 10, 1)),
        encode_bytes(3, GetMetadata("tiny")),
        encode_bytes(4, ListModels()),
    ]
)


def summary(events: list[Event]) -> list[tuple[str, int, str]]:
    out = []
    for event in events:
        message = getattr(event, "message", None) or getattr(event, "hello", None)
        out.append((type(event).__name__, event.request_id, type(message).__name__))
    return out


EXPECTED = [
    ("HandshakeComplete", 0, "Hello"),
    ("MessageReceived", 1, "Ping"),
    ("MessageReceived", 2, "InferRequest"),
    ("MessageReceived", 3, "GetMetadata"),
    ("MessageReceived", 4, "ListModels"),
]


@pytest.mark.parametrize("split", range(len(STREAM) + 1))
def test_a_stream_split_at_any_point_gives_the_same_events(split: int) -> None:
    connection = server(handshake=False)
    events = receive(connection, STREAM[:split]) + receive(connection, STREAM[split:])
    assert summary(events) == EXPECTED
    infer = events[2]
    assert isinstance(infer, MessageReceived) and isinstance(infer.message, InferRequest)
    np.testing.assert_array_equal(infer.message.inputs["x"], X)


def test_a_stream_fed_byte_by_byte_gives_the_same_events() -> None:
    connection = server(handshake=False)
    events: list[Event] = []
    for i in range(len(STREAM)):
        events += receive(connection, STREAM[i : i + 1])
    assert summary(events) == EXPECTED


def test_receiving_in_place_gives_the_same_events() -> None:
    big = np.ones((64, 64), np.float32)
    data = encode_bytes(0, Hello()) + encode_bytes(1, InferRequest("tiny", {"x": big}))
    head = len(encode_bytes(0, Hello())) + HEADER_SIZE  # HELLO, then the request's header
    connection = server(max_frame_size=1 << 20, handshake=False)
    connection.receive_data(data[:head])
    [hello] = connection.events()
    target = connection.read_buffer()
    assert isinstance(hello, HandshakeComplete) and target is not None
    rest = data[head:]
    assert len(target) == len(rest)
    target[:] = rest
    connection.buffer_filled(len(rest))
    [event] = connection.events()
    assert isinstance(event, MessageReceived) and isinstance(event.message, InferRequest)
    np.testing.assert_array_equal(event.message.inputs["x"], big)
    assert connection.read_buffer() is None


def test_oversize_frame_is_refused_from_its_header_before_buffering() -> None:
    connection = server(max_frame_size=1000)
    event = violation(receive(connection, HEADER.pack(MAGIC, 0x10, 0, 10**9, 3)))
    assert event.error.code is ErrorCode.FRAME_TOO_LARGE and "1000000000" in event.error.message
    assert event.error.closes_connection and connection.closed
    assert connection.read_buffer() is None  # no buffer was allocated for the body
    assert [m.code for _, m in sent(connection)] == [ErrorCode.FRAME_TOO_LARGE]  # type: ignore[union-attr]


def test_before_the_handshake_only_a_hello_sized_frame_is_accepted() -> None:
    connection = server(max_frame_size=1 << 30, handshake=False)
    event = violation(receive(connection, HEADER.pack(MAGIC, 0x01, 0, 60 << 20, 0)))
    assert event.error.code is ErrorCode.FRAME_TOO_LARGE
    assert str(HELLO_MAX_FRAME_SIZE) in event.error.message
    assert connection.closed and connection.read_buffer() is None  # nothing allocated
    assert [m.code for _, m in sent(connection)] == [ErrorCode.FRAME_TOO_LARGE]  # type: ignore[union-attr]


def test_a_large_request_pipelined_right_behind_hello_is_accepted() -> None:
    connection = server(max_frame_size=1 << 20, handshake=False)
    big = np.ones((64, 64), np.float32)  # 16 KiB: above the HELLO limit
    connection.receive_data(
        encode_bytes(0, Hello()) + encode_bytes(1, InferRequest("tiny", {"x": big}))
    )
    hello, request = connection.events()
    assert isinstance(hello, HandshakeComplete) and isinstance(request, MessageReceived)


def test_frames_before_a_broken_one_are_answered_before_the_break() -> None:
    connection = server()
    connection.receive_data(encode_bytes(1, Ping()) + encode_bytes(2, Ping()) + b"\x00" * 20)
    for event in connection.events():
        if isinstance(event, MessageReceived):
            connection.send_reply(event.request_id, Pong())
    replies = sent(connection)
    assert [(rid, type(m)) for rid, m in replies] == [(1, Pong), (2, Pong), (0, Error)]
    assert replies[2][1] == Error(ErrorCode.MALFORMED_FRAME, replies[2][1].message)  # type: ignore[union-attr]
    assert connection.closed


# -- server: local misuse ------------------------------------------------------------


def test_server_misuse_raises_local_protocol_error_and_sends_nothing() -> None:
    connection = server(handshake=False)
    with pytest.raises(LocalProtocolError) as e:
        connection.send_reply(1, Pong())
    assert e.value.code is ErrorCode.HANDSHAKE_FAILED
    receive(connection, encode_bytes(0, Hello()))
    connection.data_to_send()
    with pytest.raises(LocalProtocolError) as e:
        connection.send_reply(1, Ping())  # a client's message
    assert e.value.code is ErrorCode.UNSUPPORTED_MESSAGE
    with pytest.raises(LocalProtocolError):
        connection.send_request(Ping())
    with pytest.raises(LocalProtocolError):
        connection.start_handshake()
    assert sent(connection) == []


def test_replies_after_close_are_dropped_and_in_flight_requests_returned() -> None:
    connection = server()
    connection.in_flight[4] = "job 4"
    assert connection.close() == {4: "job 4"}
    connection.send_reply(4, Pong())
    connection.send_error(4, ErrorCode.CANCELLED, "cancelled")
    assert sent(connection) == [] and connection.in_flight == {}


# -- client -------------------------------------------------------------------------


def test_client_sends_hello_with_id_0_and_requests_from_1() -> None:
    connection = Connection(Role.CLIENT, agent="test-client")
    with pytest.raises(LocalProtocolError) as e:
        connection.send_request(Ping())
    assert e.value.code is ErrorCode.HANDSHAKE_FAILED
    assert connection.data_to_send() == []
    connection.start_handshake()
    # Requests may follow the HELLO at once (the server handles frames in order).
    assert connection.send_request(Ping(), "a") == 1
    assert connection.send_request(ListModels(), "b") == 2
    assert sent(connection) == [(0, Hello(1, 2, 0, "test-client")), (1, Ping()), (2, ListModels())]
    with pytest.raises(LocalProtocolError):
        connection.start_handshake()  # HELLO twice


def test_client_handshake_takes_the_servers_limits() -> None:
    connection = client(server_hello=None)
    [event] = receive(connection, encode_bytes(0, Hello(1, 1, 128 * 1024 * 1024, "srv")))
    assert isinstance(event, HandshakeComplete) and event.hello.agent == "srv"
    assert connection.version == 1 and connection.peer_max_frame_size == 128 * 1024 * 1024
    assert connection.max_frame_size == 128 * 1024 * 1024  # the server may send that much


def test_client_refuses_a_version_it_did_not_offer() -> None:
    connection = client(server_hello=None)
    event = violation(receive(connection, encode_bytes(0, Hello(3, 3, 4096))))
    assert event.error.code is ErrorCode.HANDSHAKE_FAILED and "3..3" in event.error.message
    assert connection.closed
    assert connection.data_to_send() == []  # a client never sends ERROR frames


def test_client_reports_a_refused_handshake_as_the_server_closing() -> None:
    connection = client(server_hello=None)
    refusal = Error(ErrorCode.HANDSHAKE_FAILED, "client speaks protocol versions 1..1")
    [event] = receive(connection, encode_bytes(0, refusal))
    assert isinstance(event, ServerClosing) and event.error.code is ErrorCode.HANDSHAKE_FAILED
    assert connection.closed
    with pytest.raises(LocalProtocolError) as e:
        connection.send_request(Ping())
    assert e.value.code is ErrorCode.UNAVAILABLE


def test_replies_are_matched_to_their_requests_in_any_order() -> None:
    connection = client()
    first = connection.send_request(InferRequest("tiny", {"x": X}), "first")
    second = connection.send_request(Ping(), "second")
    connection.data_to_send()
    events = receive(
        connection,
        encode_bytes(second, Pong())
        + encode_bytes(first, Error(ErrorCode.OVERLOADED, "full"))
        + encode_bytes(99, Pong()),  # answers nothing in flight: dropped
    )
    assert [(e.request_id, e.handle, type(e.message)) for e in events] == [  # type: ignore[union-attr]
        (second, "second", Pong),
        (first, "first", Error),
    ]
    assert connection.in_flight == {} and not connection.closed


def test_a_cancelled_requests_late_reply_is_dropped() -> None:
    connection = client()
    request_id = connection.send_request(Ping(), "h")
    connection.data_to_send()
    assert connection.cancel(request_id) is True
    assert connection.cancel(request_id) is False  # no longer in flight: nothing to cancel
    assert sent(connection) == [(request_id, Cancel())]
    assert receive(connection, encode_bytes(request_id, Pong())) == []


def test_client_misuse_raises_local_protocol_error_and_sends_nothing() -> None:
    connection = client()
    connection.send_request(Ping(), request_id=7)
    connection.data_to_send()
    with pytest.raises(LocalProtocolError) as e:
        connection.send_request(Ping(), request_id=7)
    assert e.value.code is ErrorCode.DUPLICATE_REQUEST_ID
    with pytest.raises(LocalProtocolError) as e:
        connection.send_request(ModelList(()))  # a server's message
    assert e.value.code is ErrorCode.UNSUPPORTED_MESSAGE
    with pytest.raises(LocalProtocolError):
        connection.send_request(Hello())
    with pytest.raises(LocalProtocolError):
        connection.send_reply(7, Pong())
    # Larger than the server's 4096 bytes: the server would drop the connection.
    with pytest.raises(LocalProtocolError) as e:
        connection.send_request(InferRequest("tiny", {"x": np.zeros((300, 4), np.float32)}))
    assert e.value.code is ErrorCode.FRAME_TOO_LARGE and "4096" in e.value.message
    assert sent(connection) == [] and list(connection.in_flight) == [7]


def test_a_connection_level_error_answers_its_request_then_closes() -> None:
    connection = client()
    a = connection.send_request(Ping(), "a")
    b = connection.send_request(Ping(), "b")
    events = receive(connection, encode_bytes(a, Error(ErrorCode.MALFORMED_FRAME, "bad")))
    first, closing = events
    assert isinstance(first, MessageReceived) and first.handle == "a"
    assert isinstance(closing, ServerClosing) and closing.error.code is ErrorCode.MALFORMED_FRAME
    assert connection.closed and connection.close() == {b: "b"}


def test_a_connection_level_error_for_no_request_closes() -> None:
    connection = client()
    connection.send_request(Ping(), "a")
    [event] = receive(connection, encode_bytes(0, Error(ErrorCode.MALFORMED_FRAME, "bad")))
    assert isinstance(event, ServerClosing) and connection.closed
    # A per-request code for no request changes nothing.
    other = client()
    assert receive(other, encode_bytes(0, Error(ErrorCode.OVERLOADED, "x"))) == []
    assert not other.closed


def test_bad_bytes_from_the_server_close_the_client() -> None:
    connection = client()
    event = violation(receive(connection, b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    assert event.error.code is ErrorCode.MALFORMED_FRAME and event.error.closes_connection
    other = client()
    event = violation(receive(other, encode_bytes(1, Ping())))  # a client's message
    assert event.error.code is ErrorCode.UNSUPPORTED_MESSAGE and other.closed


# -- both sides together ------------------------------------------------------------------


def test_client_and_server_connections_talk_to_each_other() -> None:
    c = Connection(Role.CLIENT, agent="c")
    s = Connection(Role.SERVER, max_frame_size=1 << 20, agent="s")
    c.start_handshake()
    request_id = c.send_request(InferRequest("tiny", {"x": X}), "mine")
    s.receive_data(b"".join(bytes(chunk) for chunk in c.data_to_send()))
    hello, request = s.events()
    assert isinstance(hello, HandshakeComplete) and isinstance(request, MessageReceived)
    s.in_flight[request.request_id] = "job"
    del s.in_flight[request.request_id]
    s.send_reply(request.request_id, InferReply({"y": X * 2}, 3, 4))
    c.receive_data(b"".join(bytes(chunk) for chunk in s.data_to_send()))
    done, reply = c.events()
    assert isinstance(done, HandshakeComplete) and done.hello == Hello(2, 2, 1 << 20, "s")
    assert isinstance(reply, MessageReceived) and reply.request_id == request_id
    assert reply.handle == "mine" and isinstance(reply.message, InferReply)
    np.testing.assert_array_equal(reply.message.outputs["y"], X * 2)


def test_goaway_names_the_last_request_and_the_client_then_refuses_new_requests() -> None:
    c = Connection(Role.CLIENT, agent="c")
    s = Connection(Role.SERVER, agent="s")
    assert s.send_goaway("too early") is None  # no HELLO yet: nothing can be sent
    c.start_handshake()
    first = c.send_request(InferRequest("tiny", {"x": X}), "first")
    second = c.send_request(Ping(), "second")
    s.receive_data(b"".join(bytes(chunk) for chunk in c.data_to_send()))
    assert [type(e) for e in s.events()] == [HandshakeComplete, MessageReceived, MessageReceived]
    s.data_to_send()  # the HELLO
    assert s.send_goaway("the server is shutting down") == GoAway(
        second, "the server is shutting down"
    )
    assert s.send_goaway("again") is None  # once per connection
    assert sent(s) == [(0, GoAway(second, "the server is shutting down"))]
    # A request already on its way when the server said so.
    late = c.send_request(Ping(), "late")
    c.receive_data(encode_bytes(0, Hello(1, 1, 4096, "s")) + encode_bytes(0, s.going_away))
    done, going = c.events()
    assert isinstance(done, HandshakeComplete)
    assert going == GoAwayReceived(0, GoAway(second, "the server is shutting down"))
    assert c.going_away == going.goaway and not c.closed
    with pytest.raises(LocalProtocolError) as e:
        c.send_request(Ping())
    assert e.value.code is ErrorCode.UNAVAILABLE and "going away" in e.value.message
    # The requests in flight are still answered, and cancels still go out.
    assert set(c.in_flight) == {first, second, late}
    c.data_to_send()
    [reply] = receive(c, encode_bytes(first, InferReply({"y": X})))
    assert isinstance(reply, MessageReceived) and reply.handle == "first"
    assert c.cancel(late) and sent(c) == [(late, Cancel())]


def test_goaway_from_a_client_is_refused_by_the_server() -> None:
    connection = server()
    event = violation(receive(connection, encode_bytes(0, GoAway(0, "x"))))
    assert event.error.code is ErrorCode.UNSUPPORTED_MESSAGE and not connection.closed


def test_version_negotiation_picks_the_highest_common_version() -> None:
    assert negotiate(Hello(1, 5), range(1, 3)) == 2
    with pytest.raises(RemoteProtocolError) as e:
        negotiate(Hello(3, 4), range(1, 3))
    assert e.value.code is ErrorCode.HANDSHAKE_FAILED and "3..4" in e.value.message
    assert e.value.closes_connection


@given(st.booleans(), st.sampled_from(list(Role)), st.binary(max_size=200), st.binary(max_size=200))
def test_arbitrary_bytes_give_only_events(
    handshake: bool, role: Role, first: bytes, second: bytes
) -> None:
    """Whatever the peer sends, receiving never raises, and nothing follows a closing error."""
    connection = server() if role is Role.SERVER else client()
    if role is Role.SERVER and not handshake:
        connection = server(handshake=False)
    events = receive(connection, first) + receive(connection, second)
    for i, event in enumerate(events):
        if isinstance(event, ProtocolViolation) and event.error.closes_connection:
            assert i == len(events) - 1 and connection.closed
    for _, message in sent(connection):  # a server answers every violation
        assert role is Role.SERVER and isinstance(message, Error | Hello)
