"""The Twisted client's protocol over a StringTransport: an adapter over the client Connection."""

from __future__ import annotations

import numpy as np
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from support import memory_owner
from twinfer.client import TwinferClient
from twinfer.client_protocol import ClientProtocol
from twinfer.errors import ErrorCode, LocalProtocolError, TwinferError
from twinfer.wire.decode import decode_message
from twinfer.wire.encode import encode_bytes
from twinfer.wire.frames import HEADER_SIZE, FrameDecoder
from twinfer.wire.messages import (
    Cancel,
    Error,
    Hello,
    InferReply,
    InferRequest,
    ListModels,
    Message,
    ModelInfo,
    ModelList,
    Ping,
    Pong,
)

SERVER_HELLO = Hello(1, 1, 4096, "test-server")


class ClientProtocolTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.protocol = ClientProtocol()
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def sent(self) -> list[tuple[int, Message]]:
        frames = FrameDecoder().feed(self.transport.value())
        self.transport.clear()
        return [(f.request_id, decode_message(f)) for f in frames]

    def handshake(self) -> None:
        [(rid, hello)] = self.sent()
        assert rid == 0 and isinstance(hello, Hello)
        self.protocol.dataReceived(encode_bytes(0, SERVER_HELLO))
        assert self.successResultOf(self.protocol.handshake) == SERVER_HELLO

    def test_the_handshake_fires_with_the_servers_hello(self) -> None:
        self.handshake()
        assert self.protocol.server_hello == SERVER_HELLO

    def test_the_client_says_why_shared_memory_is_off(self) -> None:
        self.handshake()
        client = TwinferClient(self.protocol)
        assert client.shared_memory_off is None  # not asked yet
        assert client.shared_memory_pool() is None
        assert client.shared_memory_off == "the server speaks protocol version 1 only"

    def test_a_refused_handshake_fails_with_the_servers_error(self) -> None:
        refusal = Error(ErrorCode.HANDSHAKE_FAILED, "client speaks protocol versions 1..1")
        self.protocol.dataReceived(encode_bytes(0, refusal))
        failure = self.failureResultOf(self.protocol.handshake, TwinferError)
        assert failure.value.code is ErrorCode.HANDSHAKE_FAILED

    def test_replies_fire_their_requests_in_any_order(self) -> None:
        self.handshake()
        client = TwinferClient(self.protocol)
        models = client.models()
        ping = self.protocol.request(Ping())
        assert self.protocol.in_flight == 2
        (rid_models, _), (rid_ping, _) = self.sent()
        self.protocol.dataReceived(
            encode_bytes(rid_ping, Pong())
            + encode_bytes(rid_models, ModelList((ModelInfo("tiny", ("cpu",)),)))
        )
        assert self.successResultOf(ping) == Pong()
        assert [m.name for m in self.successResultOf(models)] == ["tiny"]
        assert self.protocol.in_flight == 0

    def test_an_error_reply_fails_only_its_request(self) -> None:
        self.handshake()
        first, second = self.protocol.request(Ping()), self.protocol.request(Ping())
        (rid, _), _ = self.sent()
        self.protocol.dataReceived(encode_bytes(rid, Error(ErrorCode.OVERLOADED, "full")))
        assert self.failureResultOf(first, TwinferError).value.code is ErrorCode.OVERLOADED
        assert self.protocol.in_flight == 1 and not self.transport.disconnecting
        assert second.called is False

    def test_cancelling_sends_cancel_and_drops_the_late_reply(self) -> None:
        self.handshake()
        d = self.protocol.request(Ping())
        [(rid, _)] = self.sent()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        assert self.sent() == [(rid, Cancel())]
        self.protocol.dataReceived(encode_bytes(rid, Pong()))  # dropped
        assert self.protocol.in_flight == 0

    def test_a_request_over_the_servers_limit_fails_without_sending(self) -> None:
        self.handshake()
        big = InferRequest("tiny", {"x": np.zeros((300, 4), np.float32)})
        failure = self.failureResultOf(self.protocol.request(big), LocalProtocolError)
        assert failure.value.code is ErrorCode.FRAME_TOO_LARGE and "4096" in failure.value.message
        assert self.sent() == [] and self.protocol.in_flight == 0

    def test_bad_bytes_from_the_server_fail_every_request_and_drop_the_connection(self) -> None:
        self.handshake()
        pending = [self.protocol.request(Ping()), self.protocol.request(ListModels())]
        self.protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        for d in pending:
            failure = self.failureResultOf(d, TwinferError)
            assert failure.value.code is ErrorCode.MALFORMED_FRAME
            assert "bad data from the server" in failure.value.message
        assert self.transport.disconnecting

    def test_a_connection_level_error_fails_every_request(self) -> None:
        self.handshake()
        first, second = self.protocol.request(Ping()), self.protocol.request(Ping())
        (rid, _), _ = self.sent()
        self.protocol.dataReceived(encode_bytes(rid, Error(ErrorCode.MALFORMED_FRAME, "bad")))
        for d in (first, second):
            assert self.failureResultOf(d, TwinferError).value.code is ErrorCode.MALFORMED_FRAME
        # The connection is closed for new requests too.
        failure = self.failureResultOf(self.protocol.request(Ping()), TwinferError)
        assert failure.value.code is ErrorCode.UNAVAILABLE

    def test_close_fires_once_the_connection_is_lost(self) -> None:
        self.handshake()
        pending = self.protocol.request(InferRequest("tiny", {"x": np.ones((1, 4), "f4")}))
        closed = TwinferClient(self.protocol).close()
        assert self.transport.disconnecting and not closed.called
        self.protocol.connectionLost(Failure(ConnectionDone()))
        assert self.successResultOf(closed) is None
        assert self.failureResultOf(pending, TwinferError).value.code is ErrorCode.UNAVAILABLE
        # Closing a closed connection fires at once.
        assert self.successResultOf(self.protocol.close()) is None

    def test_a_lost_connection_fails_the_handshake(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(self.protocol.handshake, TwinferError)
        assert failure.value.code is ErrorCode.UNAVAILABLE

    def test_an_infer_reply_fires_infer_with_the_outputs(self) -> None:
        self.handshake()
        outputs = TwinferClient(self.protocol).infer("tiny", {"x": np.ones((1, 4), "f4")})
        [(rid, request)] = self.sent()
        assert isinstance(request, InferRequest) and request.model == "tiny"
        y = np.arange(3, dtype=np.float32).reshape(1, 3)
        self.protocol.dataReceived(encode_bytes(rid, InferReply({"y": y}, 1, 2)))
        np.testing.assert_array_equal(self.successResultOf(outputs)["y"], y)


class InPlaceReceiveTests(unittest.SynchronousTestCase):
    """A large reply is reassembled in one buffer per frame and its tensors are
    views of it: no per-chunk concatenation and no copy."""

    # 50,000 x 3 f32 = 600 KB, and 50,000 i64 labels: a reply of ~1 MB.
    y = np.random.default_rng(7).standard_normal((50_000, 3)).astype(np.float32)
    label = np.arange(50_000, dtype=np.int64)

    def setUp(self) -> None:
        self.protocol = ClientProtocol()
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(encode_bytes(0, SERVER_HELLO))
        self.transport.clear()
        self.outputs = TwinferClient(self.protocol).infer("tiny", {"x": np.ones((1, 4), "f4")})
        [(self.rid, _)] = [(f.request_id, f) for f in FrameDecoder().feed(self.transport.value())]
        self.reply = encode_bytes(self.rid, InferReply({"y": self.y, "label": self.label}, 1, 2))

    def check_outputs(self) -> dict[str, np.ndarray]:
        outputs = self.successResultOf(self.outputs)
        np.testing.assert_array_equal(outputs["y"], self.y)
        np.testing.assert_array_equal(outputs["label"], self.label)
        return outputs

    def test_a_reply_fed_in_64_kib_chunks_is_views_of_one_frame_buffer(self) -> None:
        chunk = 65536
        for start in range(0, len(self.reply), chunk):
            assert not self.outputs.called
            self.protocol.dataReceived(self.reply[start : start + chunk])
        outputs = self.check_outputs()
        owner = memory_owner(outputs["y"])
        # Both tensors live in the one buffer the frame's body was reassembled
        # in (its length is the body's), not in copies of their own.
        assert memoryview(owner).nbytes == len(self.reply) - HEADER_SIZE  # type: ignore[arg-type]
        assert memory_owner(outputs["label"]) is owner

    def test_a_reply_received_into_read_buffer_is_decoded_where_it_landed(self) -> None:
        # As the direct-read transport does: the header and the start of the
        # body arrive as bytes, the rest is received into read_buffer().
        self.protocol.dataReceived(self.reply[:1000])
        target = self.protocol.read_buffer()
        assert target is not None and len(target) == len(self.reply) - 1000
        position = 1000
        while position < len(self.reply):
            view = self.protocol.read_buffer()
            assert view is not None
            count = min(65536, len(view))
            view[:count] = self.reply[position : position + count]  # "recv_into"
            position += count
            self.protocol.buffer_filled(count)
        assert self.protocol.read_buffer() is None
        outputs = self.check_outputs()
        assert np.shares_memory(outputs["y"], np.asarray(target))
        assert np.shares_memory(outputs["label"], np.asarray(target))

    def test_no_read_buffer_is_offered_after_the_connection_is_lost(self) -> None:
        self.protocol.dataReceived(self.reply[:1000])
        assert self.protocol.read_buffer() is not None
        self.protocol.connectionLost(Failure(ConnectionDone()))
        assert self.protocol.read_buffer() is None
        self.failureResultOf(self.outputs, TwinferError)
