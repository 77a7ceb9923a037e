"""Real ``twistd`` nodes behind a real HAProxy, for ``tests/test_haproxy.py``.

- :class:`ChildProcess` (from ``child_process``): a child's output, its
  port file (a pipe on fd 3) and its end, as Deferreds;
- :func:`haproxy_command`: the admin socket's answer to one command (``show
  stat``, ``show servers state``), parsed by :func:`parse_stat` and
  :func:`parse_servers_state`;
- :func:`until`: waits for a condition on HAProxy, which says nothing unless
  asked: asked again every ``interval`` until a hard deadline;
- :class:`Load`: pipelined inference through one failover client (several
  connections through the balancer), counting every answer.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from twisted.internet import endpoints, protocol
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from twinfer.client import TwinferClient
from twinfer.errors import ErrorCode, TwinferError

#: ``srv_admin_state`` bit of ``show servers state``: DRAIN forced (by the agent here).
ADMIN_FORCED_DRAIN = 0x08


class _Reply(protocol.Protocol):
    """Sends one line and collects everything up to the close."""

    def __init__(self, line: bytes) -> None:
        self.line = line
        self.received = b""
        self.done: Deferred[str] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.line)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.received.decode("utf-8", "replace"))


async def ask(endpoint: Any, line: bytes) -> str:
    """Connect to ``endpoint``, send ``line``, return what comes back before the close."""
    reply = await endpoint.connect(protocol.Factory.forProtocol(lambda: _Reply(line)))
    return str(await reply.done)


def haproxy_command(reactor: Any, socket_path: str, command: str) -> Deferred[str]:
    """HAProxy's admin socket's answer to ``command``."""
    endpoint = endpoints.UNIXClientEndpoint(reactor, socket_path)
    return Deferred.fromCoroutine(ask(endpoint, command.encode() + b"\n"))


def parse_stat(text: str, backend: str) -> dict[str, dict[str, str]]:
    """``show stat``'s CSV: each server of ``backend`` by name, its fields by name."""
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {
        row["svname"]: row
        for row in rows
        if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")
    }


def parse_servers_state(text: str) -> dict[str, dict[str, str]]:
    """``show servers state BACKEND``: each server by name, its fields by name."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = next(line for line in lines if line.startswith("# be_id")).lstrip("# ").split()
    rows = [dict(zip(header, line.split())) for line in lines if line[0].isdigit()]
    return {row["srv_name"]: row for row in rows if len(row) == len(header)}


async def until(
    reactor: Any,
    check: Callable[[], Awaitable[bool]],
    what: str,
    deadline: float = 30.0,
    interval: float = 0.1,
) -> None:
    """Ask ``check`` again every ``interval`` seconds until it says True.

    Only for the external HAProxy, which cannot tell us when its state
    changes; fails with ``what`` after ``deadline`` seconds.
    """
    give_up = reactor.seconds() + deadline
    while not await check():
        if reactor.seconds() > give_up:
            raise AssertionError(f"HAProxy: not {what} after {deadline}s")
        await deferLater(reactor, interval, lambda: None)


def sample(text: str, name: str) -> float:
    """The value of one sample of a Prometheus page (0 if absent: a counter not yet counted)."""
    found = re.search(re.escape(name) + r" ([0-9.e+-]+)\n", text)
    return float(found.group(1)) if found else 0.0


class Load:
    """Pipelined inference through one client, ``in_flight`` requests at a time.

    The client is a failover client (``connect(reactor, [balancer],
    connections=K)``): it spreads the requests over its K connections and
    moves them itself when a node drains or dies, so every request here is
    sent once by this class.  ``counts``: ``sent``, ``ok``, ``unavailable``
    (an ``UNAVAILABLE`` answer reached the caller), ``lost`` (the connection
    went and the one re-send failed too) and ``other``; :attr:`errors` keeps
    the messages of every failure.
    """

    def __init__(
        self, client: TwinferClient, model: str, inputs: dict[str, np.ndarray], in_flight: int = 24
    ) -> None:
        self.client = client
        self.model = model
        self.inputs = inputs
        self.in_flight = in_flight
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.stopping = False
        self._pending = 0
        self._stopped: Deferred[None] = Deferred()
        self._targets: list[tuple[int, Deferred[None]]] = []

    def start(self) -> None:
        for _ in range(self.in_flight):
            self._send()

    def _send(self) -> None:
        self._pending += 1
        self.counts["sent"] += 1
        self.client.infer(self.model, self.inputs).addBoth(self._answered)

    def _answered(self, result: Any) -> None:
        self._pending -= 1
        self.count(result)
        if not self.stopping:
            self._send()
        elif self._pending == 0 and not self._stopped.called:
            self._stopped.callback(None)

    def count(self, result: Any) -> None:
        if not isinstance(result, Failure):
            self.counts["ok"] += 1
        else:
            message = str(result.value)
            self.errors.append(message)
            if result.check(TwinferError) and "lost" in message:
                self.counts["lost"] += 1
            elif result.check(TwinferError) and result.value.code == ErrorCode.UNAVAILABLE:  # type: ignore[union-attr]
                self.counts["unavailable"] += 1
            else:
                self.counts["other"] += 1
        targets, self._targets = self._targets, []
        for target, d in targets:
            if self.counts["ok"] >= target:
                d.callback(None)
            else:
                self._targets.append((target, d))

    def answered_ok(self, more: int) -> Deferred[None]:
        """Fires once ``more`` further requests have been answered OK."""
        d: Deferred[None] = Deferred()
        self._targets.append((self.counts["ok"] + more, d))
        return d

    def stop(self) -> Deferred[None]:
        """Stop sending; fires once every request sent is answered (or failed)."""
        self.stopping = True
        if self._pending == 0 and not self._stopped.called:
            self._stopped.callback(None)
        return self._stopped


def within(reactor: Any, d: Deferred[Any], seconds: float, what: str) -> Deferred[Any]:
    """``d``'s result, or an :class:`AssertionError` naming ``what`` after ``seconds``.

    ``d`` itself is left alone (not cancelled): a child's ``ended`` must stay
    unfired so that the clean-up still kills it.
    """
    out: Deferred[Any] = Deferred()

    def give_up() -> None:
        out.errback(AssertionError(f"not {what} within {seconds}s"))

    call = reactor.callLater(seconds, give_up)

    def relay(result: Any) -> Any:
        if not out.called:
            call.cancel()
            out.callback(result)
        return None if isinstance(result, Failure) else result

    d.addBoth(relay)
    return out
