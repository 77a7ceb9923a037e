"""Scheduling: from a validated request to a device and back.

- :mod:`~twinfer.scheduling.router`: the :class:`Dispatcher` (served models,
  queue choice, deadlines, failover) and its :class:`ModelEntry` per model;
- :mod:`~twinfer.scheduling.queueing`: jobs and the bounded priority queues;
- :mod:`~twinfer.scheduling.batcher`: dynamic batching as one object
  (admission, collection, stacking and splitting);
- :mod:`~twinfer.scheduling.worker`: one device replica (its thread, its
  pipeline, its health probes, its drain state);
- :mod:`~twinfer.scheduling.execution`: the per-device policy choosing the
  latency or the throughput engines, per job, from the load.

A job's result travels one way: device thread -> worker -> the job's
Deferred (an :class:`InferResult` carrying what a front end needs).
"""

from twinfer.scheduling.batcher import Batcher, BatchPolicy
from twinfer.scheduling.execution import ExecutionPolicy, Mode
from twinfer.scheduling.queueing import InferResult, Job, JobQueue
from twinfer.scheduling.router import Dispatcher, ModelEntry
from twinfer.scheduling.worker import PIPELINE_DEPTH, DeviceError, Worker, WorkerState

__all__ = [
    "PIPELINE_DEPTH",
    "BatchPolicy",
    "Batcher",
    "DeviceError",
    "Dispatcher",
    "ExecutionPolicy",
    "InferResult",
    "Job",
    "JobQueue",
    "Mode",
    "ModelEntry",
    "Worker",
    "WorkerState",
]
