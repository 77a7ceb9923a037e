"""Small socket-level helpers shared by the server and the Twisted client."""

from __future__ import annotations

from typing import Any


def set_no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off on a TCP transport (under TLS too).

    Frames are written whole; without TCP_NODELAY the last segment of a large
    frame can wait for the peer's delayed ACK (tens of milliseconds at
    concurrency 1).
    """
    while transport is not None:
        set_option = getattr(transport, "setTcpNoDelay", None)
        if set_option is not None:
            set_option(True)
            return
        transport = getattr(transport, "transport", None)  # TLS wraps the TCP transport
