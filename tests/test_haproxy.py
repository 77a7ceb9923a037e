"""Three real ``twistd twinfer`` nodes behind a real HAProxy, on loopback.

HAProxy runs ``etc/haproxy.cfg`` itself: every address and port there is a
``"${VARIABLE-default}"``, and this test sets the variables to its three
nodes' ports (HAProxy's own listening sockets are inherited file
descriptors, ``fd@N``, so no port is guessed).  The nodes serve the builtin
``tiny`` model, with ``--metrics-port`` (HAProxy's ``/readyz`` check) and
``--agent-port`` (HAProxy's agent check).

1. Load through HAProxy over six connections reaches all three nodes, and
   the nodes' ``/metrics`` count exactly the requests the clients saw
   answered.
2. Under load, one node gets SIGTERM: its agent answers ``drain`` (HAProxy's
   server state shows the agent's DRAIN), HAProxy sends it no new connection
   (its session total stays put while the refused connections reconnect),
   every request sent is answered, and the node exits 0.  Requests the
   draining node refused with ``UNAVAILABLE`` on its still-open connections
   are counted and reported (a client that re-sends them is another test's).

Skipped, loudly, only when ``haproxy`` is not installed (``.ci/run``
installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from haproxy_support import (
    ADMIN_FORCED_DRAIN,
    PORT_FILE_FD,
    ChildProcess,
    Load,
    haproxy_command,
    parse_servers_state,
    parse_stat,
    sample,
    until,
)
from twinfer.client import connect
from twistd_process import TWISTD_TINY_CONFIG

HAPROXY = shutil.which("haproxy")
TWISTD = str(Path(sys.executable).parent / "twistd")
HAPROXY_CFG = Path(__file__).resolve().parent.parent / "etc" / "haproxy.cfg"
BACKEND = "twinfer_binary_nodes"
HTTP_BACKEND = "twinfer_http_nodes"
NODES = ("node1", "node2", "node3")
#: HAProxy's inherited listening sockets, as its children's file descriptors.
BINARY_FD, HTTP_FD = 5, 6
LOOPBACK = "tcp:0:interface=127.0.0.1"
OK_SAMPLE = 'twinfer_requests_total{code="OK",frontend="binary",model="tiny"}'
UNAVAILABLE_SAMPLE = 'twinfer_requests_total{code="UNAVAILABLE",frontend="binary",model="tiny"}'


def listening_socket() -> socket.socket:
    """A TCP socket listening on a free loopback port, for HAProxy to inherit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class HAProxyTests(unittest.TestCase):
    timeout = 240

    def setUp(self) -> None:
        if HAPROXY is None:
            raise unittest.SkipTest(
                "*** haproxy is NOT installed: the real-HAProxy scale-out test did not run "
                "(apt-get install haproxy; .ci/run installs it) ***"
            )
        # Short: UNIX socket paths must fit in 108 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="twhap"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.http = Agent(reactor)

    # -- the processes ----------------------------------------------------------

    def spawn(
        self, name: str, argv: list[str], child_fds: dict[int, Any], **env: str
    ) -> ChildProcess:
        child = ChildProcess(name, port_file=PORT_FILE_FD in child_fds)
        transport = reactor.spawnProcess(
            child,
            argv[0],
            argv,
            env={**os.environ, **env},
            path=str(self.directory),
            childFDs=child_fds,
        )

        def kill() -> Deferred[int | None] | None:
            if child.ended.called:
                return None
            transport.signalProcess("KILL")
            return child.ended

        self.addCleanup(kill)
        return child

    def start_node(self, name: str) -> ChildProcess:
        config = self.directory / f"{name}.toml"
        config.write_text(TWISTD_TINY_CONFIG)
        argv = [TWISTD, "-n", "--pidfile=", "twinfer", "--config", str(config)]
        for option in ("--port", "--http-port", "--metrics-port", "--agent-port"):
            argv += [option, LOOPBACK]
        argv += [f"--port-file=/dev/fd/{PORT_FILE_FD}", "--drain-timeout", "20"]
        fds = {0: "w", 1: "r", 2: "r", PORT_FILE_FD: "r"}
        return self.spawn(name, argv, fds)

    def start_haproxy(self, nodes: dict[str, ChildProcess]) -> ChildProcess:
        binary, http = listening_socket(), listening_socket()
        self.frontend = binary.getsockname()[1]
        self.http_frontend = http.getsockname()[1]
        self.socket_path = str(self.directory / "admin.sock")
        env = {
            "TWINFER_HAPROXY_SOCKET": self.socket_path,
            "TWINFER_BINARY_BIND": f"fd@{BINARY_FD}",
            "TWINFER_HTTP_BIND": f"fd@{HTTP_FD}",
            "TWINFER_STATS_BIND": str(self.directory / "stats.sock"),
            # Fast checks: the drain window of a node is about half a second.
            "TWINFER_CHECK_INTER": "200ms",
            "TWINFER_AGENT_INTER": "100ms",
        }
        for index, node in enumerate(nodes.values(), start=1):
            env[f"TWINFER_NODE{index}"] = "127.0.0.1"
            for port in ("binary", "http", "metrics", "agent"):
                env[f"TWINFER_NODE{index}_{port.upper()}"] = str(node.ports[port])
        assert HAPROXY is not None
        argv = [HAPROXY, "-f", str(HAPROXY_CFG), "-db"]
        fds = {0: "w", 1: "r", 2: "r", BINARY_FD: binary.fileno(), HTTP_FD: http.fileno()}
        try:
            return self.spawn("haproxy", argv, fds, **env)
        finally:  # HAProxy holds its own copies now
            binary.close()
            http.close()

    # -- what HAProxy and the nodes say ------------------------------------------

    async def stat(self, backend: str = BACKEND) -> dict[str, dict[str, str]]:
        return parse_stat(await haproxy_command(reactor, self.socket_path, "show stat"), backend)

    async def servers_state(self) -> dict[str, dict[str, str]]:
        text = await haproxy_command(reactor, self.socket_path, f"show servers state {BACKEND}")
        return parse_servers_state(text)

    async def all_up(self) -> bool:
        try:
            binary, http = await self.stat(), await self.stat(HTTP_BACKEND)
        except Exception:  # the admin socket is not there yet
            return False
        servers = [*binary.values(), *http.values()]
        return len(servers) == 6 and all(
            s["status"] == "UP" and "up" in s["last_agt"] for s in servers
        )

    async def get(self, url: str) -> tuple[int, str]:
        response = await self.http.request(b"GET", url.encode())
        return response.code, (await readBody(response)).decode()

    async def metrics(self, node: ChildProcess) -> str:
        code, text = await self.get(f"http://127.0.0.1:{node.ports['metrics']}/metrics")
        self.assertEqual(code, 200)
        return text

    def stopped_line(self, node: ChildProcess) -> dict[str, int]:
        """The outcomes in a stopped node's last log line (``OK=..., UNAVAILABLE=...``)."""
        line = node.output.split("twinfer stopped: ")[1].splitlines()[0]
        outcomes = line.split("(", 1)[1].rstrip(")")
        if outcomes == "none":
            return {}
        return {k: int(v) for k, v in (item.split("=") for item in outcomes.split(", "))}

    # -- the test -------------------------------------------------------------------

    async def test_three_nodes_serve_and_one_drains_out_of_haproxy_under_load(self) -> None:
        nodes = {name: self.start_node(name) for name in NODES}
        await gatherResults([node.ready for node in nodes.values()])
        haproxy = self.start_haproxy(nodes)
        await until(reactor, self.all_up, "all six servers UP with the agent's 'up'")
        x = np.ones((2, 4), np.float32)
        endpoint = f"tcp:127.0.0.1:{self.frontend}"

        # KServe over HAProxy's HTTP front end reaches a node too.
        code, _ = await self.get(f"http://127.0.0.1:{self.http_frontend}/v2/health/ready")
        self.assertEqual(code, 200)

        # 1. Six connections, balanced per connection: every node serves.
        first = Load(reactor, endpoint, "tiny", {"x": x})
        await first.start()
        await first.answered_ok(600)
        await first.stop()
        served = {name: sample(await self.metrics(node), OK_SAMPLE) for name, node in nodes.items()}
        for name, count in served.items():
            self.assertGreater(count, 0, f"{name} served nothing: {served}")
        self.assertEqual(sum(served.values()), first.counts["ok"], served)
        self.assertEqual(first.counts["ok"], first.counts["sent"], first.counts)

        # 2. Under load, SIGTERM the node with the most connections.
        second = Load(reactor, endpoint, "tiny", {"x": x})
        second.reconnect_gate = Deferred()  # reconnect once HAProxy heard "drain"
        await second.start()
        await second.answered_ok(300)
        current = await self.stat()
        name = max(NODES, key=lambda n: int(current[n]["scur"]))
        draining = nodes[name]
        others = [node for other, node in nodes.items() if other != name]
        # An idle client of that node: the balanced clients close their
        # connections as soon as they are refused, and a node left with no
        # connection exits at once, before HAProxy's next agent check; this
        # one keeps the drain going until its 0.5 s linger ends.
        idle = await connect(reactor, f"tcp:127.0.0.1:{draining.ports['binary']}")
        draining.transport.signalProcess("TERM")

        async def drain_heard() -> bool:
            state = (await self.servers_state())[name]
            return bool(int(state["srv_admin_state"]) & ADMIN_FORCED_DRAIN)

        try:
            await until(reactor, drain_heard, f"{name} in DRAIN from its agent")
        except AssertionError as e:
            raise AssertionError(
                f"{e}\n--- {name}:\n{draining.output}\n--- haproxy:\n{haproxy.output}"
            ) from None
        sessions_then = int((await self.stat())[name]["stot"])
        second.reconnect_gate.callback(None)
        exit_code = await draining.ended
        await idle.close()  # the node closed it: at once
        self.assertEqual(exit_code, 0, draining.output)
        await second.answered_ok(300)  # the other two carry the load
        await second.stop()

        stat = await self.stat()
        self.assertEqual(int(stat[name]["stot"]), sessions_then, f"new connections to {name}")
        self.assertNotEqual(stat[name]["status"], "UP")
        self.assertGreater(second.reconnections, 0)  # the drained node's connections moved

        counts = second.counts
        report = (
            f"through HAProxy: sent {counts['sent']}, answered OK {counts['ok']}, "
            f"refused UNAVAILABLE by the draining node {counts['unavailable']}, "
            f"lost {counts['lost']}, other errors {counts['other']} {second.errors[:3]}; "
            f"{second.reconnections} connection(s) moved off {name}"
        )
        print(report)
        self.assertEqual(counts["lost"], 0, report)
        self.assertEqual(counts["other"], 0, report)
        self.assertEqual(counts["ok"] + counts["unavailable"], counts["sent"], report)

        # Every answer is accounted for by exactly one node.
        stopped = self.stopped_line(draining)
        self.assertEqual(stopped.get("UNAVAILABLE", 0), counts["unavailable"], report)
        pages = [await self.metrics(node) for node in others]
        for page in pages:
            self.assertEqual(sample(page, UNAVAILABLE_SAMPLE), 0)
        ok_total = stopped.get("OK", 0) + sum(sample(page, OK_SAMPLE) for page in pages)
        self.assertEqual(ok_total, first.counts["ok"] + counts["ok"], report)
        haproxy.transport.signalProcess("TERM")
        await haproxy.ended
