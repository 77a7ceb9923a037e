"""The device Worker in memory: its pipeline, health and drain, under a Clock.

The worker's thread is a :class:`HandRunner` (the test runs what the worker
handed to its thread, when it chooses) and its timers run on
``twisted.internet.task.Clock``; the engines are the real ``tiny`` model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from scheduling_support import BreakableDevice, HandRunner, outcome, rows, tiny_engine, tiny_job
from twinfer.engines import builtin
from twinfer.engines.openvino import Engine
from twinfer.errors import ErrorCode, TwinferError
from twinfer.scheduling import (
    PIPELINE_DEPTH,
    BatchPolicy,
    DeviceError,
    InferResult,
    Job,
    JobQueue,
    Worker,
    WorkerState,
)


def make_worker(
    engine: Engine, queue: JobQueue, clock: Clock, runner: HandRunner, **options: Any
) -> Worker:
    return Worker("cpu#0", "cpu", {"tiny": engine}, [queue], clock=clock, runner=runner, **options)


def error_code(box: list[Any]) -> int:
    [failure] = box
    assert isinstance(failure, Failure) and failure.check(TwinferError), failure
    return int(failure.value.code)  # type: ignore[union-attr]


class PipelineTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = HandRunner()
        self.queue = JobQueue("tiny", size=10)

    def test_the_thread_holds_two_jobs_and_takes_the_next_as_one_finishes(self) -> None:
        xs = [rows(1 + i, seed=i) for i in range(5)]
        jobs = [tiny_job(x) for x in xs]
        results = [outcome(job.deferred) for job in jobs]
        for job in jobs:
            self.queue.put(job)
        worker = make_worker(tiny_engine(), self.queue, self.clock, self.runner)
        worker.start()
        assert self.runner.handed == PIPELINE_DEPTH == 2
        assert worker.jobs() == jobs[:2] and self.queue.depth == 3 and worker.busy

        self.runner.run_next()
        [first] = results[0]
        assert isinstance(first, InferResult)
        np.testing.assert_allclose(
            first.outputs["y"], builtin.tiny_reference(xs[0])["y"], atol=1e-5
        )
        assert (first.model, first.device, first.batch_size, first.batch_requests) == (
            "tiny",
            "cpu",
            1,
            1,
        )
        # The finished job's place in the thread went to the next one at once.
        assert self.runner.handed == 2 and worker.jobs() == jobs[1:3] and self.queue.depth == 2

        while self.runner.handed:
            self.runner.run_next()
        for x, box in zip(xs, results):
            [result] = box
            np.testing.assert_allclose(
                result.outputs["y"], builtin.tiny_reference(x)["y"], atol=1e-5
            )
            assert result.batch_size == len(x)
        assert worker.jobs_done == worker.batches_run == 5 and not worker.busy

    def test_a_new_job_goes_to_an_idle_worker_before_a_busy_one(self) -> None:
        busy = make_worker(tiny_engine(), self.queue, self.clock, self.runner)
        idle_runner = HandRunner()
        idle = Worker(
            "cpu#1",
            "cpu",
            {"tiny": tiny_engine()},
            [self.queue],
            clock=self.clock,
            runner=idle_runner,
        )
        busy.start()
        self.queue.put(tiny_job(rows(1)))  # the only idle worker takes it at once
        assert self.runner.handed == 1 and self.queue.depth == 0
        idle.start()
        self.queue.put(tiny_job(rows(1)))
        # ``busy`` has room in its pipeline, but only an idle worker waits on the queue.
        assert self.runner.handed == 1 and idle_runner.handed == 1

    def test_a_worker_woken_by_one_queue_withdraws_from_the_others_without_failures(
        self,
    ) -> None:
        other = JobQueue("tiny2", size=10)
        worker = Worker(
            "cpu#0",
            "cpu",
            {"tiny": tiny_engine(), "tiny2": tiny_engine()},
            [self.queue, other],
            clock=self.clock,
            runner=self.runner,
        )
        waits_there: list[Any] = []
        wait = other.wait
        self.patch(other, "wait", lambda: waits_there.extend(wait()) or waits_there[-1:])
        worker.start()
        assert self.queue.idle_workers == other.idle_workers == 1
        [wait_there] = waits_there
        self.queue.put(tiny_job(rows(1)))
        assert self.runner.handed == 1 and other.idle_workers == 0
        # The other queue's wait was taken back, not cancelled: never fired.
        assert not wait_there.called
        other.put(tiny_job(rows(1), model="tiny2"))
        assert other.depth == 1 and self.runner.handed == 1  # queued: nobody waits there
        while self.runner.handed:
            self.runner.run_next()
        assert worker.jobs_done == 2 and other.depth == 0

    def test_a_job_cancelled_while_it_waits_in_the_thread_never_runs(self) -> None:
        device = BreakableDevice(tiny_engine())
        first, second = tiny_job(rows(1)), tiny_job(rows(2))
        ran, dropped = outcome(first.deferred), outcome(second.deferred)
        self.queue.put(first)
        self.queue.put(second)
        worker = make_worker(device, self.queue, self.clock, self.runner)
        worker.start()
        assert self.runner.handed == 2
        second.deferred.cancel()
        self.runner.run_next()
        self.runner.run_next()
        assert device.calls == 1 and worker.jobs_done == 1
        assert isinstance(ran[0], InferResult)
        assert isinstance(dropped[0], Failure) and dropped[0].check(CancelledError)


class HealthTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = HandRunner()
        self.queue = JobQueue("tiny", size=10)
        self.device = BreakableDevice(tiny_engine())
        self.failed: list[tuple[Job, str]] = []
        self.states: list[WorkerState] = []

    def worker(self, **options: Any) -> Worker:
        worker = make_worker(self.device, self.queue, self.clock, self.runner, **options)
        worker.on_job_failed = lambda job, w, message: self.failed.append((job, message))
        worker.on_state_changed = lambda w: self.states.append(w.state)
        worker.start()
        return worker

    def test_a_device_error_fails_the_worker_and_a_passing_probe_brings_it_back(self) -> None:
        worker = self.worker(probe_interval=5.0)
        self.device.break_down()
        broken = tiny_job(rows(1))
        self.queue.put(broken)
        self.runner.run_next()
        assert worker.state is WorkerState.FAILED and not worker.available
        assert worker.failure_reason == "device stopped answering"
        assert self.failed == [(broken, "device stopped answering")]  # the dispatcher decides
        assert (worker.jobs_done, worker.jobs_failed) == (0, 1)

        waiting = tiny_job(rows(3))
        answer = outcome(waiting.deferred)
        self.queue.put(waiting)
        assert self.runner.handed == 0 and self.queue.depth == 1  # a failed worker takes none

        self.clock.advance(5.0)  # the probe is handed to the device thread
        assert self.runner.handed == 1
        self.runner.run_next()  # ... and fails: the device is still broken
        assert worker.state is WorkerState.FAILED

        self.device.repair()
        self.clock.advance(5.0)
        self.runner.run_next()  # the probe passes
        assert worker.state is WorkerState.READY and self.states == [
            WorkerState.FAILED,
            WorkerState.READY,
        ]
        assert self.runner.handed == 1 and self.queue.depth == 0  # back at work at once
        self.runner.run_next()
        assert isinstance(answer[0], InferResult) and answer[0].batch_size == 3
        self.flushLoggedErrors(DeviceError)

    def test_a_probe_that_comes_due_while_the_device_is_busy_waits_for_an_idle_one(self) -> None:
        self.queue.put(tiny_job(rows(1)))
        worker = self.worker(probe_interval=1.0)
        assert self.runner.handed == 1
        self.clock.advance(1.0)
        assert self.runner.handed == 1  # no probe behind a job: the job is the probe
        self.runner.run_next()
        self.clock.advance(1.0)
        assert self.runner.handed == 1  # idle now: probed
        self.runner.run_next()
        assert worker.state is WorkerState.READY and self.states == []

    def test_max_failures_in_a_row_fail_the_worker_and_a_success_resets_the_count(self) -> None:
        worker = self.worker(max_failures=2)
        for i in range(4):
            self.queue.put(tiny_job(rows(1, seed=i)))
        self.device.break_down(RuntimeError("flaky"))
        self.runner.run_next()  # 1st fails
        self.device.repair()
        self.runner.run_next()  # 2nd passes: the count starts again
        self.device.break_down(RuntimeError("flaky"))
        self.runner.run_next()  # 3rd fails: one in a row
        assert worker.state is WorkerState.READY and worker.consecutive_failures == 1
        self.runner.run_next()  # 4th fails: two in a row
        assert worker.state is WorkerState.FAILED and worker.failure_reason == "flaky"
        assert [message for _, message in self.failed] == ["flaky"] * 3
        assert len(self.flushLoggedErrors(RuntimeError)) == 3

    def test_a_drained_worker_finishes_what_it_holds_and_takes_nothing_new(self) -> None:
        jobs = [tiny_job(rows(1, seed=i)) for i in range(3)]
        results = [outcome(job.deferred) for job in jobs]
        for job in jobs:
            self.queue.put(job)
        worker = self.worker(probe_interval=1.0)
        worker.pause()
        assert worker.paused and worker.state is WorkerState.DRAINED
        assert self.runner.handed == 2  # already handed to the thread: they finish
        self.runner.run_next()
        self.runner.run_next()
        assert [len(box) for box in results] == [1, 1, 0]
        assert not worker.busy and self.queue.depth == 1 and self.runner.handed == 0
        self.clock.advance(1.0)
        assert self.runner.handed == 0  # nor is a drained device probed
        worker.resume()
        assert worker.state is WorkerState.READY and self.runner.handed == 1
        self.runner.run_next()
        assert isinstance(results[2][0], InferResult)


class BatchCollectionTests(unittest.TestCase):
    """The worker and its Batcher: holding an idle device for a batch."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = HandRunner()
        self.queue = JobQueue("tiny", size=10)
        self.policy = BatchPolicy(max_batch_size=8, max_queue_delay=0.01)
        self.worker = make_worker(
            tiny_engine(), self.queue, self.clock, self.runner, batching={"tiny": self.policy}
        )
        self.worker.start()

    def submit(self, n: int, seed: int = 0) -> list[Any]:
        job = tiny_job(rows(n, seed))
        self.policy.admit(job)
        box = outcome(job.deferred)
        self.queue.put(job)
        return box

    def test_an_idle_worker_holds_its_device_for_the_delay_then_runs_one_inference(self) -> None:
        first = self.submit(1)
        assert self.runner.handed == 0 and self.worker.busy and len(self.worker.jobs()) == 1
        second = self.submit(2, seed=1)  # arrives during the delay: waits in the queue
        assert self.queue.depth == 1
        self.clock.advance(0.01)
        assert self.runner.handed == 1 and self.queue.depth == 0
        self.runner.run_next()
        for box in (first, second):
            [result] = box
            assert (result.batch_size, result.batch_requests) == (3, 2)
        assert self.worker.batches_run == 1 and self.worker.jobs_done == 2

    def test_a_worker_drained_during_the_delay_gives_the_batch_back(self) -> None:
        self.submit(1)
        self.worker.pause()
        self.clock.advance(0.01)
        assert self.runner.handed == 0 and self.queue.depth == 1 and not self.worker.busy

    def test_stopping_answers_a_batch_being_collected_and_cancels_every_timer(self) -> None:
        box = self.submit(1)
        self.worker.stop()
        assert error_code(box) == ErrorCode.UNAVAILABLE
        assert self.clock.getDelayedCalls() == [] and not self.worker.alive
