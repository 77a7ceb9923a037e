"""Jobs and the bounded, prioritised job queue.

A :class:`JobQueue` holds one ``DeferredQueue`` per priority level.  Its
scheduling policy (documented in ``docs/architecture.md``):

- **bounded**: at most ``size`` jobs wait, over all levels; one more is
  refused at once with ``OVERLOADED`` (memory never grows with load);
- **strict priority with aging**: a worker takes from the highest non-empty
  level, except that a job which has waited longer than ``aging`` seconds is
  taken first (oldest first) whatever its level, so low levels cannot starve;
- **FIFO** within a level;
- **watermarks**: when its depth reaches 3/4 of ``size`` the queue reports
  itself saturated, and it calls its ``on_relieved`` callbacks when the depth
  falls back to 1/4, so the front ends can pause and resume reading.

Batches are taken from a queue by :class:`~twinfer.scheduling.batcher.Batcher`
(:meth:`JobQueue.take_compatible`), which decides what may share one.
Nothing here runs on a thread other than the reactor's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import numpy as np
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.interfaces import IDelayedCall

from twinfer.errors import ErrorCode, TwinferError


@attrs.frozen(eq=False)
class InferResult:
    """What an inference job's Deferred fires with: everything a front end
    needs to reply and to count, so nothing is looked up after the job ran
    (the model may have been unloaded or reloaded meanwhile)."""

    outputs: dict[str, np.ndarray]
    #: Microseconds between queueing and the device thread starting the job.
    queue_us: int
    #: Microseconds the device thread spent on the job (its whole batch).
    compute_us: int
    #: Rows (dimension 0 of the inputs) in the inference that produced it:
    #: the whole dynamic batch when several requests ran together.
    batch_size: int = 1
    #: The model that ran it.
    model: str = ""
    #: The device (configured name) it ran on.
    device: str = ""
    #: Requests in the inference that produced it (1 when it ran alone).
    batch_requests: int = 1


@attrs.define(eq=False)
class Job:
    """One inference request on its way to a device."""

    model: str
    inputs: Mapping[str, np.ndarray]
    outputs: tuple[str, ...]
    #: ``time.monotonic()`` when it was queued.
    enqueued: float
    #: Priority level index, 0 = lowest.
    level: int = 0
    #: Time on the dispatcher's clock after which it must not start; ``None`` = no deadline.
    deadline: float | None = None
    #: Rows along the batch axis (dimension 0 of every input) when batching.
    rows: int = 1
    #: Jobs with equal keys may be stacked into one batch (same model, same
    #: non-batch dimensions, same outputs wanted).
    batch_key: Any = None
    #: Custom work for the device thread, given the engine (image tasks);
    #: ``None`` runs ``engine.run(inputs, outputs)``.
    work: Callable[[Any], Any] | None = None
    #: Fires with :class:`InferResult` (or the ``work`` callable's result) or
    #: fails with :class:`TwinferError`.  Cancelling it takes a queued job out
    #: of its queue (it never runs) and drops a running job's result.
    deferred: Deferred[Any] = attrs.field(init=False)
    queue: JobQueue | None = None
    running: bool = False
    #: Device failures this job has met (it is retried elsewhere once).
    attempts: int = 0
    timer: IDelayedCall | None = None

    def __attrs_post_init__(self) -> None:
        self.deferred = Deferred(self._cancelled)

    def _cancelled(self, _: Deferred[Any]) -> None:
        self.stop_timer()
        # A running job's inputs belong to the device thread until it is done.
        if not self.running:
            if self.queue is not None:
                self.queue.discard(self)
            self.inputs = {}  # release the request's memory now

    def stop_timer(self) -> None:
        """Cancel the deadline timer, if any (the job starts or ends)."""
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def fail(self, code: ErrorCode, message: str) -> None:
        """Fail the job's Deferred unless it already fired."""
        self.stop_timer()
        if not self.deferred.called:
            self.deferred.errback(TwinferError(code, message))


class JobQueue:
    """A bounded queue of jobs with priority levels (see the module docs)."""

    def __init__(
        self,
        name: str,
        size: int,
        levels: int = 1,
        aging: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.size = size
        self.aging = aging
        self._clock = clock
        self._levels: list[DeferredQueue[Job]] = [DeferredQueue() for _ in range(levels)]
        self._depth = 0
        self.saturated = False
        #: Called (no arguments) when a saturated queue falls to its low watermark.
        self.on_relieved: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<JobQueue {self.name} {self.depth}/{self.size}>"

    @property
    def levels(self) -> int:
        """Number of priority levels."""
        return len(self._levels)

    @property
    def depth(self) -> int:
        """Jobs waiting, over all levels."""
        return self._depth

    @property
    def high_watermark(self) -> int:
        """Depth at which the queue counts as saturated."""
        return max(1, self.size * 3 // 4)

    @property
    def low_watermark(self) -> int:
        """Depth at which a saturated queue is relieved."""
        return self.size // 4

    def oldest_wait(self) -> float:
        """Seconds the oldest waiting job has waited (0 when empty)."""
        heads = [level.pending[0].enqueued for level in self._levels if level.pending]
        return self._clock() - min(heads) if heads else 0.0

    def put(self, job: Job) -> None:
        """Queue ``job``, or raise ``OVERLOADED`` at once if the queue is full.

        If a worker is waiting on the queue the job is handed to it at once.
        """
        if self._depth >= self.size:
            raise TwinferError(
                ErrorCode.OVERLOADED,
                f"queue {self.name!r} is full ({self.size} jobs waiting); retry later",
            )
        job.queue = self
        level = self._levels[job.level]
        if level.waiting:
            level.put(job)  # straight to a waiting worker: never counted as queued
            return
        self._depth += 1
        level.put(job)
        if self._depth >= self.high_watermark:
            self.saturated = True

    def put_front(self, job: Job) -> None:
        """Put a job back at the head of its level (a retry); ignores the bound."""
        job.queue = self
        level = self._levels[job.level]
        if level.waiting:
            level.put(job)
            return
        self._depth += 1
        level.pending.insert(0, job)

    @property
    def idle_workers(self) -> int:
        """Workers waiting on this queue for a job (each waits on every level)."""
        return len(self._levels[0].waiting)

    def wait(self) -> list[Deferred[Job]]:
        """Deferreds, one per level, firing with a job put while the queue is empty.

        The caller must cancel the others once one fires.
        """
        return [level.get() for level in self._levels]

    def withdraw(self, wait: Deferred[Job]) -> bool:
        """Take back one of :meth:`wait`'s Deferreds that has not fired, without
        firing it (cancelling would build a ``CancelledError`` failure, on every
        wake-up of a worker serving several queues); True if it was waiting here."""
        for level in self._levels:
            try:
                level.waiting.remove(wait)
            except ValueError:
                continue
            return True
        return False

    def _pop(self, level: DeferredQueue[Job]) -> Job:
        # Straight from the pending list: no worker waits while jobs are
        # pending, so this is what ``level.get()`` would hand over, without
        # a Deferred and two callbacks per job.
        job = level.pending.pop(0)
        self._taken()
        return job

    def _taken(self) -> None:
        self._depth -= 1
        if self.saturated and self._depth <= self.low_watermark:
            self.saturated = False
            for callback in list(self.on_relieved):
                callback()

    def waiting(self) -> list[Job]:
        """A snapshot of the waiting jobs, highest level first (for operations tools)."""
        return [job for level in reversed(self._levels) for job in level.pending]

    def take(self) -> Job | None:
        """Take the next job by the scheduling policy, or ``None`` if empty."""
        if not self._depth:
            return None
        if len(self._levels) == 1:
            return self._pop(self._levels[0])
        now = self._clock()
        chosen = None
        oldest = now - self.aging
        for level in self._levels:
            if level.pending and level.pending[0].enqueued < oldest:
                chosen, oldest = level, level.pending[0].enqueued
        if chosen is None:
            chosen = next(level for level in reversed(self._levels) if level.pending)
        return self._pop(chosen)

    def take_compatible(self, key: Any, max_rows: int) -> list[Job]:
        """Take waiting jobs whose ``batch_key`` is ``key``, highest level first,
        FIFO within a level, while their rows add up to at most ``max_rows``."""
        taken: list[Job] = []
        if max_rows <= 0 or not self._depth:
            return taken
        for level in reversed(self._levels):
            pending = level.pending
            i = 0
            while i < len(pending) and max_rows > 0:
                job = pending[i]
                if job.batch_key == key and job.rows <= max_rows:
                    del pending[i]
                    self._taken()
                    taken.append(job)
                    max_rows -= job.rows
                else:
                    i += 1
        return taken

    def discard(self, job: Job) -> bool:
        """Remove a job that has not been taken yet; True if it was here."""
        pending = self._levels[job.level].pending
        try:
            pending.remove(job)
        except ValueError:
            return False
        self._taken()
        return True

    def drain(self) -> list[Job]:
        """Remove and return every waiting job (oldest levels' order kept)."""
        jobs: list[Job] = []
        for level in reversed(self._levels):
            jobs += level.pending
            level.pending.clear()
        self._depth = 0
        if self.saturated:
            self.saturated = False
            for callback in list(self.on_relieved):
                callback()
        return jobs
