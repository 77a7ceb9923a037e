"""Several connections over several endpoints, for clients that move.

:class:`ClientPool` is what :func:`twinfer.client.connect` builds for a list of
endpoints (``["tcp:a:9000", "tcp:b:9000"]``, or a list of one behind a
balancer) or for ``connections=K``.  It

- opens K connections spread round-robin over the endpoints;
- sends each request on the usable connection with the fewest in flight;
- on ``GOAWAY`` (a draining server, see ``docs/protocol.md`` §3.10) stops
  sending on that connection, opens a replacement to the same endpoint
  string (through a balancer that lands on another node; if it refuses, the
  next endpoints in turn) and closes the old connection once its replies are
  in; requests the server refused because they came after its ``GOAWAY``
  are sent again on another connection (the server never ran them, so this
  does not use up their one re-send below: through a balancer, the other
  connection may be to the same draining node and refuse them too; at most
  as many times as the pool has connections);
- on a lost connection re-sends the inference and image requests that were
  in flight **once**, on a connection to another endpoint or on a fresh one
  (inference is idempotent; through a balancer, the other connections may
  be to the same dead node).  Other requests (admin above all: a ``load`` may have run)
  are never re-sent: they fail with ``UNAVAILABLE`` naming the lost
  connection.

So every request is answered exactly once, or fails with a
:class:`~twinfer.errors.TwinferError` that says what happened.
:attr:`ClientPool.resent` counts the re-sends.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, cast

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from twinfer.client_protocol import ClientProtocol, ConnectionDropped, GoneAway, Unreachable
from twinfer.errors import ErrorCode, TwinferError
from twinfer.wire.messages import GoAway, Hello, ImageRequest, InferRequest, Message

log = Logger()

#: Requests that may be sent again: they change nothing on the server.
IDEMPOTENT: tuple[type, ...] = (InferRequest, ImageRequest)
#: Seconds before replacing a connection sent away at once, doubled each time in a row.
BACKOFF = 0.05
MAX_BACKOFF = 2.0
#: Failures after which a request never reached a device or its reply is lost.
_MOVED = (ConnectionDropped, GoneAway, Unreachable)


def _observe(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred firing (with None) when ``d`` fires; ``d``'s result is untouched."""
    out: Deferred[None] = Deferred()

    def fire(result: Any) -> Any:
        out.callback(None)
        return result

    d.addBoth(fire)
    return out


class ClientPool:
    """Connections to ``endpoints`` (name, endpoint) pairs; see the module docstring.

    Has the :class:`~twinfer.client.ClientProtocol` methods a
    :class:`~twinfer.client.TwinferClient` uses (``request``, ``close``,
    ``server_hello``, ``in_flight``, ``usable``).  :meth:`start` opens the
    connections.
    """

    def __init__(
        self,
        endpoints: Sequence[tuple[str, IStreamClientEndpoint]],
        connections: int = 1,
        clock: Any = None,
    ) -> None:
        """``clock`` (an ``IReactorTime``, usually the reactor) paces the
        replacement of connections that are sent away as soon as they open;
        without one they are replaced at once."""
        if not endpoints:
            raise ValueError("a client pool needs at least one endpoint")
        self.endpoints = list(endpoints)
        #: Connections kept open (at least one per endpoint is not implied).
        self.size = max(1, connections)
        #: Open connections (usable or finishing after GOAWAY), oldest first.
        self.protocols: list[ClientProtocol] = []
        #: Re-sends of requests (after a lost connection or a refusal after GOAWAY).
        self.resent = 0
        #: The HELLO of the first server connected to.
        self.server_hello = Hello()
        self._endpoint_of: dict[ClientProtocol, int] = {}
        self._opening: list[Deferred[ClientProtocol | None]] = []
        self._errors: dict[int, str] = {}
        self._closed = False
        self._clock = clock
        # GOAWAYs in a row that came before any request was taken (a node
        # that drains but still accepts connections, or a balancer sending
        # us back to it): each waits twice as long before reconnecting.
        self._sent_away = 0
        self._delayed: list[Any] = []  # replacements waiting for their time

    # -- connections ------------------------------------------------------------

    async def start(self) -> ClientPool:
        """Open :attr:`size` connections round-robin over the endpoints; returns
        the pool once they are all connected or refused.  Raises
        :class:`~twinfer.client.Unreachable` when none could be made."""
        n = len(self.endpoints)
        await DeferredList([self._open(i % n) for i in range(self.size)])
        if not self.protocols:
            raise Unreachable(ErrorCode.UNAVAILABLE, f"cannot connect: {self._why()}")
        self.server_hello = self.protocols[0].server_hello
        return self

    def _why(self) -> str:
        return "; ".join(f"{self.endpoints[i][0]}: {why}" for i, why in self._errors.items())

    def _open(self, index: int) -> Deferred[ClientProtocol | None]:
        """Connect to endpoint ``index`` and handshake; fires with the new
        connection, or ``None`` (the reason is kept for error messages)."""
        d = Deferred.fromCoroutine(self._connect(index))
        self._opening.append(d)

        def opened(result: ClientProtocol | None) -> ClientProtocol | None:
            self._opening.remove(d)
            return result

        d.addCallback(opened)  # (_connect never fails)
        return d

    async def _connect(self, index: int) -> ClientProtocol | None:
        name, endpoint = self.endpoints[index]
        try:
            factory = Factory.forProtocol(ClientProtocol)
            protocol = cast(ClientProtocol, await endpoint.connect(factory))
            await protocol.handshake
        except Exception as e:
            self._errors[index] = str(e) or type(e).__name__
            log.info("twinfer client: cannot connect to {name}: {e}", name=name, e=e)
            return None
        self._errors.pop(index, None)
        if self._closed:
            protocol.close()
            return None
        self.protocols.append(protocol)
        self._endpoint_of[protocol] = index
        protocol.goaway.addCallback(self._gone_away, protocol)
        protocol.when_closed().addCallback(self._closed_connection, protocol)
        return protocol

    async def _replace(self, index: int) -> ClientProtocol | None:
        """A connection in place of one to endpoint ``index``: to the same
        endpoint first, then to each of the others in turn."""
        n = len(self.endpoints)
        for step in range(n):
            if self._closed:
                return None
            protocol = await self._open((index + step) % n)
            if protocol is not None:
                return protocol
        return None

    def _gone_away(self, goaway: GoAway, protocol: ClientProtocol) -> None:
        name = self.endpoints[self._endpoint_of[protocol]][0]
        log.info(
            "twinfer client: {name} is going away ({reason}); moving to a new connection",
            name=name,
            reason=goaway.reason,
        )
        if not self._closed:
            index = self._endpoint_of[protocol]
            if goaway.last_request_id == 0:
                # Told to go before any request was taken (it connected to
                # a node already draining): try the next endpoint first,
                # and not in a tight loop.
                index = (index + 1) % len(self.endpoints)
                self._sent_away += 1
            else:
                self._sent_away = 0
            delay = min(MAX_BACKOFF, BACKOFF * 2 ** (self._sent_away - 1))
            if self._sent_away and self._clock is not None:
                self._delayed = [c for c in self._delayed if c.active()]
                self._delayed.append(self._clock.callLater(delay, self._replace_now, index))
            else:
                self._replace_now(index)
        self._retire_if_idle(protocol)

    def _replace_now(self, index: int) -> None:
        if not self._closed:
            Deferred.fromCoroutine(self._replace(index))

    def _retire_if_idle(self, protocol: ClientProtocol) -> None:
        """Close a connection the server is leaving once its replies are in."""
        if protocol.going_away is not None and protocol.in_flight == 0:
            protocol.close()

    def _closed_connection(self, _: None, protocol: ClientProtocol) -> None:
        """Forget a closed connection and, if it was lost, open its replacement
        (once: called again for the same connection, does nothing)."""
        if protocol not in self._endpoint_of:
            return
        index = self._endpoint_of.pop(protocol)
        self.protocols.remove(protocol)
        if protocol.going_away is None and not self._closed:
            # Lost, not retired: its replacement was not opened yet.
            Deferred.fromCoroutine(self._replace(index))

    # -- requests -----------------------------------------------------------------

    def _pick(
        self, avoid: int | None = None, stale: Collection[ClientProtocol] = ()
    ) -> ClientProtocol | None:
        """The usable connection with the fewest requests in flight, on another
        endpoint than ``avoid`` if there is one, else one not in ``stale``."""
        usable = [p for p in self.protocols if p.usable]
        elsewhere = [p for p in usable if self._endpoint_of.get(p) != avoid]
        candidates = elsewhere or [p for p in usable if p not in stale]
        return min(candidates, key=lambda p: p.in_flight) if candidates else None

    def request(self, message: Message) -> Deferred[Message]:
        """Send ``message`` on the least busy usable connection (opening one
        if there is none); fires with the reply message, see the module
        docstring for what happens when a connection goes."""
        protocol = self._pick()
        if protocol is not None:
            return self._send_on(protocol, message, resent=False, refused=0)
        return Deferred.fromCoroutine(
            self._send_when_connected(message, 0, None, resent=False, refused=0)
        )

    def _send_on(
        self, protocol: ClientProtocol, message: Message, resent: bool, refused: int
    ) -> Deferred[Message]:
        d = protocol.request(message)
        d.addBoth(self._settled, protocol, message, resent, refused)
        return d

    async def _send_when_connected(
        self,
        message: Message,
        start: int,
        avoid: int | None,
        resent: bool,
        refused: int,
        stale: Collection[ClientProtocol] = (),
    ) -> Message:
        """Send on a usable connection (on another endpoint than ``avoid`` if
        one is up, else on one not in ``stale``), waiting for those being
        opened, else opening one from endpoint ``start`` on."""
        if self._closed:
            raise TwinferError(ErrorCode.UNAVAILABLE, "the client was closed")
        protocol = self._pick(avoid, stale)
        if protocol is None and self._opening:
            await DeferredList([_observe(d) for d in list(self._opening)])
            protocol = self._pick(avoid, stale)
        if protocol is None:
            protocol = await self._replace(start)
        if protocol is None:
            raise Unreachable(ErrorCode.UNAVAILABLE, f"no server could be reached: {self._why()}")
        return await self._send_on(protocol, message, resent, refused)

    def _settled(
        self, result: Any, protocol: ClientProtocol, message: Message, resent: bool, refused: int
    ) -> Any:
        """``resent``: the request was already sent again after a lost
        connection (it may have run); ``refused``: how many servers refused
        it after their GOAWAY (it did not run there)."""
        self._retire_if_idle(protocol)
        if not isinstance(result, Failure):
            self._sent_away = 0  # a server took a request: no longer being sent away
            return result
        if self._closed or not result.check(*_MOVED):
            return result
        error: TwinferError = result.value  # type: ignore[assignment]
        index = self._endpoint_of.get(protocol, 0)
        name = self.endpoints[index][0]
        what = (
            f"{name} went away before it accepted the request"
            if isinstance(error, GoneAway)
            else f"connection to {name} lost"
        )
        if not isinstance(message, IDEMPOTENT):
            if isinstance(error, GoneAway):
                return result
            return Failure(
                ConnectionDropped(
                    ErrorCode.UNAVAILABLE,
                    f"{what} with a {type(message).__name__} in flight; it is not re-sent "
                    f"(only inference is): {error.message}",
                )
            )
        stale: Collection[ClientProtocol] = ()
        if isinstance(error, GoneAway) and refused < self.size:
            # Never run: safe to send again without using up the one re-send.
            resent_now, refused = resent, refused + 1
        elif resent or isinstance(error, GoneAway):
            return Failure(ConnectionDropped(ErrorCode.UNAVAILABLE, f"{what}: {error.message}"))
        else:
            resent_now = True
            # Through a balancer, the other connections to this endpoint may
            # be to the same dead node, their loss not read yet: re-send on
            # another endpoint or on a connection opened from now on (the
            # replacement, opened here rather than after the failed requests).
            stale = set(self.protocols)
            self._closed_connection(None, protocol)
        self.resent += 1
        retry = Deferred.fromCoroutine(
            self._send_when_connected(
                message, (index + 1) % len(self.endpoints), index, resent_now, refused, stale
            )
        )

        def failed(failure: Failure) -> Failure:
            if failure.check(*_MOVED):
                why = failure.value.message
                return Failure(
                    TwinferError(ErrorCode.UNAVAILABLE, f"{what} and the retry failed: {why}")
                )
            return failure  # the server's answer to the retry

        return retry.addErrback(failed)

    # -- the rest of the protocol's API ---------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered, over every connection."""
        return sum(p.in_flight for p in self.protocols)

    @property
    def usable(self) -> bool:
        """Whether a request can be sent now or once a connection opens."""
        return not self._closed and bool(self.protocols or self._opening)

    def close(self) -> Deferred[None]:
        """Close every connection; fires with ``None`` once they are closed.
        Requests in flight fail with ``UNAVAILABLE`` and are not re-sent."""
        self._closed = True
        for call in self._delayed:
            if call.active():
                call.cancel()
        closing = [p.close() for p in list(self.protocols)]
        return DeferredList(closing).addCallback(lambda _: None)
