"""Three real ``twistd twinfer`` nodes behind a real HAProxy, on loopback.

HAProxy runs ``etc/haproxy.cfg`` itself: every address and port there is a
``"${VARIABLE-default}"``, and this test sets the variables to its three
nodes' ports (HAProxy's own listening sockets are inherited file
descriptors, ``fd@N``, so no port is guessed).  The nodes serve the builtin
``tiny`` model, with ``--metrics-port`` (HAProxy's ``/readyz`` check) and
``--agent-port`` (HAProxy's agent check).

The load is one failover client, ``connect(reactor, [HAProxy],
connections=6)``: a list of one endpoint, the balancer, so every connection
it opens in place of one that went lands wherever HAProxy sends it.

1. Load over its six connections reaches all three nodes, and the nodes'
   ``/metrics`` count exactly the requests the client saw answered.
2. Under load, one node gets SIGTERM: its agent answers ``drain`` (HAProxy's
   server state shows the agent's DRAIN), HAProxy sends it no new connection
   after that, the node exits 0, and every request is answered OK exactly
   once: the requests the node refused after its GOAWAY were re-sent by the
   client on its new connections (the node's ``UNAVAILABLE`` count equals
   the client's ``resent``), so the caller sees no error and nothing is
   lost.
3. Still under load, another node gets ``kill -9``: the client's
   connections to it are lost, it re-sends their in-flight inference once
   through HAProxy (which retries and redispatches the new connections to
   the remaining node, and whose health check marks the dead one DOWN), and
   again every request is answered OK, 0 lost; the remaining node served,
   and the number of re-sent requests is reported.

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

from child_process import PORT_FILE_FD, ChildProcess
from haproxy_support import (
    ADMIN_FORCED_DRAIN,
    Load,
    haproxy_command,
    parse_servers_state,
    parse_stat,
    sample,
    until,
    within,
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
#: The failover client's connections through HAProxy.
CONNECTIONS = 6
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

    async def test_three_nodes_serve_one_drains_one_is_killed_and_no_request_is_lost(
        self,
    ) -> None:
        nodes = {name: self.start_node(name) for name in NODES}
        await within(reactor, gatherResults([n.ready for n in nodes.values()]), 60, "nodes up")
        haproxy = self.start_haproxy(nodes)
        await until(reactor, self.all_up, "all six servers UP with the agent's 'up'")
        x = np.ones((2, 4), np.float32)
        endpoint = f"tcp:127.0.0.1:{self.frontend}"

        # KServe over HAProxy's HTTP front end reaches a node too.
        code, _ = await self.get(f"http://127.0.0.1:{self.http_frontend}/v2/health/ready")
        self.assertEqual(code, 200)

        # The failover client: six connections through the balancer.
        client = await connect(reactor, [endpoint], connections=CONNECTIONS)
        self.addCleanup(client.close)

        # 1. Six connections, balanced per connection: every node serves.
        first = Load(client, "tiny", {"x": x})
        first.start()
        await within(reactor, first.answered_ok(600), 60, "600 answers")
        await within(reactor, first.stop(), 30, "the first load's last answers")
        served = {name: sample(await self.metrics(node), OK_SAMPLE) for name, node in nodes.items()}
        for name, count in served.items():
            self.assertGreater(count, 0, f"{name} served nothing: {served}")
        self.assertEqual(sum(served.values()), first.counts["ok"], served)
        self.assertEqual(first.counts["ok"], first.counts["sent"], first.counts)
        self.assertEqual(client.resent, 0)

        # 2. Under load, SIGTERM the node with the most connections.
        second = Load(client, "tiny", {"x": x})
        second.start()
        await within(reactor, second.answered_ok(300), 60, "300 answers before the drain")
        current = await self.stat()
        name = max(NODES, key=lambda n: int(current[n]["scur"]))
        draining = nodes[name]
        others = {other: node for other, node in nodes.items() if other != name}
        # An idle client of that node: the failover client retires its
        # connections there as soon as their replies are in, and a node left
        # with no connection exits at once, before HAProxy's next agent
        # check; this one keeps the drain going until its 0.5 s linger ends.
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
        exit_code = await within(reactor, draining.ended, 30, f"{name} exited after SIGTERM")
        await idle.close()  # the node closed it: at once
        self.assertEqual(exit_code, 0, draining.output)
        await within(reactor, second.answered_ok(300), 60, "300 answers after the drain")
        await within(reactor, second.stop(), 30, "the second load's last answers")

        stat = await self.stat()
        self.assertEqual(int(stat[name]["stot"]), sessions_then, f"new connections to {name}")
        self.assertNotEqual(stat[name]["status"], "UP")

        counts, resent_on_drain = second.counts, client.resent
        stopped = self.stopped_line(draining)
        report = (
            f"drain of {name} through HAProxy: sent {counts['sent']}, answered OK "
            f"{counts['ok']}, UNAVAILABLE seen by the caller {counts['unavailable']}, lost "
            f"{counts['lost']}, other errors {counts['other']} {second.errors[:3]}; re-sent "
            f"by the client {resent_on_drain} (refused by {name} after its GOAWAY: "
            f"{stopped.get('UNAVAILABLE', 0)})"
        )
        print(report)
        self.assertEqual(counts["ok"], counts["sent"], report)
        self.assertEqual(second.errors, [], report)
        # Every refusal the node counted came back to the client, which sent it again.
        self.assertEqual(stopped.get("UNAVAILABLE", 0), resent_on_drain, report)

        # Every answer is accounted for by exactly one node.
        pages = {other: await self.metrics(node) for other, node in others.items()}
        for page in pages.values():
            self.assertEqual(sample(page, UNAVAILABLE_SAMPLE), 0)
        ok_total = stopped.get("OK", 0) + sum(sample(page, OK_SAMPLE) for page in pages.values())
        self.assertEqual(ok_total, first.counts["ok"] + counts["ok"], report)

        # 3. Still under load, kill -9 the live node with the most connections.
        third = Load(client, "tiny", {"x": x})
        third.start()
        await within(reactor, third.answered_ok(300), 60, "300 answers before the kill")
        current = await self.stat()
        killed_name = max(others, key=lambda n: int(current[n]["scur"]))
        killed = others[killed_name]
        (remaining_name,) = set(others) - {killed_name}
        remaining = others[remaining_name]
        self.assertGreater(int(current[killed_name]["scur"]), 0, current[killed_name])
        ok_before = sample(pages[remaining_name], OK_SAMPLE)
        killed.transport.signalProcess("KILL")
        await within(reactor, killed.ended, 30, f"{killed_name} dead after SIGKILL")

        async def killed_down() -> bool:
            return (await self.stat())[killed_name]["status"].startswith("DOWN")

        await until(reactor, killed_down, f"{killed_name} DOWN by its health check")
        await within(reactor, third.answered_ok(300), 60, "300 answers after the kill")
        await within(reactor, third.stop(), 30, "the third load's last answers")

        counts = third.counts
        resent_on_kill = client.resent - resent_on_drain
        served_after = sample(await self.metrics(remaining), OK_SAMPLE) - ok_before
        report = (
            f"kill -9 of {killed_name} through HAProxy: sent {counts['sent']}, answered OK "
            f"{counts['ok']}, lost {counts['lost']}, UNAVAILABLE {counts['unavailable']}, "
            f"other errors {counts['other']} {third.errors[:3]}; re-sent by the client "
            f"{resent_on_kill}; {remaining_name} answered {served_after:.0f} since the kill"
        )
        print(report)
        self.assertEqual(counts["ok"], counts["sent"], report)
        self.assertEqual(third.errors, [], report)
        # The killed node had requests in flight on its connections: they came back.
        self.assertGreater(resent_on_kill, 0, report)
        self.assertGreater(served_after, 0, report)
        await client.close()
        haproxy.transport.signalProcess("TERM")
        await within(reactor, haproxy.ended, 30, "haproxy exited")
