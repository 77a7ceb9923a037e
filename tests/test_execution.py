"""The adaptive execution policy in memory: which engine a device runs, per job.

A device here is two (or one) :class:`Worker` replicas sharing one
:class:`ExecutionPolicy`, each with a throughput and a latency engine, their
threads :class:`HandRunner` s and their timers a ``Clock``.

The engines are stand-ins, not OpenVINO, on purpose: what is tested is
*when* each engine holds the device, and a stand-in lets the test end each
"inference" when it chooses and see, at every step, which engines the
replicas' threads hold: concurrency observed deterministically.  (That both
real engines compute the same outputs is tested in ``test_tuning.py``.)
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from scheduling_support import HandRunner, outcome
from twinfer.frontends.console.commands import describe_engines
from twinfer.scheduling import (
    PIPELINE_DEPTH,
    DeviceError,
    ExecutionPolicy,
    InferResult,
    Job,
    JobQueue,
    Mode,
    Worker,
    WorkerState,
)


class StandInEngine:
    """A stand-in compiled engine: answers ``y = 2x`` and says which engine it is."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.calls = 0
        self.error: Exception | None = None

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return {"y": inputs["x"] * 2}

    def probe(self) -> None:
        if self.error is not None:
            raise self.error


class Device:
    """``replicas`` workers of one device sharing one execution policy."""

    def __init__(
        self,
        replicas: int = 2,
        *,
        hold: float = 0.5,
        enter_waiting: int = 2,
        adaptive: bool = True,
        **options: Any,
    ) -> None:
        self.clock = Clock()
        self.queue = JobQueue("m", size=1000)
        self.policy = ExecutionPolicy("cpu", self.clock, enter_waiting=enter_waiting, hold=hold)
        self.runners = [HandRunner() for _ in range(replicas)]
        self.throughput = [StandInEngine("throughput") for _ in range(replicas)]
        self.latency = [StandInEngine("latency") for _ in range(replicas)]
        self.workers = [
            Worker(
                f"cpu#{i}",
                "cpu",
                {"m": self.throughput[i]},
                [self.queue],
                clock=self.clock,
                runner=runner,
                policy=self.policy,
                latency_engines={"m": self.latency[i]} if adaptive else None,
                **options,
            )
            for i, runner in enumerate(self.runners)
        ]
        self.results: list[list[Any]] = []
        #: Every kind of engine seen in the threads at once, after each step.
        self.seen: list[set[str]] = []

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self.check()

    def submit(self, n: int = 1) -> list[list[Any]]:
        boxes = []
        for _ in range(n):
            value = np.full((1, 4), float(len(self.results)), np.float32)
            job = Job("m", {"x": value}, (), 0.0)
            boxes.append(outcome(job.deferred))
            self.queue.put(job)
            self.results.append(boxes[-1])
            self.check()
        return boxes

    def held(self) -> list[tuple[int, str]]:
        """(replica, engine kind) of every call handed to a thread, not yet run."""
        held = []
        for i, runner in enumerate(self.runners):
            for f, args, _ in runner.pending:
                engine = getattr(f, "__self__", None) or args[0]
                held.append((i, engine.kind))
        return held

    def kinds(self) -> set[str]:
        return {kind for _, kind in self.held()}

    def check(self) -> None:
        """The policy's promise: the threads never hold both engines at once."""
        kinds = self.kinds()
        self.seen.append(kinds)
        assert len(kinds) <= 1, f"both engines at once: {self.held()}"
        for runner in self.runners:
            assert runner.handed <= PIPELINE_DEPTH

    def finish(self, replica: int | None = None) -> None:
        """Run the oldest call of ``replica`` (default: the first replica holding one)."""
        if replica is None:
            replica = next(i for i, r in enumerate(self.runners) if r.handed)
        self.runners[replica].run_next()
        self.check()

    def finish_all(self) -> None:
        """Run everything handed to the threads, the replicas in turn."""
        while any(r.handed for r in self.runners):
            for i, runner in enumerate(self.runners):
                if runner.handed:
                    self.finish(i)


def answered(box: list[Any]) -> InferResult:
    [result] = box
    assert isinstance(result, InferResult), result
    return result


class IdleDeviceTests(unittest.TestCase):
    def test_one_user_gets_the_latency_engine_of_one_replica(self) -> None:
        device = Device()
        device.start()
        for i in range(5):
            [box] = device.submit()
            assert device.held() == [(0, "latency")]
            device.finish()
            np.testing.assert_array_equal(answered(box).outputs["y"], np.full((1, 4), 2.0 * i))
            device.clock.advance(0.01)
        assert device.latency[0].calls == 5
        assert device.throughput[0].calls == device.throughput[1].calls == 0
        assert device.latency[1].calls == 0 and device.runners[1].handed == 0
        assert device.policy.mode is Mode.LATENCY and device.policy.switches == 0

    def test_two_users_stay_on_the_latency_engine(self) -> None:
        device = Device()
        device.start()
        device.submit(2)  # one on the device; the other waits in the queue
        assert device.held() == [(0, "latency")] and device.queue.depth == 1
        for _ in range(10):
            device.finish()  # the waiting one starts; the user's next arrives
            device.submit()
            assert device.held() == [(0, "latency")] and device.queue.depth == 1
        assert device.policy.switches == 0

    def test_the_latency_engine_pipelines_jobs_that_wait(self) -> None:
        device = Device()
        device.start()
        device.submit(3)  # a third user: one job more waiting than two users make
        device.finish()
        # The leader's thread holds the next job and the one behind it.
        assert device.held() == [(0, "latency"), (0, "latency")]
        assert device.policy.mode is Mode.LATENCY

    def test_a_device_without_latency_engines_runs_every_replica_on_throughput(self) -> None:
        device = Device(adaptive=False)
        device.start()
        device.submit(2)
        assert device.held() == [(0, "throughput"), (1, "throughput")]
        assert device.policy.mode is Mode.THROUGHPUT and device.policy.switches == 0


class QueueingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.device = Device()
        self.device.start()

    def burst(self, n: int = 10) -> list[list[Any]]:
        """``n`` jobs at once: the first runs on the latency engine, then the
        streams take the rest once it has finished."""
        device = self.device
        boxes = device.submit(n)
        # The burst waits behind the latency job: nothing starts beside it.
        assert device.held() == [(0, "latency")] and device.queue.depth == n - 1
        device.finish()  # seen as the job finishes: the streams take over at once
        assert device.policy.mode is Mode.THROUGHPUT
        # Every replica's thread now holds a pipeline of throughput jobs.
        assert sorted(device.held()) == [(0, "throughput")] * 2 + [(1, "throughput")] * 2
        device.finish_all()
        for box in boxes:
            answered(box)
        return boxes

    def test_a_burst_switches_to_the_streams_once_not_per_job(self) -> None:
        self.burst()
        assert self.device.policy.switches == 1
        assert self.device.throughput[0].calls + self.device.throughput[1].calls == 9
        assert self.device.throughput[1].calls >= 4  # both streams worked

    def test_a_switch_waits_for_the_pipelined_latency_job_and_the_console_shows_it(
        self,
    ) -> None:
        device = self.device
        assert [describe_engines(w) for w in device.workers] == ["latency", "standby"]
        device.submit(3)
        device.finish()  # two waited: the leader pipelines both, still on latency
        assert device.held() == [(0, "latency")] * 2
        device.submit(2)
        device.finish()  # two wait behind the running one: switch, once it is done
        assert device.held() == [(0, "latency")] and device.queue.depth == 2
        shown = [describe_engines(w) for w in device.workers]
        assert shown == ["latency->throughput", "standby->throughput"]
        device.finish()
        assert device.held() == [(0, "throughput"), (1, "throughput")]
        assert [describe_engines(w) for w in device.workers] == ["throughput"] * 2

    def test_back_to_latency_only_after_the_hold_time_of_light_load(self) -> None:
        device = self.device
        self.burst()
        device.clock.advance(0.3)  # light load for 0.3 s: still the streams
        device.submit()
        assert device.kinds() == {"throughput"}
        device.finish()
        device.clock.advance(0.3)  # 0.6 s > hold
        device.submit()
        assert device.held() == [(0, "latency")]
        device.finish()
        assert device.policy.switches == 2

    def test_sustained_load_keeps_the_streams_past_the_hold_time(self) -> None:
        device = self.device
        self.burst()
        device.submit(2)  # two users now, each with a request in flight
        for _ in range(40):
            device.clock.advance(0.1)
            device.finish(next(i for i, r in enumerate(device.runners) if r.handed))
            device.submit()  # that user's next request
            assert device.kinds() == {"throughput"}
        assert device.policy.switches == 1

    def test_a_new_burst_during_the_hold_time_restarts_it(self) -> None:
        device = self.device
        self.burst()
        device.clock.advance(0.4)
        device.submit(4)
        device.finish_all()
        device.clock.advance(0.4)  # 0.8 s since the first burst, 0.4 s since the second
        device.submit()
        assert device.kinds() == {"throughput"}
        device.finish()
        assert device.policy.switches == 1


class ReplicaStateTests(unittest.TestCase):
    def test_a_non_thread_safe_device_keeps_its_one_thread_in_both_modes(self) -> None:
        device = Device(replicas=1)
        device.start()
        [worker] = device.workers
        device.submit()
        assert device.held() == [(0, "latency")]
        device.submit(4)  # a burst: the single thread switches engines, not threads
        device.finish()
        assert device.policy.mode is Mode.THROUGHPUT
        assert device.held() == [(0, "throughput")] * PIPELINE_DEPTH
        device.finish_all()
        assert worker.jobs_done == 5 and device.throughput[0].calls == 4
        assert len(device.runners) == 1 and device.policy.leader() is worker

    def test_a_drained_leader_hands_latency_mode_to_the_next_replica(self) -> None:
        device = Device()
        device.start()
        device.workers[0].pause()
        device.submit()
        assert device.held() == [(1, "latency")]
        device.finish()
        device.workers[0].resume()
        device.submit()
        assert device.held() == [(0, "latency")]

    def test_a_failed_leader_is_replaced_and_comes_back_after_its_probe(self) -> None:
        device = Device(probe_interval=5.0)
        device.start()
        device.latency[0].error = DeviceError("device lost")
        [box] = device.submit()
        device.finish()
        [failure] = box
        assert isinstance(failure, Failure)
        assert device.workers[0].state is WorkerState.FAILED
        device.submit()
        assert device.held() == [(1, "latency")]
        device.finish()
        device.latency[0].error = None
        device.clock.advance(5.0)  # the failed replica probes (its latency engine)
        assert (0, "latency") in device.held()
        device.finish(0)
        assert device.workers[0].state is WorkerState.READY
        device.finish_all()  # the other replica's own probe
        device.submit()
        assert device.held() == [(0, "latency")]
        assert len(self.flushLoggedErrors(DeviceError)) == 1

    def test_idle_replicas_in_latency_mode_do_not_probe_beside_the_leader(self) -> None:
        device = Device(probe_interval=1.0)
        device.start()
        device.submit()
        device.clock.advance(1.0)  # the leader is busy; the other may not probe
        assert device.held() == [(0, "latency")]

    def test_dropping_and_restoring_the_latency_engines(self) -> None:
        device = Device()
        device.start()
        for worker in device.workers:
            worker.reconfigure({}, latency_engines={"m": None})
        device.submit(2)
        assert device.held() == [(0, "throughput"), (1, "throughput")]
        device.finish_all()
        for worker, engine in zip(device.workers, device.latency):
            worker.reconfigure({}, latency_engines={"m": engine})
        device.clock.advance(1.0)
        device.submit()
        assert device.held() == [(0, "latency")]

    def test_a_stopped_worker_leaves_the_policy(self) -> None:
        device = Device()
        device.start()
        device.workers[0].stop()
        assert device.policy.workers == [device.workers[1]]
        device.submit()
        assert device.held() == [(1, "latency")]


class RandomLoadTests(unittest.TestCase):
    def test_never_both_engines_at_once_under_random_load(self) -> None:
        """Random arrivals, completions, drains and clock steps: at every step
        the threads hold one kind of engine, and every job is answered."""
        rng = random.Random(7)
        device = Device(replicas=2, hold=0.2)
        device.start()
        for step in range(1500):
            action = rng.random()
            heavy = (step // 150) % 2  # phases of bursts, then of one user
            if action < 0.2 and heavy:
                device.submit(rng.choice((1, 2, 4)))
            elif action < 0.35:
                if not device.held() and not device.queue.depth:
                    device.submit()
            elif action < 0.8:
                busy = [i for i, r in enumerate(device.runners) if r.handed]
                if busy:
                    device.finish(rng.choice(busy))
            elif action < 0.83:
                worker = rng.choice(device.workers)
                worker.resume() if worker.paused else worker.pause()
                device.check()
            else:
                device.clock.advance(rng.choice((0.01, 0.05, 0.3)))
                device.check()
        for worker in device.workers:
            worker.resume()
        device.finish_all()
        device.clock.advance(1.0)
        device.finish_all()
        assert all(len(box) == 1 for box in device.results)
        assert all(isinstance(box[0], InferResult) for box in device.results)
        # Both modes were exercised, and switched far fewer times than jobs ran.
        assert {"latency"} in device.seen and {"throughput"} in device.seen
        assert 4 <= device.policy.switches <= len(device.results) / 10
