"""Shared-memory requests through the data plane, in memory: a real ``tiny``
engine behind a hand-stepped worker thread, so the moments a region is
unregistered, a request is cancelled and the device thread finishes are
chosen exactly.  The behaviour tested: unregistering a region in use
succeeds at once, and its memory is unmapped when the last request using it
is done with it — never under a device thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet.task import Clock
from twisted.trial import unittest

from scheduling_support import HandRunner, outcome, tiny_engine, tiny_signature
from twinfer.dataplane import DataPlane
from twinfer.engines.builtin import tiny_reference
from twinfer.errors import ErrorCode, TwinferError
from twinfer.scheduling import Dispatcher, InferResult, JobQueue, ModelEntry, Worker
from twinfer.sharedmem import SharedMemory
from twinfer.sharedmem_requests import infer, region_outputs
from twinfer.wire.messages import DType, RegionRef, RegionTensor

X = np.arange(8, dtype=np.float32).reshape(2, 4)


class SharedMemoryRequestTests(unittest.TestCase):
    def setUp(self) -> None:
        self.queue = JobQueue("tiny", size=8)
        entry = ModelEntry("tiny", tiny_signature(), ("cpu",), (self.queue,))
        self.clock = Clock()
        self.runner = HandRunner()
        worker = Worker(
            "cpu#0",
            "cpu",
            {"tiny": tiny_engine()},
            [self.queue],
            clock=self.clock,
            runner=self.runner,
        )
        self.dispatcher = Dispatcher({"tiny": entry}, [worker], self.clock)
        self.dispatcher.start()
        self.addCleanup(self.dispatcher.stop)
        self.plane = DataPlane(self.dispatcher, tasks=None)
        self.session = self.plane.open_session("binary")
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.shm = SharedMemory(str(self.directory))
        self.table = self.shm.table(8, 1 << 20, "test")

    def region(self, name: str) -> np.ndarray:
        """A registered region of 256 bytes with X at offset 0; its bytes as
        the client sees them."""
        path = self.directory / name
        path.write_bytes(X.tobytes() + bytes(256 - X.nbytes))
        self.table.register(name, "/" + name, 0, 256)
        return np.memmap(path, np.uint8, "r")

    def submit(self, key: int, region: str, outputs: bool = True) -> list[Any]:
        x = RegionTensor(DType.F32, (2, 4), RegionRef(region, 0, 32))
        into = {"y": RegionRef(region, 64, 24)} if outputs else {}
        d = infer(self.plane, self.session, key, "tiny", self.table, {"x": x}, ("y",), into)
        return outcome(d)

    def test_outputs_are_written_into_the_region_by_the_device_thread(self) -> None:
        client_view = self.region("a")
        box = self.submit(1, "a")
        assert self.runner.handed == 1 and box == []
        self.runner.run_next()
        [result] = box
        assert isinstance(result, InferResult)
        expected = tiny_reference(X)["y"]
        np.testing.assert_allclose(result.outputs["y"], expected, atol=1e-6)
        np.testing.assert_allclose(
            client_view[64:88].view(np.float32).reshape(2, 3), expected, atol=1e-6
        )
        reply = region_outputs(result.outputs, {"y": RegionRef("a", 64, 24)})
        assert reply == {"y": RegionTensor(DType.F32, (2, 3), RegionRef("a", 64, 24))}
        assert self.plane.stats.requests == {("tiny", "OK", "binary"): 1}

    def test_a_region_unregistered_while_the_device_uses_it_stays_mapped_until_done(self) -> None:
        client_view = self.region("a")
        box = self.submit(1, "a")
        self.table.unregister("a")  # succeeds at once; the name is free
        assert self.table.status() == [] and "a" in self.shm.mapped
        self.runner.run_next()  # the device thread reads and writes the mapping
        assert isinstance(box[0], InferResult)
        assert self.shm.mapped == {}  # unmapped with the last lease
        assert client_view[64:88].view(np.float32)[0] == tiny_reference(X)["y"][0, 0]

    def test_cancelled_while_running_keeps_the_mapping_until_the_device_is_done(self) -> None:
        self.region("a")
        seen: list[Any] = []

        class CancelledMidway:
            """The client cancels (and the region is unregistered) while the
            device thread is inside the inference."""

            def run(inner, inputs: Any, outputs: Any) -> dict[str, np.ndarray]:  # noqa: N805
                assert self.session.cancel(1)
                self.table.unregister("a")
                seen.append(dict(self.shm.mapped))  # still mapped under the device
                return tiny_engine().run(inputs, outputs)

        self.dispatcher.workers[0].engines["tiny"] = CancelledMidway()  # type: ignore[assignment]
        box = self.submit(1, "a")
        self.runner.run_next()
        [failure] = box
        assert failure.value.code is ErrorCode.CANCELLED
        assert seen == [{"a": 256}]
        assert self.shm.mapped == {}  # released when the device thread was done

    def test_cancelled_before_the_device_thread_starts_it(self) -> None:
        self.region("a")
        box = self.submit(1, "a")
        assert self.runner.handed == 1  # handed to the thread, not started
        self.table.unregister("a")
        self.session.cancel(1)
        assert box[0].value.code is ErrorCode.CANCELLED
        assert self.shm.mapped == {}  # released now: the thread will skip it
        self.runner.run_next()  # and so it does, without touching the memory
        assert self.shm.mapped == {}

    def test_cancelled_while_queued_releases_at_once(self) -> None:
        for name in "abc":
            self.region(name)
        self.submit(1, "a")
        self.submit(2, "b")
        queued = self.submit(3, "c")
        assert self.queue.depth >= 1  # the last one waits in the queue (FIFO)
        self.table.unregister("c")
        assert "c" in self.shm.mapped
        self.session.cancel(3)
        assert queued[0].value.code is ErrorCode.CANCELLED
        assert "c" not in self.shm.mapped  # it will never run: released now

    def test_inputs_only_take_the_ordinary_path_and_release_when_answered(self) -> None:
        self.region("a")
        box = self.submit(1, "a", outputs=False)
        self.table.unregister("a")
        assert "a" in self.shm.mapped
        self.runner.run_next()
        np.testing.assert_allclose(box[0].outputs["y"], tiny_reference(X)["y"], atol=1e-6)
        assert self.shm.mapped == {}

    def test_refused_requests_release_their_leases_and_are_counted(self) -> None:
        self.region("a")
        x = RegionTensor(DType.F32, (2, 4), RegionRef("a", 0, 32))
        cases = [
            ("nope", {"x": x}, {"y": RegionRef("a", 64, 24)}, ErrorCode.UNKNOWN_MODEL),
            ("tiny", {"x": x}, {"y": RegionRef("zz", 0, 24)}, ErrorCode.UNKNOWN_REGION),
            ("tiny", {"x": x}, {"y": RegionRef("a", 250, 24)}, ErrorCode.INVALID_REGION),
        ]
        for key, (model, inputs, into, code) in enumerate(cases):
            box = outcome(
                infer(self.plane, self.session, key, model, self.table, inputs, ("y",), into)
            )
            [failure] = box
            assert failure.check(TwinferError) and failure.value.code is code, failure
        self.table.unregister("a")
        assert self.shm.mapped == {}  # every lease was released
        assert self.runner.handed == 0
        counted = {code for (_, code, _) in self.plane.stats.requests}
        assert counted == {"UNKNOWN_MODEL", "UNKNOWN_REGION", "INVALID_REGION"}

    def test_a_dynamic_output_too_big_for_its_region_fails_the_request_not_the_device(
        self,
    ) -> None:
        self.region("a")
        x = RegionTensor(DType.F32, (2, 4), RegionRef("a", 0, 32))
        for key in range(4):  # more than max_failures in a row
            box = outcome(
                infer(
                    self.plane, self.session, key, "tiny", self.table,
                    {"x": x}, ("y",), {"y": RegionRef("a", 64, 20)},
                )
            )  # fmt: skip
            self.runner.run_next()
            [failure] = box
            assert failure.value.code is ErrorCode.INVALID_REGION
            assert "takes 24 bytes" in failure.value.message
        assert all(w.available for w in self.dispatcher.workers)
