"""End to end with a real ``twistd twinfer`` process: SIGTERM drain, metrics, SIGHUP."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from twinfer.client import connect
from twinfer.errors import ErrorCode, TwinferError

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

LISTENING = re.compile(r"twinfer (?:(debug console|metrics) )?listening on tcp:127\.0\.0\.1:(\d+)")


class _Twistd(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = ""
        self.ports: dict[str, int] = {}
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[int] = Deferred()
        self.expected = 1

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")
        for match in LISTENING.finditer(self.output):
            self.ports[match.group(1) or "protocol"] = int(match.group(2))
        if len(self.ports) >= self.expected and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"twistd exited early:\n{self.output}"))
        self.ended.callback(reason.value.exitCode)


class TwistdTests(unittest.TestCase):
    timeout = 120

    async def start(self, *args: str, queue_size: int = 256) -> _Twistd:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        self.config_path = directory / "twinfer.toml"
        self.config_path.write_text(CONFIG.format(queue_size=queue_size))
        proc = _Twistd()
        proc.expected = 1 + sum(a in ("--metrics-port", "--debug-port") for a in args)
        argv = [TWISTD, "-n", "--pidfile=", "twinfer", "--config", str(self.config_path),
                "--port", "tcp:0:interface=127.0.0.1", *args]
        self.transport = reactor.spawnProcess(
            proc, TWISTD, argv, env=dict(os.environ), path=str(directory)
        )

        def kill() -> Deferred[int] | None:
            if proc.ended.called:
                return None
            self.transport.signalProcess("KILL")
            return proc.ended

        self.addCleanup(kill)
        await proc.ready
        return proc

    async def test_sigterm_answers_every_request(self) -> None:
        proc = await self.start("--drain-timeout", "20")
        url = f"tcp:127.0.0.1:{proc.ports['protocol']}"
        clients = [await connect(reactor, url) for _ in range(3)]
        image = np.zeros((1, 3, 224, 224), np.float32)
        counts = {"sent": 0, "ok": 0, "unavailable": 0, "lost": 0, "other": 0}
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
        self.assertEqual(counts["ok"] + counts["unavailable"], counts["sent"], counts)
        self.assertGreater(counts["unavailable"], 0, counts)  # new requests were refused
        stopped_line = r"twinfer stopped: (\d+) inference requests answered \((.*)\)"
        match = re.search(stopped_line, proc.output)
        self.assertIsNotNone(match, proc.output)
        assert match is not None
        self.assertEqual(int(match.group(1)), counts["sent"])  # the server agrees
        self.assertIn(f"OK={counts['ok']}", match.group(2))
        self.assertIn(f"UNAVAILABLE={counts['unavailable']}", match.group(2))

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
        client = await connect(reactor, f"tcp:127.0.0.1:{proc.ports['protocol']}")
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
        client = await connect(reactor, f"tcp:127.0.0.1:{proc.ports['protocol']}")
        self.config_path.write_text(CONFIG.format(queue_size=64).replace(
            '[[models]]\nname = "squeezenet"', '[[models]]\nname = "squeezenet2"'
        ))
        self.transport.signalProcess("HUP")
        while "configuration re-read" not in proc.output:
            await client.ping()
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
