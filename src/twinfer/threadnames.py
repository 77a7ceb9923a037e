"""OS-level thread names, so that tools outside the process can tell threads apart.

Python's ``threading`` names (and Twisted's ``ThreadPool`` names) live only
inside the interpreter: ``ps -L``, ``top -H``, ``py-spy`` and
``/proc/PID/task/TID/comm`` show every thread under the process's own name.
The device workers name their thread ``twinfer-<worker>`` with
:func:`name_os_thread`, which is how ``benchmarks/procstat.py`` tells the
device threads' CPU time from the reactor's and OpenVINO's own pools'.
"""

from __future__ import annotations

import ctypes
import sys

#: ``prctl`` option: set the calling thread's name (``linux/prctl.h``).
PR_SET_NAME = 15
#: Linux keeps 15 bytes of a thread's name (16 with the terminating NUL).
MAX_NAME_BYTES = 15


def name_os_thread(name: str) -> bool:
    """Set the calling thread's OS name to ``name`` (cut to 15 bytes).

    Returns whether it was set: only on Linux; elsewhere, or if ``prctl``
    fails, this does nothing (a name is a convenience for tools, never
    worth failing for).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        encoded = name.encode("utf-8", "replace")[:MAX_NAME_BYTES]
        return int(libc.prctl(PR_SET_NAME, ctypes.c_char_p(encoded), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
