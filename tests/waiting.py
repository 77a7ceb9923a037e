"""Events for the tests that run real servers: Deferreds fired by the thing
being waited for, so that no test polls a condition in a loop.

Each helper wraps one hook of one object (its ``put``, its state-change
callback) for as long as the test waits, calls the original first, and puts
it back when the Deferred fires.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred

from twinfer.scheduling import Job, JobQueue, Worker, WorkerState


def queue_depth_reaches(queue: JobQueue, depth: int) -> Deferred[None]:
    """A Deferred firing (with None) once ``queue`` holds ``depth`` waiting jobs
    (at once if it already does): checked each time a job is put in it."""
    reached: Deferred[None] = Deferred()
    if queue.depth >= depth:
        reached.callback(None)
        return reached
    put = queue.put

    def put_and_check(job: Job) -> None:
        put(job)
        if queue.depth >= depth and not reached.called:
            del queue.put  # type: ignore[method-assign]  # the class's own again
            reached.callback(None)

    queue.put = put_and_check  # type: ignore[method-assign]
    return reached


def workers_reach(workers: Sequence[Worker], state: WorkerState) -> Deferred[None]:
    """A Deferred firing (with None) once every worker of ``workers`` is in
    ``state`` (at once if they are): checked on each of their state changes."""
    reached: Deferred[None] = Deferred()
    originals = {worker: worker.on_state_changed for worker in workers}

    def check() -> None:
        if reached.called or any(worker.state is not state for worker in workers):
            return
        for worker, original in originals.items():
            worker.on_state_changed = original
        reached.callback(None)

    def changed(worker: Worker) -> None:
        originals[worker](worker)
        check()

    for worker in workers:
        worker.on_state_changed = changed
    check()
    return reached
