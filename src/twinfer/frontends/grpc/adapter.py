"""The gRPC front end's reactor side: its calls on the data plane, and the bridge to them.

Everything in :class:`GRPCAdapter` runs on the reactor thread, like every
other front end's calls on the :class:`~twinfer.dataplane.DataPlane` (which
is not thread-safe, and need not be).  The gRPC servicer runs on its own
asyncio loop in another thread and reaches the adapter only through a
:class:`ReactorBridge`: ``reactor.callFromThread`` one way, the loop's
``call_soon_threadsafe`` back to an asyncio future the other, so neither
thread ever waits for the other and no thread is parked per request.

Sessions: a unary call belongs to its gRPC peer (``ipv4:127.0.0.1:50312``:
one client connection), whose data-plane session lives while the peer has a
call in flight; a ``ModelStreamInfer`` stream is a session of its own, from
its first request to its end.  Either way the server's per-connection
in-flight limit applies, and the metrics count them under the front end
``grpc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.python.failure import Failure

from twinfer import sharedmem_requests
from twinfer.dataplane import DataPlane, Session
from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.http import kserve
from twinfer.ops.repository import (
    ModelRepository,
    ModelStatistics,
    RepositoryModel,
    TritonModelConfig,
)
from twinfer.scheduling import InferResult
from twinfer.sharedmem import RegionTable, regions_of
from twinfer.wire.messages import RegionInfo

__all__ = ["FRONTEND", "GRPCAdapter", "ReactorBridge"]

#: The front end's name in the data plane and its metrics.
FRONTEND = "grpc"


class ReactorBridge:
    """Runs functions on the reactor thread for code on an asyncio loop.

    Made and used on the loop's thread; ``reactor`` needs ``callFromThread``.
    """

    def __init__(self, reactor: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.reactor = reactor
        self.loop = loop

    def call(self, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """An asyncio future of ``function(*args)`` run on the reactor thread
        (of what its Deferred fires with, if it returns one; an exception or
        a failed Deferred sets the future's exception).

        Cancelling the future only stops the waiting: say what to undo with
        :meth:`send` (the servicer cancels the data-plane request).
        """
        future: asyncio.Future[Any] = self.loop.create_future()
        self.reactor.callFromThread(self._run, future, function, args)
        return future

    def send(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` on the reactor thread, not waiting for it."""
        self.reactor.callFromThread(function, *args)

    def _run(self, future: asyncio.Future[Any], function: Callable[..., Any], args: Any) -> None:
        d = maybeDeferred(function, *args)
        d.addBoth(self._deliver, future)

    def _deliver(self, result: Any, future: asyncio.Future[Any]) -> None:
        # A closed loop: the server is gone and nobody waits for the result.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle, future, result)


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # the call was cancelled meanwhile
        return
    if isinstance(result, Failure):
        future.set_exception(result.value)
    else:
        future.set_result(result)


class GRPCAdapter:
    """The gRPC front end's data-plane calls (reactor thread only).

    ``max_inflight`` is the server's per-connection limit, applied per peer
    and per stream.  ``repository`` answers Triton's repository, statistics
    and configuration extensions (None: one of its own, without load and
    unload); ``shared_regions`` is the server-wide shared-memory table
    (None: ``--allow-shm`` is off).
    """

    def __init__(
        self,
        dataplane: DataPlane,
        max_inflight: int = 0,
        *,
        repository: ModelRepository | None = None,
        shared_regions: RegionTable | None = None,
    ) -> None:
        self.plane = dataplane
        self.dispatcher = dataplane.dispatcher
        self.max_inflight = max_inflight
        self.repository = repository or ModelRepository(dataplane)
        self.regions = shared_regions
        dataplane.frontend(FRONTEND)  # its gauges read 0 before the first call
        #: Open sessions by peer (or stream) and how many users each has.
        self._sessions: dict[Hashable, tuple[Session, int]] = {}

    # -- sessions ------------------------------------------------------------------

    def acquire(self, owner: Hashable) -> Session:
        """The session of ``owner`` (a peer or a stream), opened on first use."""
        session, users = self._sessions.get(owner, (None, 0))
        if session is None:
            session = self.plane.open_session(FRONTEND, max_inflight=self.max_inflight)
        self._sessions[owner] = (session, users + 1)
        return session

    def release(self, owner: Hashable) -> None:
        """One user of ``owner``'s session is done; the last one closes it
        (which cancels whatever it still has in flight)."""
        session, users = self._sessions.get(owner, (None, 0))
        if session is None:
            return
        if users > 1:
            self._sessions[owner] = (session, users - 1)
            return
        del self._sessions[owner]
        session.close()

    def cancel(self, owner: Hashable, key: Hashable) -> None:
        """The client cancelled request ``key`` (or its deadline passed): withdraw the job."""
        entry = self._sessions.get(owner)
        if entry is not None:
            entry[0].cancel(key)

    # -- requests ------------------------------------------------------------------

    def refuse(self, owner: Hashable, model: str, error: TwinferError) -> None:
        """Count a request refused while decoding it (it never reached the data plane)."""
        session = self.acquire(owner)
        self.plane.refuse(session, model, error)
        self.release(owner)

    def infer(
        self,
        owner: Hashable,
        key: Hashable,
        model: str,
        version: str,
        request: kserve.InferRequest,
        remaining: float | None,
    ) -> Deferred[InferResult]:
        """Submit ``request`` for ``model`` on ``owner``'s session.

        ``remaining`` is the gRPC deadline's time left in seconds (None: no
        deadline): the job is withdrawn if still queued then.  Fires with
        the :class:`InferResult` or fails with :class:`TwinferError`.
        """
        session = self.acquire(owner)
        try:
            self.check_model(model, version)
            priority = self._level(model, request.priority)
            timeout_ms = _timeout_ms(request.timeout_us, remaining)
        except TwinferError as e:  # refused before it became a job: count it too
            self.plane.refuse(session, model, e)
            self.release(owner)
            return fail(e)
        # Tensors may be in shared memory (parameters.shared_memory_region).
        d = sharedmem_requests.infer_maybe_shared(
            self.plane,
            session,
            key,
            model,
            self.regions,
            request.inputs,
            request.output_names,
            request.output_regions,
            timeout_ms=timeout_ms,
            priority=priority,
        )
        return d.addBoth(self._released, owner)

    def _released(self, result: Any, owner: Hashable) -> Any:
        self.release(owner)
        return result

    # -- metadata --------------------------------------------------------------------

    def check_model(self, name: str, version: str) -> None:
        """Raise ``UNKNOWN_MODEL`` unless ``name`` is served at ``version`` ("" is any)."""
        self.dispatcher.entry(name)
        if version and version != kserve.MODEL_VERSION:
            raise TwinferError(
                ErrorCode.UNKNOWN_MODEL,
                f"model {name!r} has no version {version!r} (versions: [{kserve.MODEL_VERSION!r}])",
            )

    def server_ready(self) -> bool:
        """Every model has a healthy device (and the server is not draining)."""
        infos = self.dispatcher.model_infos()
        return not self.plane.draining and all(info.ready for info in infos)

    def model_ready(self, name: str, version: str) -> bool:
        """``name`` can serve now (``UNKNOWN_MODEL`` if it is not served)."""
        self.check_model(name, version)
        return bool(self.dispatcher.model_ready(name))

    def metadata(self, name: str, version: str) -> Any:
        """The model's :class:`~twinfer.wire.messages.Metadata`."""
        self.check_model(name, version)
        return self.dispatcher.metadata(name)

    # -- Triton's extensions ------------------------------------------------------------

    def repository_index(self, ready_only: bool) -> list[RepositoryModel]:
        """Every model the server knows and its state (only the ready ones)."""
        return self.repository.index(ready_only=ready_only)

    def load(self, name: str) -> Deferred[str]:
        """Load or reload ``name`` (``--allow-admin``); see :meth:`ModelRepository.load`."""
        return self.repository.load(name)

    def unload(self, name: str) -> Deferred[str]:
        """Stop serving ``name`` (``--allow-admin``); see :meth:`ModelRepository.unload`."""
        return self.repository.unload(name)

    def statistics(self, name: str, version: str) -> list[ModelStatistics]:
        """Statistics of ``name`` ("": every served model)."""
        if name:
            self.check_model(name, version)
        return self.repository.statistics(name)

    def config(self, name: str, version: str) -> TritonModelConfig:
        """The configuration ``name`` is served with."""
        self.check_model(name, version)
        return self.repository.config(name)

    def register_region(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Register a server-wide shared-memory region (``--allow-shm``)."""
        self._shm(lambda table: table.register(name, key, offset, byte_size))

    def unregister_region(self, name: str) -> None:
        """Unregister region ``name`` ("": every region)."""
        self._shm(lambda table: table.unregister(name) if name else table.unregister_all())

    def region_status(self, name: str) -> list[RegionInfo]:
        """The regions registered ("") or the one named."""
        return self._shm(lambda table: table.status(name))  # type: ignore[no-any-return]

    def _shm(self, call: Callable[[RegionTable], Any]) -> Any:
        """``call`` on the server-wide regions; a refusal (``--allow-shm``
        off included) is counted as the front end's protocol error, as over HTTP."""
        try:
            return call(regions_of(self.regions))
        except TwinferError as e:
            self.plane.protocol_error(FRONTEND, e.code)
            raise

    def _level(self, name: str, priority: int) -> int:
        """twinfer's level for Triton's ``priority``: :func:`kserve.priority_level`."""
        if not priority:
            return 0
        return kserve.priority_level(
            name, priority, self.dispatcher.entry(name).choose_queue().levels
        )


def _timeout_ms(timeout_us: int | None, remaining: float | None) -> int:
    """The job's deadline in ms (0: none) from Triton's ``timeout`` and the gRPC deadline."""
    candidates = []
    if timeout_us:
        candidates.append(math.ceil(timeout_us / 1000))
    if remaining is not None:
        if remaining <= 0:
            raise TwinferError(
                ErrorCode.DEADLINE_EXCEEDED, "the call's deadline passed before it was queued"
            )
        candidates.append(max(1, math.ceil(remaining * 1000)))
    return min(candidates) if candidates else 0
