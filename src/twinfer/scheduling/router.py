"""Routing: served models, queue choice, deadlines and failover.

The reactor thread validates a request and :meth:`Dispatcher.submit` turns it
into a :class:`~twinfer.scheduling.queueing.Job` in one of the model's
bounded queues (:class:`~twinfer.scheduling.queueing.JobQueue`).  Device
workers (:class:`~twinfer.scheduling.worker.Worker`) take jobs from the
queues they serve and answer them; the dispatcher owns the workers and knows
which serve which queue.

A model's queue is shared by all the devices that serve it (idle workers take
from it in turn), or a model has one queue per device (``per-device``): a
request then goes to the shortest queue with a healthy device.

Device failure: a worker whose device failed is taken out of rotation (see
:mod:`twinfer.scheduling.worker`); the job that failed is retried once on
another device, and queues left with no healthy worker hand their jobs to the
model's other queues or answer them ``UNAVAILABLE``.

Other modules read the dispatcher's state through its public methods
(:meth:`Dispatcher.model`, :meth:`~Dispatcher.model_names`,
:meth:`~Dispatcher.workers_on`, :meth:`~Dispatcher.pending_jobs`...), never
its attributes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs
import numpy as np
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from twinfer.engines.openvino import Engine, Signature
from twinfer.errors import ErrorCode, TwinferError
from twinfer.scheduling.batcher import BatchPolicy
from twinfer.scheduling.queueing import Job, JobQueue
from twinfer.scheduling.worker import Worker, WorkerState, fail_on_device
from twinfer.wire.messages import Metadata, ModelInfo

__all__ = ["Dispatcher", "ModelEntry"]


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
    #: How it runs per device (``adaptive``, ``throughput``, ``latency``,
    #: ``properties``; see :mod:`twinfer.engines.tuning`).
    execution: Mapping[str, str] = attrs.field(factory=dict)
    #: The load-time timing of its engines per device (a
    #: :class:`twinfer.engines.tuning.Tuning`), where it ran.
    tuning: Mapping[str, Any] = attrs.field(factory=dict)
    #: Workers that take from each queue (filled in by the dispatcher).
    workers_of: dict[str, list[Worker]] = attrs.field(factory=dict)
    #: Set while a (re)load attaches the queues to workers: requests then
    #: wait in the queues instead of being refused for want of a device.
    attaching: bool = False

    def ready_queues(self) -> list[JobQueue]:
        """Queues that at least one available worker takes from."""
        return [q for q in self.queues if any(w.available for w in self.workers_of.get(q.name, ()))]

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
    """Routes validated requests into queues and owns the workers.

    ``clock`` (an ``IReactorTime``; the global reactor when omitted) times
    the requests' deadlines.
    """

    def __init__(
        self, models: Mapping[str, ModelEntry], workers: Sequence[Worker], clock: Any = None
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock: IReactorTime = clock
        self._models = dict(models)
        self._workers = list(workers)
        self._started = False
        self.counters = _Counters()
        #: Called (no arguments) when a saturated queue drains to its low watermark.
        self.on_relieved: list[Callable[[], None]] = []
        for worker in self._workers:
            self._adopt(worker)
        self._index_workers()
        for entry in self._models.values():
            for queue in entry.queues:
                queue.on_relieved.append(self._relieved)

    # -- state, read by the front ends and the operations tools ---------------

    @property
    def started(self) -> bool:
        """Whether the dispatcher takes requests (started, and not stopping)."""
        return self._started

    @property
    def models(self) -> Mapping[str, ModelEntry]:
        """The served models by name (a read-only view: use :meth:`install`
        and :meth:`uninstall` to change it)."""
        return MappingProxyType(self._models)

    @property
    def workers(self) -> list[Worker]:
        """Every worker (a copy: use :meth:`add_worker` and :meth:`remove_worker`)."""
        return list(self._workers)

    def model(self, name: str) -> ModelEntry | None:
        """The served model called ``name``, or ``None``."""
        return self._models.get(name)

    def entries(self) -> list[ModelEntry]:
        """The served models' entries, in the order they were installed."""
        return list(self._models.values())

    def model_names(self) -> list[str]:
        """The names of the served models, in the order they were installed."""
        return list(self._models)

    def model_queues(self) -> list[tuple[str, JobQueue]]:
        """Every served model's queues, as ``(model name, queue)`` pairs."""
        return [(entry.name, q) for entry in list(self._models.values()) for q in entry.queues]

    def workers_on(self, device: str) -> list[Worker]:
        """The workers of ``device`` (configured name), running or not."""
        return [w for w in list(self._workers) if w.device == device]

    def pending_jobs(self, queues: Collection[JobQueue] | None = None) -> list[Job]:
        """Every job not answered yet: waiting in a queue, being collected into a
        batch, or on a device; only those of ``queues`` when given."""
        held = [job for worker in self._workers for job in worker.jobs()]
        if queues is None:
            queues = [q for _, q in self.model_queues()]
        else:
            held = [job for job in held if job.queue in queues]
        jobs = [job for queue in queues for job in queue.waiting()] + held
        return [job for job in jobs if not job.deferred.called]

    def _relieved(self) -> None:
        for callback in list(self.on_relieved):
            callback()

    def saturated(self, model: str) -> bool:
        """Whether every queue of ``model`` that can take work is above its high watermark."""
        entry = self._models.get(model)
        return entry is not None and all(q.saturated for q in entry.queues)

    # -- changing what is served ------------------------------------------------

    def _adopt(self, worker: Worker) -> None:
        worker.on_job_failed = self._job_failed
        worker.on_state_changed = self._worker_state_changed

    def add_worker(self, worker: Worker) -> None:
        """Take a new worker into service (started if the dispatcher runs)."""
        self._adopt(worker)
        self._workers.append(worker)
        self._index_workers()
        if self._started:
            worker.start()

    def remove_worker(self, worker: Worker) -> None:
        """Stop a worker and forget it."""
        worker.stop()
        self._workers.remove(worker)
        self._index_workers()

    def install(self, entry: ModelEntry) -> ModelEntry | None:
        """Serve ``entry`` under its name (atomically replacing any previous
        version, which is returned); its queues must already be on workers."""
        for queue in entry.queues:
            queue.on_relieved.append(self._relieved)
        old = self._models.get(entry.name)
        self._models[entry.name] = entry
        self._index_workers()
        return old

    def uninstall(self, name: str) -> ModelEntry | None:
        """Stop serving ``name`` (new requests get ``UNKNOWN_MODEL``); returns its
        entry, or ``None`` if it was not served.  Its queued and running jobs
        are left as they are."""
        return self._models.pop(name, None)

    def reindex(self) -> None:
        """Recompute which workers serve which queues (after a reconfiguration)."""
        self._index_workers()

    def _index_workers(self) -> None:
        for entry in self._models.values():
            entry.workers_of = {
                q.name: [w for w in self._workers if q in w.queues] for q in entry.queues
            }

    def start(self) -> None:
        """Start every worker."""
        self._started = True
        for worker in self._workers:
            worker.start()

    def stop_accepting(self) -> None:
        """Refuse new requests with ``UNAVAILABLE`` from now on; what is queued
        or running carries on (the first step of a graceful stop)."""
        self._started = False

    def stop(self) -> None:
        """Fail queued jobs with UNAVAILABLE and stop every worker."""
        self._started = False
        for entry in self._models.values():
            for queue in entry.queues:
                for job in queue.drain():
                    job.fail(ErrorCode.UNAVAILABLE, "the server is shutting down")
        for worker in self._workers:
            worker.stop()

    def entry(self, model: str) -> ModelEntry:
        """The served model called ``model``, or ``UNKNOWN_MODEL``."""
        try:
            return self._models[model]
        except KeyError:
            raise TwinferError(
                ErrorCode.UNKNOWN_MODEL,
                f"model {model!r} is not served here (served: {sorted(self._models)})",
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
        """Queue a request whose inputs fit the model (the data plane
        validates them: :meth:`twinfer.dataplane.DataPlane.infer`).

        ``timeout_ms`` (0: the model's default) bounds the time it may wait
        before a device starts it; ``priority`` is a level from 1 (lowest) to
        the model's number of levels, 0 for the model's default.  ``work``,
        when given, replaces ``engine.run`` in the device thread (its return
        value is what the Deferred fires with).

        Returns the job's Deferred, which fires with an
        :class:`~twinfer.scheduling.queueing.InferResult` or fails with
        :class:`TwinferError`; cancel it to withdraw the job.  Raises
        :class:`TwinferError` at once for an unknown model, a batch with
        too many rows, a full queue or no healthy device.
        """
        entry = self.entry(model)
        if not self._started:
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
            entry.batching.admit(job)  # its rows and batch key; INVALID_SHAPE if too many
        queue.put(job)
        job.deferred.addErrback(self._count_cancelled, job)
        timeout = timeout_ms / 1000 if timeout_ms else entry.default_timeout
        # A job handed straight to a waiting worker is already running: its
        # deadline (to reach a device) is met, and a timer would be a no-op.
        if timeout > 0 and not job.running and not job.deferred.called:
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
        entry = self._models.get(job.model)
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
        fail_on_device(job, worker, message)

    def _worker_state_changed(self, worker: Worker) -> None:
        if worker.state is WorkerState.FAILED:
            self.counters.device_failures += 1
        if worker.state is WorkerState.READY:
            return
        # Queues this worker served that no available worker serves any more:
        # hand their jobs to the model's other queues, or answer them.
        for entry in self._models.values():
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
        entry = self._models.get(model)
        return self._started and entry is not None and bool(entry.ready_queues())

    def model_infos(self) -> tuple[ModelInfo, ...]:
        """Every served model, for MODEL_LIST (ready = a healthy device serves it)."""
        return tuple(
            ModelInfo(e.name, e.devices, self._started and bool(e.ready_queues()))
            for e in self._models.values()
        )

    def metadata(self, model: str) -> Metadata:
        """One model's metadata, or ``UNKNOWN_MODEL``."""
        entry = self.entry(model)
        return entry.signature.metadata(entry.name, entry.devices)
