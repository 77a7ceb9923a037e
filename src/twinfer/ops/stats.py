"""Request statistics: counters and latency histograms, cheap on the hot path.

The data plane (:mod:`twinfer.dataplane`) calls :meth:`Stats.request_done`
once per inference request, whatever its front end, on the reactor thread.
That costs three dictionary lookups, a few integer and float increments,
one ``time.time()`` and three ``bisect`` calls; there are no locks, because only the reactor thread
writes.  Readers (the debug console on the reactor thread, the Prometheus
collector in a web thread) take snapshots: copying a list of ints is atomic
under the GIL, so a scrape may be a request behind but is never torn within a
bucket list.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable

import numpy as np

#: Bucket upper bounds, in seconds, for queue, compute and end-to-end times:
#: from 50 us (the tiny model on a CPU) to 10 s (a cold GPU), roughly x2.5.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Bucket upper bounds for batch sizes (samples per device execution).
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Latencies kept per model for the console's percentiles.
RECENT = 2048


class Histogram:
    """Cumulative-at-read histogram with fixed buckets, plus a window of recent values."""

    __slots__ = ("bounds", "counts", "sum", "recent")

    def __init__(self, bounds: tuple[float, ...], recent: int = 0) -> None:
        self.bounds = bounds
        #: Per-bucket counts (not cumulative); the last slot is ``+Inf``.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.recent: deque[float] | None = deque(maxlen=recent) if recent else None

    def observe(self, value: float) -> None:
        """Count one value."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        if self.recent is not None:
            self.recent.append(value)

    @property
    def count(self) -> int:
        """Values observed."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs in Prometheus' cumulative form, ``+Inf`` last."""
        counts = list(self.counts)  # snapshot: may be read from a web thread
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out

    def percentiles(self, qs: tuple[float, ...] = (50, 90, 99)) -> tuple[float, ...] | None:
        """Percentiles of the recent window, or None if it is empty."""
        if not self.recent:
            return None
        return tuple(float(v) for v in np.percentile(np.fromiter(self.recent, float), qs))


class ModelStats:
    """Everything counted for one model.

    Besides the histograms (whose sums are the total seconds), a few running
    totals for Triton's statistics extension (:mod:`twinfer.ops.repository`):
    the seconds failed requests took, device executions and when the last
    request was answered.
    """

    __slots__ = (
        "codes",
        "queue",
        "compute",
        "latency",
        "batch",
        "failed_seconds",
        "executions",
        "by_batch",
        "last_request",
    )

    def __init__(self) -> None:
        #: Requests answered, by outcome: ``"OK"`` or an ErrorCode name.
        self.codes: dict[str, int] = {}
        self.queue = Histogram(LATENCY_BUCKETS, RECENT)
        self.compute = Histogram(LATENCY_BUCKETS, RECENT)
        self.latency = Histogram(LATENCY_BUCKETS, RECENT)
        self.batch = Histogram(BATCH_BUCKETS)
        #: End-to-end seconds of the requests answered with an error (the
        #: successful ones' total is ``latency.sum`` minus this).
        self.failed_seconds = 0.0
        #: Device executions that answered requests: each request that ran
        #: adds ``1 / (requests in its batch)``, so a batch counts once
        #: whichever of its requests are counted first (see :meth:`execution_count`).
        self.executions = 0.0
        #: ``{batch rows: [executions, compute seconds]}`` for requests that ran,
        #: each shared out the same way.
        self.by_batch: dict[int, list[float]] = {}
        #: Wall-clock time (seconds since the epoch) of the last answer; 0: none yet.
        self.last_request = 0.0

    @property
    def count(self) -> int:
        """Requests answered."""
        return sum(self.codes.values())

    @property
    def errors(self) -> int:
        """Requests answered with an error."""
        return sum(n for code, n in self.codes.items() if code != "OK")

    @property
    def execution_count(self) -> int:
        """Device executions (a dynamic batch counts once).

        Exact unless a request was cancelled after its batch ran (its share
        of the batch is then not counted).
        """
        return round(self.executions)


class Stats:
    """Per-model request statistics for the whole server (one per process)."""

    def __init__(self, clock: float | None = None, wall: Callable[[], float] = time.time) -> None:
        self.started = time.monotonic() if clock is None else clock
        #: The wall clock stamping each model's last answer (``time.time``).
        self.wall = wall
        self.models: dict[str, ModelStats] = {}
        #: Answers by outcome over all models (unknown models included).
        self.totals: dict[str, int] = {}
        #: Answers by ``(model, outcome, front end)``; ``model`` is ``""`` for
        #: the models that are not served (so clients cannot grow the table).
        self.requests: dict[tuple[str, str, str], int] = {}

    def model(self, name: str) -> ModelStats:
        """The statistics of ``name`` (created on first use)."""
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelStats()
        return stats

    def request_done(
        self,
        model: str,
        code: str,
        latency: float,
        queue: float | None = None,
        compute: float | None = None,
        batch: int | None = None,
        known: bool = True,
        frontend: str = "",
        batch_requests: int = 1,
    ) -> None:
        """Count one answered inference request (called on the reactor thread).

        ``code`` is ``"OK"`` or the ErrorCode's name; times are in seconds;
        ``queue``/``compute``/``batch`` are given for requests that ran.
        Requests for models that are not served (``known=False``) only count
        in :attr:`totals` and under model ``""``, so a client cannot grow the
        per-model tables.  ``frontend`` names the front end that answered;
        ``batch_requests`` is how many requests shared the device execution.
        """
        self.totals[code] = self.totals.get(code, 0) + 1
        key = (model if known else "", code, frontend)
        self.requests[key] = self.requests.get(key, 0) + 1
        if not known:
            return
        stats = self.model(model)
        stats.codes[code] = stats.codes.get(code, 0) + 1
        stats.latency.observe(latency)
        stats.last_request = self.wall()
        if code != "OK":
            stats.failed_seconds += latency
        if queue is not None:
            stats.queue.observe(queue)
        if compute is not None:
            stats.compute.observe(compute)
            share = 1.0 / batch_requests
            stats.executions += share
            rows = stats.by_batch.get(batch or 1)
            if rows is None:
                rows = stats.by_batch[batch or 1] = [0.0, 0.0]
            rows[0] += share
            rows[1] += compute * share
        if batch is not None:
            stats.batch.observe(batch)

    @property
    def answered(self) -> int:
        """Inference requests answered, whatever the outcome."""
        return sum(self.totals.values())
