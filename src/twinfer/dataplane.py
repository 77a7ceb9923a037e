"""The data plane: the one path every inference request takes, whatever its front end.

Front ends (the binary protocol, HTTP's KServe v2 and image APIs, gRPC to
come) only translate their wire format into calls on one :class:`DataPlane`
and its answers back.  The data plane does everything in between, once:

* **admission**: the server is draining (``UNAVAILABLE``), the client's
  in-flight limit (``OVERLOADED``), a request key already in flight
  (``DUPLICATE_REQUEST_ID``);
* **validation**: the model exists, its inputs fit its signature, an image
  request names an image model (``UNKNOWN_MODEL``, ``INVALID_*``,
  ``WRONG_TASK``);
* **submission** to the dispatcher, with the request's deadline and priority
  (a full queue is ``OVERLOADED``);
* **outcome mapping**: whatever happens, the request's Deferred fails only
  with :class:`~twinfer.errors.TwinferError` (a cancelled job becomes
  ``CANCELLED``, an unexpected exception ``INTERNAL`` and a log entry), so a
  front end needs one error path, and :mod:`twinfer.outcomes` tells it the
  HTTP status or gRPC code;
* **counting**: every request is counted exactly once, by model, outcome and
  front end, refusals included, and every front end's connections and
  requests in flight are visible in one place (:meth:`DataPlane.sessions`),
  which is what the metrics and the graceful drain read.

A client connection is a :class:`Session`.  Results travel one way: device
thread -> dispatcher -> data plane -> front end, and carry everything the
front end needs to answer (an image reply names its task), so nobody looks a
model up again after its job ran.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from types import ModuleType
from typing import Any

import attrs
import numpy as np
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from twinfer.budget import BufferBudget
from twinfer.errors import ErrorCode, TwinferError
from twinfer.ops.stats import Stats
from twinfer.outcomes import outcome
from twinfer.scheduling import Dispatcher, InferResult

__all__ = ["DataPlane", "FrontendState", "ImagePredictions", "Session", "load_tasks"]

log = Logger()


@attrs.frozen
class ImagePredictions:
    """What an image request's Deferred fires with."""

    #: The model's task: ``"classify"`` or ``"detect"``.
    task: str
    #: One dict per prediction: ``label_id``, ``label``, ``confidences`` and
    #: ``detection_box`` (``[x1, y1, x2, y2]`` in the image's own pixels).
    predictions: list[dict[str, Any]]


class Session:
    """One client connection of one front end, as the data plane sees it.

    A front end opens a session when a client connects
    (:meth:`DataPlane.open_session`) and closes it when the client goes
    (:meth:`close`), which withdraws the client's queued jobs and drops the
    results of its running ones.  ``transport`` is what the graceful drain
    disconnects once the session has nothing in flight.
    """

    def __init__(
        self,
        plane: DataPlane,
        frontend: FrontendState,
        max_inflight: int,
        transport: Any,
        inflight: dict[Hashable, Deferred[Any]] | None = None,
    ) -> None:
        self.plane = plane
        self.frontend = frontend
        #: Requests in flight (0: no limit beyond the server's own).
        self.max_inflight = max_inflight
        #: The connection's transport (``loseConnection`` ends it).
        self.transport = transport
        #: Requests queued or running, by the key the front end gave them
        #: (a front end may pass its own table: the binary protocol's
        #: connection reads it to refuse duplicate request ids).
        self.inflight: dict[Hashable, Deferred[Any]] = {} if inflight is None else inflight
        #: Requests this session made (admitted or not).
        self.requests = 0
        self.closed = False
        self._closed_waiters: list[Deferred[None]] = []

    def __repr__(self) -> str:
        return f"<Session {self.frontend.name} inflight={len(self.inflight)}>"

    def cancel(self, key: Hashable) -> bool:
        """Cancel the request ``key`` if it is in flight (its Deferred fails
        with ``CANCELLED``); returns whether it was."""
        d = self.inflight.get(key)
        if d is None:
            return False
        d.cancel()
        return True

    def close(self) -> None:
        """The client is gone: cancel what it has in flight and forget it."""
        if self.closed:
            return
        self.closed = True
        self.frontend.sessions.discard(self)
        inflight, self.inflight = self.inflight, {}
        for d in inflight.values():
            d.cancel()  # queued jobs never run; running ones' results are dropped
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_closed(self) -> Deferred[None]:
        """A Deferred that fires (with None) when the session is closed (its
        protocol's ``connectionLost``); cancelling it only stops the waiting."""
        if self.closed:
            return succeed(None)

        def forget(d: Deferred[None]) -> None:
            if d in self._closed_waiters:
                self._closed_waiters.remove(d)

        d: Deferred[None] = Deferred(forget)
        self._closed_waiters.append(d)
        return d


@attrs.define(eq=False)
class FrontendState:
    """One front end's sessions and the refusals it met before any request
    (malformed frames, bodies that do not parse)."""

    name: str
    sessions: set[Session] = attrs.field(factory=set)
    #: Protocol-level errors by ErrorCode name (they close a connection or
    #: refuse bytes that never became a request).
    protocol_errors: dict[str, int] = attrs.field(factory=dict)
    #: What a server limit refused, by limit name (``max_connections``,
    #: ``idle_timeout``, ``hello_size``...): connections closed or bytes not read.
    refused: dict[str, int] = attrs.field(factory=dict)

    @property
    def inflight(self) -> int:
        """Requests queued or running, over this front end's sessions."""
        return sum(len(s.inflight) for s in list(self.sessions))  # read from scrape threads too


def load_tasks() -> ModuleType | None:
    """:mod:`twinfer.tasks` if it is installed, else None.

    Only the absence of that very module counts: an ImportError raised from
    inside it is a bug and propagates.
    """
    try:
        return importlib.import_module("twinfer.tasks")
    except ModuleNotFoundError as e:
        if e.name == "twinfer.tasks":
            return None
        raise


class DataPlane:
    """Admits, validates, submits, maps outcomes and counts, for every front end.

    ``tasks`` is the image-task module: True (the default) imports
    :mod:`twinfer.tasks` if it is installed, None serves no image requests
    (``WRONG_TASK``); ``clock`` is ``time.monotonic`` unless a test
    gives another; ``budget`` bounds the request bytes the front ends buffer
    (:class:`~twinfer.budget.BufferBudget`; default 512 MiB).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        stats: Stats | None = None,
        tasks: ModuleType | None | bool = True,
        clock: Callable[[], float] = time.monotonic,
        budget: BufferBudget | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        #: The request bytes every front end may buffer at once, together.
        self.budget = budget if budget is not None else BufferBudget()
        self.stats = stats if stats is not None else Stats()
        self.tasks: ModuleType | None = load_tasks() if tasks is True else tasks or None
        self._now = clock
        self.frontends: dict[str, FrontendState] = {}
        #: Set when a graceful drain begins: new requests get UNAVAILABLE.
        self.draining = False
        self._drain_listeners: list[Callable[[], object]] = []

    # -- front ends and their sessions ----------------------------------------

    def frontend(self, name: str) -> FrontendState:
        """The state of front end ``name`` (registered on first use, so that its
        gauges read 0 rather than nothing before the first client)."""
        state = self.frontends.get(name)
        if state is None:
            state = self.frontends[name] = FrontendState(name)
        return state

    def open_session(
        self,
        frontend: str,
        transport: Any = None,
        max_inflight: int = 0,
        inflight: dict[Any, Deferred[Any]] | None = None,
    ) -> Session:
        """A new client connection of ``frontend`` (``inflight``: the table
        to keep its requests in flight in, if the front end has one)."""
        state = self.frontend(frontend)
        session = Session(self, state, max_inflight, transport, inflight)
        state.sessions.add(session)
        return session

    def sessions(self) -> Iterator[Session]:
        """Every open session, over every front end."""
        for state in list(self.frontends.values()):
            yield from list(state.sessions)

    def inflight(self) -> int:
        """Requests queued or running, over every front end."""
        return sum(state.inflight for state in self.frontends.values())

    def on_drain(self, listener: Callable[[], object]) -> None:
        """Call ``listener`` (no arguments) when a drain begins, so that a
        front end can tell its clients (the binary protocol's ``GOAWAY``)."""
        self._drain_listeners.append(listener)

    def begin_drain(self) -> None:
        """Refuse new requests (``UNAVAILABLE``); those in flight go on.
        Every front end's drain listener hears it, once."""
        if self.draining:
            return
        self.draining = True
        for listener in list(self._drain_listeners):
            listener()

    # -- requests ---------------------------------------------------------------

    def infer(
        self,
        session: Session,
        key: Hashable,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: tuple[str, ...] = (),
        *,
        timeout_ms: int = 0,
        priority: int = 0,
        work: Callable[[Any], Any] | None = None,
    ) -> Deferred[InferResult]:
        """Run ``model`` on ``inputs`` for ``session``'s request ``key``.

        Returns a Deferred firing with an :class:`InferResult` (the outputs
        asked for, or all of them, and the queue and compute times), or
        failing with :class:`TwinferError`; cancel it (or
        :meth:`Session.cancel` ``key``) to withdraw the request.
        ``timeout_ms`` (0: the model's default) bounds its wait for a
        device; ``priority`` is a level from 1 (lowest), 0 for the default.
        ``work`` (validated like ``inputs``) replaces ``engine.run`` in the
        device thread and must return the :class:`InferResult` itself (the
        shared-memory requests of :mod:`twinfer.sharedmem_requests`).
        """
        started = self._now()
        try:
            self._admit(session, key)
            self.dispatcher.entry(model).signature.validate(model, inputs, outputs)
            d = self.dispatcher.submit(
                model, inputs, outputs, timeout_ms=timeout_ms, priority=priority, work=work
            )
        except TwinferError as e:
            return self._refused(session, model, e, started)
        return self._track(session, key, model, started, d)

    def predict_image(
        self,
        session: Session,
        key: Hashable,
        model: str,
        image: bytes | bytearray | memoryview,
        task: str | None = None,
    ) -> Deferred[ImagePredictions]:
        """Decode ``image``, run the image model ``model`` on it and decode its
        outputs into predictions, all in the device thread.

        Returns a Deferred firing with :class:`ImagePredictions` or failing
        with :class:`TwinferError` (``WRONG_TASK`` when ``model`` has no
        image task, or not ``task`` if one is given; ``INVALID_INPUT`` for
        bytes that are not an image).
        """
        started = self._now()
        try:
            self._admit(session, key)
            if self.tasks is None:
                raise TwinferError(
                    ErrorCode.WRONG_TASK, "this server has no image tasks (twinfer.tasks)"
                )
            kind, d = self.tasks.submit_image(self.dispatcher, model, image, task)
        except TwinferError as e:
            return self._refused(session, model, e, started)
        d.addCallback(lambda predictions: ImagePredictions(kind, predictions))
        return self._track(session, key, model, started, d)

    def refuse(self, session: Session, model: str, error: TwinferError) -> None:
        """Count a request that its front end refused while translating it (a
        body that does not parse, an unknown model version...)."""
        session.requests += 1
        self._count(session.frontend.name, model, error.code, 0.0)

    def protocol_error(self, frontend: str, code: ErrorCode | int) -> None:
        """Count bytes that never became a request (a malformed frame...)."""
        errors = self.frontend(frontend).protocol_errors
        name = outcome(code).name
        errors[name] = errors.get(name, 0) + 1

    def limit_refused(self, frontend: str, limit: str) -> None:
        """Count one refusal by the server limit ``limit`` (a config key's name)."""
        refused = self.frontend(frontend).refused
        refused[limit] = refused.get(limit, 0) + 1

    # -- implementation ---------------------------------------------------------

    def _admit(self, session: Session, key: Hashable) -> None:
        session.requests += 1
        if key in session.inflight:
            raise TwinferError(
                ErrorCode.DUPLICATE_REQUEST_ID,
                f"request id {key} is already in flight on this connection",
            )
        if self.draining:
            raise TwinferError(
                ErrorCode.UNAVAILABLE, "the server is shutting down and accepts no new requests"
            )
        limit = session.max_inflight
        if limit and len(session.inflight) >= limit:
            raise TwinferError(
                ErrorCode.OVERLOADED,
                f"this connection already has {limit} requests in flight (the limit)",
            )

    def _refused(
        self, session: Session, model: str, error: TwinferError, started: float
    ) -> Deferred[Any]:
        self._count(session.frontend.name, model, error.code, self._now() - started)
        return fail(error)

    def _track(
        self, session: Session, key: Hashable, model: str, started: float, d: Deferred[Any]
    ) -> Deferred[Any]:
        session.inflight[key] = d
        # First in the chain: the front end's callbacks see the mapped outcome.
        d.addBoth(self._finished, session, key, model, started)
        return d

    def _finished(
        self, result: Any, session: Session, key: Hashable, model: str, started: float
    ) -> Any:
        if session.inflight.get(key) is not None:
            del session.inflight[key]
        latency = self._now() - started
        frontend = session.frontend.name
        if not isinstance(result, Failure):
            if isinstance(result, InferResult):
                self.stats.request_done(
                    model,
                    "OK",
                    latency,
                    result.queue_us / 1e6,
                    result.compute_us / 1e6,
                    result.batch_size,
                    frontend=frontend,
                    batch_requests=result.batch_requests,
                )
            else:
                self.stats.request_done(model, "OK", latency, frontend=frontend)
            return result
        if result.check(TwinferError):
            error: TwinferError = result.value  # type: ignore[assignment]
        elif result.check(CancelledError):
            what = f"request {key}" if isinstance(key, int) else "the request"
            error = TwinferError(ErrorCode.CANCELLED, f"{what} was cancelled")
        else:
            log.failure("unexpected failure of a request for {model}", result, model=model)
            error = TwinferError(ErrorCode.INTERNAL, result.getErrorMessage())
        self._count(frontend, model, error.code, latency)
        return Failure(error)

    def _count(self, frontend: str, model: str, code: ErrorCode | int, latency: float) -> None:
        # Requests for models not served count only in the totals, so that a
        # client cannot grow the per-model tables.
        known = self.dispatcher.model(model) is not None or model in self.stats.models
        self.stats.request_done(model, outcome(code).name, latency, known=known, frontend=frontend)
