"""Starting and (gracefully) stopping the model server; SIGHUP reloads.

``twistd`` stops an application by calling ``stopService`` on its services
during the reactor's "before shutdown" phase and waits for the Deferreds they
return.  :class:`ServingService` uses that to drain:

1. every front end is marked closing (new inference requests get
   ``UNAVAILABLE``) and readiness turns false; every binary client gets
   ``GOAWAY`` (the last request its connection will answer); the listening
   ports are stopped by their own services at the same time;
2. jobs already queued or running are given up to ``drain_timeout`` seconds
   to finish and be answered;
3. whatever is left is answered with ``UNAVAILABLE`` and the workers stop;
4. after ``linger`` seconds more (new requests still get ``UNAVAILABLE``),
   every front-end connection (binary protocol and HTTP, idle keep-alive ones
   included) is closed once its replies are flushed; the drain waits on a
   Deferred fired from each one's ``connectionLost`` (a client that does not
   read is cut off after ``close_timeout``).

Time is the ``clock`` given to :class:`ServingService` (``callLater`` and
Deferred timeouts only, no polling), so tests drive it with a ``Clock``.

Every request a client sent before it saw the connection close is answered,
and the process exits with status 0.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import Logger

from twinfer.compat import exit_normally
from twinfer.dataplane import DataPlane
from twinfer.errors import ErrorCode, TwinferError
from twinfer.ops.control import Controller, job_settled
from twinfer.scheduling import Job

log = Logger()


def _settle_within(d: Deferred[Any], seconds: float, clock: Any) -> Deferred[bool]:
    """Fires with True when ``d`` fires, or False after ``seconds`` (``d`` is left alone)."""
    result: Deferred[bool] = Deferred()

    def fire(value: bool) -> None:
        if call.active():
            call.cancel()
        if not result.called:
            result.callback(value)

    call = clock.callLater(seconds, fire, False)
    d.addBoth(lambda _: fire(True))
    return result


class ServingService(service.Service):
    """Runs the dispatcher's workers; stops them gracefully (see the module docstring)."""

    def __init__(
        self,
        controller: Controller,
        # IReactorTime (typed Any: mypy cannot check zope interfaces here)
        clock: Any,
        drain_timeout: float = 30.0,
        close_timeout: float = 5.0,
        handle_sighup: bool = False,
        linger: float = 0.5,
    ) -> None:
        self.controller = controller
        self.clock = clock
        self.drain_timeout = drain_timeout
        self.close_timeout = close_timeout
        self.handle_sighup = handle_sighup
        #: Seconds between the end of the drain and closing the connections,
        #: so that clients see UNAVAILABLE for what they send meanwhile
        #: rather than a closed connection.
        self.linger = linger
        self._previous_sighup: Any = None

    def startService(self) -> None:
        super().startService()
        self.controller.dispatcher.start()
        if self.handle_sighup and hasattr(signal, "SIGHUP"):
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)

    def _sighup(self, signum: int, frame: Any) -> None:
        # Signal handlers run between bytecodes of the reactor thread: hand
        # the work to the reactor rather than doing it here.
        self.clock.callLater(0, self._reload)

    def _reload(self) -> None:
        log.info("SIGHUP: re-reading the configuration")
        self.controller.reload_config().addErrback(lambda f: log.failure("SIGHUP reload failed", f))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        return Deferred.fromCoroutine(self.shutdown())

    def pending_jobs(self) -> list[Job]:
        """Every job queued or running now."""
        return self.controller.dispatcher.pending_jobs()

    async def shutdown(self) -> None:
        """Drain and stop; fires when every connection is closed."""
        controller = self.controller
        dispatcher = controller.dispatcher
        # Every front end: UNAVAILABLE for new requests; binary clients get GOAWAY.
        controller.begin_drain()
        dispatcher.stop_accepting()  # anything else that submits: UNAVAILABLE too
        jobs = self.pending_jobs()
        log.info(
            "twinfer shutting down: draining {count} queued and running jobs (up to {timeout}s)",
            count=len(jobs),
            timeout=self.drain_timeout,
        )
        drained = await _settle_within(
            gatherResults([job_settled(job) for job in jobs]), self.drain_timeout, self.clock
        )
        left = self.pending_jobs()
        for job in left:
            if job.running:  # queued ones are answered by dispatcher.stop()
                job.deferred.errback(
                    TwinferError(
                        ErrorCode.UNAVAILABLE,
                        f"the server shut down before the job finished "
                        f"(drain timeout {self.drain_timeout}s)",
                    )
                )
        if not drained:
            log.warn("drain timeout: {count} jobs answered UNAVAILABLE", count=len(left))
        dispatcher.stop()
        if self.linger and controller.connections():
            await deferLater(self.clock, self.linger, lambda: None)
        await close_connections(controller.dataplane, self.clock, self.close_timeout)
        # twistd re-raises the signal that stopped the reactor once it has
        # shut down (so the exit status says "killed by SIGTERM").  A finished
        # graceful drain is a normal exit: the process exits 0.
        exit_normally(self.clock)
        stats = controller.stats
        outcomes = ", ".join(f"{code}={n}" for code, n in sorted(stats.totals.items()))
        log.info(
            "twinfer stopped: {answered} inference requests answered ({outcomes})",
            answered=stats.answered,
            outcomes=outcomes or "none",
        )


async def close_connections(dataplane: DataPlane, clock: Any, close_timeout: float) -> None:
    """Close every front end's open connection once its queued replies are sent.

    The connections are the data plane's sessions (binary and HTTP, idle
    keep-alive ones included); the wait is on each session's close, which
    its protocol's ``connectionLost`` does (never a poll).  Those still open
    after ``close_timeout`` seconds of ``clock`` (a client that does not read
    its replies) are aborted.  Returns once every one of them is closed.
    """
    sessions = [s for s in dataplane.sessions() if s.transport is not None]
    if not sessions:
        return
    # A Deferred of its own, so that timing it out leaves the waits alone.
    closed: Deferred[Any] = Deferred()
    gatherResults([s.when_closed() for s in sessions]).chainDeferred(closed)
    for session in sessions:
        session.transport.loseConnection()  # after the queued replies are sent
    closed.addTimeout(close_timeout, clock)
    try:
        await closed
    except defer.TimeoutError:
        left = [s for s in sessions if not s.closed]
        aborted = gatherResults([s.when_closed() for s in left])
        for session in left:
            log.warn("aborting connection from {peer}", peer=session.transport.getPeer())
            session.transport.abortConnection()
        await aborted
