"""The debug console over a real TCP connection: login, every command, bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import numpy as np
from twisted.conch.telnet import DO, DONT, ECHO, IAC, WILL, WONT
from twisted.internet import endpoints, reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel

from ops_support import ConsoleClient, OpsServerTestCase
from twinfer.client import connect
from twinfer.errors import TwinferError
from twinfer.frontends.console import LogLevels, hash_password, main, table, verify_password


class TelnetClient(ConsoleClient):
    """A :class:`ConsoleClient` that negotiates as ``telnet`` does.

    It answers the server's ``IAC WILL/WONT ECHO`` with ``IAC DO/DONT ECHO``
    (so the server reads those answers in the middle of its input), hands
    only the text on, and keeps every byte received in :attr:`raw`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.raw = b""
        self._pending = b""

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        data, self._pending = self._pending + data, b""
        text = b""
        while data:
            before, iac, rest = data.partition(IAC)
            text += before
            if not iac:
                break
            if len(rest) < 2:  # the rest of the command is still on its way
                self._pending = iac + rest
                break
            verb, option = rest[:1], rest[1:2]
            assert verb in (WILL, WONT) and option == ECHO, f"unexpected telnet command {rest!r}"
            self.transport.write(IAC + (DO if verb == WILL else DONT) + option)
            data = rest[2:]
        super().dataReceived(text)


def test_password_hash_round_trip() -> None:
    stored = hash_password("s3cret", iterations=1000)
    assert stored.startswith("pbkdf2_sha256$1000$")
    assert verify_password("s3cret", stored)
    assert not verify_password("s3cret!", stored)
    assert not verify_password("x", "pbkdf2_sha256$broken")
    assert verify_password("plain", "plain") and not verify_password("plain", "other")


def test_python_m_prints_a_credentials_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twinfer.frontends.console", "alice"],
        input="s3cret\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    user, stored = result.stdout.strip().split(":", 1)
    assert user == "alice"
    assert stored.startswith("pbkdf2_sha256$300000$")
    assert verify_password("s3cret", stored) and not verify_password("s3cret!", stored)
    assert main(["alice:x"]) == 2  # a user name cannot hold the separator


def test_table_aligns_columns() -> None:
    text = table(("A", "LONGER"), [("xxxx", 1), ("y", 22)])
    assert text.splitlines() == ["A     LONGER", "xxxx  1", "y     22"]


def test_log_levels_filter_what_reaches_the_observer() -> None:
    seen: list[str] = []
    levels = LogLevels()
    log = Logger(
        namespace="twinfer.dispatcher",
        observer=levels.filtering(lambda event: seen.append(event["log_format"])),
    )
    log.debug("hidden by default")
    log.info("shown by default")
    levels.set(LogLevel.warn)
    log.info("hidden at warn")
    log.warn("shown at warn")
    levels.set(LogLevel.debug, "twinfer.dispatcher")
    log.debug("shown for the namespace")
    assert seen == ["shown by default", "shown at warn", "shown for the namespace"]


class ConsoleTests(OpsServerTestCase):
    async def telnet(self, port: int) -> TelnetClient:
        """A :class:`TelnetClient` connected to the console on ``port``."""
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client: TelnetClient = await endpoint.connect(Factory.forProtocol(TelnetClient))

        async def close() -> None:
            if client.transport.connected:
                client.transport.loseConnection()
                await client.closed

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        return client

    async def logged_in(self) -> Any:
        credentials = self.mktemp()
        with open(credentials, "w") as f:
            f.write("# operators\n")
            f.write(f"admin:{hash_password('letmein', iterations=1000)}\n")
        port = await self.start_console(credentials)
        client = await self.telnet(port)
        banner = await client.read()
        self.assertIn("debug console", banner)
        self.assertTrue(banner.endswith("Username: "))
        self.assertEqual(await client.send("admin"), "Password: ")
        reply = await client.send("letmein")
        self.assertIn("Logged in", reply)
        # The client stopped echoing for the password only; its answers to
        # the server (IAC DO ECHO, IAC DONT ECHO) did not disturb the login.
        self.assertIn(b"Username: " + IAC + WILL + ECHO + b"Password: ", client.raw)
        self.assertIn(IAC + WONT + ECHO + b"\r\nLogged in", client.raw)
        self.assertEqual(client.raw.count(IAC), 2)
        return client

    async def test_login_refused_then_closed(self) -> None:
        credentials = self.mktemp()
        with open(credentials, "w") as f:
            f.write(f"admin:{hash_password('letmein', iterations=1000)}\n")
        await self.start_ops_server()
        port = await self.start_console(credentials)
        client = await self.telnet(port)
        await client.read()
        for attempt in range(3):
            await client.send("admin" if attempt else "nobody")
            reply = await client.send("wrong")
            self.assertIn("Login incorrect", reply)
        await client.closed  # three failures: the server hangs up
        # Every password prompt turned the echo off, and every answer on again.
        self.assertEqual(client.raw.count(IAC + WILL + ECHO), 3)
        self.assertEqual(client.raw.count(IAC + WONT + ECHO), 3)
        self.assertTrue(
            client.raw.endswith(IAC + WONT + ECHO + b"\r\nLogin incorrect. Goodbye.\r\n")
        )
        # Commands before login are never run: the first line is a user name.
        client = await self.telnet(port)
        await client.read()
        self.assertEqual(await client.send("status"), "Password: ")

    async def test_every_command(self) -> None:
        server_port = await self.start_ops_server()
        client = await self.logged_in()
        tiny = await connect(reactor, f"tcp:127.0.0.1:{server_port}")
        self.close_clients_on_cleanup(tiny)
        x = np.ones((3, 4), np.float32)
        for _ in range(5):
            await tiny.infer("tiny", {"x": x})
        with self.assertRaises(TwinferError):
            await tiny.infer("tiny", {"x": np.ones((3, 5), np.float32)})

        help_text = await client.send("help")
        for name in (
            "status",
            "models",
            "devices",
            "queues",
            "stats",
            "load",
            "unload",
            "reload",
            "drain",
            "undrain",
            "loglevel",
            "quit",
            "frontends",
        ):
            self.assertIn(f"\r\n{name}", help_text)

        status = await client.send("status")
        self.assertRegex(status, r"connections\s+1\r\n")
        self.assertRegex(status, r"requests\s+6\r\n")
        self.assertRegex(status, r"ok\s+5\r\n")
        self.assertRegex(status, r"errors\s+1\r\n")
        self.assertRegex(status, r"state\s+ready")
        # Per front end, under the totals: the binary client, and no request in flight.
        self.assertRegex(status, r"connections\s+1\r\n  binary\s+1\r\nconsole sessions\s+1\r\n")
        self.assertRegex(status, r"in flight\s+0\r\n  binary\s+0\r\nrequests")

        frontends = (await client.send("frontends")).splitlines()
        self.assertEqual(
            re.split(r"\s{2,}", frontends[0]),
            ["FRONTEND", "CONNECTIONS", "IN FLIGHT", "ANSWERED", "OUTCOMES", "PROTOCOL ERRORS"],
        )
        self.assertEqual(
            frontends[1].split(), ["binary", "1", "0", "6", "OK:5,INVALID_SHAPE:1", "-"]
        )
        self.assertEqual(frontends[2:], ["twinfer> "])

        models = await client.send("models")
        self.assertRegex(models, r"tiny\s+cpu\s+0\s+x:f32\[\?,4\]\s+6\s+1\s+builtin:tiny")
        # The test config pins PERFORMANCE_HINT: one engine, as configured.
        self.assertRegex(models, r"builtin:tiny\s+cpu:properties\r\n")

        devices = await client.send("devices")
        rows = [line.split() for line in devices.splitlines()[1:-1]]
        expected = [["cpu", "cpu#0", "idle"], ["cpu", "cpu#1", "idle"]]
        self.assertEqual([r[:3] for r in rows], expected)
        self.assertEqual(sum(int(r[4]) for r in rows), 5)  # jobs done over both replicas
        self.assertEqual([r[-1] for r in rows], ["single", "single"])  # PERFORMANCE_HINT pinned

        queues = await client.send("queues")
        self.assertRegex(queues, r"QUEUE\s+MODEL\s+DEVICES\s+DEPTH\s+SIZE\s+OLDEST WAIT")
        self.assertRegex(queues, r"tiny\s+tiny\s+cpu\s+0\s+256\s+-")

        stats = await client.send("stats tiny")
        self.assertIn("tiny: 6 requests, 1 errors", stats)
        self.assertRegex(stats, r"INVALID_SHAPE\s+1")
        self.assertRegex(stats, r"OK\s+5")
        # The same counts by front end: all of them came over the binary protocol.
        self.assertRegex(stats, r"CODE\s+COUNT\s+BINARY\r\nINVALID_SHAPE\s+1\s+1\r\nOK\s+5\s+5\r\n")
        self.assertRegex(stats, r"end-to-end(\s+[\d.]+){3}\s+6")
        self.assertRegex(stats, r"compute(\s+[\d.]+){3}\s+5")

        self.assertIn("error: no model 'nope'", await client.send("stats nope"))

        loaded = await client.send("load tiny2 builtin:tiny cpu")
        self.assertRegex(loaded, r"^loaded tiny2 from builtin:tiny on cpu in [\d.]+s")
        out = await tiny.infer("tiny2", {"x": x})
        self.assertEqual(out["y"].shape, (3, 3))
        reloaded = await client.send("reload tiny2")
        self.assertRegex(reloaded, r"^reloaded tiny2 ")
        self.assertEqual((await tiny.infer("tiny2", {"x": x}))["y"].shape, (3, 3))
        self.assertRegex(await client.send("unload tiny2"), r"^unloaded tiny2 \(0 queued")
        self.assertEqual(len(self.dispatcher.workers), 2)  # tiny2 shared tiny's workers

        drained = await client.send("drain cpu")
        self.assertIn("device cpu drained: 2 worker(s)", drained)
        self.assertRegex(await client.send("devices"), r"cpu#0\s+drained")
        self.assertIn("not ready", await client.send("status"))
        self.assertIn("undrained", await client.send("undrain cpu"))
        self.assertEqual((await tiny.infer("tiny", {"x": x}))["y"].shape, (3, 3))

        self.assertIn("log level of everything set to debug", await client.send("loglevel debug"))
        self.assertIn("set to info", await client.send("loglevel INFO twinfer"))
        self.console_factory.log_levels.set(LogLevel.info)

        self.assertIn("bye", await client.send("quit"))
        await client.closed

    async def test_bad_input_keeps_the_session(self) -> None:
        await self.start_ops_server()
        client = await self.logged_in()
        cases = {
            "frobnicate": "error: unknown command 'frobnicate'",
            "stats": "error: expected 1 argument(s); usage: stats MODEL",
            "status now": "error: expected 0 argument(s); usage: status",
            "load onlyname": "error: expected 2-3 argument(s); usage: load NAME PATH",
            "load x /no/such/model.onnx": "error: no such model file: /no/such/model.onnx",
            "load x builtin:nothing": "error: model 'x': cannot read builtin:nothing",
            "load tiny builtin:tiny": "error: model 'tiny' is already loaded (use reload)",
            "load y builtin:tiny gpu": "error: no device 'gpu' (devices: cpu)",
            "unload nope": "error: model 'nope' is not loaded",
            "reload nope": "error: model 'nope' is not loaded",
            "drain gpu": "error: no device 'gpu' (devices: cpu)",
            "loglevel loud": "error: unknown level 'loud'",
        }
        for line, expected in cases.items():
            reply = await client.send(line)
            self.assertTrue(reply.startswith(expected), f"{line!r} -> {reply!r}")
            self.assertEqual(len(reply.splitlines()), 2, reply)  # one line + prompt
        self.assertEqual(await client.send(""), "twinfer> ")
        # Telnet's interrupt (IAC IP) ends the session.
        client.transport.write(b"\xff\xf4\r\n")
        await client.closed

    async def test_loopback_console_without_credentials(self) -> None:
        await self.start_ops_server()
        port = await self.start_console(None)
        client = await self.console(port)
        banner = await client.read()
        self.assertTrue(banner.endswith("twinfer> "))
        self.assertIn("tiny", await client.send("models"))
