"""Per-thread CPU time and RSS of a process, read from ``/proc`` (Linux).

The API the benchmarks share (``run.py`` and ``server_cpu.py``):

- :func:`sample` ``(pid) -> {tid: (name, cpu_seconds)}``: every thread of
  ``pid`` now, ``name`` from ``/proc/PID/task/TID/comm`` and ``cpu_seconds``
  its time on the CPU (``schedstat``, nanosecond resolution; ``stat``'s user +
  system ticks where the kernel has no schedstat);
- :func:`delta` ``(before, after)``: CPU seconds each thread used between two
  samples (threads that started in between count from zero; threads that
  ended in between are lost: sample often enough);
- :func:`by_role` ``(pid, used)``: those seconds summed as ``reactor`` (the
  main thread, ``tid == pid``: twistd's reactor), ``device`` (threads whose
  OS name starts with ``twinfer-``: the device workers' threads, which call
  OpenVINO), ``other`` (everything else: OpenVINO's own pools, Python's
  helper threads) and ``total``;
- :func:`per_request_us` ``(seconds, requests)``: microseconds per request;
- :func:`rss_bytes` ``(pid)``: the process's resident set size now.

Only the reactor's figure is CPU spent wholly outside OpenVINO; a device
thread's time includes the part of inference OpenVINO runs on the calling
thread.  A device thread can only be told apart if the server names its
threads (``twinfer-*``); otherwise its time is counted in ``other``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

#: ``{tid: (name, cpu_seconds)}``
ThreadSample = dict[int, tuple[str, float]]

ROLES = ("reactor", "device", "other", "total")


def parse_stat_cpu(stat: str) -> float:
    """User + system CPU seconds from the text of a ``/proc/.../stat`` file.

    The command name (field 2) is in parentheses and may contain spaces, so
    fields are counted after the last ``)``: utime and stime are the 12th and
    13th there (fields 14 and 15 of proc(5)).
    """
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def sample(pid: int, proc: Path = Path("/proc")) -> ThreadSample:
    """Every thread of ``pid``: ``{tid: (name, cpu_seconds)}`` (empty if it has exited)."""
    result: ThreadSample = {}
    try:
        tids = os.listdir(proc / str(pid) / "task")
    except OSError:
        return result
    for entry in tids:
        task = proc / str(pid) / "task" / entry
        try:
            name = (task / "comm").read_text().strip()
            cpu = thread_cpu_seconds(task)
        except (OSError, IndexError, ValueError):
            continue  # the thread ended between listdir and read
        result[int(entry)] = (name, cpu)
    return result


def thread_cpu_seconds(task: Path) -> float:
    """CPU seconds of one thread (``/proc/PID/task/TID``): from ``schedstat``
    (nanoseconds on the CPU) where the kernel has it, else from ``stat``
    (user + system in clock ticks, 10 ms apart)."""
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return parse_stat_cpu((task / "stat").read_text())


def delta(before: Mapping[int, tuple[str, float]], after: ThreadSample) -> ThreadSample:
    """CPU seconds each thread of ``after`` used since ``before``."""
    return {
        tid: (name, max(0.0, cpu - before.get(tid, (name, 0.0))[1]))
        for tid, (name, cpu) in after.items()
    }


def role(pid: int, tid: int, name: str) -> str:
    """``reactor``, ``device`` or ``other`` (see the module's docstring)."""
    if tid == pid:
        return "reactor"
    if name.startswith("twinfer-"):
        return "device"
    return "other"


def by_role(pid: int, used: ThreadSample) -> dict[str, float]:
    """Seconds in ``used`` summed per role, plus ``total``."""
    sums = dict.fromkeys(ROLES, 0.0)
    for tid, (name, seconds) in used.items():
        sums[role(pid, tid, name)] += seconds
        sums["total"] += seconds
    return sums


def per_request_us(seconds: Mapping[str, float], requests: int) -> dict[str, float | None]:
    """Each role's seconds as microseconds per request (``None`` without requests)."""
    return {k: (1e6 * v / requests if requests else None) for k, v in seconds.items()}


def rss_bytes(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Resident set size of ``pid`` in bytes (``None`` if it has exited)."""
    try:
        fields = (proc / str(pid) / "statm").read_text().split()
    except OSError:
        return None
    return int(fields[1]) * PAGE
