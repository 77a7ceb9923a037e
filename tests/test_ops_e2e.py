"""End to end with a real ``twistd twinfer`` process: SIGTERM drain, metrics, SIGHUP."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet import endpoints, protocol, reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from child_process import PORT_FILE_FD, ChildProcess
from ops_support import ConsoleClient
from twinfer.client import connect
from twinfer.errors import ErrorCode, LocalProtocolError, TwinferError
from twinfer.failover import ClientPool

TWISTD = str(Path(sys.executable).parent / "twistd")

CONFIG = """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 1

[[models]]
name = "tiny"
path = "builtin:tiny"
queue_size = {queue_size}
properties = {{ INFERENCE_PRECISION_HINT = "f32" }}

[[models]]
name = "squeezenet"
path = "builtin:squeezenet"
queue_size = 1024
"""


class _RawHTTP(protocol.Protocol):
    """An HTTP/1.1 client that keeps its connection open between requests."""

    def __init__(self) -> None:
        self.received = b""
        self.reply: Deferred[bytes] | None = None
        self.closed: Deferred[None] = Deferred()

    def get(self, path: str) -> Deferred[bytes]:
        """Fires with the whole response (headers and a Content-Length body)."""
        self.reply = Deferred()
        self.transport.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        return self.reply

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        head, separator, body = self.received.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        if separator and length and len(body) >= int(length[1]) and self.reply is not None:
            reply, self.reply, self.received = self.reply, None, b""
            reply.callback(head + separator + body)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class TwistdTests(unittest.TestCase):
    timeout = 120

    def spawn(self, *args: str, queue_size: int = 256) -> ChildProcess:
        """Start ``twistd twinfer`` with ``args`` (killed at cleanup if still running)."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        self.config_path = directory / "twinfer.toml"
        self.config_path.write_text(CONFIG.format(queue_size=queue_size))
        proc = ChildProcess("twistd")
        argv = [
            TWISTD,
            "-n",
            "--pidfile=",
            "twinfer",
            "--config",
            str(self.config_path),
            "--port",
            "tcp:0:interface=127.0.0.1",
            f"--port-file=/dev/fd/{PORT_FILE_FD}",
            *args,
        ]
        self.transport = reactor.spawnProcess(
            proc,
            TWISTD,
            argv,
            env=dict(os.environ),
            path=str(directory),
            childFDs={0: "w", 1: "r", 2: "r", PORT_FILE_FD: "r"},
        )

        def kill() -> Deferred[int] | None:
            if proc.ended.called:
                return None
            self.transport.signalProcess("KILL")
            return proc.ended

        self.addCleanup(kill)
        return proc

    async def start(self, *args: str, queue_size: int = 256) -> ChildProcess:
        """Start ``twistd twinfer`` with ``args``; returns once every port listens."""
        proc = self.spawn(*args, queue_size=queue_size)
        await proc.ready
        return proc

    async def test_sigterm_answers_every_request(self) -> None:
        proc = await self.start("--drain-timeout", "20")
        url = f"tcp:127.0.0.1:{proc.ports['binary']}"
        clients = [await connect(reactor, url) for _ in range(3)]
        image = np.zeros((1, 3, 224, 224), np.float32)
        # "refused": refused by the client itself after the server's GOAWAY
        # (never sent, so the server does not count them).
        counts = {"sent": 0, "ok": 0, "unavailable": 0, "refused": 0, "lost": 0, "other": 0}
        stopped: set[int] = set()
        done: list[Deferred[None]] = []
        first_replies: Deferred[None] = Deferred()

        def send(index: int) -> None:
            # A well-behaved client: keeps requests pipelined until the server
            # says it is going away (UNAVAILABLE), then stops sending.
            if index in stopped:
                return
            counts["sent"] += 1
            d = clients[index].infer("squeezenet", {"data_0": image})
            d.addCallbacks(lambda _: answered(index, None), lambda f: answered(index, f))

        def answered(index: int, failure: Any) -> None:
            if failure is None:
                counts["ok"] += 1
                if counts["ok"] == 10 and not first_replies.called:
                    first_replies.callback(None)
            else:
                error = failure.value
                if isinstance(error, TwinferError) and "connection to the server" in error.message:
                    counts["lost"] += 1
                elif isinstance(error, LocalProtocolError) and error.code == ErrorCode.UNAVAILABLE:
                    counts["refused"] += 1
                    stopped.add(index)
                elif isinstance(error, TwinferError) and error.code == ErrorCode.UNAVAILABLE:
                    counts["unavailable"] += 1
                    stopped.add(index)
                else:
                    counts["other"] += 1
                    stopped.add(index)
            send(index)

        for index, client in enumerate(clients):
            for _ in range(8):
                send(index)
            lost: Deferred[None] = Deferred()
            client.protocol.connectionLost = (  # type: ignore[method-assign]
                lambda reason, orig=client.protocol.connectionLost, d=lost: (
                    orig(reason),
                    d.callback(None),
                )
            )
            done.append(lost)
        await first_replies
        self.transport.signalProcess("TERM")
        exit_code = await proc.ended
        for d in done:
            await d  # every connection was closed by the server
        self.assertEqual(exit_code, 0, proc.output)
        self.assertEqual(counts["lost"], 0, counts)
        self.assertEqual(counts["other"], 0, counts)
        served = counts["ok"] + counts["unavailable"]
        self.assertEqual(served + counts["refused"], counts["sent"], counts)
        # New requests were refused (by the server, or by the client after GOAWAY).
        self.assertGreater(counts["unavailable"] + counts["refused"], 0, counts)
        stopped_line = r"twinfer stopped: (\d+) inference requests answered \((.*)\)"
        match = re.search(stopped_line, proc.output)
        self.assertIsNotNone(match, proc.output)
        assert match is not None
        self.assertEqual(int(match.group(1)), served)  # the server agrees
        self.assertIn(f"OK={counts['ok']}", match.group(2))
        if counts["unavailable"]:
            self.assertIn(f"UNAVAILABLE={counts['unavailable']}", match.group(2))

    async def test_sigterm_moves_a_multi_endpoint_client_without_losing_a_request(self) -> None:
        first = await self.start("--drain-timeout", "20")
        first_process = self.transport
        second = await self.start()
        endpoints = [f"tcp:127.0.0.1:{p.ports['binary']}" for p in (first, second)]
        client = await connect(reactor, endpoints, connections=2)
        self.addCleanup(client.close)
        image = np.zeros((1, 3, 224, 224), np.float32)
        total, window = 120, 8
        state = {"sent": 0, "done": 0}
        failures: list[Any] = []
        finished: Deferred[None] = Deferred()

        def send() -> None:
            state["sent"] += 1
            d = client.infer("squeezenet", {"data_0": image})
            d.addErrback(failures.append)
            d.addBoth(settled)

        def settled(_: Any) -> None:
            state["done"] += 1
            if state["sent"] < total:
                send()
                if state["done"] == total // 4:
                    first_process.signalProcess("TERM")  # under load
            if state["done"] == total:
                finished.callback(None)

        for _ in range(window):
            send()
        await finished
        self.assertEqual(await first.ended, 0, first.output)
        self.assertEqual(failures, [])  # every request answered, none lost
        self.assertEqual(state["sent"], total)
        # The drained node answered what it had accepted; the rest went to the other.
        stopped_line = r"twinfer stopped: (\d+) inference requests answered \((.*)\)"
        match = re.search(stopped_line, first.output)
        assert match is not None, first.output
        self.assertGreater(int(match.group(1)), 0)
        refused = re.search(r"UNAVAILABLE=(\d+)", match.group(2))
        # Each request the draining node refused was re-sent (once) to the other.
        self.assertEqual(int(refused.group(1)) if refused else 0, client.resent)
        pool = client.protocol
        assert isinstance(pool, ClientPool)
        self.assertTrue(all(p.usable for p in pool.protocols))

    async def test_metrics_move_and_health(self) -> None:
        proc = await self.start("--metrics-port", "tcp:0:interface=127.0.0.1")
        base = f"http://127.0.0.1:{proc.ports['metrics']}".encode()
        agent = Agent(reactor)

        async def get(path: bytes) -> tuple[int, str]:
            response = await agent.request(b"GET", base + path)
            return response.code, (await readBody(response)).decode()

        self.assertEqual(await get(b"/healthz"), (200, "ok\n"))
        self.assertEqual(await get(b"/readyz"), (200, "ready\n"))
        _, before = await get(b"/metrics")
        ok = 'twinfer_requests_total{code="OK",frontend="binary",model="tiny"}'
        self.assertNotIn(ok, before)
        client = await connect(reactor, f"tcp:127.0.0.1:{proc.ports['binary']}")
        for _ in range(7):
            await client.infer("tiny", {"x": np.ones((5, 4), np.float32)})
        with self.assertRaises(TwinferError):
            await client.infer("tiny", {"x": np.ones((5, 3), np.float32)})
        _, after = await get(b"/metrics")
        client.close()

        def value(text: str, sample: str) -> float:
            found = re.search(re.escape(sample) + r" ([0-9.e+-]+)\n", text)
            self.assertIsNotNone(found, f"{sample} not in\n{text}")
            assert found is not None
            return float(found.group(1))

        self.assertEqual(value(after, ok), 7)
        bad_shape = 'twinfer_requests_total{code="INVALID_SHAPE",frontend="binary",model="tiny"}'
        self.assertEqual(value(after, bad_shape), 1)
        self.assertEqual(value(after, 'twinfer_request_seconds_count{model="tiny"}'), 8)
        self.assertEqual(value(after, 'twinfer_compute_seconds_count{model="tiny"}'), 7)
        self.assertEqual(value(after, 'twinfer_batch_size_bucket{le="4.0",model="tiny"}'), 0)
        self.assertEqual(value(after, 'twinfer_batch_size_bucket{le="8.0",model="tiny"}'), 7)
        self.assertEqual(value(after, 'twinfer_device_jobs_total{device="cpu"}'), 7)
        self.assertGreater(value(after, 'twinfer_device_busy_seconds_total{device="cpu"}'), 0)
        self.assertEqual(value(after, 'twinfer_queue_depth{model="tiny",queue="tiny"}'), 0)
        self.assertEqual(value(after, "twinfer_ready"), 1)
        self.assertIn("process_resident_memory_bytes", after)
        self.transport.signalProcess("TERM")
        self.assertEqual(await proc.ended, 0)

    async def test_sighup_reloads_changed_models(self) -> None:
        proc = await self.start(queue_size=256)
        client = await connect(reactor, f"tcp:127.0.0.1:{proc.ports['binary']}")
        self.config_path.write_text(
            CONFIG.format(queue_size=64).replace(
                '[[models]]\nname = "squeezenet"', '[[models]]\nname = "squeezenet2"'
            )
        )
        self.transport.signalProcess("HUP")
        await proc.wait_for("configuration re-read")
        summary = proc.output.split("SIGHUP: configuration re-read: ")[1]
        self.assertIn("unloaded squeezenet (0 queued", summary)
        self.assertIn("reloaded tiny from builtin:tiny", summary)  # queue_size changed
        self.assertIn("loaded squeezenet2 from builtin:squeezenet", summary)
        names = sorted(m.name for m in await client.models())
        self.assertEqual(names, ["squeezenet2", "tiny"])
        out = await client.infer("tiny", {"x": np.ones((1, 4), np.float32)})
        self.assertEqual(out["y"].shape, (1, 3))
        client.close()
        self.transport.signalProcess("TERM")
        self.assertEqual(await proc.ended, 0)

    async def test_sigterm_with_an_idle_http_keep_alive_client_exits_within_the_drain_timeout(
        self,
    ) -> None:
        drain_timeout = 10.0
        proc = await self.start(
            "--http-port", "tcp:0:interface=127.0.0.1", "--drain-timeout", str(drain_timeout)
        )
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", proc.ports["http"])
        client = await endpoint.connect(protocol.Factory.forProtocol(_RawHTTP))
        for _ in range(2):  # the second request proves the connection is kept alive
            reply = await client.get("/v2/health/ready")
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
            self.assertNotIn(b"connection: close", reply.lower())
        started = reactor.seconds()
        self.transport.signalProcess("TERM")
        self.assertEqual(await proc.ended, 0, proc.output)
        self.assertLess(reactor.seconds() - started, drain_timeout)
        await client.closed  # the server closed the idle connection
        self.assertIn("twinfer stopped", proc.output)

    async def test_a_port_that_cannot_be_bound_fails_start_up(self) -> None:
        taken = reactor.listenTCP(
            0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1"
        )
        self.addCleanup(taken.stopListening)
        description = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        proc = self.spawn("--http-port", description)
        exit_code = await proc.ended
        self.assertNotEqual(exit_code, 0, proc.output)
        self.assertIn(
            f"twinfer: cannot listen on {description}: address already in use", proc.output
        )
        self.assertFalse(proc.ready.called and proc.ports, proc.ports)
        proc.ready.addErrback(lambda _: None)  # "twistd exited early": expected here

    async def test_the_console_sets_the_level_of_twistds_log(self) -> None:
        proc = await self.start("--debug-port", "tcp:0:interface=127.0.0.1")
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", proc.ports["console"])
        console = await endpoint.connect(protocol.Factory.forProtocol(ConsoleClient))
        await console.read()
        self.assertIn("set to warn", await console.send("loglevel warn"))
        self.assertIn("drained", await console.send("drain cpu"))
        self.assertIn("set to info", await console.send("loglevel info"))
        self.assertIn("undrained", await console.send("undrain cpu"))
        await proc.wait_for("console: (loopback) undrains cpu")
        self.assertNotIn("drains cpu", proc.output.replace("undrains cpu", ""))
        console.transport.loseConnection()
        await console.closed
        self.transport.signalProcess("TERM")
        self.assertEqual(await proc.ended, 0, proc.output)
