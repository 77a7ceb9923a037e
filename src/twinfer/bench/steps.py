"""A step load: closed-loop users whose number changes mid-run, without a pause.

:class:`SteppedLoop` runs phases back to back on the same connections (e.g.
1 user for 20 s, then 16, then 1 again): when a phase adds users they start
at once, when it removes users the extra ones stop after their current
reply, so the server sees the load change the way a real one does, with no
drain and no reconnect between phases.  Each request is attributed to the
phase in which it completed.  Per phase the report keeps every error, and
takes the throughput and the latency percentiles only from the *settled*
part of the phase (after its first ``settle`` seconds), where the server has
had time to react to the step.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from twinfer.bench.load import BenchError, close_all, prepare, shares_for
from twinfer.bench.load import _describe as describe_failure
from twinfer.bench.loop import error_name
from twinfer.bench.report import Progress, Samples, summarize
from twinfer.client_protocol import ClientProtocol
from twinfer.failover import ClientPool
from twinfer.wire.messages import InferReply, InferRequest


@attrs.frozen
class Phase:
    """``users`` requests kept in flight for ``seconds``."""

    users: int
    seconds: float


def parse_phases(users: Sequence[int], seconds: float) -> list[Phase]:
    """Phases of ``users[i]`` users, each ``seconds`` long."""
    if not users or seconds <= 0 or any(u < 1 for u in users):
        raise ValueError("a step load needs at least one phase of 1+ users and a positive length")
    return [Phase(u, seconds) for u in users]


@attrs.frozen(eq=False)
class PhaseSamples:
    """What one phase measured."""

    phase: Phase
    #: The phase's start and end, ``monotonic_ns`` values.
    start_ns: int
    end_ns: int
    #: Requests that completed in the settled part of the phase
    #: (``[start_ns + settle, end_ns)``): throughput and latency come from these.
    settled: Samples
    #: Failed requests over the whole phase, settling included, by code name.
    errors: dict[str, int]
    #: Requests (answered or failed) that completed over the whole phase.
    completed: int


def summarize_phase(samples: PhaseSamples) -> dict[str, Any]:
    """One phase's report: :func:`~twinfer.bench.report.summarize` of the
    settled part, with ``concurrency`` the phase's users, and errors counted
    over the whole phase (``settled_errors`` keeps those of the settled part)."""
    settled = summarize(samples.settled)
    return {
        "concurrency": samples.phase.users,
        "phase_s": samples.phase.seconds,
        "phase_start_ns": samples.start_ns,
        "phase_end_ns": samples.end_ns,
        "settle_s": (samples.settled.start_ns - samples.start_ns) / 1e9,
        "completed": samples.completed,
        **settled,
        "settled_errors": settled["errors"],
        "errors": dict(sorted(samples.errors.items())),
        "error_count": sum(samples.errors.values()),
    }


class SteppedLoop:
    """Users over ``protocols`` in closed loop, their number set per :class:`Phase`.

    User ``i`` sends on connection ``i % len(protocols)``.  ``now_ns`` and
    ``cpu_seconds`` are the wall and CPU clocks (``time.monotonic_ns`` and
    ``time.process_time`` unless a test gives others); ``clock`` schedules
    the phase changes.
    """

    def __init__(
        self,
        clock: Any,
        protocols: Sequence[ClientProtocol | ClientPool],
        message: InferRequest,
        phases: Sequence[Phase],
        *,
        settle: float = 2.0,
        now_ns: Callable[[], int] = time.monotonic_ns,
        cpu_seconds: Callable[[], float] = time.process_time,
    ) -> None:
        if not phases:
            raise ValueError("a step load needs at least one phase")
        if any(settle >= p.seconds for p in phases):
            raise ValueError(f"every phase must be longer than the settling time ({settle:g} s)")
        self._clock = clock
        self._protocols = list(protocols)
        self._message = message
        self._phases = list(phases)
        self._settle_ns = int(settle * 1e9)
        self._now = now_ns
        self._cpu = cpu_seconds
        #: Users that should be running (the current phase's), and those that are.
        self._target = 0
        self._running = 0
        self._next_user = 0
        self._bounds: list[int] = []
        # One entry per completed request, in completion order.
        self._done_ns: list[int] = []
        self._latency: list[int] = []
        self._queue: list[int] = []
        self._compute: list[int] = []
        self._failed_ns: list[int] = []
        self._failed_code: list[str] = []
        #: CPU clock readings at each phase's settling point and end.
        self._cpu_marks: dict[int, float] = {}
        #: Completed requests so far, for progress displays.
        self.completed = 0
        #: The most users seen in flight at once (a check for tests and reports).
        self.peak_running = 0
        self.done: Deferred[list[PhaseSamples]] = Deferred()

    @property
    def users(self) -> int:
        """Users running now."""
        return self._running

    def start(self) -> Deferred[list[PhaseSamples]]:
        """Start the first phase now; :attr:`done` fires with one
        :class:`PhaseSamples` per phase once the last one ended and every
        request is answered."""
        begin = self._now()
        self._bounds = [begin]
        for phase in self._phases:
            self._bounds.append(self._bounds[-1] + int(phase.seconds * 1e9))
        for index in range(len(self._phases)):
            if index:
                delay = (self._bounds[index] - begin) / 1e9
                self._clock.callLater(delay, self._enter, index)
            settled = (self._bounds[index] + self._settle_ns - begin) / 1e9
            self._clock.callLater(settled, self._mark_cpu, 2 * index)
        end = (self._bounds[-1] - begin) / 1e9
        self._clock.callLater(end, self._finish)
        self._enter(0)
        return self.done

    def _mark_cpu(self, mark: int) -> None:
        self._cpu_marks[mark] = self._cpu()

    def _enter(self, index: int) -> None:
        if index > 0:
            self._mark_cpu(2 * index - 1)  # the previous phase's end
        self._target = self._phases[index].users
        # Counted up front: a send that fails synchronously on a lost
        # connection lowers _running again, and must not be replaced here.
        for _ in range(max(0, self._target - self._running)):
            self._running += 1
            protocol = self._protocols[self._next_user % len(self._protocols)]
            self._next_user += 1
            self._send(protocol)
        self.peak_running = max(self.peak_running, self._running)

    def _finish(self) -> None:
        self._mark_cpu(2 * len(self._phases) - 1)
        self._target = 0
        if self._running == 0:
            self._complete()

    def _send(self, protocol: ClientProtocol | ClientPool) -> None:
        sent = self._now()
        d = protocol.request(self._message)
        d.addCallbacks(
            self._replied, self._failed, callbackArgs=(protocol, sent), errbackArgs=(protocol, sent)
        )

    def _keeps_going(self) -> bool:
        """Called as a user's reply arrives: False if the user must stop now
        (the phase has fewer users than are running)."""
        if self._running > self._target:
            self._running -= 1
            if self._running == 0 and self._target == 0:
                self._complete()
            return False
        return True

    def _replied(self, reply: Any, protocol: ClientProtocol | ClientPool, sent: int) -> None:
        now = self._now()
        self.completed += 1
        if type(reply) is InferReply:
            self._done_ns.append(now)
            self._latency.append(now - sent)
            self._queue.append(reply.queue_us)
            self._compute.append(reply.compute_us)
        else:
            self._failed_ns.append(now)
            self._failed_code.append(f"CLIENT_UNEXPECTED_{type(reply).__name__}")
        if self._keeps_going():
            # Replies arrive from dataReceived, never synchronously: no recursion.
            self._send(protocol)

    def _failed(self, failure: Failure, protocol: ClientProtocol | ClientPool, sent: int) -> None:
        self.completed += 1
        self._failed_ns.append(self._now())
        self._failed_code.append(error_name(failure))
        if not protocol.usable:
            self._running -= 1  # the connection is gone: this user cannot go on
            if self._running == 0 and self._target == 0:
                self._complete()
        elif self._keeps_going():
            # A failure may fire synchronously: go through the reactor so a run
            # of them cannot grow the stack.
            self._clock.callLater(0, self._send, protocol)

    def _complete(self) -> None:
        if self.done.called:
            return
        self.done.callback(self.results())

    def results(self) -> list[PhaseSamples]:
        """Every phase's samples from what has completed so far."""
        done = np.array(self._done_ns, dtype=np.int64)
        latency = np.array(self._latency, dtype=np.int64)
        queue = np.array(self._queue, dtype=np.int64)
        compute = np.array(self._compute, dtype=np.int64)
        failed = np.array(self._failed_ns, dtype=np.int64)
        codes = np.array(self._failed_code, dtype=object)
        phases = []
        for index, phase in enumerate(self._phases):
            start, end = self._bounds[index], self._bounds[index + 1]
            settled_from = start + self._settle_ns
            whole = (done >= start) & (done < end)
            settled = (done >= settled_from) & (done < end)
            failed_whole = (failed >= start) & (failed < end)
            failed_settled = (failed >= settled_from) & (failed < end)
            cpu0 = self._cpu_marks.get(2 * index)
            cpu1 = self._cpu_marks.get(2 * index + 1)
            phases.append(
                PhaseSamples(
                    phase=phase,
                    start_ns=start,
                    end_ns=end,
                    settled=Samples(
                        latency_ns=latency[settled],
                        queue_us=queue[settled],
                        compute_us=compute[settled],
                        errors=dict(Counter(codes[failed_settled].tolist())),
                        start_ns=settled_from,
                        end_ns=end,
                        cpu_seconds=max(0.0, cpu1 - cpu0)
                        if cpu0 is not None and cpu1 is not None
                        else 0.0,
                    ),
                    errors=dict(Counter(codes[failed_whole].tolist())),
                    completed=int(whole.sum() + failed_whole.sum()),
                )
            )
        return phases


def run_steps_in_process(
    args: argparse.Namespace, progress: Progress, report: Callable[[dict[str, Any]], None]
) -> None:
    """The step load ``args.steps`` (users per phase, ``args.step_duration``
    seconds each, ``args.settle`` seconds of settling) in this process, over
    one set of connections; ``report`` gets each phase's summary at the end.
    Raises :class:`~twinfer.bench.load.BenchError` if it cannot be set up."""
    phases = parse_phases(args.steps, args.step_duration)
    failures: list[BaseException] = []

    async def main(reactor: Any) -> None:
        widest = max(p.users for p in phases)
        share = shares_for(widest, argparse.Namespace(**{**vars(args), "processes": 1}))[0]
        try:
            clients, message = await prepare(reactor, share)
        except Exception as e:
            failures.append(e)
            return
        if isinstance(message, list):  # one region per user: the users are fixed
            close_all(clients)
            failures.append(BenchError("--steps cannot be combined with --shared-memory"))
            return
        try:
            loop = SteppedLoop(
                reactor, [c.protocol for c in clients], message, phases, settle=args.settle
            )
            progress.reset()
            started = time.monotonic()
            total = sum(p.seconds for p in phases)
            ticker = task.LoopingCall(
                lambda: progress.update(
                    f"step load, {loop.users} users",
                    loop.completed,
                    time.monotonic() - started,
                    total,
                )
            )
            ticker.start(0.5, now=False)
            results = await loop.start()
            ticker.stop()
            progress.clear()
            for phase in results:
                report(summarize_phase(phase))
        finally:
            close_all(clients)

    try:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    except SystemExit as e:  # react() always exits; 0 means main() returned
        if e.code:
            raise BenchError("the step load failed (see the traceback above)") from None
    if failures:
        status, message = describe_failure(failures[0])
        raise BenchError(message, status) from failures[0]
