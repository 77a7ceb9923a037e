"""The closed loop: C simulated users, each keeping one request in flight.

:class:`ClosedLoop` runs on one reactor over any number of connections.  Per
request it only stamps a clock, sends a pre-built message whose tensors are
``bytes``-backed (the codec passes them to the transport without copying)
and appends three integers to lists; once every user has stopped it fires
with the window's :class:`~twinfer.bench.report.Samples`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from twinfer.bench.report import Samples
from twinfer.client_protocol import ClientProtocol
from twinfer.errors import ErrorCode, TwinferError
from twinfer.failover import ClientPool
from twinfer.wire.messages import InferReply, InferRequest


def error_name(failure: Failure) -> str:
    """The name a failed request is counted under: its error code's name, or
    ``CLIENT_<exception type>`` for a failure that is not the server's answer."""
    error = failure.value
    if isinstance(error, TwinferError):
        code = error.code
        return code.name if isinstance(code, ErrorCode) else f"CODE_{code}"
    return f"CLIENT_{type(error).__name__}"


class ClosedLoop:
    """C users, each keeping one request in flight, over some connections.

    User ``i`` sends on connection ``i % len(protocols)`` (a
    :class:`~twinfer.failover.ClientPool` counts as one: it spreads its
    users' requests over its own connections).  What counts as
    measured:

    - ``duration`` mode: requests completing in ``[t0, t0 + duration)``,
      where ``t0 = start + warmup``; users stop sending at the window's end;
    - ``requests`` mode: the first ``requests`` requests sent at or after
      ``t0``; the window ends when the last of them completes.
    """

    def __init__(
        self,
        clock: Any,
        protocols: Sequence[ClientProtocol | ClientPool],
        message: InferRequest | Sequence[InferRequest],
        users: int,
        *,
        duration: float | None = None,
        requests: int | None = None,
        warmup: float = 0.0,
    ) -> None:
        if (duration is None) == (requests is None):
            raise ValueError("give exactly one of duration and requests")
        self._clock = clock
        self._protocols = list(protocols)
        # One message for every user, or one each (their own shm regions).
        self._messages = [message] if isinstance(message, InferRequest) else list(message)
        self._users = users
        self._duration_ns = None if duration is None else int(duration * 1e9)
        self._limit = requests
        self._warmup_ns = int(warmup * 1e9)
        self._latency: list[int] = []
        self._queue: list[int] = []
        self._compute: list[int] = []
        self._errors: Counter[str] = Counter()
        self._issued = 0
        self._active = 0
        self._t0 = 0
        self._t1: int | None = None  # duration mode: the window's end
        self._last_done = 0
        self._cpu0 = 0.0
        self._cpu1 = 0.0
        self._resent0 = 0
        #: Completed requests so far (warmup included), for progress displays.
        self.completed = 0
        self.done: Deferred[Samples] = Deferred()

    def start(self, at_ns: int | None = None) -> Deferred[Samples]:
        """Start every user at ``monotonic_ns() == at_ns`` (now if ``None``).

        Returns :attr:`done`, which fires with the measured :class:`Samples`
        once every user has stopped and nothing is in flight.
        """
        delay = 0.0 if at_ns is None else max(0.0, (at_ns - time.monotonic_ns()) / 1e9)
        self._clock.callLater(delay, self._begin)
        return self.done

    @property
    def t0_ns(self) -> int:
        """When measurement starts (0 before :meth:`start` took effect)."""
        return self._t0

    def _begin(self) -> None:
        now = time.monotonic_ns()
        self._t0 = now + self._warmup_ns
        if self._duration_ns is not None:
            self._t1 = self._t0 + self._duration_ns
        self._clock.callLater(self._warmup_ns / 1e9, self._mark_cpu)
        self._active = self._users
        for user in range(self._users):
            message = self._messages[user % len(self._messages)]
            self._send(self._protocols[user % len(self._protocols)], message)

    def _mark_cpu(self) -> None:
        self._cpu0 = time.process_time()
        self._resent0 = self._resent()

    def _resent(self) -> int:
        return sum(p.resent for p in self._protocols if isinstance(p, ClientPool))

    def _send(self, protocol: ClientProtocol | ClientPool, message: InferRequest) -> None:
        now = time.monotonic_ns()
        if self._t1 is not None and now >= self._t1:
            self._user_stopped()
            return
        if self._limit is not None and now >= self._t0:
            if self._issued >= self._limit:
                self._user_stopped()
                return
            self._issued += 1
        d = protocol.request(message)
        d.addCallbacks(
            self._replied,
            self._failed,
            callbackArgs=(protocol, now, message),
            errbackArgs=(protocol, now, message),
        )

    def _measured(self, sent: int, now: int) -> bool:
        if self._t1 is not None:
            return self._t0 <= now < self._t1
        return sent >= self._t0

    def _replied(
        self, reply: Any, protocol: ClientProtocol | ClientPool, sent: int, message: InferRequest
    ) -> None:
        now = time.monotonic_ns()
        self.completed += 1
        if type(reply) is not InferReply:
            self._count_error(f"CLIENT_UNEXPECTED_{type(reply).__name__}", sent, now)
        elif self._measured(sent, now):
            self._latency.append(now - sent)
            self._queue.append(reply.queue_us)
            self._compute.append(reply.compute_us)
            self._last_done = now
        # Replies always arrive from dataReceived, never synchronously, so this
        # does not recurse.
        self._send(protocol, message)

    def _failed(
        self,
        failure: Failure,
        protocol: ClientProtocol | ClientPool,
        sent: int,
        message: InferRequest,
    ) -> None:
        now = time.monotonic_ns()
        self.completed += 1
        self._count_error(error_name(failure), sent, now)
        if not protocol.usable:
            self._user_stopped()  # the connection is gone: this user cannot go on
        else:
            # A failure may fire synchronously (e.g. an encoding error):
            # go through the reactor so a run of them cannot grow the stack.
            self._clock.callLater(0, self._send, protocol, message)

    def _count_error(self, name: str, sent: int, now: int) -> None:
        if self._measured(sent, now):
            self._errors[name] += 1
            self._last_done = now

    def _user_stopped(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._cpu1 = time.process_time()
            end = self._t1 if self._t1 is not None else max(self._last_done, self._t0)
            self.done.callback(
                Samples(
                    latency_ns=np.array(self._latency, dtype=np.int64),
                    queue_us=np.array(self._queue, dtype=np.int64),
                    compute_us=np.array(self._compute, dtype=np.int64),
                    errors=dict(self._errors),
                    start_ns=self._t0,
                    end_ns=end,
                    cpu_seconds=max(0.0, self._cpu1 - self._cpu0),
                    resent=self._resent() - self._resent0,
                )
            )
