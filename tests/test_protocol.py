"""TwinferProtocol over a StringTransport: every error path, deterministically.

The dispatcher here is real but has no workers, so queued jobs wait until a
test takes them from the queue and answers them by hand; that makes queue
overflow, cancellation, disconnects and out-of-order replies exact.
"""

from __future__ import annotations

import numpy as np
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from twinfer.config import ServerConfig
from twinfer.dataplane import DataPlane
from twinfer.engines import builtin
from twinfer.engines.openvino import Signature
from twinfer.errors import ErrorCode
from twinfer.frontends.binary import TwinferFactory, TwinferProtocol
from twinfer.scheduling import Dispatcher, InferResult, Job, JobQueue, ModelEntry, WorkerState
from twinfer.wire.decode import decode_message
from twinfer.wire.encode import encode_bytes
from twinfer.wire.frames import HEADER, HEADER_SIZE, MAGIC, FrameDecoder
from twinfer.wire.messages import (
    Cancel,
    Error,
    GetMetadata,
    Hello,
    InferReply,
    InferRequest,
    ListModels,
    Message,
    Metadata,
    ModelList,
    Ping,
    Pong,
)

X = np.arange(8, dtype=np.float32).reshape(2, 4)


class HandOperatedWorker:
    """Test double for a device replica that is healthy but never takes a job
    by itself: the tests take jobs from the queue and answer them by hand."""

    name = "cpu#0"
    device = "cpu"
    state = WorkerState.READY
    failure_reason = ""
    available = True
    alive = True

    def __init__(self, queue: JobQueue) -> None:
        self.queues = [queue]

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class ProtocolFixture(unittest.TestCase):
    """A factory with one worker-less model queue, and one connected client."""

    queue_size = 3

    def setUp(self) -> None:
        self.queue = JobQueue("tiny", size=self.queue_size)
        entry = ModelEntry("tiny", Signature.of(builtin.tiny_model()), ("cpu",), (self.queue,))
        self.clock = Clock()
        worker = HandOperatedWorker(self.queue)
        self.dispatcher = Dispatcher(
            {"tiny": entry},
            workers=[worker],  # type: ignore[list-item]
            clock=self.clock,
        )
        self.dispatcher.start()
        self.dataplane = DataPlane(self.dispatcher)
        self.factory = TwinferFactory(
            self.dataplane, ServerConfig(max_frame_size=4096, max_inflight_per_connection=5)
        )
        self.proto, self.transport = self.connect()

    def connect(self, handshake: bool = True) -> tuple[TwinferProtocol, StringTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        assert isinstance(proto, TwinferProtocol)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        proto.makeConnection(transport)
        if handshake:
            self.send(proto, 0, Hello(agent="test"))
            [(rid, hello)] = self.replies(transport)
            assert isinstance(hello, Hello) and hello.max_frame_size == 4096
        return proto, transport

    def send(self, proto: TwinferProtocol, request_id: int, message: Message) -> None:
        proto.dataReceived(encode_bytes(request_id, message))

    def replies(self, transport: StringTransport) -> list[tuple[int, Message]]:
        frames = FrameDecoder().feed(transport.value())
        transport.clear()
        return [(f.request_id, decode_message(f)) for f in frames]

    def error(self, transport: StringTransport) -> tuple[int, Error]:
        [(rid, message)] = self.replies(transport)
        assert isinstance(message, Error), message
        return rid, message

    def take_job(self) -> Job:
        job = self.queue.take()
        assert job is not None
        return job


class ProtocolTests(ProtocolFixture):
    # -- handshake and framing ------------------------------------------------

    def test_first_frame_must_be_hello(self) -> None:
        proto, transport = self.connect(handshake=False)
        self.send(proto, 9, Ping())
        rid, error = self.error(transport)
        assert (rid, error.code) == (9, ErrorCode.HANDSHAKE_FAILED)
        assert "got Ping" in error.message
        assert transport.disconnecting

    def test_unsupported_version_is_refused_and_closed(self) -> None:
        proto, transport = self.connect(handshake=False)
        self.send(proto, 0, Hello(min_version=7, max_version=9))
        _, error = self.error(transport)
        assert error.code == ErrorCode.HANDSHAKE_FAILED and "7..9" in error.message
        assert transport.disconnecting

    def test_garbage_gets_a_malformed_frame_error_and_the_connection_closes(self) -> None:
        self.proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        _, error = self.error(self.transport)
        assert error.code == ErrorCode.MALFORMED_FRAME and "b'GE'" in error.message
        assert self.transport.disconnecting
        # Nothing more is parsed from a closing connection.
        self.send(self.proto, 1, Ping())
        assert self.transport.value() == b""

    def test_oversize_frame_is_refused_from_its_header(self) -> None:
        header = HEADER.pack(MAGIC, 0x10, 0, 4097, 3)
        self.proto.dataReceived(header)
        rid, error = self.error(self.transport)
        assert error.code == ErrorCode.FRAME_TOO_LARGE and "4097" in error.message
        assert self.transport.disconnecting

    def test_truncated_body_is_malformed(self) -> None:
        body = encode_bytes(4, InferRequest("tiny", {"x": X}))[HEADER_SIZE:]
        cut = body[:-9]
        self.proto.dataReceived(HEADER.pack(MAGIC, 0x10, 0, len(cut), 4) + cut)
        rid, error = self.error(self.transport)
        assert (rid, error.code) == (4, ErrorCode.MALFORMED_FRAME)
        assert "truncated" in error.message
        assert self.transport.disconnecting

    def test_unknown_message_type_keeps_the_connection(self) -> None:
        self.proto.dataReceived(HEADER.pack(MAGIC, 0x66, 0, 0, 12))
        rid, error = self.error(self.transport)
        assert (rid, error.code) == (12, ErrorCode.UNSUPPORTED_MESSAGE)
        assert not self.transport.disconnecting
        self.send(self.proto, 13, Ping())
        assert self.replies(self.transport) == [(13, Pong())]

    def test_reply_messages_from_a_client_are_refused(self) -> None:
        self.send(self.proto, 2, Pong())
        _, error = self.error(self.transport)
        assert error.code == ErrorCode.UNSUPPORTED_MESSAGE and "Pong" in error.message

    def test_frames_split_anywhere_and_batched_are_all_answered(self) -> None:
        data = b"".join(encode_bytes(i, Ping()) for i in range(1, 6))
        data += encode_bytes(6, ListModels())
        for i in range(len(data)):
            self.proto.dataReceived(data[i : i + 1])
        replies = self.replies(self.transport)
        assert [rid for rid, _ in replies] == [1, 2, 3, 4, 5, 6]
        assert isinstance(replies[-1][1], ModelList)

    # -- control messages -------------------------------------------------------

    def test_model_list_and_metadata(self) -> None:
        self.send(self.proto, 1, ListModels())
        self.send(self.proto, 2, GetMetadata("tiny"))
        self.send(self.proto, 3, GetMetadata("nope"))
        (_, models), (_, metadata), (rid, error) = self.replies(self.transport)
        assert isinstance(models, ModelList) and [m.name for m in models.models] == ["tiny"]
        assert isinstance(metadata, Metadata) and metadata.inputs[0].shape == (-1, 4)
        assert isinstance(error, Error) and error.code == ErrorCode.UNKNOWN_MODEL
        assert "'nope'" in error.message and "tiny" in error.message

    # -- inference ----------------------------------------------------------------

    def test_invalid_requests_get_errors_and_the_connection_stays(self) -> None:
        cases = [
            (InferRequest("nope", {"x": X}), ErrorCode.UNKNOWN_MODEL),
            (InferRequest("tiny", {"x": X.astype(np.float64)}), ErrorCode.INVALID_DTYPE),
            (InferRequest("tiny", {"x": X.reshape(4, 2)}), ErrorCode.INVALID_SHAPE),
            (InferRequest("tiny", {"w": X}), ErrorCode.INVALID_INPUT),
            (InferRequest("tiny", {"x": X}, ("nope",)), ErrorCode.UNKNOWN_OUTPUT),
        ]
        for rid, (request, code) in enumerate(cases, start=1):
            self.send(self.proto, rid, request)
            got_rid, error = self.error(self.transport)
            assert (got_rid, error.code) == (rid, code), error
        assert self.queue.depth == 0 and not self.transport.disconnecting

    def test_replies_go_out_as_jobs_finish_in_any_order(self) -> None:
        for rid in (10, 11, 12):
            self.send(self.proto, rid, InferRequest("tiny", {"x": X * rid}))
        jobs = [self.take_job() for _ in range(3)]
        np.testing.assert_array_equal(jobs[1].inputs["x"], X * 11)
        for job in reversed(jobs):
            job.deferred.callback(InferResult(builtin.tiny_reference(job.inputs["x"]), 5, 7))
        replies = self.replies(self.transport)
        assert [rid for rid, _ in replies] == [12, 11, 10]
        for rid, reply in replies:
            assert isinstance(reply, InferReply) and (reply.queue_us, reply.compute_us) == (5, 7)
            np.testing.assert_allclose(reply.outputs["y"], builtin.tiny_reference(X * rid)["y"])
        assert self.proto.inflight == {}

    def test_full_queue_answers_overloaded_at_once(self) -> None:
        for rid in range(1, 4):
            self.send(self.proto, rid, InferRequest("tiny", {"x": X}))
        self.send(self.proto, 4, InferRequest("tiny", {"x": X}))
        rid, error = self.error(self.transport)
        assert (rid, error.code) == (4, ErrorCode.OVERLOADED)
        assert "'tiny' is full (3 jobs waiting)" in error.message
        assert self.queue.depth == 3

    def test_duplicate_request_id_is_refused_without_touching_the_first(self) -> None:
        self.send(self.proto, 5, InferRequest("tiny", {"x": X}))
        self.send(self.proto, 5, InferRequest("tiny", {"x": X}))
        rid, error = self.error(self.transport)
        assert (rid, error.code) == (5, ErrorCode.DUPLICATE_REQUEST_ID)
        assert self.queue.depth == 1 and 5 in self.proto.inflight

    def test_cancel_removes_a_queued_job_and_answers_cancelled(self) -> None:
        self.send(self.proto, 1, InferRequest("tiny", {"x": X}))
        self.send(self.proto, 2, InferRequest("tiny", {"x": X}))
        self.send(self.proto, 1, Cancel())
        rid, error = self.error(self.transport)
        assert (rid, error.code) == (1, ErrorCode.CANCELLED)
        assert self.queue.depth == 1
        assert self.take_job().deferred is self.proto.inflight[2]
        self.send(self.proto, 99, Cancel())  # unknown id: ignored
        assert self.transport.value() == b""

    def test_disconnect_drops_the_clients_queued_jobs_but_not_others(self) -> None:
        other, other_transport = self.connect()
        self.send(self.proto, 1, InferRequest("tiny", {"x": X}))
        self.send(other, 1, InferRequest("tiny", {"x": X * 2}))
        self.send(self.proto, 2, InferRequest("tiny", {"x": X}))
        self.proto.connectionLost()
        assert self.queue.depth == 1
        job = self.take_job()
        np.testing.assert_array_equal(job.inputs["x"], X * 2)
        job.deferred.callback(InferResult({"y": np.zeros((2, 3), np.float32)}, 0, 0))
        [(rid, reply)] = self.replies(other_transport)
        assert rid == 1 and isinstance(reply, InferReply)

    def test_a_running_jobs_result_is_dropped_after_disconnect(self) -> None:
        self.send(self.proto, 1, InferRequest("tiny", {"x": X}))
        job = self.take_job()
        job.running = True
        self.proto.connectionLost()
        self.transport.clear()
        assert job.deferred.called  # cancelled: the worker will not fire it again
        assert self.proto.inflight == {}

    def test_device_failure_is_reported_and_the_connection_stays(self) -> None:
        from twinfer.errors import TwinferError

        self.send(self.proto, 1, InferRequest("tiny", {"x": X}))
        self.take_job().deferred.errback(
            TwinferError(ErrorCode.INFERENCE_FAILED, "model 'tiny' failed on device 'cpu': boom")
        )
        rid, error = self.error(self.transport)
        assert error.code == ErrorCode.INFERENCE_FAILED and "boom" in error.message
        self.send(self.proto, 2, Ping())
        assert self.replies(self.transport) == [(2, Pong())]

    def test_requests_after_shutdown_are_unavailable(self) -> None:
        self.send(self.proto, 1, InferRequest("tiny", {"x": X}))
        self.dispatcher.stop()
        rid, error = self.error(self.transport)
        assert (rid, error.code) == (1, ErrorCode.UNAVAILABLE)
        self.send(self.proto, 2, InferRequest("tiny", {"x": X}))
        rid, error = self.error(self.transport)
        assert (rid, error.code) == (2, ErrorCode.UNAVAILABLE)


class InFlightLimitTests(ProtocolFixture):
    """The same fixture with a roomy queue, so the connection limit binds first."""

    queue_size = 100

    def test_per_connection_in_flight_limit(self) -> None:
        for rid in range(1, 7):
            self.send(self.proto, rid, InferRequest("tiny", {"x": X}))
        rid, error = self.error(self.transport)
        assert (rid, error.code) == (6, ErrorCode.OVERLOADED)
        assert "5 requests in flight" in error.message
        # Other connections are not affected by this one's limit.
        other, other_transport = self.connect()
        self.send(other, 1, InferRequest("tiny", {"x": X}))
        assert other_transport.value() == b"" and self.queue.depth == 6


class SchedulingProtocolTests(ProtocolFixture):
    """Deadlines, priorities and back-pressure, on a hand-driven clock."""

    queue_size = 8

    def test_a_request_past_its_deadline_is_answered_and_never_runs(self) -> None:
        self.send(self.proto, 1, InferRequest("tiny", {"x": X}, timeout_ms=50))
        self.send(self.proto, 2, InferRequest("tiny", {"x": X}))
        self.clock.advance(0.049)
        assert self.transport.value() == b"" and self.queue.depth == 2
        self.clock.advance(0.002)
        rid, error = self.error(self.transport)
        assert (rid, error.code) == (1, ErrorCode.DEADLINE_EXCEEDED)
        assert "50 ms" in error.message and "'tiny'" in error.message
        assert self.queue.depth == 1 and self.dispatcher.counters.deadline_exceeded == 1
        assert self.take_job().deferred is self.proto.inflight[2]

    def test_a_started_job_is_not_expired(self) -> None:
        self.send(self.proto, 1, InferRequest("tiny", {"x": X}, timeout_ms=10))
        job = self.take_job()
        job.running = True
        job.stop_timer()  # as a worker does when it starts the job
        self.clock.advance(1)
        assert self.transport.value() == b""
        job.deferred.callback(InferResult({"y": np.zeros((2, 3), np.float32)}, 0, 0))
        [(rid, reply)] = self.replies(self.transport)
        assert rid == 1 and isinstance(reply, InferReply)

    def test_the_models_default_timeout_applies_when_a_request_names_none(self) -> None:
        self.dispatcher.models["tiny"].default_timeout = 0.2
        self.send(self.proto, 1, InferRequest("tiny", {"x": X}))
        self.clock.advance(0.25)
        _, error = self.error(self.transport)
        assert error.code == ErrorCode.DEADLINE_EXCEEDED and "200 ms" in error.message

    def test_priority_out_of_range_is_refused(self) -> None:
        self.send(self.proto, 1, InferRequest("tiny", {"x": X}, priority=2))
        rid, error = self.error(self.transport)
        assert (rid, error.code) == (1, ErrorCode.INVALID_INPUT)
        assert "priority 2 is out of range" in error.message and "1..1" in error.message

    def test_cancel_counts_and_frees_the_slot(self) -> None:
        self.send(self.proto, 1, InferRequest("tiny", {"x": X}))
        self.send(self.proto, 1, Cancel())
        assert self.dispatcher.counters.cancelled == 1 and self.queue.depth == 0

    def test_a_saturated_queue_pauses_the_busiest_connection_until_it_drains(self) -> None:
        quiet, quiet_transport = self.connect()
        self.send(quiet, 1, InferRequest("tiny", {"x": X}))
        for rid in range(1, 6):  # depth 6 reaches the high watermark (3/4 of 8)
            self.send(self.proto, rid, InferRequest("tiny", {"x": X}))
        assert self.queue.saturated
        assert self.transport.producerState == "paused" and self.proto.paused_for == {"load"}
        assert quiet_transport.producerState == "producing"
        for _ in range(3):
            self.take_job()
        assert self.transport.producerState == "paused"  # depth 3: above the low mark
        self.take_job()
        assert self.transport.producerState == "producing" and not self.proto.paused_for

    def test_write_and_load_pauses_are_independent(self) -> None:
        self.proto.pause_reading("writes")
        self.proto.pause_reading("load")
        self.proto.resume_reading("load")
        assert self.transport.producerState == "paused"
        self.proto.resume_reading("writes")
        assert self.transport.producerState == "producing"


class AdminDecodingTests(ProtocolFixture):
    def test_a_well_formed_admin_request_for_an_unknown_op_keeps_the_connection(self) -> None:
        body = b'{"op":"explode","model":"tiny"}'
        self.proto.dataReceived(HEADER.pack(MAGIC, 0x40, 0, len(body), 3) + body)
        rid, error = self.error(self.transport)
        assert (rid, error.code) == (3, ErrorCode.INVALID_INPUT)
        assert "'explode'" in error.message
        assert not self.transport.disconnecting
        self.send(self.proto, 4, Ping())
        assert self.replies(self.transport) == [(4, Pong())]
