"""Adaptive execution: which compiled engine a device runs, decided per job.

A model served with ``execution = "adaptive"`` has two engines on a CPU
device (see :mod:`twinfer.engines.tuning`): a *latency* engine (compiled with
``PERFORMANCE_HINT = LATENCY``: every core on one request) and a *throughput*
engine (``THROUGHPUT``: several streams, one per device replica).  One
:class:`ExecutionPolicy` per device, shared by the device's replicas
(:class:`~twinfer.scheduling.worker.Worker`), puts the device in one of two
modes:

- :attr:`Mode.LATENCY`: one replica (the *leader*: the first available one)
  runs jobs on its latency engines; the others take nothing;
- :attr:`Mode.THROUGHPUT`: every replica runs jobs on its throughput engines.

**Never both at once.**  A switch is first *requested* (:attr:`target`); from
then on no replica starts anything, and the mode changes only when every job
(and health probe) started under the old mode has finished.  So the two
engines never compute together and the cores are never oversubscribed.

**Hysteresis** (switching per job is slower than either engine alone: see
``docs/architecture.md``).  The *load* is what the device holds (started,
pipelined, being batched) plus what waits in the queues its replicas serve.
In LATENCY mode the device enters THROUGHPUT when ``enter_waiting`` jobs
wait behind the running one (a burst switches once, when it is seen).  In
THROUGHPUT mode it returns to LATENCY only once the load has stayed at one
job or none for ``hold`` seconds, judged at each job event (arrival at an
idle replica, start, finish): between a burst's last job and the next
request there is no event, and none is needed.

A device whose replicas have no latency engine (``throughput`` or
``latency`` execution, or a measurement that found one engine better on
both counts) stays in THROUGHPUT mode: every replica takes jobs, as
without a policy.  The policy never changes how many threads enter a
device, only which compiled engine they run: a device that is not
thread-safe keeps ``replicas = 1``, and its single replica is the leader.

Everything runs on the reactor thread; the clock is injected, so the policy
runs under ``twisted.internet.task.Clock`` in the tests.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

if TYPE_CHECKING:
    from twinfer.scheduling.worker import Worker

__all__ = ["DEFAULT_HOLD", "ExecutionPolicy", "Mode"]

log = Logger()

#: Seconds of light load (one job or none) before THROUGHPUT returns to LATENCY.
DEFAULT_HOLD = 0.5


class Mode(enum.Enum):
    """Which engines a device runs."""

    #: One replica, on the latency engines.
    LATENCY = "latency"
    #: Every replica, on the throughput engines (their streams).
    THROUGHPUT = "throughput"


class ExecutionPolicy:
    """The execution mode of one device, shared by its replicas.

    ``enter_waiting``: jobs waiting behind the running one that switch
    LATENCY to THROUGHPUT (at least 1); ``hold``: seconds of light load
    before THROUGHPUT returns to LATENCY; ``clock`` times the hold.
    """

    def __init__(
        self,
        device: str,
        clock: IReactorTime,
        *,
        enter_waiting: int = 2,
        hold: float = DEFAULT_HOLD,
    ) -> None:
        self.device = device
        self.enter_waiting = max(1, enter_waiting)
        self.hold = hold
        self._clock = clock
        self.workers: list[Worker] = []
        #: The engines the device runs now.
        self.mode = Mode.LATENCY
        #: The mode it switches to once what runs under :attr:`mode` finishes.
        self.target = Mode.LATENCY
        #: Jobs, batches and probes handed to the replicas' threads, not finished.
        self.running = 0
        #: Completed switches, for the operations tools and the tests.
        self.switches = 0
        self._calm_since: float | None = None
        self._notifying = False

    def __repr__(self) -> str:
        switching = f"->{self.target.value}" if self.switching else ""
        return (
            f"<ExecutionPolicy {self.device} {self.mode.value}{switching} running={self.running}>"
        )

    # -- membership --------------------------------------------------------------

    def join(self, worker: Worker) -> None:
        """Count ``worker`` among the device's replicas (the worker calls it)."""
        if worker not in self.workers:
            self.workers.append(worker)
        if not (self.running or self.switches):
            # Before any work: start in the mode the engines call for, no switch.
            self.mode = self.target = Mode.LATENCY if self.adaptive else Mode.THROUGHPUT

    def leave(self, worker: Worker) -> None:
        """Forget a stopped replica, and let the others take its place."""
        if worker in self.workers:
            self.workers.remove(worker)
            self.reconsider()

    def reconsider(self) -> None:
        """A replica changed state (failed, drained, back, stopped): review the
        mode and let every replica take jobs if it now may (the leader may
        have changed)."""
        self.review()
        self._notify()

    # -- state ---------------------------------------------------------------------

    @property
    def adaptive(self) -> bool:
        """Whether the device has latency engines to switch to."""
        return any(worker.latency_engines for worker in self.workers)

    @property
    def switching(self) -> bool:
        """Whether a switch waits for the old mode's work to finish."""
        return self.target is not self.mode

    def leader(self) -> Worker | None:
        """The replica that runs jobs in LATENCY mode: the first available one."""
        return next((w for w in self.workers if w.available), None)

    def load(self) -> int:
        """Jobs the device holds (started, pipelined, being batched) plus those
        waiting in the queues its replicas serve."""
        queues = {id(q): q for worker in self.workers for q in worker.queues}
        held = sum(len(worker.batcher.held()) for worker in self.workers)
        return self.running + held + sum(q.depth for q in queues.values())

    def may_take(self, worker: Worker) -> bool:
        """Whether ``worker`` may start a job now (never during a switch)."""
        if self.switching:
            return False
        return self.mode is Mode.THROUGHPUT or worker is self.leader()

    # -- events, from the workers ----------------------------------------------

    def started(self) -> None:
        """A replica handed a job, a batch or a probe to its thread."""
        self.running += 1

    def finished(self) -> None:
        """What :meth:`started` counted has finished (or failed)."""
        self.running -= 1
        self.review()

    def review(self, arriving: int = 0) -> None:
        """Decide the mode from the load now (plus ``arriving`` jobs in a
        replica's hand); complete a pending switch when nothing runs."""
        if self._notifying:
            return
        if self.switching:
            self._complete_if_idle()
            return
        load = self.load() + arriving
        wanted = self.mode
        if not self.adaptive:
            wanted = Mode.THROUGHPUT
        elif self.mode is Mode.LATENCY:
            if load - 1 >= self.enter_waiting:
                wanted = Mode.THROUGHPUT
        elif load <= 1:
            now = self._clock.seconds()
            if self._calm_since is None:
                self._calm_since = now
            if now - self._calm_since >= self.hold:
                wanted = Mode.LATENCY
        else:
            self._calm_since = None
        if wanted is not self.mode:
            self.target = wanted
            self._calm_since = None
            self._complete_if_idle()

    def _complete_if_idle(self) -> None:
        collecting = any(worker.batcher.collecting for worker in self.workers)
        if self.running or collecting:
            return
        log.debug(
            "device {device}: {old} -> {new} execution",
            device=self.device,
            old=self.mode.value,
            new=self.target.value,
        )
        self.mode = self.target
        self.switches += 1
        self._notify()

    def _notify(self) -> None:
        """Let every replica reconsider taking jobs under the current mode."""
        self._notifying = True
        try:
            # One job each first, so that a short queue is spread over the
            # streams rather than pipelined behind the first replica.
            for depth in (1, None):
                for worker in list(self.workers):
                    worker.policy_changed(depth)
        finally:
            self._notifying = False
