"""Runtime control on a real in-process server: reload under load, unload, admin, health."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from twisted.internet import reactor
from twisted.internet.defer import DeferredList

from ops_support import OpsServerTestCase
from twinfer.client import connect
from twinfer.engines.builtin import tiny_reference
from twinfer.engines.openvino import Engine
from twinfer.errors import ErrorCode, TwinferError
from twinfer.registry import openvino_engine
from twinfer.wire.messages import AdminRequest

#: ``tiny`` with both engines kept (not timed: the choice stays adaptive).
ADAPTIVE_TINY = """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 2
execution = "adaptive"
tune_seconds = 0
properties = { INFERENCE_PRECISION_HINT = "f32" }

[[models]]
name = "tiny"
path = "builtin:tiny"
"""


class ControlTests(OpsServerTestCase):
    async def test_reload_under_load_fails_nothing(self) -> None:
        port = await self.start_ops_server()
        clients = [await connect(reactor, f"tcp:127.0.0.1:{port}") for _ in range(3)]
        self.close_clients_on_cleanup(*clients)
        x = np.random.default_rng(1).random((8, 4)).astype(np.float32)
        expected = tiny_reference(x)["y"]
        results: list[object] = []
        stop = False

        async def pound(client: object) -> None:
            # Keep 16 requests in flight per connection until told to stop.
            while not stop:
                batch = [client.infer("tiny", {"x": x}) for _ in range(16)]  # type: ignore[attr-defined]
                outcome = await DeferredList(batch, consumeErrors=True)
                results.extend(outcome)

        from twisted.internet.defer import Deferred

        loads = [Deferred.fromCoroutine(pound(c)) for c in clients]
        old_queue = self.dispatcher.models["tiny"].queues[0]
        summaries = []
        for _ in range(3):  # three swaps while the load runs
            summaries.append(await self.controller.reload("tiny"))
        stop = True
        await DeferredList(loads)
        self.assertTrue(all(s.startswith("reloaded tiny") for s in summaries), summaries)
        failures = [r for ok, r in results if not ok]
        self.assertEqual(failures, [])
        self.assertGreater(len(results), 48)
        for _, out in results:
            np.testing.assert_allclose(out["y"], expected, rtol=1e-5, atol=1e-5)  # type: ignore[index]
        new_queue = self.dispatcher.models["tiny"].queues[0]
        self.assertIsNot(new_queue, old_queue)
        # The workers serve only the newest queue; the old ones are gone.
        for worker in self.dispatcher.workers:
            self.assertEqual(worker.queues, [new_queue])
        self.assertEqual(len(self.dispatcher.workers), 2)

    async def test_reload_of_an_adaptive_model_under_load_fails_nothing(self) -> None:
        port = await self.start_ops_server(ADAPTIVE_TINY)
        client = await connect(reactor, f"tcp:127.0.0.1:{port}")
        self.close_clients_on_cleanup(client)
        x = np.random.default_rng(2).random((3, 4)).astype(np.float32)
        expected = tiny_reference(x)["y"]
        results: list[object] = []
        for _ in range(3):
            # One request alone (the latency engine), then a burst (the streams).
            results.append(await client.infer("tiny", {"x": x}))
            burst = [client.infer("tiny", {"x": x}) for _ in range(12)]
            reloading = self.controller.reload("tiny")
            results.extend(await DeferredList(burst, fireOnOneErrback=True, consumeErrors=True))
            self.assertTrue((await reloading).startswith("reloaded tiny"))
        for result in results:
            out = result[1] if isinstance(result, tuple) else result
            np.testing.assert_allclose(out["y"], expected, rtol=1e-5, atol=1e-5)  # type: ignore[index]
        workers = self.dispatcher.workers
        self.assertEqual(len(workers), 2)
        [policy] = {id(w.policy): w.policy for w in workers}.values()
        assert policy is not None
        # The reloaded model's latency engines replaced the old ones.
        self.assertTrue(policy.adaptive and not policy.switching)
        self.assertTrue(all(set(w.latency_engines) == {"tiny"} for w in workers))
        self.assertEqual(self.dispatcher.models["tiny"].execution, {"cpu": "adaptive"})
        await self.controller.unload("tiny")
        self.assertEqual(self.dispatcher.workers, [])

    async def test_unload_answers_queued_requests(self) -> None:
        gate = threading.Event()
        self.addCleanup(gate.set)

        class GatedEngine:
            """Test double around the real engine: holds the device until the
            gate opens, so requests stay queued deterministically."""

            def __init__(self, inner: Engine) -> None:
                self.inner = inner

            def run(self, inputs: Any, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
                gate.wait(10)
                return self.inner.run(inputs, outputs)

        port = await self.start_ops_server(
            engine_factory=lambda m, d, r: GatedEngine(openvino_engine(m, d, r))
        )
        client = await connect(reactor, f"tcp:127.0.0.1:{port}")
        self.close_clients_on_cleanup(client)
        x = np.ones((1, 4), np.float32)
        running = [client.infer("tiny", {"x": x}) for _ in range(2)]  # both replicas held
        pending = [client.infer("tiny", {"x": x}) for _ in range(5)]
        await client.ping()  # the server has read (and queued) the requests
        self.assertEqual(self.dispatcher.models["tiny"].queues[0].depth, 5)
        unloading = self.controller.unload("tiny")
        gate.set()  # the running jobs finish on the old engines
        for d in running:
            self.assertEqual((await d)["y"].shape, (1, 3))
        summary = await unloading
        self.assertEqual(summary, "unloaded tiny (5 queued request(s) answered UNAVAILABLE)")
        for d in pending:
            with self.assertRaises(TwinferError) as caught:
                await d
            self.assertEqual(caught.exception.code, ErrorCode.UNAVAILABLE)
            self.assertEqual(caught.exception.message, "model 'tiny' was unloaded")
        with self.assertRaises(TwinferError) as caught:
            await client.infer("tiny", {"x": x})
        self.assertEqual(caught.exception.code, ErrorCode.UNKNOWN_MODEL)
        self.assertEqual(self.dispatcher.workers, [])  # no model left: workers stopped
        health = await client.health()
        self.assertTrue(health.ready)  # nothing configured is missing

    async def test_admin_messages_need_allow_admin(self) -> None:
        port = await self.start_ops_server()
        client = await connect(reactor, f"tcp:127.0.0.1:{port}")
        self.close_clients_on_cleanup(client)
        with self.assertRaises(TwinferError) as caught:
            await client.admin(AdminRequest("load", "sq", "builtin:squeezenet"))
        self.assertEqual(caught.exception.code, ErrorCode.UNSUPPORTED_MESSAGE)
        self.assertIn("--allow-admin", caught.exception.message)

        self.factory.allow_admin = True
        summary = await client.admin(AdminRequest("load", "sq", "builtin:squeezenet"))
        self.assertRegex(summary, r"^loaded sq from builtin:squeezenet on cpu")
        image = np.zeros((1, 3, 224, 224), np.float32)
        out = await client.infer("sq", {"data_0": image})
        self.assertEqual(next(iter(out.values())).shape, (1, 1000, 1, 1))
        with self.assertRaises(TwinferError) as caught:
            await client.admin(AdminRequest("reload", "nope"))
        self.assertEqual(caught.exception.code, ErrorCode.UNKNOWN_MODEL)
        self.assertIn("drained", await client.admin(AdminRequest("drain", device="cpu")))
        health = await client.health()
        self.assertEqual((health.live, health.ready), (True, False))
        self.assertIn("has no healthy device", health.detail)
        await client.admin(AdminRequest("undrain", device="cpu"))
        self.assertTrue((await client.health()).ready)
        self.assertIn("unloaded sq", await client.admin(AdminRequest("unload", "sq")))

    async def test_requests_from_any_front_end_are_counted_by_the_data_plane(self) -> None:
        await self.start_ops_server()
        x = np.ones((2, 4), np.float32)
        # As the HTTP front end does: a session of its own on the same data plane.
        session = self.dataplane.open_session("http")
        for i in range(3):
            await self.dataplane.infer(session, i, "tiny", {"x": x})
        with self.assertRaises(TwinferError):
            await self.dataplane.infer(session, 9, "tiny", {"x": x.astype(np.float64)})
        model = self.stats.model("tiny")
        self.assertEqual(model.count, 4)
        self.assertEqual(model.errors, 1)
        self.assertEqual(model.compute.count, 3)
        self.assertEqual(self.stats.requests[("tiny", "OK", "http")], 3)
        self.assertEqual(self.stats.requests[("tiny", "INVALID_DTYPE", "http")], 1)
