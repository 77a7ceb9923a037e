"""The binary protocol as a state machine: hypothesis drives clients against the real server.

:class:`ProtocolMachine` opens client connections to a real
``TwinferFactory`` -> ``DataPlane`` -> ``Dispatcher`` -> ``Worker`` stack
(each connection a ``TwinferProtocol`` on a ``StringTransport``, time a
``Clock``) and, step by step, queues frames on them (handshakes, pipelined
valid and invalid requests, duplicate ids, cancels, garbage), delivers
those bytes split at arbitrary points, disconnects clients (mid-frame too),
runs or breaks the device, advances the clock and drains the server.

The test keeps its own model of every connection and predicts each step's
output exactly; after every step it decodes what the server wrote (with
:mod:`twinfer.wire`) and checks that:

- every request the server accepted gets exactly one reply, with its own
  request id and the right outputs, or is dropped because its own client
  left (or broke the protocol); nothing answers an id that was not sent;
- a connection-level error closes that connection only;
- the data plane's counts (``stats.requests``, protocol errors, each
  session's requests, ``inflight()``) are what the test saw, and the
  sessions of closed connections are gone.

At the end of each run the device is repaired and everything left runs to
its end: every accepted request must then have been answered, and no
client may be left paused with bytes it could not send.

The device is a stand-in: the worker and its engine are real (the builtin
``tiny`` model on OpenVINO's CPU), but the worker's thread is a
:class:`HandRunner` and the engine is wrapped in a :class:`BreakableDevice`,
because the test must decide when the device finishes a job and whether it
fails, which a real thread would decide by timing.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import NamedTuple

import attrs
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from scheduling_support import BreakableDevice, HandRunner, rows, tiny_engine, tiny_signature
from twinfer.config import ServerConfig
from twinfer.dataplane import DataPlane
from twinfer.engines import builtin
from twinfer.errors import ErrorCode
from twinfer.frontends.binary import TwinferFactory, TwinferProtocol
from twinfer.scheduling import DeviceError, Dispatcher, JobQueue, ModelEntry, Worker, WorkerState
from twinfer.scheduling.batcher import execute
from twinfer.wire.decode import decode_message
from twinfer.wire.encode import encode_bytes
from twinfer.wire.frames import HEADER, HEADER_SIZE, MAGIC, FrameDecoder
from twinfer.wire.messages import (
    Cancel,
    Error,
    GoAway,
    Hello,
    InferReply,
    InferRequest,
    Message,
    MessageType,
    Ping,
)

QUEUE_SIZE = 4  # saturated (reading paused) at 3 jobs waiting, relieved at 1
MAX_INFLIGHT = 3  # per connection
MAX_FRAME = 4096
MAX_FAILURES = 3  # consecutive failed jobs that take the device out of rotation
PROBE_INTERVAL = 0.5
MAX_CLIENTS = 3

#: Request frames, in the proportions sent (the first ones are what a failing
#: example shrinks to).
REQUEST_KINDS = ("valid",) * 4 + ("cancel", "cancel", "wrong-shape", "unknown-model", "ping")

#: A reply as the test sees it: its request id and a label ("OK", "Pong",
#: "Hello", "GoAway:<last request id>" or an ErrorCode's name).
Reply = tuple[int, str]


@attrs.define(eq=False)
class Outgoing:
    """A frame (or bytes posing as one) that a client queued for the server."""

    kind: str
    rid: int
    data: bytes
    #: Inference requests: the model, the rows a reply answers, whether they
    #: have the right shape, and the timeout (seconds).
    model: str = "tiny"
    x: np.ndarray | None = None
    valid: bool = True
    timeout: float = 0.0


@attrs.define(eq=False)
class Request:
    """An inference request the server accepted and has not answered yet."""

    rid: int
    x: np.ndarray
    #: On the test's clock; None: it may wait for the device forever.
    deadline: float | None
    #: The server's handle on it (its job's Deferred), known once delivered.
    handle: Deferred[object] | None = None


@attrs.define(eq=False)
class Admission:
    """What decides a valid request's fate within one delivered chunk."""

    depth: int  # jobs waiting in the queue
    idle: bool  # the worker waits on the queue: the next job goes straight to it
    available: bool  # the worker takes jobs at all
    on_device: set[Request]  # the requests whose jobs the worker holds


class Client:
    """One client connection and the test's model of it."""

    def __init__(self, number: int, proto: TwinferProtocol, transport: StringTransport) -> None:
        self.number = number
        self.proto = proto
        self.transport = transport
        #: "handshaking", "open", or "closed" (the server closed it for a protocol error).
        self.state = "handshaking"
        #: The client went away (``connectionLost``).
        self.lost = False
        self.outgoing = bytearray()
        self.frames: deque[Outgoing] = deque()
        #: Bytes of ``frames[0]`` already delivered.
        self.partial = 0
        self.inflight: dict[int, Request] = {}
        #: The highest request id the server took as a request (what GOAWAY names).
        self.last_request_id = 0
        #: Inference requests the server received after the handshake.
        self.requests = 0
        self.decoder = FrameDecoder()

    def __repr__(self) -> str:
        return f"client{self.number}"


def hello_frame(bad_version: bool = False) -> Outgoing:
    """A client's HELLO (request id 0), or one offering only versions nobody speaks."""
    if bad_version:
        return Outgoing("bad-hello", 0, encode_bytes(0, Hello(7, 9)))
    return Outgoing("hello", 0, encode_bytes(0, Hello(agent="machine")))


class Ask(NamedTuple):
    """A well-formed request a client sends (drawn small, so that failing
    examples read well; ids are few, so that they collide)."""

    kind: str
    rid: int
    rows: int = 1
    seed: int = 0
    timeout_ms: int = 0

    def frame(self) -> Outgoing:
        if self.kind == "cancel":
            return Outgoing(self.kind, self.rid, encode_bytes(self.rid, Cancel()))
        if self.kind == "ping":
            return Outgoing(self.kind, self.rid, encode_bytes(self.rid, Ping()))
        x = rows(self.rows, self.seed)
        model = "nope" if self.kind == "unknown-model" else "tiny"
        sent = x[:, :3].copy() if self.kind == "wrong-shape" else x
        data = encode_bytes(self.rid, InferRequest(model, {"x": sent}, timeout_ms=self.timeout_ms))
        valid = self.kind != "wrong-shape"
        return Outgoing("infer", self.rid, data, model, x, valid, self.timeout_ms / 1000)


asks = st.builds(
    Ask,
    st.sampled_from(REQUEST_KINDS),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(0, 255),
    st.sampled_from([0, 0, 20, 100]),
)


def label(message: Message) -> str:
    if isinstance(message, Error):
        return ErrorCode(message.code).name
    if isinstance(message, GoAway):
        return f"GoAway:{message.last_request_id}"
    if isinstance(message, InferReply):
        return "OK"
    return type(message).__name__


class ProtocolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.runner = HandRunner()
        self.device = BreakableDevice(tiny_engine())
        self.queue = JobQueue("tiny", size=QUEUE_SIZE)
        entry = ModelEntry("tiny", tiny_signature(), ("cpu",), (self.queue,))
        self.worker = Worker(
            "cpu#0",
            "cpu",
            {"tiny": self.device},
            [self.queue],
            clock=self.clock,
            runner=self.runner,
            max_failures=MAX_FAILURES,
            probe_interval=PROBE_INTERVAL,
        )
        self.dispatcher = Dispatcher({"tiny": entry}, [self.worker], clock=self.clock)
        self.dispatcher.start()
        self.dataplane = DataPlane(self.dispatcher, tasks=None, clock=self.clock.seconds)
        config = ServerConfig(max_frame_size=MAX_FRAME, max_inflight_per_connection=MAX_INFLIGHT)
        self.factory = TwinferFactory(self.dataplane, config)
        self.clients: list[Client] = []
        #: What the data plane must have counted: (model or "", outcome) -> requests.
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.protocol_errors: Counter[str] = Counter()

    # -- choosing -------------------------------------------------------------------

    def live(self) -> list[Client]:
        return [c for c in self.clients if not c.lost]

    def awaiting_hello(self) -> list[Client]:
        return [
            c
            for c in self.live()
            if c.state == "handshaking" and not any(f.kind == "hello" for f in c.frames)
        ]

    def deliverable(self) -> list[Client]:
        """Clients with bytes to send whose connection is being read (a
        paused transport would not read them)."""
        return [c for c in self.live() if c.outgoing and c.transport.producerState != "paused"]

    # -- rules: clients -------------------------------------------------------------

    @precondition(lambda self: len(self.live()) < MAX_CLIENTS)
    @rule(handshake=st.sampled_from([True, True, True, False]))
    def open_connection(self, handshake: bool) -> None:
        number = len(self.clients)
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 7000))
        assert isinstance(proto, TwinferProtocol)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + number))
        proto.makeConnection(transport)
        client = Client(number, proto, transport)
        self.clients.append(client)
        if handshake:
            self.queue_frame(client, hello_frame())
            self.deliver_bytes(client, len(client.outgoing))

    @precondition(lambda self: self.awaiting_hello())
    @rule(data=st.data(), bad_version=st.sampled_from([False, False, False, True]))
    def send_hello(self, data: st.DataObject, bad_version: bool) -> None:
        """The HELLO of a client that connected without it (possibly after
        other frames, which break the handshake)."""
        client = data.draw(st.sampled_from(self.awaiting_hello()), label="client")
        self.queue_frame(client, hello_frame(bad_version))

    @precondition(lambda self: self.live())
    @rule(data=st.data(), batch=st.lists(asks, min_size=1, max_size=6), at_once=st.booleans())
    def send_requests(self, data: st.DataObject, batch: list[Ask], at_once: bool) -> None:
        """Pipelined requests: inference (valid or not), cancels and pings;
        ``at_once``: they arrive in one chunk with the bytes queued before them."""
        client = self.pick(data)
        for ask in batch:
            self.queue_frame(client, ask.frame())
        if at_once and client in self.deliverable():
            self.deliver_bytes(client, len(client.outgoing))

    @precondition(lambda self: self.live())
    @rule(
        data=st.data(),
        rid=st.integers(1, 4),
        kind=st.sampled_from(
            ["unknown-type", "bad-magic", "too-large", "truncated", "hello", "bad-hello"]
        ),
    )
    def send_garbage(self, data: st.DataObject, rid: int, kind: str) -> None:
        """Frames that break the protocol (all but an unknown type after the
        handshake close the connection; a HELLO does so once it is open)."""
        infer = MessageType.INFER_REQUEST
        if kind in ("hello", "bad-hello"):
            self.queue_frame(self.pick(data), hello_frame(kind == "bad-hello"))
            return
        if kind == "bad-magic":
            raw = b"GET / HTTP/1.1\r\n\r\n"[:HEADER_SIZE]
        elif kind == "too-large":
            raw = HEADER.pack(MAGIC, infer, 0, MAX_FRAME + 1, rid)
        elif kind == "truncated":
            body = encode_bytes(rid, InferRequest("tiny", {"x": rows(1)}))[HEADER_SIZE:-9]
            raw = HEADER.pack(MAGIC, infer, 0, len(body), rid) + body
        else:
            raw = HEADER.pack(MAGIC, 0x66, 0, 0, rid)
        self.queue_frame(self.pick(data), Outgoing(kind, rid, raw))

    @precondition(lambda self: self.deliverable())
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        """Some of a client's bytes arrive: any prefix, cut anywhere."""
        client = data.draw(st.sampled_from(self.deliverable()), label="client")
        count = data.draw(st.integers(1, len(client.outgoing)), label="bytes")
        self.deliver_bytes(client, count)

    @precondition(lambda self: self.deliverable())
    @rule(data=st.data())
    def deliver_bytewise(self, data: st.DataObject) -> None:
        """A client's bytes arrive one at a time: frames cut at every point."""
        client = data.draw(st.sampled_from(self.deliverable()), label="client")
        while client in self.deliverable():
            self.deliver_bytes(client, 1)

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        """The client goes (mid-frame, with requests in flight, or after the
        server closed it): its requests are dropped, never answered."""
        self.lose(self.pick(data))

    # -- rules: the server and its device ------------------------------------------

    @precondition(lambda self: self.runner.handed)
    @rule(outcome=st.sampled_from(["ok"] * 5 + ["error", "device-error"]), calls=st.integers(1, 3))
    def device_runs(self, outcome: str, calls: int) -> None:
        """The device finishes up to ``calls`` jobs (or probes), all with ``outcome``."""
        for _ in range(calls):
            if self.runner.handed:
                self.run_device(outcome)

    @rule(seconds=st.sampled_from([0.01, 0.05, 0.25, 1.0]))
    def advance_clock(self, seconds: float) -> None:
        now = self.clock.seconds() + seconds  # as Clock.advance computes it
        waiting = {job.deferred for job in self.queue.waiting()}
        expiring = [
            owner
            for key, owner in self.owners().items()
            if key in waiting and owner[1].deadline is not None and owner[1].deadline <= now
        ]
        self.clock.advance(seconds)
        want: dict[Client, list[Reply]] = {}
        for owner in expiring:
            self.finish(owner, "DEADLINE_EXCEEDED", want)
        self.expect(want, ordered=False)

    @precondition(lambda self: not self.dataplane.draining and self.dataplane.inflight() > 1)
    @rule()
    def begin_drain(self) -> None:
        want = {c: [(0, f"GoAway:{c.last_request_id}")] for c in self.live() if c.state == "open"}
        self.dataplane.begin_drain()
        self.expect(want, ordered=True)

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def counts_agree(self) -> None:
        counted: Counter[tuple[str, str]] = Counter()
        for (model, code, frontend), n in self.dataplane.stats.requests.items():
            assert frontend == "binary"
            counted[model, code] += n
        assert counted == self.outcomes
        errors = self.dataplane.frontend("binary").protocol_errors
        assert Counter(errors) == self.protocol_errors
        live = self.live()
        for client in live:
            assert set(client.proto.inflight) == set(client.inflight), client
            assert client.proto.requests == client.requests, client
        assert self.dataplane.inflight() == sum(len(c.inflight) for c in live)

    @invariant()
    def sessions_of_closed_connections_are_gone(self) -> None:
        live = self.live()
        assert set(self.dataplane.sessions()) == {c.proto.session for c in live}
        assert self.factory.connections == {c.proto for c in live}
        for client in self.clients:
            assert client.proto.session is not None
            assert client.proto.session.closed == client.lost

    @invariant()
    def only_broken_connections_are_closed(self) -> None:
        for client in self.live():
            assert client.transport.disconnecting == (client.state == "closed"), client

    def teardown(self) -> None:
        """Repair the device and let everything run to its end: every accepted
        request is answered and no client is left paused with bytes to send."""
        for client in self.live():
            if client.state == "closed":
                self.lose(client)  # as the reactor does once the error is written
        self.device.repair()
        for _ in range(100):
            for client in self.deliverable():
                self.deliver_bytes(client, len(client.outgoing))
            while self.runner.handed:
                self.run_device("ok")
            if not (self.deliverable() or any(c.inflight for c in self.live())):
                break
            self.advance_clock(PROBE_INTERVAL)  # probes bring a failed device back
        stuck = [(c, c.transport.producerState) for c in self.live() if c.outgoing]
        assert not stuck, f"clients that can no longer send: {stuck}"
        unanswered = {c: sorted(c.inflight) for c in self.live() if c.inflight}
        assert not unanswered, f"accepted but never answered: {unanswered}"
        self.counts_agree()
        self.sessions_of_closed_connections_are_gone()

    # -- the model ----------------------------------------------------------------------

    def pick(self, data: st.DataObject) -> Client:
        return data.draw(st.sampled_from(self.live()), label="client")

    def lose(self, client: Client) -> None:
        client.lost = True
        self.outcomes["tiny", "CANCELLED"] += len(client.inflight)
        client.inflight.clear()
        client.proto.connectionLost(Failure(ConnectionDone()))
        self.expect({}, ordered=False)

    def queue_frame(self, client: Client, frame: Outgoing) -> None:
        client.outgoing += frame.data
        client.frames.append(frame)

    def deliver_bytes(self, client: Client, count: int) -> None:
        """Hand the server ``count`` of the client's bytes and check its answer."""
        chunk = bytes(client.outgoing[:count])
        del client.outgoing[:count]
        client.partial += count
        completed = []
        while client.frames and client.partial >= len(client.frames[0].data):
            client.partial -= len(client.frames[0].data)
            completed.append(client.frames.popleft())
        jobs = {job.deferred for job in self.worker.jobs()}
        admission = Admission(
            self.queue.depth,
            self.queue.idle_workers > 0,
            self.worker.available,
            {r for c in self.live() for r in c.inflight.values() if r.handle in jobs},
        )
        want = [reply for frame in completed for reply in self.read(client, frame, admission)]
        client.proto.dataReceived(chunk)
        self.expect({client: want}, ordered=True)
        for rid, request in client.inflight.items():
            if request.handle is None:
                request.handle = client.proto.inflight.get(rid)

    def read(self, client: Client, frame: Outgoing, admission: Admission) -> list[Reply]:
        """What the server answers at once to one complete frame (and the
        model's new state)."""
        if client.state == "closed":
            return []  # nothing is read after a connection-level error
        if frame.kind == "bad-magic":
            return self.broken(client, 0, ErrorCode.MALFORMED_FRAME)
        if frame.kind == "too-large":
            return self.broken(client, 0, ErrorCode.FRAME_TOO_LARGE)
        if frame.kind == "truncated":
            return self.broken(client, frame.rid, ErrorCode.MALFORMED_FRAME)
        if frame.kind == "unknown-type":
            if client.state == "handshaking":
                return self.broken(client, frame.rid, ErrorCode.UNSUPPORTED_MESSAGE)
            self.protocol_errors["UNSUPPORTED_MESSAGE"] += 1
            return [(frame.rid, "UNSUPPORTED_MESSAGE")]
        if client.state == "handshaking":
            if frame.kind != "hello":  # no HELLO first, or no common version
                return self.broken(client, frame.rid, ErrorCode.HANDSHAKE_FAILED)
            client.state = "open"
            if self.dataplane.draining:
                return [(frame.rid, "Hello"), (0, f"GoAway:{client.last_request_id}")]
            return [(frame.rid, "Hello")]
        if frame.kind in ("hello", "bad-hello"):
            return self.broken(client, frame.rid, ErrorCode.HANDSHAKE_FAILED)  # a second HELLO
        if frame.kind == "cancel":
            request = client.inflight.pop(frame.rid, None)
            if request is None:
                return []  # not in flight (answered already, say): ignored
            self.outcomes["tiny", "CANCELLED"] += 1
            if request not in admission.on_device:
                admission.depth -= 1
            return [(frame.rid, "CANCELLED")]
        client.last_request_id = max(client.last_request_id, frame.rid)
        if frame.kind == "ping":
            return [(frame.rid, "Pong")]
        refusal = self.admit(client, frame, admission)
        return [(frame.rid, refusal)] if refusal else []

    def admit(self, client: Client, frame: Outgoing, admission: Admission) -> str:
        """An inference request: refused (its error's name) or accepted ("")."""
        client.requests += 1
        model = frame.model if frame.model == "tiny" else ""  # unknown models count as ""
        if frame.rid in client.inflight:
            code = "DUPLICATE_REQUEST_ID"  # refused by the protocol itself
        elif self.dataplane.draining:
            code = "UNAVAILABLE"
        elif len(client.inflight) >= MAX_INFLIGHT:
            code = "OVERLOADED"
        elif frame.model != "tiny":
            code = "UNKNOWN_MODEL"
        elif not frame.valid:
            code = "INVALID_SHAPE"
        elif not admission.available:
            code = "UNAVAILABLE"
        elif not admission.idle and admission.depth >= QUEUE_SIZE:
            code = "OVERLOADED"
        else:
            assert frame.x is not None
            deadline = self.clock.seconds() + frame.timeout if frame.timeout else None
            request = Request(frame.rid, frame.x, deadline)
            client.inflight[frame.rid] = request
            if admission.idle:  # handed to the waiting worker, never queued
                admission.idle = False
                admission.on_device.add(request)
            else:
                admission.depth += 1
            return ""
        self.outcomes[model, code] += 1
        return code

    def broken(self, client: Client, rid: int, code: ErrorCode) -> list[Reply]:
        """A connection-level error: the server answers it and closes the connection."""
        client.state = "closed"
        self.protocol_errors[code.name] += 1
        return [(rid, code.name)]

    def owners(self) -> dict[Deferred[object], tuple[Client, Request]]:
        """Accepted requests not answered yet, by their server handle."""
        return {
            r.handle: (c, r)
            for c in self.live()
            for r in c.inflight.values()
            if r.handle is not None
        }

    def finish(
        self,
        owner: tuple[Client, Request] | None,
        outcome: str,
        want: dict[Client, list[Reply]],
        values: dict[tuple[Client, int], np.ndarray] | None = None,
    ) -> None:
        """A request in flight ends with ``outcome``: a reply, unless its
        connection is closed."""
        if owner is None:
            return  # cancelled, or its client left: its result is dropped
        client, request = owner
        del client.inflight[request.rid]
        self.outcomes["tiny", outcome] += 1
        if client.state == "open":
            want.setdefault(client, []).append((request.rid, outcome))
            if values is not None:
                values[client, request.rid] = request.x

    def run_device(self, outcome: str) -> None:
        """The device finishes the oldest call handed to its thread: a job
        (which succeeds or fails) or a health probe."""
        call, args, _ = self.runner.pending[0]
        batch = args[1] if call is execute else []
        waiting = self.queue.waiting()
        was_failed = self.worker.state is WorkerState.FAILED
        if outcome == "ok":
            self.device.repair()
        else:
            error = DeviceError("device lost") if outcome == "device-error" else None
            self.device.break_down(error or RuntimeError("boom"))
        owners = self.owners()
        self.runner.run_next()
        want: dict[Client, list[Reply]] = {}
        values: dict[tuple[Client, int], np.ndarray] = {}
        for job in batch:
            code = "OK" if outcome == "ok" else "INFERENCE_FAILED"
            self.finish(owners.get(job.deferred), code, want, values)
        if not was_failed and self.worker.state is WorkerState.FAILED:
            # Out of rotation: the jobs it would have taken are answered at once.
            for job in waiting:
                self.finish(owners.get(job.deferred), "UNAVAILABLE", want)
        self.expect(want, ordered=False, values=values)

    def expect(
        self,
        want: dict[Client, list[Reply]],
        ordered: bool,
        values: dict[tuple[Client, int], np.ndarray] | None = None,
    ) -> None:
        """Every client received exactly the replies in ``want`` (and the
        ``OK`` ones carry the outputs of their inputs)."""
        for client in self.clients:
            frames = client.decoder.feed(client.transport.value())
            client.transport.clear()
            assert client.decoder.error is None and client.decoder.buffered == 0
            got = [(f.request_id, decode_message(f)) for f in frames]
            replies = [(rid, label(message)) for rid, message in got]
            expected = want.get(client, [])
            if not ordered:
                replies, expected = sorted(replies), sorted(expected)
            assert replies == expected, f"{client}: got {replies}, expected {expected}"
            for rid, message in got:
                if isinstance(message, InferReply):
                    assert values is not None
                    reference = builtin.tiny_reference(values[client, rid])
                    np.testing.assert_allclose(message.outputs["y"], reference["y"], atol=1e-5)
                    assert set(message.outputs) == set(reference)


ProtocolMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    derandomize=True,  # the same runs every time: CI cannot fail by chance
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


#: The machine, run by pytest.
TestProtocolStateMachine = ProtocolMachine.TestCase
