"""The dispatcher under real load: real models, real threads, real loopback sockets."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import numpy as np
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from http_support import Gate, GatedEngine
from support import ServerTestCase, memory_owner
from twinfer.client import TwinferClient, connect
from twinfer.client_protocol import ClientProtocol
from twinfer.engines import builtin
from twinfer.engines.openvino import Engine
from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.binary import TwinferProtocol
from twinfer.netutil import DirectReadClient, DirectReadServer
from twinfer.registry import LoadedModel, openvino_engine
from twinfer.wire.decode import decode_message
from twinfer.wire.encode import encode_bytes
from twinfer.wire.frames import FrameDecoder
from twinfer.wire.messages import Hello

PLACEMENT_CONFIG = """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 2
properties = { INFERENCE_PRECISION_HINT = "f32" }

[[devices]]
name = "fpga"          # stands for a device that is not thread-safe
target = "CPU"
replicas = 1
properties = { INFERENCE_PRECISION_HINT = "f32" }

[[models]]
name = "tiny"          # shared queue: cpu#0, cpu#1 and fpga#0 all take from it
path = "builtin:tiny"
devices = ["cpu", "fpga"]
queue_size = 1000

[[models]]
name = "tiny2"         # pinned: its own queue on the fpga only
path = "builtin:tiny"
devices = ["fpga"]
queue = "per-device"
queue_size = 1000
"""


class DeviceGuard:
    """Records how many threads are inside one device replica at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside = 0
        self.max_inside = 0
        self.threads: set[int] = set()
        self.calls = 0


class GuardedEngine:
    """Test double around the REAL OpenVINO engine: it behaves like a device
    that is not thread-safe (the seed's FPGA) by recording every overlap of two
    threads inside the device, and holds the device a little to widen any race."""

    def __init__(self, inner: Engine, guard: DeviceGuard, hold: float = 0.0005) -> None:
        self._inner = inner
        self._guard = guard
        self._hold = hold

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        guard = self._guard
        with guard._lock:
            guard.inside += 1
            guard.calls += 1
            guard.max_inside = max(guard.max_inside, guard.inside)
            guard.threads.add(threading.get_ident())
        try:
            time.sleep(self._hold)
            return self._inner.run(inputs, outputs)
        finally:
            with guard._lock:
                guard.inside -= 1


class CrashingEngine:
    """Test double: a device whose every third call raises, as a flaky device would."""

    def __init__(self, inner: Engine) -> None:
        self._inner = inner
        self.calls = 0

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.calls % 3 == 0:
            raise RuntimeError("device fell over")
        return self._inner.run(inputs, outputs)


def batch(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


class DispatcherTests(ServerTestCase):
    async def connect(self) -> TwinferClient:
        client = await connect(reactor, f"tcp:127.0.0.1:{self.port}")
        self.addCleanup(client.close)
        return client

    async def test_no_device_is_entered_by_two_threads_under_many_clients(self) -> None:
        guards: dict[tuple[str, int], DeviceGuard] = {}

        def factory(model: LoadedModel, device: str, replica: int) -> Engine:
            guard = guards.setdefault((device, replica), DeviceGuard())
            return GuardedEngine(openvino_engine(model, device, replica), guard)

        await self.start_server(PLACEMENT_CONFIG, factory)
        clients = [await self.connect() for _ in range(8)]
        requests = []
        for c, client in enumerate(clients):
            for i in range(24):
                model = "tiny2" if i % 3 == 0 else "tiny"
                x = batch(c * 100 + i)
                requests.append((x, client.infer(model, {"x": x})))
        results = await defer.gatherResults([d for _, d in requests])
        for (x, _), out in zip(requests, results):
            np.testing.assert_allclose(out["y"], builtin.tiny_reference(x)["y"], atol=1e-5)
            np.testing.assert_array_equal(out["label"], builtin.tiny_reference(x)["label"])
        assert set(guards) == {("cpu", 0), ("cpu", 1), ("fpga", 0)}
        for key, guard in guards.items():
            assert guard.max_inside == 1, key
            assert len(guard.threads) == 1, key  # always the replica's own thread
        # The fpga ran both its models (tiny2 only runs there), and the shared queue
        # spread tiny over all three replicas.
        assert guards[("fpga", 0)].calls >= 64
        assert all(guard.calls > 0 for guard in guards.values())
        assert sum(g.calls for g in guards.values()) == len(requests)

    async def test_64_pipelined_requests_on_one_connection_all_complete_correctly(self) -> None:
        await self.start_server()
        client = await self.connect()
        inputs = [batch(i, n=1 + i % 5) for i in range(64)]
        results = await defer.gatherResults([client.infer("tiny", {"x": x}) for x in inputs])
        for x, out in zip(inputs, results):
            np.testing.assert_allclose(out["y"], builtin.tiny_reference(x)["y"], atol=1e-5)

    async def test_replies_carry_the_servers_queue_and_compute_times(self) -> None:
        await self.start_server()
        client = await self.connect()
        reply = await client.infer_reply("tiny", {"x": batch(1)})
        assert reply.compute_us > 0 and reply.queue_us >= 0

    async def test_a_crashing_device_fails_only_its_requests(self) -> None:
        crashing: list[CrashingEngine] = []

        def factory(model: LoadedModel, device: str, replica: int) -> Engine:
            crashing.append(CrashingEngine(openvino_engine(model, device, replica)))
            return crashing[-1]

        await self.start_server(PLACEMENT_CONFIG.replace("replicas = 2", "replicas = 1"), factory)
        client = await self.connect()
        outcomes = []
        for i in range(12):
            try:
                await client.infer("tiny2", {"x": batch(i)})
                outcomes.append("ok")
            except TwinferError as e:
                assert e.code == ErrorCode.INFERENCE_FAILED
                assert "'tiny2'" in e.message and "'fpga'" in e.message
                assert "device fell over" in e.message
                outcomes.append("failed")
        assert outcomes.count("failed") == 4 and outcomes.count("ok") == 8
        assert await client.ping() > 0
        assert len(self.flushLoggedErrors(RuntimeError)) == 4  # each failure was logged

    async def test_a_malformed_frame_closes_only_that_client(self) -> None:
        await self.start_server()
        good = await self.connect()
        pending = [good.infer("tiny", {"x": batch(i)}) for i in range(16)]

        class Garbage(Protocol):
            def connectionMade(self) -> None:
                self.received = b""
                self.closed: defer.Deferred[None] = defer.Deferred()
                self.transport.write(encode_bytes(0, Hello()))
                self.transport.write(b"\x00" * 64)

            def dataReceived(self, data: bytes) -> None:
                self.received += data

            def connectionLost(self, reason: object = None) -> None:
                self.closed.callback(None)

        from twisted.internet.endpoints import TCP4ClientEndpoint

        bad = await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(
            Factory.forProtocol(Garbage)
        )
        await bad.closed
        frames = FrameDecoder().feed(bad.received)
        hello, error = (decode_message(f) for f in frames)
        assert getattr(error, "code", None) == ErrorCode.MALFORMED_FRAME
        results = await defer.gatherResults(pending)
        assert len(results) == 16
        assert len(await good.models()) == 1

    async def test_a_vanished_clients_queued_jobs_never_run(self) -> None:
        guards: dict[tuple[str, int], DeviceGuard] = {}
        gate = Gate()
        self.addCleanup(gate.open)

        def factory(model: LoadedModel, device: str, replica: int) -> Engine:
            guard = guards.setdefault((device, replica), DeviceGuard())
            # A device held busy until the server has seen the client leave, so
            # the queue is still full then (no race with the clock).
            return GatedEngine(GuardedEngine(openvino_engine(model, device, replica), guard), gate)

        await self.start_server(PLACEMENT_CONFIG, factory)
        fpga = guards[("fpga", 0)]
        # Only the fpga serves tiny2, so all but the first wait in its queue.
        leaver = await self.connect()
        doomed = [leaver.infer("tiny2", {"x": batch(i)}) for i in range(40)]
        for d in doomed:
            d.addErrback(lambda f: f.trap(TwinferError))
        await deferToThread(gate.started.acquire, True, 30)  # the first is on the device
        [session] = self.dataplane.frontends["binary"].sessions
        leaver.close()
        await session.when_closed()  # the server saw it go: its jobs are withdrawn
        gate.open()
        await defer.DeferredList(doomed)
        stayer = await self.connect()
        await stayer.infer("tiny2", {"x": batch(1)})
        entry = self.dispatcher.models["tiny2"]
        assert entry.queues[0].depth == 0
        # Only the job already on the device when the client left ran, then ours.
        assert fpga.calls == 2

    async def test_the_client_refuses_a_request_over_the_servers_frame_limit(self) -> None:
        await self.start_server(
            "[server]\nmax_frame_size = 4096\n"
            + PLACEMENT_CONFIG.replace("replicas = 2", "replicas = 1")
        )
        client = await self.connect()
        assert client.server.max_frame_size == 4096
        with self.assertRaises(TwinferError) as e:
            await client.infer("tiny", {"x": np.zeros((300, 4), np.float32)})
        assert e.exception.code == ErrorCode.FRAME_TOO_LARGE and "4096" in e.exception.message
        out = await client.infer("tiny", {"x": batch(1)})  # the connection is intact
        assert out["y"].shape == (3, 3)

    async def test_large_frames_are_received_in_place_and_answered_correctly(self) -> None:
        await self.start_server()
        client = await self.connect()
        received_in_place: list[int] = []
        original = TwinferProtocol.buffer_filled

        def spy(protocol: TwinferProtocol, count: int) -> None:
            received_in_place.append(count)
            original(protocol, count)

        self.patch(TwinferProtocol, "buffer_filled", spy)
        # 40,000 x 4 f32 = 640 KB: received with recv_into straight into the frame.
        xs = [
            np.random.default_rng(i).standard_normal((40_000, 4)).astype(np.float32)
            for i in range(6)
        ]
        results = await defer.gatherResults([client.infer("tiny", {"x": x}) for x in xs])
        for x, out in zip(xs, results):
            np.testing.assert_allclose(out["y"], builtin.tiny_reference(x)["y"], atol=1e-4)
        [connection] = self.factory.connections
        assert isinstance(connection.transport, DirectReadServer)
        assert sum(received_in_place) > 6 * 500_000  # most of every body came in place

    async def test_large_replies_are_received_in_place_by_the_twisted_client(self) -> None:
        await self.start_server()
        client = await self.connect()
        received_in_place: list[int] = []
        original = ClientProtocol.buffer_filled

        def spy(protocol: ClientProtocol, count: int) -> None:
            received_in_place.append(count)
            original(protocol, count)

        self.patch(ClientProtocol, "buffer_filled", spy)
        # Replies of 40,000 x 3 f32 + 40,000 i64 = 800 KB each.
        xs = [
            np.random.default_rng(i).standard_normal((40_000, 4)).astype(np.float32)
            for i in range(4)
        ]
        results = await defer.gatherResults([client.infer("tiny", {"x": x}) for x in xs])
        for x, out in zip(xs, results):
            np.testing.assert_allclose(out["y"], builtin.tiny_reference(x)["y"], atol=1e-4)
            # Both outputs are views of the one buffer their frame landed in.
            frame = memory_owner(out["y"])
            assert memory_owner(out["label"]) is frame
            assert memoryview(frame).nbytes > 800_000  # type: ignore[arg-type]
        assert isinstance(client.protocol, ClientProtocol)
        assert isinstance(client.protocol.transport, DirectReadClient)
        assert sum(received_in_place) > 4 * 600_000  # most of every reply came in place
