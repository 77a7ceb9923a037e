"""Device workers and the dispatcher: the producer-consumer core.

The reactor thread validates a request and :meth:`Dispatcher.submit` turns it
into a :class:`~twinfer.queueing.Job` in a bounded queue
(:class:`~twinfer.queueing.JobQueue`, one ``DeferredQueue`` per priority
level).  Each device replica is a :class:`Worker` that owns a one-thread
``ThreadPool``: it takes one job (or one batch of jobs) at a time from the
queues it serves, runs it there with ``deferToThreadPool`` and fires the
jobs' Deferreds back on the reactor thread.  Because a worker holds at most
one job or batch and has one thread, a device replica is never entered by two
threads, whatever the load; a device that is not thread-safe gets
``replicas = 1``.

A model's queue is shared by all the devices that serve it (idle workers take
from it in turn), or a model has one queue per device (``per-device``); a
worker that serves several queues visits them round-robin.

Device failure: a worker whose device raises :class:`DeviceError`, fails
``max_failures`` times in a row, or fails its idle health probe is taken out
of rotation; the job that failed is retried once on another device, and
queues left with no healthy worker hand their jobs to the model's other
queues or answer them UNAVAILABLE.  A failed worker keeps probing and comes
back when its device answers again.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from twinfer.backend import Engine, Signature
from twinfer.batching import BatchPolicy, run_batch
from twinfer.errors import ErrorCode, TwinferError
from twinfer.queueing import InferResult, Job, JobQueue, batch_key
from twinfer.wire.messages import Metadata, ModelInfo

__all__ = [
    "DeviceError",
    "Dispatcher",
    "InferResult",
    "Job",
    "JobQueue",
    "ModelEntry",
    "Worker",
    "WorkerState",
]

log = Logger()


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


class _Counters:
    """Totals kept by the dispatcher (read by status and metrics)."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.deadline_exceeded = 0
        self.results_dropped = 0
        self.retried = 0
        self.device_failures = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


#: Result slot of a job that was cancelled before the device thread reached it.
_SKIPPED: Any = object()


def _execute(engine: Engine, jobs: list[Job], outputs: tuple[str, ...]) -> list[Any]:
    """Run one job or one batch on ``engine``; called in the worker's own thread.

    Jobs cancelled while they waited behind the previous one are skipped
    (their slot in the result is ``_SKIPPED``); reading ``deferred.called`` here
    is a benign race: at worst a just-cancelled job runs and its result is
    dropped.
    """
    live = [job for job in jobs if not job.deferred.called]
    if not live:
        return [_SKIPPED] * len(jobs)
    started = time.monotonic()
    rows = [job.rows for job in live]
    results = iter(run_batch(engine, [job.inputs for job in live], rows, outputs))
    done = time.monotonic()
    compute_us = int((done - started) * 1e6)
    batch_rows = sum(rows) if len(live) > 1 else _leading_dim(live[0].inputs)
    return [
        InferResult(next(results), int((started - job.enqueued) * 1e6), compute_us, batch_rows)
        if job in live
        else _SKIPPED
        for job in jobs
    ]


def _leading_dim(inputs: Mapping[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()), None)
    return first.shape[0] if first is not None and first.ndim else 1


def _execute_work(engine: Engine, job: Job) -> list[Any]:
    """Run a job's custom work (e.g. an image task) in the worker's thread."""
    if job.deferred.called or job.work is None:  # cancelled while waiting its turn
        return [_SKIPPED]
    return [job.work(engine)]


#: Jobs (or batches) a worker hands to its one-thread pool at once: one on the
#: device and one waiting right behind it, so the device does not sit idle
#: while the reactor thread turns a finished job into the next one.
PIPELINE_DEPTH = 2


class Worker:
    """One device replica: one thread; one job or batch on the device at a time,
    and the next one waiting behind it in the thread's queue."""

    def __init__(
        self,
        name: str,
        device: str,
        reactor: Any,
        engines: Mapping[str, Engine],
        queues: Sequence[JobQueue],
        batching: Mapping[str, BatchPolicy] | None = None,
        max_failures: int = 3,
        probe_interval: float = 0.0,
    ) -> None:
        self.name = name
        self.device = device
        self._reactor: IReactorFromThreads = reactor
        self._clock: IReactorTime = reactor
        self.engines = dict(engines)
        self.queues = list(queues)
        self.batching = dict(batching or {})
        self.max_failures = max_failures
        self.probe_interval = probe_interval
        self._next_queue = 0
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"twinfer-{name}")
        self._waits: list[Deferred[Job]] = []
        self._running = False
        self._launched = 0  # jobs or batches handed to the thread, not yet answered
        self._probing = False
        self._collect_timer: IDelayedCall | None = None
        self._collecting: list[Job] = []
        self._probe_timer: IDelayedCall | None = None
        self.state = WorkerState.READY
        self.failure_reason = ""
        #: The jobs handed to the device thread (running or next), oldest first.
        self.current: list[Job] = []
        self.jobs_done = 0
        self.jobs_failed = 0
        #: Inferences run (a batch of several jobs counts once).
        self.batches_run = 0
        self.busy_seconds = 0.0
        self.consecutive_failures = 0
        #: Set by the dispatcher: called with (job, worker, message) when a job
        #: fails on this device, and with (worker) when the worker's state changes.
        self.on_job_failed: Callable[[Job, Worker, str], None] = _fail_job
        self.on_state_changed: Callable[[Worker], None] = lambda worker: None

    def __repr__(self) -> str:
        return f"<Worker {self.name} {self.state.value} queues={[q.name for q in self.queues]}>"

    @property
    def available(self) -> bool:
        """Whether this worker takes jobs (ready, and running)."""
        return self._running and self.state is WorkerState.READY

    @property
    def alive(self) -> bool:
        """Whether the worker's thread is running (started and not stopped)."""
        return bool(self._pool.started) and not self._pool.joined

    @property
    def paused(self) -> bool:
        """Whether an operator drained this worker."""
        return self.state is WorkerState.DRAINED

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
    ) -> None:
        """Swap engines (``None`` drops one), queues and batching between two jobs.

        A job already on the device keeps the engine it started with; the
        next job taken uses the new set.  The dispatcher must be re-indexed
        afterwards (:meth:`Dispatcher.reindex`).
        """
        for model, engine in engines.items():
            if engine is None:
                self.engines.pop(model, None)
                self.batching.pop(model, None)
            else:
                self.engines[model] = engine
        for model, policy in (batching or {}).items():
            if policy is None:
                self.batching.pop(model, None)
            else:
                self.batching[model] = policy
        self.queues = [q for q in self.queues if q not in remove]
        self.queues += [q for q in add if q not in self.queues]
        self._next_queue = 0
        if self._waits:
            self._stop_waiting()
            self._take_next()

    def start(self) -> None:
        """Start the thread and begin taking jobs."""
        self._pool.start()
        self._running = True
        self._schedule_probe()
        self._take_next()

    def stop(self) -> None:
        """Stop taking jobs and join the thread (after the current job, if any)."""
        self._running = False
        self._stop_waiting()
        for timer in (self._collect_timer, self._probe_timer):
            if timer is not None and timer.active():
                timer.cancel()
        collecting, self._collecting = self._collecting, []
        for job in collecting:
            job.fail(ErrorCode.UNAVAILABLE, "the server is shutting down")
        self._pool.stop()

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
        self.on_state_changed(self)

    # -- taking jobs ----------------------------------------------------------

    def _stop_waiting(self) -> None:
        waits, self._waits = self._waits, []
        for wait in waits:
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

    def _take_next(self) -> None:
        # A loop, not recursion: a run of cancelled jobs must not grow the stack.
        while (
            self.available
            and self._launched < PIPELINE_DEPTH
            and not (self._collecting or self._probing or self._waits)
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
        self._start(job)
        self._take_next()

    def _start(self, job: Job) -> None:
        """Start ``job`` (collecting a batch around it if its model batches)."""
        if job.deferred.called:  # cancelled or expired while queued
            return
        policy = self.batching.get(job.model)
        if policy is None or job.work is not None or job.queue is None:
            self._launch([job])
            return
        batch = [job, *job.queue.take_compatible(job.batch_key, policy.max_batch_size - job.rows)]
        rows = sum(j.rows for j in batch)
        if policy.launch_now(rows) or self._launched or job.queue.idle_workers:
            # No waiting when it cannot pay: behind a running job the batch
            # waits for the device anyway, and while another device idles,
            # a newcomer would go there rather than into this batch.
            self._launch(batch)
            return
        # Hold the idle device for up to the delay while more requests arrive.
        self._collecting = batch
        self._collect_timer = self._clock.callLater(
            policy.max_queue_delay, self._collected, batch, rows, policy
        )

    def _collected(self, batch: list[Job], rows: int, policy: BatchPolicy) -> None:
        self._collect_timer = None
        self._collecting = []
        queue = batch[0].queue
        if queue is not None:
            batch += queue.take_compatible(batch[0].batch_key, policy.max_batch_size - rows)
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
        self.current = self.current + batch
        self.batches_run += 1
        first = batch[0]
        engine = self.engines[first.model]
        if first.work is not None:
            d = deferToThreadPool(self._reactor, self._pool, _execute_work, engine, first)
        else:
            d = deferToThreadPool(self._reactor, self._pool, _execute, engine, batch, first.outputs)
        d.addCallbacks(self._succeeded, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _succeeded(self, results: list[Any], batch: list[Job]) -> None:
        ran = [result for result in results if result is not _SKIPPED]
        self.jobs_done += len(ran)
        if ran:
            self.consecutive_failures = 0
            if isinstance(ran[0], InferResult):
                self.busy_seconds += ran[0].compute_us / 1e6
        self._finish(batch)
        for job, result in zip(batch, results):
            job.inputs = {}
            if result is not _SKIPPED and not job.deferred.called:
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
        self._finish(batch)
        if failure.check(DeviceError) or self.consecutive_failures >= self.max_failures:
            self.set_state(WorkerState.FAILED, message)
        for job in batch:
            job.running = False
            if not job.deferred.called:
                self.on_job_failed(job, self, message)

    def _finish(self, batch: list[Job]) -> None:
        self._launched -= 1
        self.current = [job for job in self.current if job not in batch]
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
        busy = self._launched or self._collecting or self._probing
        if not self._running or busy or self.state is WorkerState.DRAINED:
            self._schedule_probe()
            return
        probe = getattr(next(iter(self.engines.values())), "probe", None)
        if probe is None:
            return
        self._stop_waiting()
        self._probing = True
        d = deferToThreadPool(self._reactor, self._pool, probe)
        d.addCallbacks(self._probe_passed, self._probe_failed)

    def _probe_passed(self, _: object) -> None:
        self._probing = False
        if self.state is WorkerState.FAILED:
            self.set_state(WorkerState.READY)
        self._take_next()
        self._schedule_probe()

    def _probe_failed(self, failure: Failure) -> None:
        self._probing = False
        self.set_state(WorkerState.FAILED, f"health probe: {failure.getErrorMessage()}")
        self._schedule_probe()


def _fail_job(job: Job, worker: Worker, message: str) -> None:
    job.fail(
        ErrorCode.INFERENCE_FAILED,
        f"model {job.model!r} failed on device {worker.device!r}: {message}",
    )


def _ignore_cancel(failure: Failure) -> None:
    failure.trap(CancelledError)


@attrs.define(eq=False)
class ModelEntry:
    """A served model: its signature, scheduling options and queues."""

    name: str
    signature: Signature
    devices: tuple[str, ...]
    queues: tuple[JobQueue, ...]
    batching: BatchPolicy | None = None
    #: Seconds a request may wait in the queue when it names no timeout (0 = forever).
    default_timeout: float = 0.0
    #: Priority level used when a request names none (index, 0 = lowest).
    default_level: int = 0
    #: The model's image task (a :class:`twinfer.tasks.ImageTask`), if any.
    task: Any = None
    #: Workers that take from each queue (filled in by the dispatcher).
    workers_of: dict[str, list[Worker]] = attrs.field(factory=dict)
    #: Set while a (re)load attaches the queues to workers: requests then
    #: wait in the queues instead of being refused for want of a device.
    attaching: bool = False

    def ready_queues(self) -> list[JobQueue]:
        """Queues that at least one available worker takes from."""
        return [
            q for q in self.queues if any(w.available for w in self.workers_of.get(q.name, ()))
        ]

    def choose_queue(self) -> JobQueue:
        """The shared queue, or the shortest per-device queue with a healthy device;
        ``UNAVAILABLE`` when no device can serve the model."""
        if len(self.queues) == 1 and (self.attaching or self.ready_queues()):
            return self.queues[0]
        ready = self.ready_queues() or (list(self.queues) if self.attaching else [])
        if not ready:
            states = ", ".join(
                f"{w.name} {w.state.value}" + (f" ({w.failure_reason})" if w.failure_reason else "")
                for q in self.queues
                for w in self.workers_of.get(q.name, ())
            )
            raise TwinferError(
                ErrorCode.UNAVAILABLE,
                f"no healthy device serves model {self.name!r} ({states or 'no workers'})",
            )
        return min(ready, key=lambda q: q.depth)


class Dispatcher:
    """Routes validated requests into queues and owns the workers."""

    def __init__(
        self, models: Mapping[str, ModelEntry], workers: Sequence[Worker], clock: Any = None
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock: IReactorTime = clock
        self.models = dict(models)
        self.workers = list(workers)
        self.started = False
        self.counters = _Counters()
        #: Request statistics (:class:`twinfer.stats.Stats`) fed with every
        #: request submitted, from any front end; ``None`` keeps none.
        self.stats: Any = None
        #: Called (no arguments) when a saturated queue drains to its low watermark.
        self.on_relieved: list[Callable[[], None]] = []
        for worker in self.workers:
            self._adopt(worker)
        self._index_workers()
        for entry in self.models.values():
            for queue in entry.queues:
                queue.on_relieved.append(self._relieved)

    def _relieved(self) -> None:
        for callback in list(self.on_relieved):
            callback()

    def saturated(self, model: str) -> bool:
        """Whether every queue of ``model`` that can take work is above its high watermark."""
        entry = self.models.get(model)
        return entry is not None and all(q.saturated for q in entry.queues)

    def _adopt(self, worker: Worker) -> None:
        worker.on_job_failed = self._job_failed
        worker.on_state_changed = self._worker_state_changed

    def add_worker(self, worker: Worker) -> None:
        """Take a new worker into service (started if the dispatcher runs)."""
        self._adopt(worker)
        self.workers.append(worker)
        self._index_workers()
        if self.started:
            worker.start()

    def remove_worker(self, worker: Worker) -> None:
        """Stop a worker and forget it."""
        worker.stop()
        self.workers.remove(worker)
        self._index_workers()

    def install(self, entry: ModelEntry) -> ModelEntry | None:
        """Serve ``entry`` under its name (atomically replacing any previous
        version, which is returned); its queues must already be on workers."""
        for queue in entry.queues:
            queue.on_relieved.append(self._relieved)
        old = self.models.get(entry.name)
        self.models[entry.name] = entry
        self._index_workers()
        return old

    def reindex(self) -> None:
        """Recompute which workers serve which queues (after a reconfiguration)."""
        self._index_workers()

    def _index_workers(self) -> None:
        for entry in self.models.values():
            entry.workers_of = {
                q.name: [w for w in self.workers if q in w.queues] for q in entry.queues
            }

    def start(self) -> None:
        """Start every worker."""
        self.started = True
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        """Fail queued jobs with UNAVAILABLE and stop every worker."""
        self.started = False
        for entry in self.models.values():
            for queue in entry.queues:
                for job in queue.drain():
                    job.fail(ErrorCode.UNAVAILABLE, "the server is shutting down")
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
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: tuple[str, ...] = (),
        *,
        timeout_ms: int = 0,
        priority: int = 0,
        work: Callable[[Engine], Any] | None = None,
    ) -> Deferred[Any]:
        """Validate and queue a request.

        ``timeout_ms`` (0: the model's default) bounds the time it may wait
        before a device starts it; ``priority`` is a level from 1 (lowest) to
        the model's number of levels, 0 for the model's default.  ``work``,
        when given, replaces ``engine.run`` in the device thread (its return
        value is what the Deferred fires with; ``inputs`` are then not
        validated).

        Returns the job's Deferred, which fires with an
        :class:`~twinfer.queueing.InferResult` or fails with
        :class:`TwinferError`; cancel it to withdraw the job.  Raises
        :class:`TwinferError` at once for an unknown model, invalid inputs,
        a full queue or no healthy device.
        """
        started = time.monotonic()
        try:
            d = self._submit(model, inputs, outputs, timeout_ms, priority, work)
        except TwinferError as e:
            self._record(model, e.code, started)
            raise
        if self.stats is not None:
            d.addBoth(self._record_outcome, model, started)
        return d

    def _record(self, model: str, code: int, started: float, result: Any = None) -> None:
        if self.stats is None:
            return
        latency = time.monotonic() - started
        name = "OK" if code == 0 else getattr(code, "name", str(code))
        known = model in self.models or model in self.stats.models
        if isinstance(result, InferResult):
            self.stats.request_done(
                model,
                name,
                latency,
                result.queue_us / 1e6,
                result.compute_us / 1e6,
                result.batch_size,
                known,
            )
        else:
            self.stats.request_done(model, name, latency, known=known)

    def _record_outcome(self, outcome: Any, model: str, started: float) -> Any:
        if isinstance(outcome, Failure):
            if outcome.check(CancelledError):
                code: int = ErrorCode.CANCELLED
            elif outcome.check(TwinferError):
                code = outcome.value.code  # type: ignore[union-attr]
            else:
                code = ErrorCode.INTERNAL
            self._record(model, code, started)
        else:
            self._record(model, 0, started, outcome)
        return outcome  # the caller still sees it

    def _submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: tuple[str, ...],
        timeout_ms: int,
        priority: int,
        work: Callable[[Engine], Any] | None,
    ) -> Deferred[Any]:
        entry = self.entry(model)
        if work is None:
            entry.signature.validate(model, inputs, outputs)
        if not self.started:
            raise TwinferError(ErrorCode.UNAVAILABLE, "the server is not running")
        queue = entry.choose_queue()
        if priority:
            if not 1 <= priority <= queue.levels:
                raise TwinferError(
                    ErrorCode.INVALID_INPUT,
                    f"priority {priority} is out of range for model {model!r} "
                    f"(1..{queue.levels}, or 0 for the default)",
                )
            level = priority - 1
        else:
            level = entry.default_level
        now = self._clock.seconds()
        job = Job(model, inputs, outputs, time.monotonic(), level=level, work=work)
        if entry.batching is not None and work is None:
            job.rows = _rows(inputs)
            job.batch_key = batch_key(inputs, outputs)
            if job.rows > entry.batching.max_batch_size:
                raise TwinferError(
                    ErrorCode.INVALID_SHAPE,
                    f"request has {job.rows} rows; model {model!r} takes at most "
                    f"{entry.batching.max_batch_size} per inference",
                )
        queue.put(job)
        job.deferred.addErrback(self._count_cancelled, job)
        timeout = timeout_ms / 1000 if timeout_ms else entry.default_timeout
        if timeout > 0 and not job.deferred.called:
            job.deadline = now + timeout
            job.timer = self._clock.callLater(timeout, self._expire, job, timeout)
        return job.deferred

    def submit_call(self, model: str, work: Callable[[Engine], Any]) -> Deferred[Any]:
        """Queue custom device-thread work for ``model`` (given its engine).

        For jobs whose thread-side work is more than one inference (the image
        tasks decode, infer and post-process there).  The Deferred fires with
        what ``work`` returned; a :class:`TwinferError` raised by ``work``
        fails it as it is, any other exception as ``INFERENCE_FAILED``.
        """
        return self.submit(model, {}, (), work=work)

    def _count_cancelled(self, failure: Failure, job: Job) -> Failure:
        if failure.check(CancelledError):
            self.counters.cancelled += 1
            if job.running:
                self.counters.results_dropped += 1
        return failure  # the caller still sees it

    def _expire(self, job: Job, timeout: float) -> None:
        job.timer = None
        if job.running or job.deferred.called:
            return
        if job.queue is not None:
            job.queue.discard(job)
        job.inputs = {}
        self.counters.deadline_exceeded += 1
        job.fail(
            ErrorCode.DEADLINE_EXCEEDED,
            f"request waited {timeout * 1000:.0f} ms for model {job.model!r} without "
            f"reaching a device (its deadline)",
        )

    def _job_failed(self, job: Job, worker: Worker, message: str) -> None:
        """A job failed on a device: retry it once on another device, else fail it."""
        entry = self.models.get(job.model)
        others = (
            [
                q
                for q in entry.ready_queues()
                if any(w.available and w is not worker for w in entry.workers_of[q.name])
            ]
            if entry is not None
            else []
        )
        if job.attempts == 0 and job.work is None and others:
            job.attempts += 1
            self.counters.retried += 1
            target = job.queue if job.queue in others else min(others, key=lambda q: q.depth)
            target.put_front(job)
            return
        _fail_job(job, worker, message)

    def _worker_state_changed(self, worker: Worker) -> None:
        if worker.state is WorkerState.FAILED:
            self.counters.device_failures += 1
        if worker.state is WorkerState.READY:
            return
        # Queues this worker served that no available worker serves any more:
        # hand their jobs to the model's other queues, or answer them.
        for entry in self.models.values():
            if entry.attaching:
                continue  # its workers are being attached: its queues wait
            ready = entry.ready_queues()
            for queue in entry.queues:
                if queue in ready or not queue.depth:
                    continue
                for job in queue.drain():
                    if ready:
                        min(ready, key=lambda q: q.depth).put_front(job)
                    else:
                        job.fail(
                            ErrorCode.UNAVAILABLE,
                            f"no healthy device serves model {entry.name!r} "
                            f"({worker.name}: {worker.state.value})",
                        )

    def model_ready(self, model: str) -> bool:
        """Whether ``model`` can be served now (running, with a healthy device)."""
        entry = self.models.get(model)
        return self.started and entry is not None and bool(entry.ready_queues())

    def model_infos(self) -> tuple[ModelInfo, ...]:
        """Every served model, for MODEL_LIST (ready = a healthy device serves it)."""
        return tuple(
            ModelInfo(e.name, e.devices, self.started and bool(e.ready_queues()))
            for e in self.models.values()
        )

    def metadata(self, model: str) -> Metadata:
        """One model's metadata, or ``UNKNOWN_MODEL``."""
        entry = self.entry(model)
        return entry.signature.metadata(entry.name, entry.devices)


def _rows(inputs: Mapping[str, np.ndarray]) -> int:
    """The batch dimension shared by every input (validated against the model)."""
    rows = {array.shape[0] if array.ndim else 1 for array in inputs.values()}
    if len(rows) != 1:
        raise TwinferError(
            ErrorCode.INVALID_SHAPE,
            f"inputs disagree on the batch dimension: {sorted(rows)}",
        )
    return rows.pop()
