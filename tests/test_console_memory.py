"""The debug console in memory: its telnet handling and its view of every front end.

The console session is a real :class:`ConsoleProtocol` over a
``StringTransport``, logging in through a real portal with an in-memory
checker (no pool thread).  For the front ends, a Controller over a real
data plane whose one device worker runs its thread by hand (as in
test_metrics), with the real binary and HTTP front ends over
StringTransports.  The same console over a TCP socket is in
test_ops_console.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
from twisted.conch.telnet import DO, DONT, ECHO, IAC, IP, NOP, SB, SE, WILL, WONT
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface import implementer

from http_memory import Connection, request_bytes
from scheduling_support import HandRunner, tiny_engine, tiny_signature
from support import config_from
from twinfer.config import ServerConfig
from twinfer.dataplane import DataPlane
from twinfer.frontends.binary import TwinferFactory, TwinferProtocol
from twinfer.frontends.console import PROMPT, ConsoleFactory, ConsoleRealm
from twinfer.frontends.console.telnet import TelnetInput
from twinfer.frontends.http.site import Router, TwinferSite
from twinfer.frontends.http.v2 import KServeAPI
from twinfer.ops.control import Controller
from twinfer.scheduling import Dispatcher, JobQueue, ModelEntry, Worker
from twinfer.wire.encode import encode_bytes
from twinfer.wire.messages import Hello

CONFIG = """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 1

[[models]]
name = "tiny"
path = "builtin:tiny"
queue_size = 4
"""

X = np.arange(8, dtype=np.float32).reshape(2, 4)
LOGGED_IN = b"\r\nLogged in. Type 'help' for the commands.\r\n" + PROMPT


def infer_request(x: np.ndarray, model: str = "tiny") -> bytes:
    """A KServe v2 infer request for ``model``, as raw HTTP."""
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    body = json.dumps({"inputs": [tensor]}).encode()
    return request_bytes("POST", f"/v2/models/{model}/infer", body)


class ConsoleSession:
    """One console connection, driven by hand."""

    def __init__(self, factory: ConsoleFactory) -> None:
        address = IPv4Address("TCP", "127.0.0.1", 50000)
        protocol = factory.buildProtocol(address)
        assert protocol is not None
        self.protocol = protocol
        # Lenient: the session resumes reading after its last failed login
        # has already closed the connection, which a real transport allows.
        self.transport = StringTransport(peerAddress=address, lenient=True)
        self.protocol.makeConnection(self.transport)

    def output(self) -> bytes:
        """What the console wrote since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def send(self, *pieces: bytes) -> bytes:
        """Deliver ``pieces`` one by one (as TCP may split them); the console's answer."""
        for piece in pieces:
            self.protocol.dataReceived(piece)
        return self.output()

    def command(self, line: str) -> str:
        """The reply to ``line``, without its final prompt."""
        reply = self.send(line.encode() + b"\r\n")
        assert reply.endswith(PROMPT), reply
        return reply[: -len(PROMPT)].decode()


class TelnetInputTests(unittest.SynchronousTestCase):
    def test_commands_are_removed_wherever_they_are_split(self) -> None:
        stream = (
            b"st" + IAC + DO + ECHO + b"at" + IAC + NOP + b"us"
            + IAC + SB + b"\x18\x00xterm" + IAC + IAC + b"\x01" + IAC + SE
            + IAC + IAC + b"\r\n"
        )  # fmt: skip
        expected = b"status\xff\r\n"
        assert TelnetInput().feed(stream) == expected
        telnet = TelnetInput()
        data = b"".join(telnet.feed(stream[i : i + 1]) for i in range(len(stream)))
        assert data == expected
        assert not telnet.interrupted

    def test_an_interrupt_drops_what_follows(self) -> None:
        telnet = TelnetInput()
        assert telnet.feed(b"sta" + IAC) == b"sta"
        assert telnet.feed(IP + b"tus\r\n") == b""
        assert telnet.interrupted
        assert telnet.feed(b"help\r\n") == b""


@implementer(ICredentialsChecker)
class SlowChecker:
    """Answers a login when the test fires :attr:`answer` (as a pool thread would)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.answer: Deferred[bytes] = Deferred()

    def requestAvatarId(self, credentials: object) -> Deferred[bytes]:
        return self.answer


class ConsoleLoginTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        checker = InMemoryUsernamePasswordDatabaseDontUse(admin=b"letmein")
        portal = Portal(ConsoleRealm(), [checker])  # type: ignore[arg-type]
        controller = Controller(
            config_from(CONFIG), DataPlane(Dispatcher({}, [], clock=Clock()), tasks=None), Clock()
        )
        self.console = ConsoleSession(ConsoleFactory(controller, portal))
        assert self.console.output().endswith(b"debug console\r\nUsername: ")

    def test_the_password_is_not_echoed_by_a_telnet_client(self) -> None:
        console = self.console
        # Echo off just before the password prompt...
        assert console.send(b"admin\r\n") == IAC + WILL + ECHO + b"Password: "
        # ...the client agrees (IAC DO ECHO) and types the password; the
        # server echoes nothing (telnet shows nothing) and turns the echo back
        # on as soon as the password's line is in.
        reply = console.send(IAC + DO, ECHO + b"letm", b"ein\r\n")
        assert reply == IAC + WONT + ECHO + LOGGED_IN
        # The client's agreement, even split, is not part of a command.
        assert console.send(IAC, DONT + ECHO + b"quit\r\n") == b"bye\r\n"
        assert console.transport.disconnecting

    def test_a_client_that_does_not_negotiate_logs_in_too(self) -> None:
        console = self.console  # nc: sees the three bytes, answers nothing
        assert console.send(b"admin\r\n").endswith(b"Password: ")
        assert console.send(b"letmein\r\n") == IAC + WONT + ECHO + LOGGED_IN
        assert "COMMAND" in console.command("help")

    def test_echo_is_back_on_after_a_failed_login(self) -> None:
        console = self.console
        for attempt in range(3):
            assert console.send(b"admin\r\n") == IAC + WILL + ECHO + b"Password: "
            reply = console.send(IAC + DO + ECHO + b"wrong\r\n")
            last = attempt == 2
            expected = (
                b"Login incorrect. Goodbye.\r\n" if last else b"Login incorrect.\r\nUsername: "
            )
            assert reply == IAC + WONT + ECHO + b"\r\n" + expected
            console.send(IAC + DONT + ECHO)
        assert console.transport.disconnecting

    def test_lines_typed_during_the_login_check_run_after_it(self) -> None:
        slow = SlowChecker()
        controller = self.console.protocol.factory.controller
        console = ConsoleSession(ConsoleFactory(controller, Portal(ConsoleRealm(), [slow])))
        console.output()
        console.send(b"admin\r\n")
        # The password and the next command in one packet, the telnet answer split.
        assert console.send(IAC + DO + ECHO + b"letmein\r\nhe", b"lp\r\n") == IAC + WONT + ECHO
        slow.answer.callback(b"admin")  # the check is done: then the buffered line runs
        reply = console.output()
        assert reply.startswith(LOGGED_IN + b"COMMAND")
        assert reply.endswith(PROMPT)

    def test_telnet_interrupt_closes_the_session_at_once(self) -> None:
        assert self.console.send(b"adm" + IAC + IP) == b""
        assert self.console.transport.disconnecting


class ConsoleFrontendTests(unittest.SynchronousTestCase):
    """``status``, ``frontends`` and ``stats`` show every front end's requests."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = HandRunner()
        queue = JobQueue("tiny", size=4)
        worker = Worker(
            "cpu#0", "cpu", {"tiny": tiny_engine()}, [queue], clock=self.clock, runner=self.runner
        )
        entry = ModelEntry("tiny", tiny_signature(), ("cpu",), (queue,))
        dispatcher = Dispatcher({"tiny": entry}, [worker], clock=self.clock)
        dispatcher.start()
        self.addCleanup(dispatcher.stop)
        self.plane = DataPlane(dispatcher, tasks=None)
        controller = Controller(config_from(CONFIG), self.plane, self.clock)
        router = Router()
        KServeAPI(self.plane, self.clock, ThreadPool()).install(router)
        self.site = TwinferSite(router, self.plane, 65536, 5.0, reactor=self.clock)
        self.binary = TwinferFactory(
            self.plane, ServerConfig(max_frame_size=4096, max_inflight_per_connection=5)
        )
        self.console = ConsoleSession(ConsoleFactory(controller))  # loopback: no login
        self.console.output()

    def binary_client(self, port: int) -> tuple[TwinferProtocol, StringTransport]:
        proto = self.binary.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        assert isinstance(proto, TwinferProtocol)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        proto.makeConnection(transport)
        proto.dataReceived(encode_bytes(0, Hello(agent="test")))
        return proto, transport

    def run_device(self) -> None:
        while self.runner.handed:
            self.runner.run_next()

    def frontends(self) -> list[list[str]]:
        """The ``frontends`` table, split into cells."""
        lines = self.console.command("frontends").splitlines()
        assert re.split(r"\s{2,}", lines[0]) == [
            "FRONTEND", "CONNECTIONS", "IN FLIGHT", "ANSWERED", "OUTCOMES", "PROTOCOL ERRORS"
        ]  # fmt: skip
        return [line.split() for line in lines[1:]]

    def status(self) -> list[tuple[str, str]]:
        """The ``status`` rows about connections and requests in flight."""
        rows = [
            tuple(re.split(r"\s{2,}", line.strip()))
            for line in self.console.command("status").splitlines()
        ]
        first = rows.index(("connections", rows[rows.index(("FIELD", "VALUE")) + 4][1]))
        last = next(i for i, row in enumerate(rows) if row[0] == "requests")
        return rows[first:last]  # type: ignore[return-value]

    def test_every_front_end_in_status_frontends_and_stats(self) -> None:
        # Both front ends registered with the data plane before any client.
        assert self.frontends() == [
            ["binary", "0", "0", "0", "-", "-"],
            ["http", "0", "0", "0", "-", "-"],
        ]
        proto, _ = self.binary_client(40001)
        http, idle = Connection(self.site, 40002), Connection(self.site, 40003)
        http.send(infer_request(X))  # held by the device: in flight
        assert proto.session is not None
        binary_request = self.plane.infer(proto.session, 1, "tiny", {"x": X})
        assert self.status() == [
            ("connections", "3"),
            ("binary", "1"),
            ("http", "2"),
            ("console sessions", "1"),
            ("in flight", "2"),
            ("binary", "1"),
            ("http", "1"),
        ]
        assert self.frontends() == [
            ["binary", "1", "1", "0", "-", "-"],
            ["http", "2", "1", "0", "-", "-"],
        ]

        self.run_device()
        self.successResultOf(binary_request)
        http.send(infer_request(np.ones((2, 5), np.float32)))  # INVALID_SHAPE
        http.send(infer_request(X, model="nope"))  # UNKNOWN_MODEL, counted under no model
        self.plane.infer(proto.session, 2, "tiny", {"x": X})
        self.run_device()
        bad, bad_transport = self.binary_client(40004)
        bad.dataReceived(b"GET / HTTP/1.1\r\n\r\n")  # HTTP on the binary port
        assert bad_transport.disconnecting
        bad.connectionLost()
        assert [r.status for r in http.responses()] == [200, 400, 404]
        idle.hang_up()

        assert self.frontends() == [
            ["binary", "1", "0", "2", "OK:2", "MALFORMED_FRAME:1"],
            ["http", "1", "0", "3", "OK:1,INVALID_SHAPE:1,UNKNOWN_MODEL:1", "-"],
        ]
        assert self.status() == [
            ("connections", "2"),
            ("binary", "1"),
            ("http", "1"),
            ("console sessions", "1"),
            ("in flight", "0"),
            ("binary", "0"),
            ("http", "0"),
        ]
        stats = self.console.command("stats tiny").split("\r\n\r\n")[0].splitlines()
        assert stats == [
            "tiny: 4 requests, 1 errors",
            "CODE           COUNT  BINARY  HTTP",
            "INVALID_SHAPE  1      0       1",
            "OK             3      2       1",
        ]
