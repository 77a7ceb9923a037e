"""The HAProxy agent-check responder, served on ``--agent-port``.

HAProxy's ``agent-check`` (see its configuration manual, section 5.2,
``agent-check``, ``agent-port``, ``agent-inter``, ``agent-send``) opens a TCP
connection to the agent every ``agent-inter``, optionally sends the
``agent-send`` string, and reads one line of words.  twinfer answers each
connection with exactly one line and closes it:

``up ready N%``
    The node serves.  ``N`` is its free capacity (:func:`weight_percent`),
    which HAProxy applies to the server's configured weight; ``up`` undoes
    an earlier ``down`` and ``ready`` an earlier ``drain``.  With
    ``[server] agent_maxconn`` set, `` maxconn:M`` follows.
``drain``
    The node is shutting down (``SIGTERM``: the graceful drain), or an
    operator drained every device (console ``drain``): HAProxy opens no new
    connection to it and leaves the open ones alone, whose requests are
    still answered.
``down #REASON``
    No device worker can take a job (failed devices, or none running yet):
    HAProxy marks the server DOWN until the agent says ``up`` again.

The reply is a pure function (:func:`agent_reply`) of a
:class:`LoadSnapshot`, taken from the :class:`~twinfer.ops.control.Controller`
when HAProxy connects (:func:`take_snapshot`); :class:`AgentProtocol` is the
thin adapter that writes it.  Whatever HAProxy sends (an ``agent-send``
line) is read and ignored: the reply does not depend on it.

The port stays open through the graceful drain (:func:`drain_finished`), so
that HAProxy hears ``drain`` while the node still answers its open
connections, rather than a refused connection.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from twinfer.dataplane import DataPlane
from twinfer.ops.control import Controller

#: The longest ``down`` reason sent (HAProxy shows it on its stats page).
MAX_REASON = 200
#: Seconds a checker may keep the connection open after the reply.
CLOSE_TIMEOUT = 10.0


@attrs.frozen
class LoadSnapshot:
    """What the agent's reply is computed from: the node's state at one instant."""

    #: The node is shutting down (SIGTERM): the graceful drain is under way.
    closing: bool
    #: Device workers running (started, not stopped), over every device.
    workers: int
    #: Of those, the ones that take jobs now (not failed, not drained).
    ready: int
    #: Of those, the ones an operator drained (console ``drain``).
    drained: int
    #: Jobs waiting in the served models' queues (not yet on a device).
    queued: int
    #: The ``maxconn`` to advertise (``[server] agent_maxconn``); 0: none.
    maxconn: int = 0
    #: ``"cpu#0 failed (reason)"`` for each running worker that is not ready
    #: and not drained: the ``down`` reason.
    problems: tuple[str, ...] = ()


def weight_percent(snapshot: LoadSnapshot) -> int:
    """The node's free capacity, as the weight percentage HAProxy applies.

    ``ready / (workers + queued)``, in percent, rounded, at least 1:

    - all workers ready and nothing waiting: 100%;
    - half the workers drained or failed: 50% (half the node serves);
    - as many jobs waiting as there are workers (each worker one job behind):
      50%; twice as many: 33%.

    The expected wait of a new job grows with ``queued / workers``, so the
    weight falls as a job sent here would wait longer; it never reaches 0,
    which HAProxy would take as DRAIN.
    """
    slots = snapshot.workers + snapshot.queued
    if slots <= 0 or snapshot.ready <= 0:
        return 1
    return max(1, min(100, round(100 * snapshot.ready / slots)))


def _reason(snapshot: LoadSnapshot) -> str:
    if snapshot.workers == 0:
        text = "no device worker is running"
    else:
        text = "no healthy device: " + ", ".join(snapshot.problems or ("none ready",))
    # One line, and short: HAProxy reads up to the first CR or LF.
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def agent_reply(snapshot: LoadSnapshot) -> str:
    """The line (without its newline) the agent answers for ``snapshot``.

    ``drain`` while the node shuts down or every running worker is drained;
    ``down #REASON`` when no worker can take a job; otherwise ``up ready N%``
    (:func:`weight_percent`), then `` maxconn:M`` when one is configured.
    """
    if snapshot.closing:
        return "drain"
    if snapshot.ready == 0:
        if snapshot.workers > 0 and snapshot.drained == snapshot.workers:
            return "drain"
        return f"down #{_reason(snapshot)}"
    reply = f"up ready {weight_percent(snapshot)}%"
    if snapshot.maxconn > 0:
        reply += f" maxconn:{snapshot.maxconn}"
    return reply


def take_snapshot(controller: Controller) -> LoadSnapshot:
    """The node's state now, as :func:`agent_reply` reads it (on the reactor thread)."""
    dispatcher = controller.dispatcher
    running = [w for w in dispatcher.workers if w.alive]
    ready = [w for w in running if w.available]
    drained = [w for w in running if w.paused]
    problems = tuple(
        f"{w.name} {w.state.value}" + (f" ({w.failure_reason})" if w.failure_reason else "")
        for w in running
        if not w.available and not w.paused
    )
    return LoadSnapshot(
        closing=controller.closing,
        workers=len(running),
        ready=len(ready),
        drained=len(drained),
        queued=sum(queue.depth for _, queue in dispatcher.model_queues()),
        maxconn=controller.config.server.agent_maxconn,
        problems=problems,
    )


class AgentProtocol(Protocol):
    """Answers one agent check: writes the reply line as soon as HAProxy connects.

    Then it half-closes (HAProxy sees the end of the reply) and reads until
    HAProxy closes its side, which ends the connection: closing at once
    with an unread ``agent-send`` line in the socket would reset the
    connection, and the reply with it.  A peer still connected after
    ``close_timeout`` seconds is cut off.
    """

    factory: AgentFactory
    transport: Any

    def __init__(self) -> None:
        self._timeout: IDelayedCall | None = None

    def connectionMade(self) -> None:
        line = agent_reply(self.factory.snapshot()) + "\n"
        self.transport.write(line.encode("ascii", "replace"))
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:  # not a TCP-like transport: close once written
            self.transport.loseConnection()
            return
        half_close()
        self._timeout = self.factory.clock.callLater(
            self.factory.close_timeout, self.transport.abortConnection
        )

    def dataReceived(self, data: bytes) -> None:
        """HAProxy's ``agent-send`` string: read, and ignored."""

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None


class AgentFactory(Factory):
    """Makes an :class:`AgentProtocol` per agent check, answering for ``controller``.

    ``clock`` (an ``IReactorTime``) times the close of a checker that stays
    connected.
    """

    protocol: Any = AgentProtocol
    noisy = False

    def __init__(
        self, controller: Controller, clock: Any, close_timeout: float = CLOSE_TIMEOUT
    ) -> None:
        self.controller = controller
        self.clock = clock
        self.close_timeout = close_timeout

    def snapshot(self) -> LoadSnapshot:
        """The node's state now (:func:`take_snapshot`)."""
        return take_snapshot(self.controller)


def drain_finished(dataplane: DataPlane) -> Deferred[Any]:
    """Fires once every connection open now is closed: the graceful drain's end.

    The drain closes every front end's connection last, once its requests are
    answered (:func:`twinfer.ops.lifecycle.close_connections`), so the agent
    port, kept open until then, answers ``drain`` for as long as the node
    still answers connections HAProxy opened before.
    """
    return gatherResults([session.when_closed() for session in dataplane.sessions()])
