"""Dynamic batching as one object: which jobs run together, when, and how.

MLServer's ``AdaptiveBatcher`` is the model: one object owns the whole of
batching.  Here that is :class:`Batcher`, one per device worker, with one
:class:`BatchPolicy` per model that batches:

- **admission** (:meth:`BatchPolicy.admit`, reactor thread, at submission):
  a request's rows (its shared dimension 0) and its batch key (every input's
  dtype and non-batch dimensions, and the outputs asked for: what must match
  for two requests to share an inference); a request with more rows than
  ``max_batch_size`` is refused;
- **collection** (:meth:`Batcher.collect`, reactor thread): around the job a
  worker took, the jobs already waiting in the same queue with the same key,
  up to ``max_batch_size`` rows.  A batch that reached a preferred size (or
  the limit) runs at once; otherwise the idle device is held for up to
  ``max_queue_delay`` while more requests arrive, then the batch runs with
  what it has.  There is no waiting when it cannot pay: while the worker's
  device still runs an earlier batch (the new one would wait for it anyway),
  or while another device idles on the queue (a newcomer would go there
  rather than into this batch);
- **execution** (:func:`execute`, the worker's own thread): the inputs are
  stacked along axis 0, the model runs once and the outputs are split back
  per request, so the reactor never touches tensor data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twinfer.engines.openvino import Engine
from twinfer.errors import ErrorCode, TwinferError
from twinfer.scheduling.queueing import InferResult, Job

__all__ = [
    "SKIPPED",
    "BatchPolicy",
    "Batcher",
    "batch_key",
    "batch_rows",
    "execute",
    "run_batch",
]


def batch_key(inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...]) -> tuple[Any, ...]:
    """What must match for two requests to share a batch: every input's
    dtype and non-batch dimensions, and the outputs asked for."""
    return (
        tuple(sorted((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items())),
        outputs,
    )


def batch_rows(inputs: Mapping[str, np.ndarray]) -> int:
    """The batch dimension shared by every input; ``INVALID_SHAPE`` when they disagree."""
    rows = {array.shape[0] if array.ndim else 1 for array in inputs.values()}
    if len(rows) != 1:
        raise TwinferError(
            ErrorCode.INVALID_SHAPE,
            f"inputs disagree on the batch dimension: {sorted(rows)}",
        )
    return rows.pop()


@attrs.frozen
class BatchPolicy:
    """How one model's requests are batched."""

    #: Most rows (sum of the requests' batch dimensions) in one inference.
    max_batch_size: int
    #: Seconds a partial batch may wait for more requests.
    max_queue_delay: float = 0.0
    #: Batch sizes worth launching at once without waiting (e.g. (4, 8)).
    preferred_batch_sizes: tuple[int, ...] = ()

    def launch_now(self, rows: int) -> bool:
        """Whether a batch of ``rows`` rows should run without waiting for more."""
        return (
            rows >= self.max_batch_size
            or rows in self.preferred_batch_sizes
            or self.max_queue_delay <= 0
        )

    def admit(self, job: Job) -> None:
        """Set ``job``'s rows and batch key from its inputs (before it is queued).

        Raises :class:`TwinferError` ``INVALID_SHAPE`` when its inputs disagree
        on the batch dimension or it has more rows than one inference takes.
        """
        job.rows = batch_rows(job.inputs)
        job.batch_key = batch_key(job.inputs, job.outputs)
        if job.rows > self.max_batch_size:
            raise TwinferError(
                ErrorCode.INVALID_SHAPE,
                f"request has {job.rows} rows; model {job.model!r} takes at most "
                f"{self.max_batch_size} per inference",
            )


class Batcher:
    """Collects one device worker's batches (see the module docs).

    ``clock`` schedules the collection delay; ``on_collected`` is called with
    a batch whose delay ran out (the worker launches it, or gives it back
    when it can no longer take work).  At most one batch is collected at a
    time: the worker holds its idle device for it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        policies: Mapping[str, BatchPolicy] | None = None,
        on_collected: Callable[[list[Job]], None] = lambda batch: None,
    ) -> None:
        self._clock = clock
        self._policies = dict(policies or {})
        self.on_collected = on_collected
        self._held: list[Job] = []
        self._timer: IDelayedCall | None = None

    def policy(self, model: str) -> BatchPolicy | None:
        """``model``'s policy, or ``None`` when its requests run one by one."""
        return self._policies.get(model)

    def set_policy(self, model: str, policy: BatchPolicy | None) -> None:
        """Batch ``model`` by ``policy`` from its next job on (``None``: no batching)."""
        if policy is None:
            self._policies.pop(model, None)
        else:
            self._policies[model] = policy

    @property
    def collecting(self) -> bool:
        """Whether a partial batch is being held for more requests."""
        return bool(self._held)

    def held(self) -> list[Job]:
        """The jobs of the batch being collected (empty when none is)."""
        return list(self._held)

    def collect(self, job: Job, device_busy: bool) -> list[Job] | None:
        """Start a batch with ``job``, which a worker just took from its queue.

        Returns the batch to launch now (``job`` alone when its model does
        not batch), or ``None`` when the batch is held for up to the model's
        delay: :attr:`on_collected` then receives it.  ``device_busy``: the
        worker's device still runs an earlier job, so waiting cannot pay.
        """
        policy = self._policies.get(job.model)
        queue = job.queue
        if policy is None or job.work is not None or queue is None:
            return [job]
        batch = [job, *queue.take_compatible(job.batch_key, policy.max_batch_size - job.rows)]
        rows = sum(j.rows for j in batch)
        if policy.launch_now(rows) or device_busy or queue.idle_workers:
            return batch
        self._held = batch
        self._timer = self._clock.callLater(policy.max_queue_delay, self._collected, policy, rows)
        return None

    def _collected(self, policy: BatchPolicy, rows: int) -> None:
        self._timer = None
        batch, self._held = self._held, []
        queue = batch[0].queue
        if queue is not None:
            batch += queue.take_compatible(batch[0].batch_key, policy.max_batch_size - rows)
        self.on_collected(batch)

    def cancel(self) -> list[Job]:
        """Stop collecting; returns the held jobs (the caller answers them)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        held, self._held = self._held, []
        return held


# -- in the device thread -------------------------------------------------------

#: Result slot of a job that was cancelled before the device thread reached it.
SKIPPED: Any = object()


def _own_bytes(part: np.ndarray) -> np.ndarray:
    # One copy into a bytes object, in the device thread: the reply is then
    # written without any copy on the reactor thread (see twinfer.wire.encode).
    return np.ndarray(part.shape, part.dtype, buffer=part.tobytes())


def run_batch(
    engine: Engine,
    inputs: Sequence[Mapping[str, np.ndarray]],
    rows: Sequence[int],
    outputs: tuple[str, ...],
) -> list[dict[str, np.ndarray]]:
    """Run several requests as one inference; called in the device thread.

    Returns one output dict per request, in order.  Raises ``ValueError``
    when an output's first dimension is not the batch (the model cannot be
    batched this way).
    """
    if len(inputs) == 1:
        return [engine.run(inputs[0], outputs)]
    stacked = {name: np.concatenate([i[name] for i in inputs]) for name in inputs[0]}
    result = engine.run(stacked, outputs)
    total = sum(rows)
    bounds = np.cumsum([0, *rows])
    split: list[dict[str, np.ndarray]] = [{} for _ in inputs]
    for name, array in result.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ValueError(
                f"output {name!r} has shape {list(array.shape)}, not batched along "
                f"axis 0 ({total} rows): the model cannot be batched"
            )
        for k in range(len(inputs)):
            split[k][name] = _own_bytes(array[bounds[k] : bounds[k + 1]])
    return split


def _leading_dim(inputs: Mapping[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()), None)
    return first.shape[0] if first is not None and first.ndim else 1


def execute(engine: Engine, jobs: list[Job], device: str = "") -> list[Any]:
    """Run one job or one batch on ``engine``; called in the worker's own thread.

    Returns one :class:`InferResult` per job, in order.  Jobs cancelled while
    they waited behind the previous one are skipped (their slot is
    :data:`SKIPPED`); reading ``deferred.called`` here is a benign race: at
    worst a just-cancelled job runs and its result is dropped.
    """
    live = [job for job in jobs if not job.deferred.called]
    if not live:
        return [SKIPPED] * len(jobs)
    started = time.monotonic()
    rows = [job.rows for job in live]
    results = iter(run_batch(engine, [job.inputs for job in live], rows, live[0].outputs))
    compute_us = int((time.monotonic() - started) * 1e6)
    batch_size = sum(rows) if len(live) > 1 else _leading_dim(live[0].inputs)
    return [
        InferResult(
            next(results),
            int((started - job.enqueued) * 1e6),
            compute_us,
            batch_size,
            job.model,
            device,
            len(live),
        )
        if job in live
        else SKIPPED
        for job in jobs
    ]
