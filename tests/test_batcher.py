"""Dynamic batching in memory: admission, collection under a Clock, stacking and splitting."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from twisted.internet.task import Clock

from scheduling_support import BreakableDevice, rows, tiny_engine, tiny_job
from twinfer.engines import builtin
from twinfer.engines.openvino import OpenVINOEngine, Signature
from twinfer.errors import ErrorCode, TwinferError
from twinfer.scheduling import Batcher, BatchPolicy, InferResult, Job, JobQueue
from twinfer.scheduling.batcher import SKIPPED, execute, run_batch

POLICY = BatchPolicy(max_batch_size=4, max_queue_delay=0.005)


def admitted(n: int, seed: int = 0, width: int = 4, policy: BatchPolicy = POLICY) -> Job:
    job = Job("tiny", {"x": np.zeros((n, width), np.float32) + seed}, (), 0.0)
    policy.admit(job)
    return job


class Collection:
    """A queue, a Clock and a Batcher whose collected batches are recorded."""

    def __init__(self, policy: BatchPolicy = POLICY) -> None:
        self.clock = Clock()
        self.queue = JobQueue("tiny", size=20)
        self.collected: list[list[Job]] = []
        self.batcher = Batcher(self.clock, {"tiny": policy}, self.collected.append)

    def put(self, *jobs: Job) -> None:
        for job in jobs:
            self.queue.put(job)

    def take(self) -> Job:
        job = self.queue.take()
        assert job is not None
        return job


# -- admission ---------------------------------------------------------------


def test_admission_sets_rows_and_key_and_refuses_a_request_larger_than_a_batch() -> None:
    job = admitted(3)
    assert (
        job.rows == 3 and job.batch_key == admitted(1).batch_key != admitted(1, width=5).batch_key
    )
    with pytest.raises(TwinferError) as e:
        admitted(5)
    assert e.value.code == ErrorCode.INVALID_SHAPE
    assert "5 rows" in e.value.message and "at most 4" in e.value.message


def test_admission_refuses_inputs_that_disagree_on_the_batch_dimension() -> None:
    job = Job("m", {"a": np.zeros((2, 1)), "b": np.zeros((3, 1))}, (), 0.0)
    with pytest.raises(TwinferError) as e:
        POLICY.admit(job)
    assert e.value.code == ErrorCode.INVALID_SHAPE and "[2, 3]" in e.value.message


# -- collection ----------------------------------------------------------------


def test_a_model_without_a_policy_runs_each_job_alone() -> None:
    c = Collection()
    c.batcher.set_policy("tiny", None)
    assert c.batcher.policy("tiny") is None
    c.put(admitted(1), admitted(1))
    job = c.take()
    assert c.batcher.collect(job, device_busy=False) == [job] and c.queue.depth == 1


def test_custom_work_runs_alone() -> None:
    c = Collection()
    work = Job("tiny", {}, (), 0.0, work=lambda engine: None)
    c.put(work, admitted(1))
    assert c.batcher.collect(c.take(), device_busy=False) == [work] and c.queue.depth == 1


def test_compatible_waiting_jobs_join_up_to_the_row_limit() -> None:
    c = Collection(BatchPolicy(max_batch_size=4))
    first, two, three, one, wide = (
        admitted(1),
        admitted(2),
        admitted(2),
        admitted(1),
        admitted(1, width=5),
    )
    c.put(first, two, three, one, wide)
    batch = c.batcher.collect(c.take(), device_busy=False)
    # "three" would make 5 rows; "wide" has another shape: both stay queued.
    assert batch == [first, two, one]
    assert c.queue.waiting() == [three, wide]


def test_a_partial_batch_holds_for_the_delay_then_runs_with_what_came_meanwhile() -> None:
    c = Collection()
    first = admitted(1)
    c.put(first)
    assert c.batcher.collect(c.take(), device_busy=False) is None
    assert c.batcher.collecting and c.batcher.held() == [first]
    c.clock.advance(0.004)
    late, other_shape = admitted(2), admitted(1, width=5)
    c.put(late, other_shape)
    assert c.collected == []
    c.clock.advance(0.001)
    assert c.collected == [[first, late]] and not c.batcher.collecting
    assert c.queue.waiting() == [other_shape]


def test_a_batch_of_a_preferred_size_runs_at_once() -> None:
    c = Collection(BatchPolicy(max_batch_size=8, max_queue_delay=0.005, preferred_batch_sizes=(3,)))
    jobs = [admitted(1, seed=i) for i in range(3)]
    c.put(*jobs)
    assert c.batcher.collect(c.take(), device_busy=False) == jobs
    assert c.clock.getDelayedCalls() == []


def test_no_waiting_while_the_device_still_runs() -> None:
    c = Collection()
    job = admitted(1)
    c.put(job)
    assert c.batcher.collect(c.take(), device_busy=True) == [job]
    assert c.clock.getDelayedCalls() == []


def test_no_waiting_while_another_device_idles_on_the_queue() -> None:
    c = Collection()
    job = admitted(1)
    c.put(job)
    c.take()
    other_device = c.queue.wait()  # another worker waits on the (now empty) queue
    assert c.queue.idle_workers == 1
    assert c.batcher.collect(job, device_busy=False) == [job]
    for wait in other_device:
        wait.addErrback(lambda f: None)
        wait.cancel()
    # With nobody idling, the same job is held for the delay.
    assert c.batcher.collect(job, device_busy=False) is None
    c.batcher.cancel()


def test_cancel_stops_the_timer_and_returns_the_held_jobs() -> None:
    c = Collection()
    job = admitted(1)
    c.put(job)
    c.batcher.collect(c.take(), device_busy=False)
    assert c.batcher.cancel() == [job]
    assert c.clock.getDelayedCalls() == [] and not c.batcher.collecting
    c.clock.advance(1)
    assert c.collected == []


# -- in the device thread ----------------------------------------------------------


def test_execute_stacks_the_batch_runs_once_and_splits_the_answers() -> None:
    device = BreakableDevice(tiny_engine())
    xs = [rows(n, seed=n) for n in (1, 2, 3)]
    jobs = [tiny_job(x) for x in xs]
    for job in jobs:
        BatchPolicy(max_batch_size=8).admit(job)  # as the dispatcher does: rows and key
    results = execute(device, jobs, "cpu")
    assert device.calls == 1
    for x, result in zip(xs, results):
        assert isinstance(result, InferResult)
        np.testing.assert_allclose(result.outputs["y"], builtin.tiny_reference(x)["y"], atol=1e-5)
        np.testing.assert_array_equal(result.outputs["label"], builtin.tiny_reference(x)["label"])
        assert (result.batch_size, result.batch_requests) == (6, 3)
        assert (result.model, result.device) == ("tiny", "cpu")
        assert isinstance(result.outputs["y"].base, bytes)  # its own bytes, not a view


def test_execute_skips_a_job_cancelled_before_the_thread_reached_it() -> None:
    jobs = [tiny_job(rows(n)) for n in (1, 2, 3)]
    for job in jobs:
        BatchPolicy(max_batch_size=8).admit(job)
    jobs[1].deferred.addErrback(lambda f: None)
    jobs[1].deferred.cancel()
    first, skipped, last = execute(tiny_engine(), jobs, "cpu")
    assert skipped is SKIPPED
    assert first.batch_size == last.batch_size == 4 and first.batch_requests == 2


def test_a_model_whose_outputs_do_not_follow_the_batch_cannot_be_batched() -> None:
    x = ops.parameter(ov.PartialShape([-1, 4]), ov.Type.f32, name="x")
    x.output(0).get_tensor().set_names({"x"})
    total = ops.reduce_sum(x, ops.constant(np.array([0])), keep_dims=False)  # [4]
    total.output(0).get_tensor().set_names({"total"})
    model = ov.Model([total.output(0)], [x], "sum")
    engine = OpenVINOEngine(ov.Core().compile_model(model, "CPU"), Signature.of(model))
    [alone] = run_batch(engine, [{"x": rows(2)}], [2], ())
    np.testing.assert_allclose(alone["total"], rows(2).sum(axis=0), atol=1e-5)
    with pytest.raises(ValueError, match="cannot be batched"):
        run_batch(engine, [{"x": rows(2)}, {"x": rows(1)}], [2, 1], ())
