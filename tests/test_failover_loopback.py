"""The client that moves, over real loopback sockets to two in-process servers."""

from __future__ import annotations

from typing import Any

import numpy as np
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from support import ServerTestCase
from twinfer.client import TwinferClient, connect

X = np.arange(8, dtype=np.float32).reshape(2, 4)


class TwoServersTests(ServerTestCase):
    async def start_two(self) -> tuple[list[str], list[Any]]:
        """Two servers of the tiny model; their endpoints and factories."""
        endpoints, factories = [], []
        for _ in range(2):
            port = await self.start_server()
            endpoints.append(f"tcp:127.0.0.1:{port}")
            factories.append(self.factory)
        return endpoints, factories

    async def run_load(
        self, client: TwinferClient, total: int, window: int, midway: Any
    ) -> tuple[list[dict[str, np.ndarray]], list[Any]]:
        """Keep ``window`` requests in flight until ``total`` were sent; call
        ``midway()`` right after the request sent when a third are answered.
        Fires with the outputs and the failures."""
        outputs: list[dict[str, np.ndarray]] = []
        failures: list[Any] = []
        finished: Deferred[None] = Deferred()
        state = {"sent": 0, "done": 0}

        def send() -> None:
            state["sent"] += 1
            d = client.infer("tiny", {"x": X})
            d.addCallbacks(outputs.append, failures.append)
            d.addBoth(settled)

        def settled(_: Any) -> None:
            state["done"] += 1
            if state["sent"] < total:
                send()
                if state["done"] == total // 3:
                    midway()
            if state["done"] == total:
                finished.callback(None)

        for _ in range(window):
            send()
        await finished
        return outputs, failures

    async def test_a_dropped_server_costs_no_request(self) -> None:
        endpoints, (first, second) = await self.start_two()
        client = await connect(reactor, endpoints, connections=4)
        self.close_clients_on_cleanup(client)
        expected = (await client.infer("tiny", {"x": X}))["y"]
        dropped: list[int] = []

        def drop_first_server() -> None:
            # Mid-load, the first server's connections break (a crash, a cut
            # cable): whatever the client had in flight there is lost.
            for protocol in list(first.connections):
                dropped.append(len(protocol.inflight))
                protocol.transport.abortConnection()

        outputs, failures = await self.run_load(client, 240, 16, drop_first_server)
        self.assertEqual(failures, [])
        self.assertEqual(len(outputs), 240)  # each answered exactly once
        for output in outputs:
            np.testing.assert_array_equal(output["y"], expected)
        self.assertTrue(dropped)
        self.assertGreater(client.resent, 0)
        self.assertGreater(len(second.connections), 0)

    async def test_a_draining_server_moves_its_clients_without_losing_requests(self) -> None:
        endpoints, (first, second) = await self.start_two()
        client = await connect(reactor, endpoints, connections=2)
        self.close_clients_on_cleanup(client)
        told: list[int] = []

        def drain_first_server() -> None:
            # What the graceful drain does first (ServingService.shutdown):
            # the data plane tells the binary front end, which sends GOAWAY.
            connected = len(first.connections)
            first.dataplane.begin_drain()
            told.append(connected)
            # Told once: the client's connection got its GOAWAY already.
            assert first.go_away("again") == 0

        outputs, failures = await self.run_load(client, 120, 8, drain_first_server)
        self.assertEqual(failures, [])
        self.assertEqual(len(outputs), 120)
        self.assertEqual(told, [1])
        # The client left the draining server once its replies were in.
        self.assertEqual(
            [p.usable for p in client.protocol.protocols], [True] * len(client.protocol.protocols)
        )
        self.assertGreater(len(second.connections), 0)
