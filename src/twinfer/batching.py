"""Dynamic batching: the policy, and the stacking and splitting done in the device thread.

A worker that takes a job of a model with batching on also takes the jobs
already waiting with the same :func:`~twinfer.queueing.batch_key` (same
non-batch dimensions and outputs), up to ``max_batch_size`` rows; if the
batch is still short of a preferred size it waits up to ``max_queue_delay``
for more, then runs whatever it has.  :func:`run_batch` (device thread)
stacks the inputs along axis 0, runs the model once and splits the outputs
back, so the reactor never touches tensor data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import numpy as np

from twinfer.backend import Engine


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


def _own_bytes(part: np.ndarray) -> np.ndarray:
    # One copy into a bytes object, in the device thread: the reply is then
    # written without any copy on the reactor thread (see twinfer.codec).
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
