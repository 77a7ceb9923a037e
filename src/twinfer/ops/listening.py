"""Listening ports as Twisted services.

:class:`ListeningService` is ``twisted.application.internet.StreamServerEndpointService``
(what ``strports.service`` builds): it binds in ``privilegedStartService``,
so ``twistd`` can bind a privileged port before it sheds root, and a port
that cannot be bound fails start-up with :class:`CannotListen` (``cannot
listen on tcp:9000: address already in use``) instead of a running server
without it.  Each service keeps the port it got, so the bound address of a
``tcp:0`` port is asked of the service rather than parsed from the log.

The connections a port accepts are the data plane's sessions
(:meth:`twinfer.dataplane.DataPlane.sessions`): that is what the graceful
drain closes and waits for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twinfer.netutil import enable_direct_reads

log = Logger()


class CannotListen(Exception):
    """A port could not be bound; the message says which and why."""


def _reason(error: BaseException) -> str:
    """``address already in use`` for a ``CannotListenError``, else the error itself."""
    if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
        return (error.socketError.strerror or str(error.socketError)).lower()
    return str(error) or type(error).__name__


class ListeningService(StreamServerEndpointService):
    """Listens on one endpoint description while it runs.

    ``name`` (the service's name and the key in the port file) says which
    port it is: ``binary``, ``http``, ``console`` or ``metrics``.  Once
    listening it logs ``twinfer {label}listening on {kind}:{host}:{port}``
    (``label`` is empty for the binary protocol, whose line scripts parse).
    ``direct_reads``: receive into the protocol's frame buffers
    (:func:`twinfer.netutil.enable_direct_reads`).  ``endpoint``: listen on
    this endpoint rather than one parsed from ``description`` (which then
    only names it).  ``keep_open``: called when the service stops; the port
    goes on listening until the Deferred it returns fires (the HAProxy agent
    answers ``drain`` through the graceful drain this way).
    """

    def __init__(
        self,
        reactor: Any,
        name: str,
        description: str,
        factory: IProtocolFactory,
        *,
        label: str = "",
        direct_reads: bool = False,
        endpoint: IStreamServerEndpoint | None = None,
        keep_open: Callable[[], Deferred[Any]] | None = None,
    ) -> None:
        if endpoint is None:
            endpoint = endpoints.serverFromString(reactor, description)
        super().__init__(_ReportingEndpoint(endpoint, self), factory)
        self.setName(name)
        self.description = description
        self.label = label
        self.direct_reads = direct_reads
        self.keep_open = keep_open
        #: The listening port, once bound.
        self.port: IListeningPort | None = None
        self._error: CannotListen | None = None
        self._waiting: list[Deferred[IListeningPort]] = []

    def privilegedStartService(self) -> None:
        """Bind the port; raises :class:`CannotListen` if that failed at once."""
        super().privilegedStartService()
        if self._error is not None:
            raise self._error

    def stopService(self) -> Deferred[None]:
        """Stop listening (once ``keep_open``'s Deferred fires, if given)."""
        if self.keep_open is None:
            return super().stopService()  # type: ignore[no-any-return]
        stopping = super().stopService
        d = self.keep_open()
        d.addErrback(lambda failure: log.failure("keeping {name} open", failure, name=self.name))
        return d.addCallback(lambda _: stopping())

    def address(self) -> IAddress | None:
        """The address the port is bound to (None before it is)."""
        return self.port.getHost() if self.port is not None else None

    def when_listening(self) -> Deferred[IListeningPort]:
        """Fires with the listening port once bound, or fails with :class:`CannotListen`."""
        if self.port is not None:
            return succeed(self.port)
        if self._error is not None:
            return fail(self._error)
        d: Deferred[IListeningPort] = Deferred()
        self._waiting.append(d)
        return d

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        if self.direct_reads:
            enable_direct_reads(port)
        host = port.getHost()
        log.info(
            "twinfer {label}listening on {kind}:{host}:{port}",
            label=f"{self.label} " if self.label else "",
            kind="ssl" if self.description.startswith("ssl:") else "tcp",
            host=getattr(host, "host", host),
            port=getattr(host, "port", ""),
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port)
        return port

    def _failed(self, failure: Failure) -> None:
        message = f"cannot listen on {self.description}: {_reason(failure.value)}"
        self._error = CannotListen(message)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(CannotListen(message))


@implementer(IStreamServerEndpoint)
class _ReportingEndpoint:
    """Wraps the endpoint of a description so that its service hears the outcome.

    A failure is handed to the service (and the Deferred fires with None),
    so ``StreamServerEndpointService`` does not log it as an unhandled error.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, service: ListeningService) -> None:
        self._endpoint = endpoint
        self._service = service

    def listen(self, factory: IProtocolFactory) -> Deferred[Any]:
        d: Deferred[Any] = self._endpoint.listen(factory)
        return d.addCallbacks(self._service._listening, self._service._failed)
