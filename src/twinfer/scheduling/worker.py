"""One device replica: its thread, its pipeline, its health.

(One module because :class:`Worker` is one state machine: taking jobs,
running them and probing the device all read and change the same state and
pipeline count, and batching and execution policy already live apart.)

A :class:`Worker` takes a job (or, through its :class:`~twinfer.scheduling.batcher.Batcher`,
a batch of jobs) from the queues it serves, runs it in its own thread and
fires the jobs' Deferreds back on the reactor thread.  Its thread is a
one-thread ``ThreadPool``, so a device replica is never entered by two
threads whatever the load; a device that is not thread-safe gets
``replicas = 1``.

At most :data:`PIPELINE_DEPTH` jobs or batches are handed to the thread at
once: one on the device and one waiting right behind it.  Only an idle
worker waits on its queues, so a new job goes to an idle device before a
busy one; a worker that serves several queues visits them round-robin.

Execution: the replicas of a device may share an ExecutionPolicy that says,
per job, which may take one and on which engine (latency or throughput): see
:mod:`twinfer.scheduling.execution`.

Health: a worker whose device raises :class:`DeviceError` or fails
``max_failures`` times in a row turns ``FAILED``; every ``probe_interval``
seconds an idle worker probes its device and comes back ``READY`` when it
answers.  An operator may drain a worker (``DRAINED``: it finishes what it
holds and takes nothing new) and undrain it.

The clock (timers: batch collection, probes) and the thread runner are
parameters, so the whole of this logic runs under
``twisted.internet.task.Clock`` with a hand-fired runner in the unit tests;
:meth:`Worker.on_own_thread` builds the real one.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from twinfer.engines.openvino import Engine
from twinfer.errors import ErrorCode, TwinferError
from twinfer.scheduling.batcher import SKIPPED, Batcher, BatchPolicy, execute
from twinfer.scheduling.execution import ExecutionPolicy, Mode
from twinfer.scheduling.queueing import InferResult, Job, JobQueue
from twinfer.threadnames import name_os_thread

__all__ = ["PIPELINE_DEPTH", "DeviceError", "ThreadRunner", "Worker", "WorkerState"]

log = Logger()

#: Jobs (or batches) a worker hands to its thread at once: one on the device
#: and one waiting right behind it, so the device does not sit idle while the
#: reactor thread turns a finished job into the next one.
PIPELINE_DEPTH = 2

#: Runs ``f(*args)`` in the worker's own thread: ``runner(f, *args)`` returns a
#: Deferred that fires on the reactor thread with what ``f`` returned (or
#: fails with what it raised), like ``deferToThreadPool(reactor, pool, f, *args)``.
ThreadRunner = Callable[..., Deferred[Any]]


class DeviceError(Exception):
    """Raised by an engine when the device itself failed (not the request):
    the worker is taken out of rotation at once."""


class WorkerState(enum.Enum):
    """Whether a worker takes jobs."""

    READY = "ready"
    #: Its device failed; it probes until the device answers again.
    FAILED = "failed"
    #: Taken out of rotation by an operator (finishes its current job).
    DRAINED = "drained"


def _execute_work(engine: Engine, job: Job) -> list[Any]:
    """Run a job's custom work (e.g. an image task) in the worker's thread."""
    if job.deferred.called or job.work is None:  # cancelled while waiting its turn
        return [SKIPPED]
    return [job.work(engine)]


def fail_on_device(job: Job, worker: Worker, message: str) -> None:
    """Answer a job that failed on ``worker``'s device with ``INFERENCE_FAILED``."""
    job.fail(
        ErrorCode.INFERENCE_FAILED,
        f"model {job.model!r} failed on device {worker.device!r}: {message}",
    )


def _ignore_cancel(failure: Failure) -> None:
    failure.trap(CancelledError)


class Worker:
    """One device replica: one thread; one job or batch on the device at a time,
    and the next one waiting behind it in the thread's queue.

    ``clock`` schedules the batch collection and the health probes;
    ``runner`` runs work in the replica's thread (see :data:`ThreadRunner`);
    ``thread``, when given, is the one-thread pool behind ``runner``, started
    and stopped with the worker.  ``policy`` is the device's execution policy
    (shared by its replicas; ``None``: always the throughput engines) and
    ``latency_engines`` the latency engine per model, where it has one.
    """

    def __init__(
        self,
        name: str,
        device: str,
        engines: Mapping[str, Engine],
        queues: Sequence[JobQueue],
        *,
        clock: IReactorTime,
        runner: ThreadRunner,
        thread: ThreadPool | None = None,
        batching: Mapping[str, BatchPolicy] | None = None,
        max_failures: int = 3,
        probe_interval: float = 0.0,
        policy: ExecutionPolicy | None = None,
        latency_engines: Mapping[str, Engine | None] | None = None,
    ) -> None:
        self.name = name
        self.device = device
        self._clock = clock
        self._run_in_thread = runner
        self._thread = thread
        #: The engine per model this replica runs (the next job uses the current set).
        self.engines = dict(engines)
        #: The latency engine per model, run when the policy is in LATENCY mode.
        self.latency_engines = {m: e for m, e in (latency_engines or {}).items() if e is not None}
        self.policy = policy
        #: The queues this worker takes from, visited round-robin.
        self.queues = list(queues)
        self.batcher = Batcher(clock, batching, self._collected)
        self.max_failures = max_failures
        self.probe_interval = probe_interval
        self._next_queue = 0
        self._waits: list[Deferred[Job]] = []
        self._running = False
        self._launched = 0  # jobs or batches handed to the thread, not yet answered
        self._probing = False
        self._probe_timer: IDelayedCall | None = None
        self._on_device: list[Job] = []
        self.state = WorkerState.READY
        self.failure_reason = ""
        self.jobs_done = 0
        self.jobs_failed = 0
        #: Inferences run (a batch of several jobs counts once).
        self.batches_run = 0
        self.busy_seconds = 0.0
        self.consecutive_failures = 0
        #: Set by the dispatcher: called with (job, worker, message) when a job
        #: fails on this device, and with (worker) when the worker's state changes.
        self.on_job_failed: Callable[[Job, Worker, str], None] = fail_on_device
        self.on_state_changed: Callable[[Worker], None] = lambda worker: None
        if policy is not None:
            policy.join(self)

    @classmethod
    def on_own_thread(
        cls,
        name: str,
        device: str,
        reactor: IReactorFromThreads,
        engines: Mapping[str, Engine],
        queues: Sequence[JobQueue],
        **options: Any,
    ) -> Worker:
        """A worker with its own one-thread pool, timed by ``reactor`` (the real one)."""
        thread_name = f"twinfer-{name}"
        pool = ThreadPool(minthreads=1, maxthreads=1, name=thread_name)
        # Visible to ps/top/py-spy and to benchmarks/procstat.py (device threads' CPU).
        pool.callInThread(name_os_thread, thread_name)
        runner = functools.partial(deferToThreadPool, reactor, pool)
        clock: Any = reactor  # the reactor provides IReactorTime too
        return cls(
            name, device, engines, queues, clock=clock, runner=runner, thread=pool, **options
        )

    def __repr__(self) -> str:
        return f"<Worker {self.name} {self.state.value} queues={[q.name for q in self.queues]}>"

    # -- state, for the dispatcher and the operations tools ---------------------

    @property
    def available(self) -> bool:
        """Whether this worker takes jobs (ready, and running)."""
        return self._running and self.state is WorkerState.READY

    @property
    def alive(self) -> bool:
        """Whether the worker runs (started and not stopped)."""
        return self._running

    @property
    def paused(self) -> bool:
        """Whether an operator drained this worker."""
        return self.state is WorkerState.DRAINED

    @property
    def busy(self) -> bool:
        """Whether the worker holds jobs (on its device, or collecting a batch)."""
        return bool(self._on_device or self.batcher.collecting)

    def jobs(self) -> list[Job]:
        """The jobs this worker holds, oldest first: those handed to its thread
        (running or next) and a batch being collected."""
        return [*self._on_device, *self.batcher.held()]

    # -- operations -------------------------------------------------------------

    def pause(self) -> None:
        """Drain: finish the current job, take no new ones (the queued jobs it
        alone served move to the model's other devices)."""
        self.set_state(WorkerState.DRAINED, "drained by an operator")

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        if self.state is WorkerState.DRAINED:
            self.set_state(WorkerState.READY)

    def reconfigure(
        self,
        engines: Mapping[str, Engine | None],
        add: Sequence[JobQueue] = (),
        remove: Sequence[JobQueue] = (),
        batching: Mapping[str, BatchPolicy | None] | None = None,
        latency_engines: Mapping[str, Engine | None] | None = None,
    ) -> None:
        """Swap engines (``None`` drops one), latency engines, queues and
        batching between two jobs.

        A job already on the device keeps the engine it started with; the
        next job taken uses the new set.  The dispatcher must be re-indexed
        afterwards (:meth:`Dispatcher.reindex`).
        """
        for model, engine in engines.items():
            if engine is None:
                self.engines.pop(model, None)
                self.batcher.set_policy(model, None)
            else:
                self.engines[model] = engine
        for model, engine in (latency_engines or {}).items():
            if engine is None:
                self.latency_engines.pop(model, None)
            else:
                self.latency_engines[model] = engine
        for model, policy in (batching or {}).items():
            self.batcher.set_policy(model, policy)
        self.queues = [q for q in self.queues if q not in remove]
        self.queues += [q for q in add if q not in self.queues]
        self._next_queue = 0
        if self._waits:
            self._stop_waiting()
            self._take_next()

    def start(self) -> None:
        """Start the thread and begin taking jobs."""
        if self._thread is not None:
            self._thread.start()
        self._running = True
        self._schedule_probe()
        self._take_next()

    def stop(self) -> None:
        """Stop taking jobs and join the thread (after the current job, if any).

        A batch still being collected is answered ``UNAVAILABLE``.
        """
        was_running, self._running = self._running, False
        self._stop_waiting()
        if self._probe_timer is not None and self._probe_timer.active():
            self._probe_timer.cancel()
        self._probe_timer = None
        for job in self.batcher.cancel():
            job.fail(ErrorCode.UNAVAILABLE, "the server is shutting down")
        if self.policy is not None and was_running:
            self.policy.leave(self)
        if self._thread is not None and was_running:
            self._thread.stop()

    def set_state(self, state: WorkerState, reason: str = "") -> None:
        """Move the worker in or out of rotation."""
        if state is self.state:
            return
        log.info(
            "worker {worker} on device {device}: {old} -> {new}{why}",
            worker=self.name,
            device=self.device,
            old=self.state.value,
            new=state.value,
            why=f" ({reason})" if reason else "",
        )
        self.state = state
        self.failure_reason = reason if state is WorkerState.FAILED else ""
        if state is WorkerState.READY:
            self.consecutive_failures = 0
            self._take_next()
        else:
            self._stop_waiting()
        if self.policy is not None:
            self.policy.reconsider()  # the leader may have changed
        self.on_state_changed(self)

    # -- taking jobs ----------------------------------------------------------

    def _stop_waiting(self) -> None:
        waits, self._waits = self._waits, []
        for wait in waits:
            # Withdrawn rather than cancelled where possible: this runs each
            # time an idle worker is woken, once per other queue it serves.
            if not any(queue.withdraw(wait) for queue in self.queues):
                wait.cancel()

    def _poll(self) -> Job | None:
        """Take a waiting job, visiting the queues round-robin for fairness."""
        count = len(self.queues)
        for i in range(count):
            queue = self.queues[(self._next_queue + i) % count]
            job = queue.take()
            if job is not None:
                self._next_queue = (self._next_queue + i + 1) % count
                return job
        return None

    def policy_changed(self, depth: int | None = None) -> None:
        """The device's execution mode (or leader) changed: stop waiting on the
        queues if this worker may no longer take jobs, else take up to ``depth``
        (default: :data:`PIPELINE_DEPTH`)."""
        self._stop_waiting()
        self._take_next(depth or PIPELINE_DEPTH)

    def _allowed(self) -> bool:
        """Whether the execution policy lets this worker start a job now."""
        return self.policy is None or self.policy.may_take(self)

    def _engine_for(self, model: str) -> Engine:
        """The engine the current execution mode runs ``model`` on."""
        if self.policy is not None and self.policy.mode is Mode.LATENCY:
            return self.latency_engines.get(model) or self.engines[model]
        return self.engines[model]

    def _take_next(self, depth: int = PIPELINE_DEPTH) -> None:
        if self.policy is not None:
            self.policy.review()
        # A loop, not recursion: a run of cancelled jobs must not grow the stack.
        while (
            self.available
            and self._launched < depth
            and not (self.batcher.collecting or self._probing or self._waits)
            and self._allowed()
        ):
            job = self._poll()
            if job is None:
                if not self._launched:
                    # Only an idle worker waits on the queues, so that a new
                    # job goes to an idle device before a busy one.
                    self._waits = [wait for queue in self.queues for wait in queue.wait()]
                    for wait in self._waits:
                        wait.addCallbacks(self._woken, _ignore_cancel)
                return
            self._start(job)

    def _woken(self, job: Job) -> None:
        self._waits = [w for w in self._waits if not w.called]
        self._stop_waiting()
        if self.policy is not None:
            self.policy.review(arriving=1)
            self._stop_waiting()  # a switch made in the review may have set new waits
            if not self._allowed() and job.queue is not None:
                job.queue.put_front(job)  # the mode changed: a job for another replica
                self._take_next()
                return
        self._start(job)
        self._take_next()

    def _start(self, job: Job) -> None:
        """Start ``job``, as part of a batch if its model batches."""
        if job.deferred.called:  # cancelled or expired while queued
            return
        batch = self.batcher.collect(job, device_busy=bool(self._launched))
        if batch is not None:
            self._launch(batch)

    def _collected(self, batch: list[Job]) -> None:
        """The batcher's delay ran out: launch the batch, or give it back."""
        if not self.available:  # failed or drained meanwhile: give them back
            for job in reversed(batch):
                if not job.deferred.called and job.queue is not None:
                    job.queue.put_front(job)
            return
        self._launch(batch)
        self._take_next()

    def _launch(self, batch: list[Job]) -> None:
        """Send a job or a batch to the device thread."""
        batch = [job for job in batch if not job.deferred.called]
        if not batch:
            return
        for job in batch:
            job.stop_timer()
            job.running = True
        self._launched += 1
        self._on_device = self._on_device + batch
        self.batches_run += 1
        first = batch[0]
        engine = self._engine_for(first.model)
        if self.policy is not None:
            self.policy.started()
        if first.work is not None:
            d = self._run_in_thread(_execute_work, engine, first)
        else:
            d = self._run_in_thread(execute, engine, batch, self.device)
        d.addCallbacks(self._succeeded, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _succeeded(self, results: list[Any], batch: list[Job]) -> None:
        ran = [result for result in results if result is not SKIPPED]
        self.jobs_done += len(ran)
        if ran:
            self.consecutive_failures = 0
            if isinstance(ran[0], InferResult):
                self.busy_seconds += ran[0].compute_us / 1e6
        self._finish(batch)
        for job, result in zip(batch, results):
            job.inputs = {}
            if result is not SKIPPED and not job.deferred.called:
                job.deferred.callback(result)

    def _failed(self, failure: Failure, batch: list[Job]) -> None:
        if batch[0].work is not None and failure.check(TwinferError):
            # Custom work refused its request (e.g. an undecodable image):
            # the request's fault, not the device's.
            self._finish(batch)
            for job in batch:
                job.stop_timer()
                if not job.deferred.called:
                    job.deferred.errback(failure)
            return
        self.jobs_failed += len(batch)
        self.consecutive_failures += 1
        message = failure.getErrorMessage() or failure.type.__name__
        log.failure(
            "model {model} failed on {worker}", failure, model=batch[0].model, worker=self.name
        )
        # Out of rotation before taking the next job: a failed device takes none.
        if failure.check(DeviceError) or self.consecutive_failures >= self.max_failures:
            self.set_state(WorkerState.FAILED, message)
        self._finish(batch)
        for job in batch:
            job.running = False
            if not job.deferred.called:
                self.on_job_failed(job, self, message)

    def _finish(self, batch: list[Job]) -> None:
        self._launched -= 1
        self._on_device = [job for job in self._on_device if job not in batch]
        if self.policy is not None:
            self.policy.finished()
        # Take the next job before the replies are encoded and written, so the
        # device is busy again as soon as possible.
        self._take_next()

    # -- health -----------------------------------------------------------------

    def _schedule_probe(self) -> None:
        if self.probe_interval > 0 and self._running:
            self._probe_timer = self._clock.callLater(self.probe_interval, self._probe)

    def _probe(self) -> None:
        """Check the device while idle: a failed one comes back when it answers."""
        self._probe_timer = None
        busy = self._launched or self.batcher.collecting or self._probing
        # Under an execution policy a replica probes only when it could run a
        # job (a failed one always): a probe must not run beside the other engine.
        allowed = self.state is WorkerState.FAILED or self._allowed()
        if not self._running or busy or self.state is WorkerState.DRAINED or not allowed:
            self._schedule_probe()
            return
        model = next(iter(self.engines), None)
        probe = getattr(self._engine_for(model), "probe", None) if model is not None else None
        if probe is None:
            return
        self._stop_waiting()
        self._probing = True
        if self.policy is not None:
            self.policy.started()
        d = self._run_in_thread(probe)
        d.addCallbacks(self._probe_passed, self._probe_failed)

    def _probe_done(self) -> None:
        self._probing = False
        if self.policy is not None:
            self.policy.finished()

    def _probe_passed(self, _: object) -> None:
        self._probe_done()
        if self.state is WorkerState.FAILED:
            self.set_state(WorkerState.READY)
        self._take_next()
        self._schedule_probe()

    def _probe_failed(self, failure: Failure) -> None:
        self._probe_done()
        self.set_state(WorkerState.FAILED, f"health probe: {failure.getErrorMessage()}")
        self._schedule_probe()
