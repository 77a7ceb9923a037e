"""The HAProxy agent-check responder in memory: its reply for each state of the
node, the snapshot taken from a real controller, the one-line protocol on
``StringTransport``, and its port kept open through the graceful drain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from scheduling_support import HandRunner, outcome, rows, tiny_engine, tiny_job, tiny_signature
from support import config_from
from twinfer.dataplane import DataPlane
from twinfer.frontends.binary import TwinferFactory
from twinfer.ops.agent import (
    MAX_REASON,
    AgentFactory,
    LoadSnapshot,
    agent_reply,
    drain_finished,
    take_snapshot,
    weight_percent,
)
from twinfer.ops.control import Controller
from twinfer.ops.listening import ListeningService
from twinfer.scheduling import Dispatcher, InferResult, JobQueue, ModelEntry, Worker, WorkerState

CONFIG = """
[server]
agent_maxconn = {maxconn}

[[devices]]
name = "cpu"
target = "CPU"
replicas = 2

[[models]]
name = "tiny"
path = "builtin:tiny"
"""


def snapshot(**fields: Any) -> LoadSnapshot:
    """Two workers, both ready, nothing queued, unless ``fields`` say otherwise."""
    values: dict[str, Any] = {
        "closing": False,
        "workers": 2,
        "ready": 2,
        "drained": 0,
        "queued": 0,
    }
    values.update(fields)
    return LoadSnapshot(**values)


class ReplyTests(unittest.SynchronousTestCase):
    """:func:`agent_reply`: one case per reply HAProxy can get."""

    def test_an_idle_node_has_its_full_weight(self) -> None:
        self.assertEqual(agent_reply(snapshot()), "up ready 100%")

    def test_queued_jobs_lower_the_weight_against_the_workers(self) -> None:
        self.assertEqual(agent_reply(snapshot(queued=2)), "up ready 50%")  # one job behind each
        self.assertEqual(agent_reply(snapshot(queued=4)), "up ready 33%")
        self.assertEqual(agent_reply(snapshot(queued=1)), "up ready 67%")

    def test_drained_or_failed_workers_lower_the_weight(self) -> None:
        self.assertEqual(agent_reply(snapshot(ready=1, drained=1)), "up ready 50%")
        failed = snapshot(workers=4, ready=1, problems=("cpu#1 failed",) * 3)
        self.assertEqual(agent_reply(failed), "up ready 25%")

    def test_the_weight_never_reaches_zero_which_haproxy_takes_for_drain(self) -> None:
        self.assertEqual(weight_percent(snapshot(workers=1, ready=1, queued=1000)), 1)
        self.assertEqual(agent_reply(snapshot(workers=1, ready=1, queued=1000)), "up ready 1%")

    def test_maxconn_follows_when_configured(self) -> None:
        self.assertEqual(agent_reply(snapshot(maxconn=30)), "up ready 100% maxconn:30")
        self.assertEqual(agent_reply(snapshot(queued=2, maxconn=8)), "up ready 50% maxconn:8")

    def test_a_closing_node_drains_whatever_its_workers_do(self) -> None:
        self.assertEqual(agent_reply(snapshot(closing=True, maxconn=30)), "drain")
        self.assertEqual(agent_reply(snapshot(closing=True, ready=0, workers=0)), "drain")

    def test_every_worker_drained_is_drain(self) -> None:
        self.assertEqual(agent_reply(snapshot(ready=0, drained=2)), "drain")

    def test_no_ready_worker_is_down_with_the_reason(self) -> None:
        failed = snapshot(
            ready=0, problems=("cpu#0 failed (device lost)", "cpu#1 failed (device lost)")
        )
        self.assertEqual(
            agent_reply(failed),
            "down #no healthy device: cpu#0 failed (device lost), cpu#1 failed (device lost)",
        )

    def test_drained_and_failed_with_none_ready_is_down(self) -> None:
        mixed = snapshot(ready=0, drained=1, problems=("cpu#1 failed (device lost)",))
        self.assertEqual(agent_reply(mixed), "down #no healthy device: cpu#1 failed (device lost)")

    def test_no_running_worker_is_down(self) -> None:
        self.assertEqual(
            agent_reply(snapshot(workers=0, ready=0)), "down #no device worker is running"
        )

    def test_the_reason_is_one_short_line(self) -> None:
        problem = "cpu#0 failed (line one\r\nline two\n" + "x" * 500 + ")"
        reply = agent_reply(snapshot(workers=1, ready=0, problems=(problem,)))
        self.assertNotIn("\n", reply)
        self.assertNotIn("\r", reply)
        self.assertIn("line one line two", reply)
        self.assertEqual(len(reply), len("down #") + MAX_REASON)
        self.assertTrue(reply.endswith("..."))


class SnapshotTests(unittest.SynchronousTestCase):
    """:func:`take_snapshot` reads a real dispatcher and controller (two
    workers on the real ``tiny`` engine, their thread a HandRunner)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = HandRunner()
        self.queue = JobQueue("tiny", size=64)
        self.workers = [
            Worker(
                f"cpu#{i}", "cpu", {"tiny": tiny_engine()}, [self.queue],
                clock=self.clock, runner=self.runner,
            )
            for i in range(2)
        ]  # fmt: skip
        entry = ModelEntry("tiny", tiny_signature(), ("cpu",), (self.queue,))
        self.dispatcher = Dispatcher({"tiny": entry}, self.workers, clock=self.clock)
        self.plane = DataPlane(self.dispatcher, tasks=None)
        self.controller = Controller(config_from(CONFIG.format(maxconn=0)), self.plane, self.clock)

    def reply(self) -> str:
        return agent_reply(take_snapshot(self.controller))

    def test_before_the_workers_start_the_node_is_down(self) -> None:
        self.assertEqual(self.reply(), "down #no device worker is running")

    def test_idle_then_loaded_then_idle(self) -> None:
        self.dispatcher.start()
        self.addCleanup(self.dispatcher.stop)
        self.assertEqual(self.reply(), "up ready 100%")
        jobs = [tiny_job(rows(1, seed=i)) for i in range(10)]
        results = [outcome(job.deferred) for job in jobs]
        for job in jobs:
            self.queue.put(job)
        # The workers' threads hold some; the others wait in the queue.
        waiting = self.queue.depth
        self.assertEqual(waiting + self.runner.handed, 10)
        self.assertEqual(take_snapshot(self.controller).queued, waiting)
        self.assertGreaterEqual(waiting, 6)
        self.assertEqual(self.reply(), f"up ready {round(100 * 2 / (2 + waiting))}%")
        while self.runner.handed:
            self.runner.run_next()
        self.assertTrue(all(len(r) == 1 and isinstance(r[0], InferResult) for r in results))
        self.assertEqual(self.reply(), "up ready 100%")

    def test_console_drain_of_every_device_then_undrain(self) -> None:
        self.dispatcher.start()
        self.addCleanup(self.dispatcher.stop)
        self.controller.drain("cpu")
        self.assertEqual(self.reply(), "drain")
        self.controller.undrain("cpu")
        self.assertEqual(self.reply(), "up ready 100%")

    def test_one_failed_worker_halves_the_weight_and_both_make_it_down(self) -> None:
        self.dispatcher.start()
        self.addCleanup(self.dispatcher.stop)
        self.workers[0].set_state(WorkerState.FAILED, "device lost")
        self.assertEqual(self.reply(), "up ready 50%")
        self.workers[1].set_state(WorkerState.FAILED, "device lost")
        self.assertEqual(
            self.reply(),
            "down #no healthy device: cpu#0 failed (device lost), cpu#1 failed (device lost)",
        )

    def test_sigterm_drain(self) -> None:
        self.dispatcher.start()
        self.addCleanup(self.dispatcher.stop)
        self.controller.begin_drain()  # what the graceful drain does first
        self.assertEqual(self.reply(), "drain")

    def test_maxconn_comes_from_the_server_table(self) -> None:
        controller = Controller(config_from(CONFIG.format(maxconn=12)), self.plane, self.clock)
        self.dispatcher.start()
        self.addCleanup(self.dispatcher.stop)
        self.assertEqual(agent_reply(take_snapshot(controller)), "up ready 100% maxconn:12")


class HalfClosingTransport(StringTransport):
    """A ``StringTransport`` that, like a TCP one, can close only its writing half."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class ProtocolTests(unittest.SynchronousTestCase):
    """The adapter: one line at connection, then the close."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.state = snapshot()
        self.factory = AgentFactory(None, self.clock, close_timeout=10.0)  # type: ignore[arg-type]
        self.factory.snapshot = lambda: self.state  # type: ignore[method-assign]

    def connect(self, transport: StringTransport) -> Any:
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(transport)
        return protocol

    def test_answers_one_line_at_once_and_closes(self) -> None:
        transport = StringTransport()
        self.connect(transport)
        self.assertEqual(transport.value(), b"up ready 100%\n")
        self.assertTrue(transport.disconnecting)

    def test_each_check_gets_the_state_of_its_moment(self) -> None:
        first, second = StringTransport(), StringTransport()
        self.connect(first)
        self.state = snapshot(closing=True)
        self.connect(second)
        self.assertEqual((first.value(), second.value()), (b"up ready 100%\n", b"drain\n"))

    def test_on_tcp_it_half_closes_and_reads_what_haproxy_sends_until_it_closes(self) -> None:
        transport = HalfClosingTransport()
        protocol = self.connect(transport)
        self.assertEqual(transport.value(), b"up ready 100%\n")
        self.assertTrue(transport.write_closed)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"twinfer-backend\n")  # an agent-send line: ignored
        self.assertEqual(transport.value(), b"up ready 100%\n")
        protocol.connectionLost(Failure(ConnectionDone()))  # HAProxy closed after reading
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_checker_that_never_closes_is_cut_off(self) -> None:
        transport = HalfClosingTransport()
        protocol = self.connect(transport)
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)  # StringTransport: set by abortConnection
        protocol.connectionLost(Failure(ConnectionDone()))


class _Port:
    def __init__(self) -> None:
        self.listening = True

    def stopListening(self) -> Deferred[None]:
        self.listening = False
        return succeed(None)

    def getHost(self) -> Any:
        return None


@implementer(IStreamServerEndpoint)
class _Endpoint:
    def __init__(self) -> None:
        self.port = _Port()

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        return succeed(self.port)  # type: ignore[arg-type]


class KeepOpenTests(unittest.SynchronousTestCase):
    """The agent's port listens until the drain has closed every connection."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        queue = JobQueue("tiny", size=4)
        entry = ModelEntry("tiny", tiny_signature(), ("cpu",), (queue,))
        self.plane = DataPlane(Dispatcher({"tiny": entry}, [], clock=Clock()), tasks=None)
        self.binary = TwinferFactory(self.plane)
        self.endpoint = _Endpoint()
        self.service = ListeningService(
            reactor,
            "agent",
            "tcp:0",
            AgentFactory(None, Clock()),  # type: ignore[arg-type]
            endpoint=self.endpoint,
            keep_open=lambda: drain_finished(self.plane),
        )
        self.service.privilegedStartService()
        self.service.startService()

    def connection(self) -> Any:
        protocol = self.binary.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        return protocol

    def test_stops_listening_once_every_open_connection_is_closed(self) -> None:
        a, b = self.connection(), self.connection()
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        self.assertTrue(self.endpoint.port.listening)  # HAProxy still hears "drain"
        a.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.endpoint.port.listening)
        b.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopped)
        self.assertFalse(self.endpoint.port.listening)

    def test_with_no_connection_it_stops_at_once(self) -> None:
        self.successResultOf(self.service.stopService())
        self.assertFalse(self.endpoint.port.listening)


class AgentPortTests(unittest.TestCase):
    """``--agent-port`` on real loopback sockets, in the service tree ``twistd`` runs."""

    async def test_the_agent_port_answers_haproxy_over_tcp(self) -> None:
        from twisted.internet import endpoints, reactor
        from twisted.scripts import twistd

        from haproxy_support import ask
        from twinfer import tap
        from twistd_process import TWISTD_TINY_CONFIG

        config = Path(self.mktemp())
        config.write_text(TWISTD_TINY_CONFIG)
        options = twistd.ServerOptions()
        options.parseOptions(
            ["twinfer", f"--config={config}", "--port=tcp:0:interface=127.0.0.1"]
            + ["--agent-port=tcp:0:interface=127.0.0.1"]
        )
        top = tap.makeService(options.subOptions)
        self.assertEqual([s.name for s in top.listening_services()], ["agent", "binary"])
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        ports = await top.when_listening()
        agent = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", int(ports["agent"]))
        # HAProxy with agent-send writes a line first; the reply is the same.
        self.assertEqual(await ask(agent, b""), "up ready 100%\n")
        self.assertEqual(await ask(agent, b"twinfer_binary_nodes\n"), "up ready 100%\n")
