"""Shared-memory tensors over the binary protocol, on a real loopback server:
the Twisted client's ``shared_memory=True``, and the server's answers to bad
region messages (each a precise error, after which it keeps serving)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet import defer, reactor

from support import TINY_CONFIG, ServerTestCase, save_identity_model
from twinfer.client import TwinferClient, connect
from twinfer.errors import ErrorCode, TwinferError
from twinfer.sharedmem import SHM_DIR, SharedMemory
from twinfer.shm_client import RegionPool
from twinfer.wire.messages import (
    DType,
    GetRegionStatus,
    InferReply,
    InferRequest,
    RegionInfo,
    RegionRef,
    RegionStatus,
    RegionTensor,
    RegisterRegion,
    UnregisterRegion,
)


def shm_object(test: Any, size: int) -> tuple[str, np.ndarray]:
    """A POSIX shm object of ``size`` bytes, unlinked at cleanup; its key and its bytes."""
    pool = RegionPool()
    obj = pool._take(size)
    test.addCleanup(pool.close)
    return obj.key, obj.bytes


class SharedMemoryLoopbackTests(ServerTestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        model = save_identity_model(Path(self.mktemp() + ".xml"), np.float32, [2, 3])
        config = TINY_CONFIG + f'\n[[models]]\nname = "identity"\npath = "{model}"\n'
        await self.start_server(config)
        self.factory.shared_memory = SharedMemory()

    async def client(self) -> TwinferClient:
        client = await connect(reactor, f"tcp:127.0.0.1:{self.port}")
        self.addCleanup(client.close)
        return client

    def server_tables(self) -> list[Any]:
        return [c.regions for c in self.factory.connections if c.regions is not None]

    async def test_twisted_client_shared_memory_matches_the_socket_and_reuses_one_region(
        self,
    ) -> None:
        client = await self.client()
        rng = np.random.default_rng(1)
        for _ in range(3):
            x = rng.random((3, 4), dtype=np.float32)
            direct = await client.infer("tiny", {"x": x})
            shared = await client.infer("tiny", {"x": x}, shared_memory=True)
            for name in direct:
                np.testing.assert_allclose(shared[name], direct[name], atol=1e-5)
            x = rng.random((2, 3), dtype=np.float32)
            shared = await client.infer("identity", {"x": x}, shared_memory=True)
            np.testing.assert_array_equal(shared["out"], x)  # written into the region
        pool = client._shm.pool
        assert pool is not None and pool.objects == 1  # sequential requests: one object
        [table] = self.server_tables()
        assert len(table) == 1
        names = pool.close()
        assert names and not os.path.exists(os.path.join(SHM_DIR, names[0]))

    async def test_closing_the_connection_unregisters_and_unmaps_its_regions(self) -> None:
        client = await self.client()
        await client.infer("identity", {"x": np.ones((2, 3), np.float32)}, shared_memory=True)
        assert len(self.factory.shared_memory.mapped) == 1  # type: ignore[union-attr]
        [session] = self.dataplane.frontends["binary"].sessions
        await client.close()
        await session.when_closed()
        assert self.factory.shared_memory.mapped == {}  # type: ignore[union-attr]

    async def test_concurrent_requests_each_get_their_own_region(self) -> None:
        client = await self.client()
        xs = [np.full((2, 3), i, np.float32) for i in range(6)]
        results = await defer.gatherResults(
            [client.infer("identity", {"x": x}, shared_memory=True) for x in xs]
        )
        for x, result in zip(xs, results, strict=True):
            np.testing.assert_array_equal(result["out"], x)
        assert client._shm.pool is not None and 1 < client._shm.pool.objects <= 6

    async def test_without_allow_shm_the_client_falls_back_to_the_socket(self) -> None:
        self.factory.shared_memory = None
        client = await self.client()
        x = np.ones((1, 4), np.float32)
        shared = await client.infer("tiny", {"x": x}, shared_memory=True)
        np.testing.assert_allclose(shared["y"], (await client.infer("tiny", {"x": x}))["y"])
        assert client.shared_memory_off is not None and "--allow-shm" in client.shared_memory_off

    async def request(self, client: TwinferClient, message: Any) -> Any:
        return await client.protocol.request(message)

    async def refused(self, client: TwinferClient, message: Any) -> TwinferError:
        try:
            await self.request(client, message)
        except TwinferError as e:
            return e
        raise AssertionError(f"{message!r} was not refused")

    async def test_bad_region_messages_get_precise_errors_and_the_server_keeps_serving(
        self,
    ) -> None:
        client = await self.client()
        key, _ = shm_object(self, 4096)
        status = await self.request(client, RegisterRegion("in", key, 0, 1024))
        assert status == RegionStatus((RegionInfo("in", key, 0, 1024),))
        x = RegionTensor(DType.F32, (1, 4), RegionRef("in", 0, 16))

        def tiny(ref: RegionRef) -> InferRequest:
            return InferRequest("tiny", {"x": RegionTensor(DType.F32, (1, 4), ref)})

        ones = {"x": np.ones((2, 3), np.float32)}
        out_20 = {"out": RegionRef("in", 0, 20)}
        y_past_end = {"y": RegionRef("in", 1020, 12)}
        cases = [
            (RegisterRegion("in", key, 0, 8), ErrorCode.INVALID_REGION, "already registered"),
            (RegisterRegion("r", "/etc/passwd", 0, 8), ErrorCode.INVALID_REGION, "not the name"),
            (RegisterRegion("r", key, 65500, 200), ErrorCode.INVALID_REGION, "beyond the 65536"),
            (RegisterRegion("r", "/no-such-object", 0, 8), ErrorCode.INVALID_REGION, "no shared"),
            (UnregisterRegion("nope"), ErrorCode.UNKNOWN_REGION, "'nope'"),
            (GetRegionStatus("nope"), ErrorCode.UNKNOWN_REGION, "'nope'"),
            (
                tiny(RegionRef("no", 0, 16)),
                ErrorCode.UNKNOWN_REGION,
                "input 'x': no shared-memory region 'no'",
            ),
            (
                tiny(RegionRef("in", 1010, 16)),
                ErrorCode.INVALID_REGION,
                "offset 1010 + byte_size 16 is beyond region 'in' of 1024 bytes",
            ),
            (
                tiny(RegionRef("in", 0, 12)),
                ErrorCode.INVALID_REGION,
                "takes 16 bytes",
            ),
            (
                InferRequest("tiny", {"x": x}, ("y",), output_regions=y_past_end),
                ErrorCode.INVALID_REGION,
                "output 'y'",
            ),
            (
                InferRequest("identity", ones, ("out",), output_regions=out_20),
                ErrorCode.INVALID_REGION,
                "output 'out' takes 24 bytes",
            ),
        ]  # fmt: skip
        for message, code, text in cases:
            error = await self.refused(client, message)
            assert error.code is code and text in error.message, (message, error)
        assert await client.ping() >= 0
        # A dynamic output too big for its region is refused by the device
        # thread: the request's fault, never the device's.
        big = RegionTensor(DType.F32, (8, 4), RegionRef("in", 0, 128))
        for _ in range(4):  # more than max_consecutive_failures (3)
            error = await self.refused(
                client,
                InferRequest(
                    "tiny", {"x": big}, ("y",), output_regions={"y": RegionRef("in", 512, 95)}
                ),
            )
            assert error.code is ErrorCode.INVALID_REGION and "takes 96 bytes" in error.message
        assert all(w.available for w in self.dispatcher.workers)
        totals = (
            self.dataplane.stats.snapshot() if hasattr(self.dataplane.stats, "snapshot") else None
        )
        del totals

    async def test_a_region_unregistered_while_a_request_uses_it(self) -> None:
        client = await self.client()
        key, memory = shm_object(self, 4096)
        await self.request(client, RegisterRegion("io", key, 0, 4096))
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        memory[:24] = x.view(np.uint8).reshape(-1)
        request = InferRequest(
            "identity",
            {"x": RegionTensor(DType.F32, (2, 3), RegionRef("io", 0, 24))},
            ("out",),
            output_regions={"out": RegionRef("io", 64, 24)},
        )
        # Frames are handled in order: the request holds its leases when the
        # region is unregistered right behind it.
        inferred = client.protocol.request(request)
        removed = await self.request(client, UnregisterRegion("io"))
        assert removed == RegionStatus((RegionInfo("io", key, 0, 4096),))
        reply = await inferred
        assert isinstance(reply, InferReply)
        assert reply.outputs["out"] == RegionTensor(DType.F32, (2, 3), RegionRef("io", 64, 24))
        np.testing.assert_array_equal(memory[64:88].view(np.float32).reshape(2, 3), x)
        assert self.factory.shared_memory.mapped == {}  # type: ignore[union-attr]
        error = await self.refused(client, request)
        assert error.code is ErrorCode.UNKNOWN_REGION

    async def test_shm_messages_without_allow_shm_name_the_flag(self) -> None:
        self.factory.shared_memory = None
        client = await self.client()
        key, _ = shm_object(self, 4096)
        for message in (
            RegisterRegion("in", key, 0, 64),
            GetRegionStatus(),
            InferRequest("tiny", {"x": RegionTensor(DType.F32, (1, 4), RegionRef("in", 0, 16))}),
        ):
            error = await self.refused(client, message)
            assert error.code is ErrorCode.UNSUPPORTED_MESSAGE and "--allow-shm" in error.message
        assert await client.ping() >= 0
