"""JobQueue: bound, FIFO, strict priority with aging, batch selection, watermarks."""

from __future__ import annotations

import numpy as np
import pytest

from twinfer.errors import ErrorCode, TwinferError
from twinfer.scheduling.batcher import batch_key
from twinfer.scheduling.queueing import Job, JobQueue


class FakeClock:
    """A hand-set monotonic clock (the queue's aging reads it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def job(name: str, level: int = 0, at: float = 1000.0, rows: int = 1, key: object = None) -> Job:
    return Job(name, {}, (), at, level=level, rows=rows, batch_key=key)


def names(queue: JobQueue) -> list[str]:
    out = []
    while (taken := queue.take()) is not None:
        out.append(taken.model)
    return out


def test_a_full_queue_refuses_at_once_and_says_which() -> None:
    queue = JobQueue("m", size=2)
    queue.put(job("a"))
    queue.put(job("b"))
    with pytest.raises(TwinferError) as e:
        queue.put(job("c"))
    assert (
        e.value.code is ErrorCode.OVERLOADED and "'m' is full (2 jobs waiting)" in e.value.message
    )
    assert queue.depth == 2


def test_fifo_within_a_level() -> None:
    queue = JobQueue("m", size=10)
    for n in "abcd":
        queue.put(job(n))
    assert names(queue) == list("abcd") and queue.depth == 0


def test_higher_levels_are_taken_first() -> None:
    clock = FakeClock()
    queue = JobQueue("m", size=10, levels=3, aging=0.1, clock=clock)
    for n, level in [("low1", 0), ("mid1", 1), ("high1", 2), ("low2", 0), ("high2", 2)]:
        queue.put(job(n, level, at=clock.now))
    assert names(queue) == ["high1", "high2", "mid1", "low1", "low2"]


def test_aging_lets_a_starved_low_level_job_through() -> None:
    clock = FakeClock()
    queue = JobQueue("m", size=100, levels=2, aging=0.1, clock=clock)
    queue.put(job("old-low", 0, at=clock.now))
    order = []
    for i in range(5):
        clock.now += 0.03
        queue.put(job(f"high{i}", 1, at=clock.now))
        taken = queue.take()
        assert taken is not None
        order.append(taken.model)
    # Strict priority for the first 0.1 s, then the waiting low job goes first.
    assert order == ["high0", "high1", "high2", "old-low", "high3"]


def test_take_compatible_takes_matching_jobs_up_to_the_row_limit() -> None:
    queue = JobQueue("m", size=10, levels=2)
    queue.put(job("a", key="k", rows=2))
    queue.put(job("other", key="z", rows=1))
    queue.put(job("b", key="k", rows=3))
    queue.put(job("c", key="k", rows=2))
    queue.put(job("urgent", level=1, key="k", rows=1))
    taken = queue.take_compatible("k", max_rows=6)
    # Highest level first, then FIFO; "c" would exceed 6 rows.
    assert [j.model for j in taken] == ["urgent", "a", "b"]
    assert names(queue) == ["other", "c"]


def test_watermarks_report_saturation_and_relief() -> None:
    queue = JobQueue("m", size=8)
    relieved = []
    queue.on_relieved.append(lambda: relieved.append(queue.depth))
    for i in range(6):
        queue.put(job(str(i)))
    assert queue.saturated  # 6 >= 3/4 of 8
    for _ in range(3):
        queue.take()
    assert queue.saturated and not relieved  # 3 is above the low watermark (2)
    queue.take()
    assert not queue.saturated and relieved == [2]


def test_discard_and_drain() -> None:
    queue = JobQueue("m", size=8, levels=2)
    a, b, c = job("a"), job("b", 1), job("c")
    for j in (a, b, c):
        queue.put(j)
    assert queue.discard(a) and not queue.discard(a)
    assert [j.model for j in queue.drain()] == ["b", "c"] and queue.depth == 0


def test_cancelling_a_queued_job_removes_it_and_frees_its_inputs() -> None:
    queue = JobQueue("m", size=8)
    j = Job("m", {"x": np.ones(3)}, (), 0.0)
    queue.put(j)
    j.deferred.addErrback(lambda f: None)
    j.deferred.cancel()
    assert queue.depth == 0 and j.inputs == {}


def test_a_worker_waiting_on_an_empty_queue_gets_the_job_directly() -> None:
    queue = JobQueue("m", size=1, levels=2)
    got: list[Job] = []
    waits = queue.wait()
    waits[1].addCallback(got.append)
    queue.put(job("x", level=1))
    assert [j.model for j in got] == ["x"] and queue.depth == 0
    waits[0].addErrback(lambda f: None)
    waits[0].cancel()  # as a worker does once one of its waits fired
    queue.put(job("y"))  # the bound still holds for queued jobs
    assert queue.depth == 1


def test_batch_keys_separate_shapes_dtypes_and_outputs() -> None:
    a = {"x": np.zeros((2, 3), np.float32)}
    assert batch_key(a, ()) == batch_key({"x": np.zeros((5, 3), np.float32)}, ())
    assert batch_key(a, ()) != batch_key({"x": np.zeros((2, 4), np.float32)}, ())
    assert batch_key(a, ()) != batch_key({"x": np.zeros((2, 3), np.float16)}, ())
    assert batch_key(a, ()) != batch_key(a, ("y",))


def test_a_withdrawn_wait_never_fires_and_the_next_job_is_queued() -> None:
    queue = JobQueue("m", size=4, levels=2)
    waits = queue.wait()
    assert queue.idle_workers == 1
    assert all(queue.withdraw(wait) for wait in waits)
    assert queue.idle_workers == 0 and not queue.withdraw(waits[0])  # not there any more
    queue.put(job("a", level=1))
    assert not any(wait.called for wait in waits) and queue.depth == 1
    assert names(queue) == ["a"]
