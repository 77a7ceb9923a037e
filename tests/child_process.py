"""A child process (``twistd twinfer``, HAProxy) as the tests watch it.

:class:`ChildProcess` turns the child's output, its port file (a pipe on
file descriptor :data:`PORT_FILE_FD`, given to twistd as
``--port-file=/dev/fd/3``) and its end into Deferreds, so the tests wait on
events rather than polling the log.
"""

from __future__ import annotations

import json

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

#: The child's file descriptor that ``--port-file=/dev/fd/3`` writes to.
PORT_FILE_FD = 3


class ChildProcess(protocol.ProcessProtocol):
    """A child process: its output, its port file on fd 3 (``ready`` fires
    when it is written, or fails if the child exits first), its end."""

    def __init__(self, name: str, port_file: bool = True) -> None:
        self.name = name
        self.port_file = port_file
        self.output = ""
        #: Each port by name (``binary``, ``metrics``, ``agent``...), once listening.
        self.ports: dict[str, int] = {}
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[int | None] = Deferred()
        self._port_file = b""
        self._waiting: list[tuple[str, Deferred[None]]] = []

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == PORT_FILE_FD:
            self._port_file += data
            if b"\n" in self._port_file and not self.ready.called:
                self.ports = json.loads(self._port_file.split(b"\n", 1)[0])
                self.ready.callback(None)
            return
        self.output += data.decode("utf-8", "replace")
        waiting, self._waiting = self._waiting, []
        for text, d in waiting:
            found = self.output.find(text)
            if found >= 0 and "\n" in self.output[found:]:
                d.callback(None)
            else:
                self._waiting.append((text, d))

    def wait_for(self, text: str) -> Deferred[None]:
        """Fires once the child's output has a whole line containing ``text``."""
        d: Deferred[None] = Deferred()
        self._waiting.append((text, d))
        self.childDataReceived(1, b"")
        return d

    def processEnded(self, reason: Failure) -> None:
        if self.port_file and not self.ready.called:
            self.ready.errback(RuntimeError(f"{self.name} exited early:\n{self.output}"))
        self.ended.callback(reason.value.exitCode)
