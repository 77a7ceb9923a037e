"""One memory budget for the request bytes a server buffers.

Every front end asks the same :class:`BufferBudget` before it allocates a
request's bytes (a binary frame's body, an HTTP body) and gives them back
when the request is answered or its connection is gone.  When the budget is
spent, a front end stops reading the connection that asked (its bytes stay
in the kernel's socket buffer, and TCP flow control slows its client) until
another request releases enough: a few hundred clients sending large bodies
at once then cost at most the budget, not their sum.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

#: Default budget (``server.max_buffered_bytes``): 512 MiB.
DEFAULT_MAX_BUFFERED_BYTES = 512 * 1024 * 1024

#: Requests up to this many bytes are counted but never kept waiting: a
#: socket read is that large anyway, and a spent budget must not stop a
#: handshake, a ping or a small inference from other clients.
SMALL_REQUEST = 64 * 1024

#: Called with the bytes granted once a waiting reservation fits.
Grant = Callable[[int], object]


class BufferBudget:
    """Bytes of requests held in memory, across all connections, and their limit."""

    def __init__(self, limit: int = DEFAULT_MAX_BUFFERED_BYTES, small: int = SMALL_REQUEST) -> None:
        #: The most bytes held at once.
        self.limit = limit
        #: Requests up to this size are counted but never wait (see
        #: :data:`SMALL_REQUEST`).
        self.small = small
        #: Bytes held now.
        self.used = 0
        self._waiters: deque[tuple[int, Grant]] = deque()
        self._granting = False

    def __repr__(self) -> str:
        return f"<BufferBudget {self.used}/{self.limit} waiters={len(self._waiters)}>"

    @property
    def waiting(self) -> int:
        """Reservations waiting for bytes to be released."""
        return len(self._waiters)

    def fits(self, size: int) -> bool:
        """Whether a request of ``size`` bytes can ever be held (the whole budget)."""
        return size <= self.limit

    def try_reserve(self, size: int) -> bool:
        """Reserve ``size`` bytes if they fit now, or if the request is small
        (:attr:`small`); returns whether they were reserved."""
        if size > self.small and self.used + size > self.limit:
            return False
        self.used += size
        return True

    def take(self, size: int) -> None:
        """Count ``size`` bytes that are already held (read before they could
        be refused), even past the limit."""
        self.used += size

    def wait(self, size: int, grant: Grant) -> None:
        """Reserve ``size`` bytes as soon as they fit, then call ``grant(size)``
        (first come, first served)."""
        self._waiters.append((size, grant))

    def forget(self, grant: Grant) -> None:
        """Stop waiting for ``grant`` (its connection is gone)."""
        self._waiters = deque((n, g) for n, g in self._waiters if g != grant)

    def release(self, size: int) -> None:
        """Give ``size`` reserved bytes back; grant the waiters they make room for."""
        self.used -= size
        if self._granting:  # a grant released bytes: the loop below goes on
            return
        self._granting = True
        try:
            while self._waiters and self.used + self._waiters[0][0] <= self.limit:
                size, grant = self._waiters.popleft()
                self.used += size
                grant(size)
        finally:
            self._granting = False
