#!/usr/bin/env python3
"""``twistd`` with the front ends' Python threads named for ``/proc`` (``transports.py``).

``python transports_server.py TWISTD-ARGS...`` runs ``twistd TWISTD-ARGS...``
in this process after one change: every ``threading.Thread`` whose Python
name marks it as a front end's thread sets its OS thread name when it starts,

- the gRPC front end's asyncio loop thread (``twinfer-grpc``) -> ``py-grpc-loop``,
- the HTTP front end's codec pool threads (``PoolThread-twinfer-http-codec-N``)
  -> ``py-http-codec``,

so that ``transports.py`` can tell their CPU time from OpenVINO's pools:
threads started by Python all show the process's name in ``/proc/PID/task/*/comm``
otherwise (Python 3.11 does not name OS threads).  The names do not start
with ``twinfer-``, which ``procstat.py`` reserves for the device threads.
Nothing else about the server changes; the wrapping is measurement only.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

#: OS names given to front-end threads (at most 15 bytes; see frontend_thread_name).
GRPC_LOOP = "py-grpc-loop"
HTTP_CODEC = "py-http-codec"


def frontend_thread_name(python_name: str) -> str | None:
    """The OS name for a Python thread called ``python_name``, or ``None`` to leave it."""
    if python_name == "twinfer-grpc":
        return GRPC_LOOP
    if "twinfer-http-codec" in python_name:
        return HTTP_CODEC
    return None


def install() -> Callable[[], None]:
    """Name front-end threads at OS level as they start (see the module's docstring);
    returns a callable that undoes it (for threads started afterwards)."""
    from twinfer.threadnames import name_os_thread

    original = threading.Thread.run

    def run_named(self: threading.Thread) -> Any:
        name = frontend_thread_name(self.name)
        if name is not None:
            name_os_thread(name)
        return original(self)

    threading.Thread.run = run_named  # type: ignore[method-assign]

    def uninstall() -> None:
        threading.Thread.run = original  # type: ignore[method-assign]

    return uninstall


def main(argv: list[str]) -> None:
    install()
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *argv]
    run()


if __name__ == "__main__":
    main(sys.argv[1:])
