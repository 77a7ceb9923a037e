"""Timing a model's two CPU engines at load: measure, don't guess.

A model served with ``execution = "adaptive"`` is compiled twice for a
device: with ``PERFORMANCE_HINT = LATENCY`` (one stream, every core on one
request) and with ``PERFORMANCE_HINT = THROUGHPUT`` (several streams, each a
share of the cores).  Which one is better depends on the model and on the
CPU, so both are timed for a short, bounded warm-up (:func:`time_engine`):

- **latency**: the median of single requests run one after the other;
- **throughput**: inferences per second, the throughput engine driven from
  as many threads as it has streams (as its device replicas would), the
  latency engine alone from one thread (as the policy runs it).

:func:`choose` keeps both engines (``adaptive``) unless one wins on both
figures, in which case that one is used alone.  The figures are kept with
the loaded model (:class:`Tuning`), shown by the console's ``models`` view
and printed by ``twinfer tune MODEL``.
"""

from __future__ import annotations

import statistics
import threading
import time

import attrs
import numpy as np
import openvino as ov

from twinfer.config import EXECUTION_ADAPTIVE as ADAPTIVE
from twinfer.config import EXECUTION_LATENCY as LATENCY
from twinfer.config import EXECUTION_THROUGHPUT as THROUGHPUT
from twinfer.engines.openvino import Signature

__all__ = [
    "EngineTiming",
    "Tuning",
    "choose",
    "sample_inputs",
    "time_engine",
]

#: Single requests timed at most per engine (a bound for fast models, whose
#: time budget would otherwise buy thousands of runs for no better median).
MAX_SINGLE_RUNS = 200

#: Runs timed at least, whatever the time budget: a slow model (resnet50 on
#: a 2-core AMD EPYC: 50-130 ms a run) would otherwise be judged on two or
#: three runs, and one noisy run decided which engine it kept.
MIN_SINGLE_RUNS = 8
MIN_PARALLEL_RUNS = 4  # per thread


@attrs.frozen
class EngineTiming:
    """One compiled engine's figures from its warm-up."""

    #: Median milliseconds of one request run alone.
    latency_ms: float
    #: Inferences per second from ``threads`` threads, each with its own request.
    throughput: float
    threads: int

    def describe(self) -> str:
        """``5.91 ms, 181/s (1 thread)``."""
        plural = "s" if self.threads != 1 else ""
        return f"{self.latency_ms:.2f} ms, {self.throughput:.0f}/s ({self.threads} thread{plural})"


@attrs.frozen
class Tuning:
    """What the warm-up measured on one device, and the execution chosen from it."""

    #: ``adaptive`` (both engines kept), ``latency`` or ``throughput`` (one alone).
    choice: str
    throughput: EngineTiming
    latency: EngineTiming

    def describe(self) -> str:
        """One line: the choice and both engines' figures."""
        return (
            f"{self.choice} (latency engine {self.latency.describe()}; "
            f"throughput engine {self.throughput.describe()})"
        )


#: How much more throughput the latency engine must show, timed alone in
#: this process, before it serves every load by itself.  The timing leaves
#: out the server's own work per request (parsing, replies, the socket), and
#: on a small machine that work slows one all-core engine more than
#: independent streams: squeezenet on a 2-core AMD EPYC timed 222 vs 221
#: inferences/s here, yet served 151/s on the latency engine alone against
#: 190/s on the streams (benchmarks/RESULTS.md).
LATENCY_ALONE_MARGIN = 0.10


def choose(throughput: EngineTiming, latency: EngineTiming) -> str:
    """``latency`` or ``throughput`` when that engine wins on both figures,
    else ``adaptive``.

    The latency engine must have the lower latency and at least
    :data:`LATENCY_ALONE_MARGIN` more throughput; the throughput engine a
    latency no higher and a throughput no lower than the latency engine's.
    """
    latency_wins = latency.latency_ms < throughput.latency_ms and (
        latency.throughput >= throughput.throughput * (1 + LATENCY_ALONE_MARGIN)
    )
    if latency_wins:
        return LATENCY
    if throughput.latency_ms <= latency.latency_ms and throughput.throughput >= latency.throughput:
        return THROUGHPUT
    return ADAPTIVE


def sample_inputs(signature: Signature) -> dict[int, np.ndarray] | None:
    """Zeros of each input's smallest shape, by port index (``None``: an input
    of dynamic rank, which cannot be timed without real data)."""
    inputs = {}
    for port in signature.inputs:
        shape = port.smallest_shape
        if shape is None:
            return None
        inputs[port.index] = np.zeros(shape, port.dtype.numpy)
    return inputs


def time_engine(
    compiled: ov.CompiledModel, inputs: dict[int, np.ndarray], threads: int, seconds: float
) -> EngineTiming:
    """Time ``compiled`` for about ``seconds`` (one warm-up run more).

    Half the budget (at least :data:`MIN_SINGLE_RUNS` and at most
    :data:`MAX_SINGLE_RUNS` runs) times single requests; with ``threads > 1``
    the other half runs ``threads`` requests in parallel threads (at least
    :data:`MIN_PARALLEL_RUNS` each; OpenVINO releases the GIL while it
    infers), else the single runs give the throughput too.
    """
    request = compiled.create_infer_request()
    request.infer(inputs)  # warm-up: first-run allocations are not the engine's speed
    single: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds / (2 if threads > 1 else 1)
    while len(single) < MAX_SINGLE_RUNS:
        before = time.perf_counter()
        request.infer(inputs)
        after = time.perf_counter()
        single.append(after - before)
        if after >= deadline and len(single) >= MIN_SINGLE_RUNS:
            break
    latency_ms = statistics.median(single) * 1000
    if threads <= 1:
        return EngineTiming(latency_ms, len(single) / (time.perf_counter() - started), 1)

    counts = [0] * threads
    requests = [compiled.create_infer_request() for _ in range(threads)]
    for each in requests:
        each.infer(inputs)
    # Each thread stops after the deadline or after as many runs as a single
    # request made in the first half: fast models are bounded by count.
    runs = max(len(single), 1) * threads
    deadline = time.perf_counter() + seconds / 2

    def drive(i: int) -> None:
        while counts[i] < runs:
            requests[i].infer(inputs)
            counts[i] += 1
            if time.perf_counter() >= deadline and counts[i] >= MIN_PARALLEL_RUNS:
                return

    workers = [threading.Thread(target=drive, args=(i,)) for i in range(threads)]
    begun = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return EngineTiming(latency_ms, sum(counts) / (time.perf_counter() - begun), threads)
