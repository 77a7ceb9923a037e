"""Jobs, bounded queues and device workers: the producer-consumer core.

The reactor thread validates a request and :meth:`Dispatcher.submit` turns it
into a :class:`Job` in a bounded ``DeferredQueue`` (:class:`JobQueue`).  Each
device replica is a :class:`Worker` that owns a one-thread ``ThreadPool``:
it takes one job at a time from the queues it serves, runs it there with
``deferToThreadPool`` and fires the job's Deferred back on the reactor
thread.  Because a worker holds at most one job and has one thread, a device
replica is never entered by two threads, whatever the load; a device that is
not thread-safe gets ``replicas = 1``.

A model's queue is shared by all the devices that serve it (idle workers
take from it in turn), or a model has one queue per device (``per-device``),
and a worker that serves several models takes from their queues round-robin.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
import attrs
import numpy as np
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredQueue,
    QueueOverflow,
)
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from twinfer.backend import Engine, Signature
from twinfer.errors import ErrorCode, TwinferError
from twinfer.messages import Metadata, ModelInfo

log = Logger()


@attrs.frozen(eq=False)
class InferResult:
    """What a job's Deferred fires with."""

    outputs: dict[str, np.ndarray]
    #: Microseconds between queueing and the device thread starting the job.
    queue_us: int
    #: Microseconds the device thread spent on the job.
    compute_us: int


@attrs.define(eq=False)
class Job:
    """One inference request on its way to a device."""

    model: str
    inputs: Mapping[str, np.ndarray]
    outputs: tuple[str, ...]
    #: ``time.monotonic()`` when it was queued.
    enqueued: float
    #: Fires with :class:`InferResult` or fails with :class:`TwinferError`;
    #: cancelling it takes a queued job out of its queue (it never runs) and
    #: drops a running job's result.
    deferred: Deferred[InferResult] = attrs.field(init=False)
    queue: JobQueue | None = None
    running: bool = False

    def __attrs_post_init__(self) -> None:
        self.deferred = Deferred(self._cancelled)

    def _cancelled(self, _: Deferred[InferResult]) -> None:
        if self.queue is not None and not self.running:
            self.queue.discard(self)
        self.inputs = {}  # release the request's memory now


class JobQueue:
    """A bounded FIFO ``DeferredQueue`` of jobs for one model (or one model on one device)."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._queue: DeferredQueue[Job] = DeferredQueue(size=size)

    def __repr__(self) -> str:
        return f"<JobQueue {self.name} {self.depth}/{self.size}>"

    @property
    def depth(self) -> int:
        """Jobs waiting."""
        return len(self._queue.pending)

    def put(self, job: Job) -> None:
        """Queue ``job``, or raise ``OVERLOADED`` at once if the queue is full."""
        job.queue = self
        try:
            self._queue.put(job)
        except QueueOverflow:
            raise TwinferError(
                ErrorCode.OVERLOADED,
                f"queue {self.name!r} is full ({self.size} jobs waiting); retry later",
            ) from None

    def get(self) -> Deferred[Job]:
        """A Deferred firing with the next job (at once if one is waiting)."""
        return self._queue.get()

    def discard(self, job: Job) -> None:
        """Remove a job that has not been taken yet."""
        try:
            self._queue.pending.remove(job)
        except ValueError:
            pass

    def drain(self) -> list[Job]:
        """Remove and return every waiting job."""
        jobs = list(self._queue.pending)
        self._queue.pending.clear()
        return jobs

    def waiting(self) -> list[Job]:
        """A snapshot of the waiting jobs, oldest first (for the operations tools)."""
        return list(self._queue.pending)


def _execute(engine: Engine, job: Job) -> InferResult:
    """Run ``job`` on ``engine``; called in the worker's own thread."""
    started = time.monotonic()
    outputs = engine.run(job.inputs, job.outputs)
    done = time.monotonic()
    return InferResult(
        outputs, int((started - job.enqueued) * 1e6), int((done - started) * 1e6)
    )


class Worker:
    """One device replica: one thread, one job at a time, from the queues it serves."""

    def __init__(
        self,
        name: str,
        device: str,
        reactor: IReactorFromThreads,
        engines: Mapping[str, Engine],
        queues: Sequence[JobQueue],
    ) -> None:
        self.name = name
        self.device = device
        self._reactor = reactor
        self._engines = dict(engines)
        self._queues = list(queues)
        self._next_queue = 0
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"twinfer-{name}")
        self._waits: list[Deferred[Job]] = []
        self._running = False
        #: The job on the device right now, if any.
        self.current: Job | None = None
        self.jobs_done = 0
        self.jobs_failed = 0
        self.busy_seconds = 0.0

    def __repr__(self) -> str:
        return f"<Worker {self.name} queues={[q.name for q in self._queues]}>"

    def start(self) -> None:
        """Start the thread and begin taking jobs."""
        self._pool.start()
        self._running = True
        self._take_next()

    def stop(self) -> None:
        """Stop taking jobs and join the thread (after the current job, if any)."""
        self._running = False
        self._stop_waiting()
        self._pool.stop()

    def _stop_waiting(self) -> None:
        waits, self._waits = self._waits, []
        for wait in waits:
            wait.cancel()

    def _poll(self) -> Job | None:
        """Take a waiting job, visiting the queues round-robin for fairness."""
        count = len(self._queues)
        for i in range(count):
            queue = self._queues[(self._next_queue + i) % count]
            if queue.depth:
                self._next_queue = (self._next_queue + i + 1) % count
                taken: list[Job] = []
                queue.get().addCallback(taken.append)
                return taken[0]
        return None

    def _take_next(self) -> None:
        # A loop, not recursion: a run of cancelled jobs must not grow the stack.
        while self._running:
            job = self._poll()
            if job is None:
                self._waits = [queue.get() for queue in self._queues]
                for wait in self._waits:
                    wait.addCallbacks(self._woken, _ignore_cancel)
                return
            if self._start(job):
                return

    def _woken(self, job: Job) -> None:
        self._waits = [w for w in self._waits if not w.called]
        self._stop_waiting()
        if not self._start(job):
            self._take_next()

    def _start(self, job: Job) -> bool:
        """Send ``job`` to the device thread; False if it was cancelled meanwhile."""
        if job.deferred.called:
            return False
        job.running = True
        self.current = job
        d = deferToThreadPool(self._reactor, self._pool, _execute, self._engines[job.model], job)
        d.addCallbacks(self._succeeded, self._failed, (job,), None, (job,))
        return True

    def _succeeded(self, result: InferResult, job: Job) -> None:
        self.jobs_done += 1
        self.busy_seconds += result.compute_us / 1e6
        self._finish(job)
        if not job.deferred.called:
            job.deferred.callback(result)

    def _failed(self, failure: Failure, job: Job) -> None:
        self.jobs_failed += 1
        log.failure("model {model} failed on {worker}", failure, model=job.model, worker=self.name)
        self._finish(job)
        if not job.deferred.called:
            job.deferred.errback(
                TwinferError(
                    ErrorCode.INFERENCE_FAILED,
                    f"model {job.model!r} failed on device {self.device!r}: "
                    f"{failure.getErrorMessage()}",
                )
            )

    def _finish(self, job: Job) -> None:
        self.current = None
        job.inputs = {}
        # Take the next job before the reply is encoded and written, so the
        # device is busy again as soon as possible.
        self._take_next()

    # -- runtime control (used by twinfer.control; reactor thread only) ------

    #: Set by :meth:`pause`: the worker finishes its current job and takes no more.
    paused = False

    @property
    def queues(self) -> tuple[JobQueue, ...]:
        """The queues this worker takes jobs from."""
        return tuple(self._queues)

    @property
    def alive(self) -> bool:
        """Whether the worker's thread is running (it was started and not stopped)."""
        return bool(self._pool.started) and not self._pool.joined

    def reconfigure(
        self,
        engines: Mapping[str, Engine | None],
        add: Sequence[JobQueue] = (),
        remove: Sequence[JobQueue] = (),
    ) -> None:
        """Swap engines (``None`` drops one) and queues between two jobs.

        A job already on the device keeps the engine it started with; the
        next job taken uses the new set.  An idle worker stops waiting on its
        old queues and looks at the new set at once.
        """
        for model, engine in engines.items():
            if engine is None:
                self._engines.pop(model, None)
            else:
                self._engines[model] = engine
        self._queues = [q for q in self._queues if q not in remove]
        self._queues += [q for q in add if q not in self._queues]
        self._next_queue = 0
        if self._running and self.current is None:
            self._stop_waiting()
            self._take_next()

    def pause(self) -> None:
        """Drain the device replica: finish the current job, take no new ones."""
        self.paused = True
        self._running = False
        if self.current is None:
            self._stop_waiting()

    def resume(self) -> None:
        """Undo :meth:`pause`: take jobs again."""
        self.paused = False
        if self.alive and not self._running:
            self._running = True
            if self.current is None:
                self._take_next()


def _ignore_cancel(failure: Failure) -> None:
    failure.trap(CancelledError)


@attrs.define(eq=False)
class ModelEntry:
    """A served model: its signature and the queues its requests go into."""

    name: str
    signature: Signature
    devices: tuple[str, ...]
    queues: tuple[JobQueue, ...]

    def choose_queue(self) -> JobQueue:
        """The shared queue, or the shortest per-device queue."""
        if len(self.queues) == 1:
            return self.queues[0]
        return min(self.queues, key=lambda q: q.depth)


class Dispatcher:
    """Routes validated requests into queues and owns the workers."""

    def __init__(self, models: Mapping[str, ModelEntry], workers: Sequence[Worker]) -> None:
        self.models = dict(models)
        self.workers = list(workers)
        self.started = False

    def start(self) -> None:
        """Start every worker."""
        for worker in self.workers:
            worker.start()
        self.started = True

    def stop(self) -> None:
        """Fail queued jobs with UNAVAILABLE and stop every worker."""
        self.started = False
        for entry in self.models.values():
            for queue in entry.queues:
                for job in queue.drain():
                    if not job.deferred.called:
                        job.deferred.errback(
                            TwinferError(ErrorCode.UNAVAILABLE, "the server is shutting down")
                        )
        for worker in self.workers:
            worker.stop()

    def entry(self, model: str) -> ModelEntry:
        """The served model called ``model``, or ``UNKNOWN_MODEL``."""
        try:
            return self.models[model]
        except KeyError:
            raise TwinferError(
                ErrorCode.UNKNOWN_MODEL,
                f"model {model!r} is not served here (served: {sorted(self.models)})",
            ) from None

    def submit(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...] = ()
    ) -> Deferred[InferResult]:
        """Validate and queue a request.

        Returns the job's Deferred, which fires with an :class:`InferResult`
        or fails with :class:`TwinferError`; cancel it to withdraw the job.
        Raises :class:`TwinferError` at once for an unknown model, invalid
        inputs or a full queue.
        """
        entry = self.entry(model)
        entry.signature.validate(model, inputs, outputs)
        if not self.started:
            raise TwinferError(ErrorCode.UNAVAILABLE, "the server is not running")
        job = Job(model, inputs, outputs, time.monotonic())
        entry.choose_queue().put(job)
        return job.deferred

    def model_infos(self) -> tuple[ModelInfo, ...]:
        """Every served model, for MODEL_LIST."""
        return tuple(
            ModelInfo(e.name, e.devices, self.started) for e in self.models.values()
        )

    def metadata(self, model: str) -> Metadata:
        """One model's metadata, or ``UNKNOWN_MODEL``."""
        entry = self.entry(model)
        return entry.signature.metadata(entry.name, entry.devices)
