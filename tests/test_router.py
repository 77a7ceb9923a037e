"""The Dispatcher in memory: queue choice, failover, UNAVAILABLE, deadlines, its public reads.

Two devices, ``a`` and ``b``, each one real Worker whose thread is a
:class:`HandRunner`, all timed by a ``Clock``; the engines are the real
``tiny`` model behind :class:`BreakableDevice`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from scheduling_support import (
    BreakableDevice,
    HandRunner,
    outcome,
    rows,
    tiny_engine,
    tiny_signature,
)
from twinfer.errors import ErrorCode, TwinferError
from twinfer.scheduling import (
    BatchPolicy,
    DeviceError,
    Dispatcher,
    InferResult,
    JobQueue,
    ModelEntry,
    Worker,
    WorkerState,
)

DEVICES = ("a", "b")


class TwoDevices(unittest.TestCase):
    """A model served by devices ``a`` and ``b`` from a shared queue (or per-device ones)."""

    per_device = False
    batching: BatchPolicy | None = None

    def setUp(self) -> None:
        self.clock = Clock()
        if self.per_device:
            self.queues = {d: JobQueue(f"tiny@{d}", size=50) for d in DEVICES}
        else:
            shared = JobQueue("tiny", size=50)
            self.queues = dict.fromkeys(DEVICES, shared)
        self.entry = ModelEntry(
            "tiny",
            tiny_signature(),
            DEVICES,
            tuple(dict.fromkeys(self.queues.values())),
            batching=self.batching,
        )
        self.devices = {d: BreakableDevice(tiny_engine()) for d in DEVICES}
        self.runners = {d: HandRunner() for d in DEVICES}
        self.workers = {
            d: Worker(
                f"{d}#0",
                d,
                {"tiny": self.devices[d]},
                [self.queues[d]],
                clock=self.clock,
                runner=self.runners[d],
                batching={"tiny": self.batching} if self.batching else None,
            )
            for d in DEVICES
        }
        self.dispatcher = Dispatcher({"tiny": self.entry}, list(self.workers.values()), self.clock)
        self.dispatcher.start()
        self.addCleanup(self.dispatcher.stop)

    def submit(self, n: int = 1, **options: Any) -> list[Any]:
        return outcome(self.dispatcher.submit("tiny", {"x": rows(n)}, **options))

    def handed(self) -> dict[str, int]:
        return {d: runner.handed for d, runner in self.runners.items()}

    def run_all(self) -> None:
        while any(self.handed().values()):
            for runner in self.runners.values():
                if runner.handed:
                    runner.run_next()


def code(box: list[Any]) -> int:
    [failure] = box
    assert isinstance(failure, Failure) and failure.check(TwinferError), failure
    return int(failure.value.code)  # type: ignore[union-attr]


def device_of(box: list[Any]) -> str:
    [result] = box
    assert isinstance(result, InferResult), result
    return result.device


class SharedQueueTests(TwoDevices):
    def test_idle_devices_take_jobs_in_turn_and_the_rest_wait_in_the_queue(self) -> None:
        boxes = [self.submit() for _ in range(5)]
        assert self.handed() == {"a": 1, "b": 1}  # each idle device took one
        assert self.queues["a"].depth == 3
        self.run_all()
        assert all(isinstance(box[0], InferResult) for box in boxes)
        assert {device_of(box) for box in boxes} == {"a", "b"}

    def test_a_job_that_fails_on_one_device_is_retried_on_another(self) -> None:
        self.devices["a"].break_down()
        box = self.submit(3)
        self.runners["a"].run_next()
        assert self.workers["a"].state is WorkerState.FAILED
        assert self.handed() == {"a": 0, "b": 1}  # the retry went to b at once
        self.runners["b"].run_next()
        assert device_of(box) == "b" and box[0].batch_size == 3
        assert self.dispatcher.counters.retried == 1
        assert self.dispatcher.counters.device_failures == 1
        self.flushLoggedErrors(DeviceError)

    def test_with_no_healthy_device_left_requests_are_answered_unavailable(self) -> None:
        for device in self.devices.values():
            device.break_down()
        first, second, queued = self.submit(), self.submit(), self.submit()
        self.runners["a"].run_next()  # a fails: ``first`` is queued again for b
        assert self.queues["a"].depth == 2
        self.runners["b"].run_next()  # b fails too: nobody is left for the queue
        assert code(second) == ErrorCode.INFERENCE_FAILED  # its device failed, none to retry
        assert code(first) == code(queued) == ErrorCode.UNAVAILABLE
        assert self.queues["a"].depth == 0
        with self.assertRaises(TwinferError) as e:
            self.dispatcher.submit("tiny", {"x": rows(1)})
        assert e.exception.code == ErrorCode.UNAVAILABLE
        assert "no healthy device serves model 'tiny'" in e.exception.message
        assert "a#0 failed (device stopped answering)" in e.exception.message
        assert not self.dispatcher.model_ready("tiny")
        self.flushLoggedErrors(DeviceError)

    def test_a_request_that_waits_past_its_deadline_is_answered_so(self) -> None:
        self.submit(), self.submit()  # both devices busy
        late = self.submit(timeout_ms=50)
        self.clock.advance(0.04)
        assert late == []
        self.clock.advance(0.01)
        assert code(late) == ErrorCode.DEADLINE_EXCEEDED
        assert self.queues["a"].depth == 0 and self.dispatcher.counters.deadline_exceeded == 1

    def test_a_job_handed_straight_to_an_idle_device_arms_no_deadline_timer(self) -> None:
        self.submit(timeout_ms=50)  # device a was idle: it runs at once
        assert self.clock.getDelayedCalls() == []
        self.submit(timeout_ms=50)  # so does b
        assert self.clock.getDelayedCalls() == []
        late = self.submit(timeout_ms=50)  # this one waits: its deadline is armed
        assert [call.getTime() for call in self.clock.getDelayedCalls()] == [0.05]
        self.run_all()
        assert isinstance(late[0], InferResult) and self.clock.getDelayedCalls() == []

    def test_public_reads(self) -> None:
        d = self.dispatcher
        assert d.model("tiny") is self.entry and d.model("nope") is None
        assert d.model_names() == ["tiny"] and d.entries() == [self.entry]
        assert d.model_queues() == [("tiny", self.queues["a"])]
        assert d.workers_on("b") == [self.workers["b"]] and d.workers_on("c") == []
        boxes = [self.submit() for _ in range(3)]
        running = self.workers["a"].jobs() + self.workers["b"].jobs()
        assert len(d.pending_jobs()) == 3
        assert set(map(id, running)) < set(map(id, d.pending_jobs()))
        self.run_all()
        assert d.pending_jobs() == [] and all(len(box) == 1 for box in boxes)

    def test_stop_accepting_and_uninstall(self) -> None:
        queued = [self.submit() for _ in range(3)]
        self.dispatcher.stop_accepting()
        assert not self.dispatcher.started
        with self.assertRaises(TwinferError) as e:
            self.dispatcher.submit("tiny", {"x": rows(1)})
        assert e.exception.code == ErrorCode.UNAVAILABLE and "not running" in e.exception.message
        self.run_all()  # what was accepted is still answered
        assert all(isinstance(box[0], InferResult) for box in queued)
        assert self.dispatcher.uninstall("tiny") is self.entry
        assert self.dispatcher.uninstall("tiny") is None
        with self.assertRaises(TwinferError) as e:
            self.dispatcher.submit("tiny", {"x": rows(1)})
        assert e.exception.code == ErrorCode.UNKNOWN_MODEL


class PerDeviceQueueTests(TwoDevices):
    per_device = True

    def test_a_request_goes_to_the_shortest_queue_with_a_healthy_device(self) -> None:
        self.submit()
        self.submit()
        # Equal depths: the first queue.  a's device is busy, so the second waits there.
        assert self.handed() == {"a": 1, "b": 0} and self.queues["a"].depth == 1
        self.submit()  # b's queue is the shorter now
        assert self.handed() == {"a": 1, "b": 1} and self.queues["b"].depth == 0

    def test_jobs_queued_for_a_failed_device_move_to_another_devices_queue(self) -> None:
        self.workers["b"].pause()
        boxes = [self.submit() for _ in range(4)]  # all to a: b's queue is not ready
        assert self.handed() == {"a": 1, "b": 0} and self.queues["a"].depth == 3
        self.workers["b"].resume()
        self.devices["a"].break_down()
        self.runners["a"].run_next()
        # a failed: its queued jobs moved to b's queue, the failed one is retried there.
        assert self.workers["a"].state is WorkerState.FAILED
        assert self.queues["a"].depth == 0 and self.dispatcher.counters.retried == 1
        self.run_all()
        assert [device_of(box) for box in boxes] == ["b"] * 4
        self.flushLoggedErrors(DeviceError)


class BatchingRouteTests(TwoDevices):
    batching = BatchPolicy(max_batch_size=4, max_queue_delay=0.01)

    def test_requests_are_admitted_by_the_batch_policy_and_collected_jobs_are_pending(self) -> None:
        with self.assertRaises(TwinferError) as e:
            self.dispatcher.submit("tiny", {"x": rows(5)})
        assert e.exception.code == ErrorCode.INVALID_SHAPE
        self.workers["b"].pause()
        box = self.submit(2)
        # a holds its idle device for the delay: the job is neither queued nor running.
        assert self.handed() == {"a": 0, "b": 0} and self.queues["a"].depth == 0
        assert len(self.dispatcher.pending_jobs()) == 1
        self.submit(2)
        self.clock.advance(0.01)
        self.run_all()
        assert (box[0].batch_size, box[0].batch_requests) == (4, 2)
