"""The chaos soak's view of the server: its process, console, metrics and /proc."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody

from twinfer.errors import ErrorCode
from twinfer.outcomes import outcome

LAUNCHER = Path(__file__).with_name("chaos_server.py")
LOOPBACK = "tcp:0:interface=127.0.0.1"


class _ServerProtocol(ProcessProtocol):
    def __init__(self) -> None:
        self.port_line = b""
        self.ports: Deferred[dict[str, int]] = Deferred()
        self.exit_code: int | None = None
        self.finished = False
        self._waiters: list[Deferred[int | None]] = []
        self.output = b""

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 3:
            self.port_line += data
            if b"\n" in self.port_line and not self.ports.called:
                self.ports.callback(json.loads(self.port_line))
        else:
            self.output = (self.output + data)[-20000:]

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        if not self.ports.called:
            self.ports.errback(
                RuntimeError(f"the server exited ({code}): {self.output.decode(errors='replace')}")
            )
        self.exit_code, self.finished = code, True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(code)

    def when_ended(self) -> Deferred[int | None]:
        """Fires with the exit status once the process has ended."""
        d: Deferred[int | None] = Deferred()
        if self.finished:
            d.callback(self.exit_code)
        else:
            self._waiters.append(d)
        return d


class ServerProcess:
    """``chaos_server.py`` (``twistd -n twinfer`` with a stand-in device) in a subprocess."""

    def __init__(
        self, reactor: Any, workdir: Path, config: str, fault_file: Path, device: str
    ) -> None:
        self.reactor = reactor
        self.workdir = workdir
        self.config = config
        self.fault_file = fault_file
        self.device = device
        self.log = workdir / "twistd.log"
        self.protocol = _ServerProtocol()
        self.process: Any = None
        self.ports: dict[str, int] = {}

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    async def start(self) -> dict[str, int]:
        config = self.workdir / "twinfer.toml"
        config.write_text(self.config)
        args = [
            sys.executable,
            str(LAUNCHER),
            str(self.fault_file),
            self.device,
            "--nodaemon",
            "--pidfile=",
            f"--logfile={self.log}",
            "twinfer",
            f"--port={LOOPBACK}",
            f"--http-port={LOOPBACK}",
            f"--metrics-port={LOOPBACK}",
            f"--debug-port={LOOPBACK}",
            "--allow-admin",
            f"--config={config}",
            "--port-file=/dev/fd/3",
        ]
        self.process = self.reactor.spawnProcess(
            self.protocol,
            sys.executable,
            args,
            env=dict(os.environ),
            path=str(self.workdir),
            childFDs={0: "w", 1: "r", 2: "r", 3: "r"},
        )
        # A server that neither listens nor exits within 5 minutes is stuck.
        self.ports = await self.protocol.ports.addTimeout(300, self.reactor)
        return self.ports

    async def stop(self) -> int | None:
        """SIGTERM (a graceful drain), then wait; returns the exit status."""
        if self.process is None:
            return None
        if not self.protocol.finished:
            self.process.signalProcess("TERM")
        return await self.protocol.when_ended()

    def log_errors(self) -> dict[str, int]:
        """The exceptions the server logged with a traceback, by their last line
        (``DeviceError: injected fault...`` is the stand-in device doing its job)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        found: Counter[str] = Counter()
        last = None
        for line in text.splitlines():
            if line.startswith("\t"):
                if line.strip():
                    last = line.strip()
            elif last is not None:
                found[last[:200]] += 1
                last = None
        if last is not None:
            found[last[:200]] += 1
        return dict(found)


class _Console(Protocol):
    PROMPT = b"twinfer> "

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: Deferred[str] | None = Deferred()
        self.transport: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.endswith(self.PROMPT) and self.waiting is not None:
            text, self.buffer = self.buffer[: -len(self.PROMPT)], b""
            waiting, self.waiting = self.waiting, None
            waiting.callback(text.decode(errors="replace").strip())

    def command(self, line: str) -> Deferred[str]:
        self.waiting = Deferred()
        self.transport.write(line.encode() + b"\r\n")
        return self.waiting


async def console(reactor: Any, port: int, line: str) -> str:
    """Run one console command; returns its reply (one line)."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    session = await connectProtocol(endpoint, _Console())
    assert session.waiting is not None
    await session.waiting  # the banner
    try:
        reply = await session.command(line)
    finally:
        session.transport.loseConnection()
    return " ".join(reply.split())


async def metrics(reactor: Any, port: int) -> list[Any]:
    """The server's /metrics, parsed."""
    url = f"http://127.0.0.1:{port}/metrics".encode()
    response = await Agent(reactor).request(b"GET", url).addTimeout(60, reactor)
    body = await readBody(response).addTimeout(60, reactor)
    return list(text_string_to_metric_families(body.decode()))


def requests_by_frontend(families: list[Any]) -> dict[str, dict[str, int]]:
    """``twinfer_requests_total`` summed over models: front end -> code -> count."""
    out: dict[str, Counter[str]] = {}
    for family in families:
        if family.name != "twinfer_requests":
            continue
        for s in family.samples:
            if s.name.endswith("_total"):
                counts = out.setdefault(s.labels["frontend"], Counter())
                counts[s.labels["code"]] += int(s.value)
    return {k: dict(v) for k, v in out.items()}


def http_status_of(code: str) -> str:
    """The HTTP status a server outcome name is answered with."""
    return str(outcome(ErrorCode[code]).http_status) if code != "OK" else "200"


def proc_sample(pid: int) -> dict[str, Any]:
    """The server's RSS (MiB), threads and open fds, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return f"unknown x {os.cpu_count()}"


__all__ = [
    "ServerProcess",
    "console",
    "cpu_model",
    "http_status_of",
    "metrics",
    "proc_sample",
    "requests_by_frontend",
]
