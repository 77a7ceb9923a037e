"""The Twisted front end: a thin ``Protocol`` adapter around the sans-I/O connection.

:class:`TwinferProtocol` feeds received bytes to a server-side
:class:`~twinfer.wire.connection.Connection` (which owns the handshake, the
frame limit, duplicate request ids and the rule of which errors close the
connection), turns each request it yields into a call on the
:class:`~twinfer.dataplane.DataPlane` (which admits, validates, queues and
counts it), and writes replies as they complete (out of order, matched by
request id).  It does no inference and no heavy
copying: the reactor thread only parses, queues and writes.

Besides the messages it handles the connection's transport-level duties:
flow control (pausing reads for unread replies, saturated queues and the
buffer budget), the connection limit, the idle timeout and ``GOAWAY`` on a
drain.  They all act on the one Twisted transport, which is why they live
here and the module runs a little over 500 lines; the protocol's rules are
in :mod:`twinfer.wire.connection` and the request path in the data plane.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IAddress, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

import twinfer
from twinfer.config import ServerConfig
from twinfer.dataplane import DataPlane, ImagePredictions, Session
from twinfer.errors import CodecError, ErrorCode, TwinferError
from twinfer.frontends import binary_shm
from twinfer.netutil import set_no_delay
from twinfer.scheduling import InferResult
from twinfer.wire.connection import Connection, Role
from twinfer.wire.encode import encode_message
from twinfer.wire.events import HandshakeComplete, MessageReceived, ProtocolViolation
from twinfer.wire.messages import (
    AdminReply,
    AdminRequest,
    Cancel,
    Error,
    GetHealth,
    GetMetadata,
    GetRegionStatus,
    Health,
    ImageRequest,
    InferReply,
    InferRequest,
    ListModels,
    Message,
    ModelList,
    Ping,
    Pong,
    Prediction,
    Predictions,
    RegisterRegion,
    UnregisterRegion,
)

if TYPE_CHECKING:
    from twinfer.ops.control import Controller
    from twinfer.sharedmem import RegionTable, SharedMemory

log = Logger()

AGENT = f"twinfer/{twinfer.__version__}"
#: This front end's name in the data plane's counts and the metrics' labels.
FRONTEND = "binary"
#: The reason in the GOAWAY of a server that shuts down.
GOING_AWAY = "the server is shutting down"


@implementer(IPushProducer)
class _ReadThrottle:
    """Registered as the transport's producer: while replies pile up unsent
    (a client that does not read), stop reading its requests."""

    def __init__(self, protocol: TwinferProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol.pause_reading("writes")

    def resumeProducing(self) -> None:
        self._protocol.resume_reading("writes")

    def stopProducing(self) -> None:
        pass


class TwinferProtocol(Protocol, TimeoutMixin):
    """One client connection speaking the twinfer binary protocol.

    Limits (``[server]``): beyond ``max_connections`` connections on the
    factory's port a new one gets ``ERROR OVERLOADED`` and is closed; a
    connection that sends no frame for ``idle_timeout`` seconds while it has
    nothing in flight is closed.  Both are counted in the data plane's
    :attr:`~twinfer.dataplane.FrontendState.refused`.
    """

    factory: TwinferFactory
    # A TCP or TLS transport: also an IConsumer and IProducer.
    transport: Any
    #: This connection's shared-memory regions (:mod:`twinfer.frontends.binary_shm`).
    regions: RegionTable | None = None

    def __init__(self) -> None:
        self._connection = Connection(Role.SERVER, agent=AGENT)
        self._closing = False
        #: This connection as the data plane sees it (set when connected).
        self.session: Session | None = None
        #: Why reading from this client is paused: "writes" (its replies are
        #: not being read), "load" (it fills a saturated queue) and/or
        #: "memory" (the buffer budget is spent).
        self.paused_for: set[str] = set()
        # Budget bytes reserved for frames received and not yet handed to a
        # request in flight (released once the frames are handled).
        self._unassigned = 0

    @property
    def inflight(self) -> dict[int, Deferred[Any]]:
        """Requests in flight: request id -> the job's Deferred.  One table,
        kept by the data plane's session and read by the connection, which
        refuses a new request reusing one of these ids."""
        return self._connection.in_flight

    @property
    def requests(self) -> int:
        """Inference and image requests this connection made."""
        return self.session.requests if self.session is not None else 0

    # -- Twisted events -----------------------------------------------------

    def connectionMade(self) -> None:
        config = self.factory.config
        if len(self.factory.connections) >= config.max_connections:
            self._refuse_connection(config.max_connections)
            return
        set_no_delay(self.transport)
        self._connection.max_frame_size = config.max_frame_size
        if self.factory.clock is not None:
            self.callLater = self.factory.clock.callLater  # type: ignore[method-assign]
            self.setTimeout(config.idle_timeout or None)
        self._connection.set_admission(self._admit_body)
        self.transport.registerProducer(_ReadThrottle(self), True)
        self.session = self.factory.dataplane.open_session(
            FRONTEND,
            self.transport,
            self.factory.config.max_inflight_per_connection,
            inflight=self._connection.in_flight,
        )
        self.factory.connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        self._connection.receive_data(data)
        self._handle_events()

    def read_buffer(self) -> memoryview | None:
        """Where the transport may receive the rest of a large frame in place
        (see :class:`twinfer.netutil.DirectReadServer`)."""
        if self._closing:
            return None
        return self._connection.read_buffer()

    def buffer_filled(self, count: int) -> None:
        """``count`` bytes arrived in :meth:`read_buffer`."""
        self.resetTimeout()
        self._connection.buffer_filled(count)
        self._handle_events()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._closing = True
        self.setTimeout(None)
        self.factory.connections.discard(self)
        self.factory.paused_for_load.discard(self)
        self._connection.close()
        budget = self.factory.dataplane.budget
        budget.forget(self._memory_granted)
        unassigned, self._unassigned = self._unassigned, 0
        budget.release(unassigned)
        # Its regions go (each unmapped once its requests' leases end).
        binary_shm.close(self)
        if self.session is not None:
            # Queued jobs never run; running ones' results are dropped (and
            # their budget bytes released).
            self.session.close()

    # -- the buffer budget -----------------------------------------------------

    def _admit_body(self, length: int) -> bool:
        """Reserve a frame body's bytes in the budget before it is allocated."""
        budget = self.factory.dataplane.budget
        if not budget.fits(length):
            self.factory.dataplane.limit_refused(FRONTEND, "max_buffered_bytes")
            raise CodecError(
                ErrorCode.FRAME_TOO_LARGE,
                f"a frame of {length} bytes is larger than the server's whole buffer "
                f"budget ({budget.limit} bytes, server.max_buffered_bytes)",
            )
        if budget.try_reserve(length):
            self._unassigned += length
            return True
        # Wait for the bytes instead of allocating them: stop reading.
        self.factory.dataplane.limit_refused(FRONTEND, "max_buffered_bytes")
        self.pause_reading("memory")
        budget.wait(length, self._memory_granted)
        return False

    def _memory_granted(self, size: int) -> None:
        self._unassigned += size
        if self._closing:
            return  # connectionLost releases it
        self.resume_reading("memory")
        self._connection.admitted()
        self._handle_events()

    def _hold(self, size: int) -> int:
        """Keep ``size`` reserved bytes (a request's tensors) until its reply:
        returns the bytes held, for :meth:`_unhold` to give back."""
        size = min(size, self._unassigned - self._connection.body_in_progress)
        if size <= 0:
            return 0
        self._unassigned -= size
        return size

    def _unhold(self, held: int) -> None:
        """A request finished: give its held bytes back to the budget."""
        if held:
            self.factory.dataplane.budget.release(held)

    def _release_handled(self) -> None:
        """The frames received so far are handled: give back their bytes,
        except the body being received and those held by requests."""
        excess = self._unassigned - self._connection.body_in_progress
        if excess > 0:
            self._unassigned -= excess
            self.factory.dataplane.budget.release(excess)

    def timeoutConnection(self) -> None:
        """No frame for ``idle_timeout`` seconds: close, unless requests are in flight."""
        if self.inflight:
            self.setTimeout(self.timeOut)  # a long inference is not idleness: start over
            return
        self.factory.dataplane.limit_refused(FRONTEND, "idle_timeout")
        log.info("closing idle connection from {peer}", peer=self.transport.getPeer())
        self._closing = True
        self.transport.loseConnection()

    def _refuse_connection(self, limit: int) -> None:
        self._closing = True
        self.factory.dataplane.limit_refused(FRONTEND, "max_connections")
        error = Error(
            ErrorCode.OVERLOADED,
            f"the server already holds {limit} connections on this port "
            f"(server.max_connections); try again later or elsewhere",
        )
        self.transport.writeSequence([bytes(c) for c in encode_message(0, error)])
        self.transport.loseConnection()

    def go_away(self, reason: str) -> bool:
        """Send ``GOAWAY`` (the last request id this connection will answer,
        and ``reason``); returns whether it was sent (not before the
        handshake, and only once)."""
        if self._closing or self._connection.send_goaway(reason) is None:
            return False
        self._flush()
        return True

    # -- messages -----------------------------------------------------------

    def _handle_events(self) -> None:
        for event in self._connection.events():
            if isinstance(event, MessageReceived):
                self._HANDLERS[type(event.message)](self, event.request_id, event.message)
            elif isinstance(event, ProtocolViolation):
                self._violation(event)
            elif isinstance(event, HandshakeComplete) and self.factory.dataplane.draining:
                # Connected while the server drains (a balancer or a client
                # that has not noticed yet): tell it to go elsewhere at once.
                self._connection.send_goaway(GOING_AWAY)
        if not self._closing:  # (connectionLost releases everything)
            self._release_handled()
        self._flush()

    def _violation(self, event: ProtocolViolation) -> None:
        """The client broke the protocol; the connection has queued the ERROR answering it."""
        request = event.message
        plane = self.factory.dataplane
        if isinstance(request, InferRequest | ImageRequest) and self.session is not None:
            # A request refused by the protocol (a duplicate id) is counted
            # like any other refusal.
            plane.refuse(self.session, request.model, event.error)
        else:
            plane.protocol_error(FRONTEND, event.error.code)
            if self._connection.version == 0 and event.error.code is ErrorCode.FRAME_TOO_LARGE:
                # Refused from the header of a first frame bigger than a HELLO.
                plane.limit_refused(FRONTEND, "hello_size")
        if event.error.closes_connection:
            self._fatal(event.error)

    def _on_ping(self, request_id: int, message: Ping) -> None:
        self._send(request_id, Pong())

    def _on_list_models(self, request_id: int, message: ListModels) -> None:
        models = ModelList(self.factory.dispatcher.model_infos())
        self._send(request_id, models)

    def _on_get_metadata(self, request_id: int, message: GetMetadata) -> None:
        try:
            metadata = self.factory.dispatcher.metadata(message.model)
        except TwinferError as e:
            self._send_error(request_id, e.code, e.message)
            return
        self._send(request_id, metadata)

    def _on_infer(self, request_id: int, message: InferRequest) -> None:
        assert self.session is not None
        if message.uses_regions:
            binary_shm.on_infer(self, request_id, message)
            return
        d = self.factory.dataplane.infer(
            self.session,
            request_id,
            message.model,
            message.inputs,
            message.outputs,
            timeout_ms=message.timeout_ms,
            priority=message.priority,
        )
        held = sum(a.nbytes for a in message.inputs.values())
        self._reply_to_infer(request_id, message.model, d, held)

    def _reply_to_infer(
        self, request_id: int, model: str, d: Deferred[InferResult], held: int
    ) -> None:
        """Send ``d``'s result (or error) as the reply to ``request_id``,
        holding ``held`` bytes of the read budget until then; pause reading
        while ``model``'s queue is saturated and this client is its busiest."""
        if (
            not d.called
            and self.factory.dispatcher.saturated(model)
            and self.factory.is_busiest(self)
        ):
            # Back-pressure instead of buffering: stop reading this client's
            # requests until the queue drains to its low watermark.
            self.pause_reading("load")
        # One callback pair per request: the reply also releases the budget.
        args = (request_id, self._hold(held))
        d.addCallbacks(self._reply, self._reply_failed, callbackArgs=args, errbackArgs=args)

    def _on_image(self, request_id: int, message: ImageRequest) -> None:
        assert self.session is not None
        # Decoding, inference and post-processing all run in the device thread.
        d = self.factory.dataplane.predict_image(
            self.session, request_id, message.model, message.image, message.task or None
        )
        args = (request_id, self._hold(len(message.image)))
        d.addCallbacks(
            self._reply_predictions, self._reply_failed, callbackArgs=args, errbackArgs=args
        )

    def _on_get_health(self, request_id: int, message: GetHealth) -> None:
        controller = self.factory.controller
        if controller is not None:
            health = controller.health()
        else:
            started = self.factory.dispatcher.started and not self.factory.dataplane.draining
            health = Health(True, started, "" if started else "the server is not running")
        self._send(request_id, health)

    def _on_admin(self, request_id: int, message: AdminRequest) -> None:
        controller = self.factory.controller
        if controller is None or not self.factory.allow_admin:
            self._send_error(
                request_id,
                ErrorCode.UNSUPPORTED_MESSAGE,
                "administration is disabled on this server (start it with --allow-admin)",
            )
            return
        peer = self.transport.getPeer()
        log.info("admin request from {peer}: {message}", peer=peer, message=message)
        d = maybeDeferred(controller.execute, message)
        d.addCallbacks(
            self._admin_done,
            self._admin_failed,
            callbackArgs=(request_id,),
            errbackArgs=(request_id,),
        )

    def _admin_done(self, summary: str, request_id: int) -> None:
        self._send(request_id, AdminReply(summary))

    def _admin_failed(self, failure: Failure, request_id: int) -> None:
        if failure.check(TwinferError):
            error: TwinferError = failure.value  # type: ignore[assignment]
            self._send_error(request_id, error.code, error.message)
        else:
            log.failure("admin request {rid} failed", failure, rid=request_id)
            self._send_error(request_id, ErrorCode.INTERNAL, failure.getErrorMessage())

    def _on_cancel(self, request_id: int, message: Cancel) -> None:
        # Unknown ids are ignored: the reply may already be on its way.
        if self.session is not None:
            self.session.cancel(request_id)

    #: One handler for each message a client may send after the handshake.
    _HANDLERS: dict[type, Any] = {
        Ping: _on_ping,
        ListModels: _on_list_models,
        GetMetadata: _on_get_metadata,
        InferRequest: _on_infer,
        ImageRequest: _on_image,
        Cancel: _on_cancel,
        GetHealth: _on_get_health,
        AdminRequest: _on_admin,
        RegisterRegion: binary_shm.on_register,
        UnregisterRegion: binary_shm.on_unregister,
        GetRegionStatus: binary_shm.on_status,
    }

    # -- flow control ---------------------------------------------------------

    def pause_reading(self, reason: str) -> None:
        """Stop reading requests from this client (until every reason is gone)."""
        if not self.paused_for and self.transport is not None:
            self.transport.pauseProducing()
        self.paused_for.add(reason)
        if reason == "load":
            self.factory.paused_for_load.add(self)

    def resume_reading(self, reason: str) -> None:
        """Drop one reason to pause; read again when none is left."""
        if reason not in self.paused_for:
            return
        self.paused_for.discard(reason)
        if not self.paused_for and not self._closing:
            self.transport.resumeProducing()

    # -- replies ------------------------------------------------------------

    def _reply(self, result: InferResult, request_id: int, held: int = 0) -> None:
        self._unhold(held)
        reply = InferReply(result.outputs, result.queue_us, result.compute_us)
        try:
            self._send(request_id, reply)
        except CodecError as e:  # e.g. an output dtype the wire cannot carry
            self._send_error(request_id, ErrorCode.INTERNAL, f"cannot encode the reply: {e}")

    def _reply_predictions(self, result: ImagePredictions, request_id: int, held: int = 0) -> None:
        self._unhold(held)
        reply = Predictions(
            result.task,
            tuple(
                Prediction(p["label_id"], p["label"], p["confidences"], tuple(p["detection_box"]))
                for p in result.predictions
            ),
        )
        self._send(request_id, reply)

    def _reply_failed(self, failure: Failure, request_id: int, held: int = 0) -> None:
        self._unhold(held)
        # The data plane fails requests only with TwinferError.
        error: TwinferError = failure.value  # type: ignore[assignment]
        self._send_error(request_id, error.code, error.message)

    def _send_error(self, request_id: int, code: int, message: str) -> None:
        self._connection.send_error(request_id, code, message)
        self._flush()

    def _send(self, request_id: int, message: Message) -> None:
        self._connection.send_reply(request_id, message)
        self._flush()

    def _fatal(self, error: TwinferError) -> None:
        """Send the connection-level error already queued, then close the connection."""
        # (Counted by _violation as a protocol error.)
        peer: IAddress = self.transport.getPeer()
        log.info("closing connection from {peer}: {error}", peer=peer, error=str(error))
        self._flush()
        self._closing = True
        self.transport.loseConnection()

    def _flush(self) -> None:
        chunks = self._connection.data_to_send()
        if not chunks:
            return
        # Twisted transports take only bytes; tensor chunks from the backend
        # already are bytes (made in the device thread), so this copies
        # nothing on the hot path.
        self.transport.writeSequence([c if type(c) is bytes else bytes(c) for c in chunks])


class TwinferFactory(Factory):
    """Creates a :class:`TwinferProtocol` per connection, over one data plane.

    ``config`` gives the limits; ``clock`` (an ``IReactorTime``: the
    reactor) runs the idle timeout, which is off without one.
    """

    protocol = TwinferProtocol  # type: ignore[assignment]

    # Set by twinfer.tap for the operations features (class defaults keep the
    # factory usable on its own, as the tests' in-process servers use it).
    #: Runtime control and health (:class:`twinfer.ops.control.Controller`), if any.
    controller: Controller | None = None
    #: Whether ADMIN_REQUEST messages are obeyed (``--allow-admin``).
    allow_admin = False
    #: The server's shm mappings (``--allow-shm``); None: shared memory is refused.
    shared_memory: SharedMemory | None = None

    def __init__(
        self, dataplane: DataPlane, config: ServerConfig | None = None, clock: Any = None
    ) -> None:
        #: What idle timeouts are scheduled on (the reactor, or a Clock in
        #: tests); None: connections are never closed for idleness.
        self.clock = clock
        self.dataplane = dataplane
        self.dispatcher = dataplane.dispatcher
        self.config = config or ServerConfig()
        dataplane.frontend(FRONTEND)  # its gauges exist before the first client
        self.connections: set[TwinferProtocol] = set()
        #: Connections not being read because a queue is saturated.
        self.paused_for_load: set[TwinferProtocol] = set()
        self.dispatcher.on_relieved.append(self._relieved)
        # When the server begins to drain, every client hears it at once.
        dataplane.on_drain(lambda: self.go_away(GOING_AWAY))

    def go_away(self, reason: str) -> int:
        """Tell every client connected here that the server is going away
        (``GOAWAY``: the last request id each connection will answer, and
        ``reason``); returns how many connections were told.

        Requests in flight are still answered; the data plane answers new
        inference ``UNAVAILABLE`` while it drains.
        """
        return sum(connection.go_away(reason) for connection in list(self.connections))

    def is_busiest(self, connection: TwinferProtocol) -> bool:
        """Whether ``connection`` has at least its fair share of the requests in flight."""
        total = sum(len(c.inflight) for c in self.connections)
        return len(connection.inflight) * len(self.connections) >= total

    def _relieved(self) -> None:
        """A saturated queue drained: read from the paused connections again."""
        paused, self.paused_for_load = self.paused_for_load, set()
        for connection in paused:
            connection.resume_reading("load")
