"""Protocol version 2 in memory: the shared-memory messages and region
references round-trip through the codec, malformed ones are precise errors,
and version negotiation keeps version-1 peers working and refuses v2
features on a v1 connection."""

from __future__ import annotations

import numpy as np
import pytest

from twinfer.errors import CodecError, ErrorCode, LocalProtocolError
from twinfer.wire.connection import Connection, Role, State
from twinfer.wire.decode import decode_message
from twinfer.wire.encode import encode_bytes, encode_message
from twinfer.wire.events import HandshakeComplete, MessageReceived, ProtocolViolation
from twinfer.wire.frames import FLAG_REGIONS, HEADER_SIZE, Frame, FrameDecoder
from twinfer.wire.messages import (
    PROTOCOL_VERSION,
    DType,
    Error,
    GetRegionStatus,
    Hello,
    InferReply,
    InferRequest,
    Message,
    MessageType,
    Ping,
    RegionInfo,
    RegionRef,
    RegionStatus,
    RegionTensor,
    RegisterRegion,
    UnregisterRegion,
)

X = RegionTensor(DType.F32, (2, 4), RegionRef("in", 64, 32))
REGION_REQUEST = InferRequest(
    "tiny",
    {"x": X, "z": np.arange(3, dtype=np.int64)},
    ("y", "label"),
    timeout_ms=5,
    priority=1,
    output_regions={"y": RegionRef("out", 0, 24)},
)


def round_trip(message: Message) -> Message:
    [frame] = FrameDecoder().feed(encode_bytes(9, message))
    return decode_message(frame)


@pytest.mark.parametrize(
    "message",
    [
        RegisterRegion("in", "/twinfer-shm", 4096, 1 << 40),
        UnregisterRegion("in"),
        UnregisterRegion(),
        GetRegionStatus("in"),
        GetRegionStatus(),
        RegionStatus((RegionInfo("in", "/k", 0, 64), RegionInfo("out", "k2", 8, 16))),
        RegionStatus(()),
    ],
)
def test_region_messages_round_trip(message: Message) -> None:
    assert round_trip(message) == message


def test_region_references_round_trip_with_inline_tensors() -> None:
    decoded = round_trip(REGION_REQUEST)
    assert isinstance(decoded, InferRequest) and decoded.uses_regions
    assert decoded.inputs["x"] == X
    np.testing.assert_array_equal(decoded.inputs["z"], [0, 1, 2])
    assert decoded.outputs == ("y", "label")
    assert decoded.output_regions == {"y": RegionRef("out", 0, 24)}
    assert (decoded.timeout_ms, decoded.priority) == (5, 1)
    reply = InferReply({"y": RegionTensor(DType.F32, (2, 3), RegionRef("out", 0, 24))}, 3, 4)
    decoded_reply = round_trip(reply)
    assert isinstance(decoded_reply, InferReply)
    assert decoded_reply.outputs == reply.outputs


def test_a_request_without_regions_is_byte_for_byte_version_1() -> None:
    request = InferRequest("tiny", {"x": np.ones((1, 4), np.float32)})
    body = encode_bytes(1, request)[HEADER_SIZE:]
    assert body[2 + 4 + 4 + 3] == 0  # the flags byte, where version 1 has "reserved, 0"
    assert not request.uses_regions


def test_malformed_region_references_are_precise_errors() -> None:
    body = bytearray(encode_bytes(1, REGION_REQUEST)[HEADER_SIZE:])
    # The kind byte after the first output name ("y"): 7 is no kind.
    kind_at = 2 + 4 + 8 + 2 + 1
    assert body[kind_at] == 1
    body[kind_at] = 7
    with pytest.raises(CodecError) as e:
        decode_message(Frame(MessageType.INFER_REQUEST, 0, 1, body))
    assert e.value.code is ErrorCode.MALFORMED_FRAME and "output 'y' has unknown kind 7" in str(
        e.value
    )
    truncated = encode_bytes(1, RegisterRegion("in", "/k", 0, 8))[HEADER_SIZE:-3]
    with pytest.raises(CodecError) as e:
        decode_message(Frame(MessageType.REGISTER_REGION, 0, 1, bytearray(truncated)))
    assert e.value.code is ErrorCode.MALFORMED_FRAME and "offset and size" in str(e.value)
    with pytest.raises(CodecError) as e:
        bad_entry = bytearray(b'{"regions":[{"x":1}]}')
        decode_message(Frame(MessageType.REGION_STATUS, 0, 1, bad_entry))
    assert "REGION_STATUS: bad entry" in str(e.value)


def test_the_encoder_refuses_what_the_layout_cannot_carry() -> None:
    with pytest.raises(CodecError) as e:
        elsewhere = {"b": RegionRef("r", 0, 1)}  # "b" is not among the outputs
        encode_message(1, InferRequest("m", {}, ("a",), output_regions=elsewhere))
    assert e.value.code is ErrorCode.INVALID_REGION
    with pytest.raises(CodecError):
        encode_message(1, RegisterRegion("r", "/k", -1, 8))


def server(offer: Hello | None = None) -> Connection:
    """A server connection after the handshake with ``offer`` (default: a version-1 client)."""
    connection = Connection(Role.SERVER, agent="s")
    connection.receive_data(encode_bytes(0, offer or Hello(1, 1)))
    [event] = list(connection.events())
    assert isinstance(event, HandshakeComplete)
    connection.data_to_send()
    return connection


def test_a_version_1_client_gets_version_1_and_v2_features_are_refused_precisely() -> None:
    connection = server()
    assert connection.version == 1 and PROTOCOL_VERSION == 2
    for message in (RegisterRegion("in", "/k", 0, 8), GetRegionStatus(), REGION_REQUEST):
        connection.receive_data(encode_bytes(3, message))
        [event] = list(connection.events())
        assert isinstance(event, ProtocolViolation), event
        assert event.error.code is ErrorCode.UNSUPPORTED_MESSAGE
        assert (
            "needs protocol version 2; this connection negotiated version 1" in event.error.message
        )
        assert not event.error.closes_connection and connection.state is State.OPEN
        [(request_id, error)] = [
            (f.request_id, decode_message(f))
            for f in FrameDecoder().feed(b"".join(bytes(c) for c in connection.data_to_send()))
        ]
        assert request_id == 3 and isinstance(error, Error)
    connection.receive_data(encode_bytes(4, Ping()))
    assert [type(e) for e in connection.events()] == [MessageReceived]


def test_a_version_2_connection_accepts_region_messages() -> None:
    connection = server(offer=Hello(1, 2))
    assert connection.version == 2
    connection.receive_data(encode_bytes(3, RegisterRegion("in", "/k", 0, 8)))
    [event] = list(connection.events())
    assert isinstance(event, MessageReceived) and event.message == RegisterRegion("in", "/k", 0, 8)


def test_a_client_refuses_to_send_v2_features_to_a_version_1_server() -> None:
    connection = Connection(Role.CLIENT, agent="c")
    connection.start_handshake()
    connection.data_to_send()
    connection.receive_data(encode_bytes(0, Hello(1, 1, 4096, "old-server")))
    assert isinstance(next(connection.events()), HandshakeComplete) and connection.version == 1
    for message in (RegisterRegion("in", "/k", 0, 8), REGION_REQUEST):
        with pytest.raises(LocalProtocolError) as e:
            connection.send_request(message)
        assert e.value.code is ErrorCode.UNSUPPORTED_MESSAGE
    assert connection.data_to_send() == []
    connection.send_request(InferRequest("tiny", {"x": np.ones((1, 4), np.float32)}))


def test_the_flag_constant_is_the_one_on_the_wire() -> None:
    body = encode_bytes(1, REGION_REQUEST)[HEADER_SIZE:]
    assert body[2 + 4 + 4 + 3] == FLAG_REGIONS
