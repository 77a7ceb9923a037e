"""What ``twinfer bench`` reports: statistics, the text table, the JSON, the progress line.

The statistics (:class:`Samples`, :func:`merge`, :func:`summarize`) are pure
functions over raw per-request samples; several processes' samples are
merged by concatenation, so percentiles are those of the union.  The rest
turns a summarized point into what the user sees: a row of the table printed
as each point finishes, the ``--json`` document, and the live progress line
on a terminal.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import attrs
import numpy as np

# -- statistics (pure) -------------------------------------------------------


@attrs.frozen(eq=False)
class Samples:
    """The raw measurements of one load generator over one measurement window.

    Arrays hold one entry per successful measured request, in completion
    order; times are from ``time.monotonic_ns()``, which on Linux is the
    system-wide ``CLOCK_MONOTONIC`` and so comparable between processes.
    """

    #: Client-observed latency of each request, in nanoseconds (int64).
    latency_ns: np.ndarray
    #: The server's reported queue time of each request, in microseconds.
    queue_us: np.ndarray
    #: The server's reported compute time of each request, in microseconds.
    compute_us: np.ndarray
    #: Failed measured requests by error code name.
    errors: Mapping[str, int]
    #: Measurement window, ``monotonic_ns`` values.
    start_ns: int
    end_ns: int
    #: CPU seconds (user + system) the client process used in the window.
    cpu_seconds: float = 0.0
    #: Requests the client re-sent after a lost connection or a GOAWAY.
    resent: int = 0

    @property
    def count(self) -> int:
        """Successful measured requests."""
        return len(self.latency_ns)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (picklable; ``Samples(**d)`` rebuilds it)."""
        return attrs.asdict(self, recurse=False)


def merge(parts: Sequence[Samples]) -> Samples:
    """Combine several load generators' samples of the same point.

    Raw samples are concatenated, so any percentile computed afterwards is the
    percentile of the union (never an average of per-part percentiles);
    error counts and CPU time add up and the window spans all parts.
    """
    if not parts:
        raise ValueError("nothing to merge")
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part.errors)
    return Samples(
        latency_ns=np.concatenate([p.latency_ns for p in parts]),
        queue_us=np.concatenate([p.queue_us for p in parts]),
        compute_us=np.concatenate([p.compute_us for p in parts]),
        errors=dict(errors),
        start_ns=min(p.start_ns for p in parts),
        end_ns=max(p.end_ns for p in parts),
        cpu_seconds=sum(p.cpu_seconds for p in parts),
        resent=sum(p.resent for p in parts),
    )


PERCENTILES = (50, 90, 99)


def percentiles(values: np.ndarray, scale: float) -> dict[str, float | None]:
    """p50/p90/p99/max/mean of ``values`` times ``scale``; ``None`` each when empty."""
    if not len(values):
        return {**{f"p{p}": None for p in PERCENTILES}, "max": None, "mean": None}
    points = np.percentile(values, PERCENTILES)
    result: dict[str, float | None] = {
        f"p{p}": float(v) * scale for p, v in zip(PERCENTILES, points, strict=True)
    }
    result["max"] = float(values.max()) * scale
    result["mean"] = float(values.mean()) * scale
    return result


def summarize(samples: Samples) -> dict[str, Any]:
    """The report of one point: throughput, percentiles, errors, server split.

    Latencies are in milliseconds; ``queue_ms``/``compute_ms`` are the
    server's own figures; ``overhead_ms`` is latency minus both, per request
    (the network, the codecs and both event loops: what the server adds on
    top of the device beyond queueing, plus the client's share).
    """
    window = max(samples.end_ns - samples.start_ns, 1) / 1e9
    count = samples.count
    latency_us = samples.latency_ns / 1e3
    overhead_us = latency_us - samples.queue_us - samples.compute_us
    return {
        "count": count,
        "errors": dict(sorted(samples.errors.items())),
        "error_count": sum(samples.errors.values()),
        "window_s": window,
        # The window on the system-wide monotonic clock (to line up with
        # other measurements, e.g. the server's CPU time).
        "window_start_ns": samples.start_ns,
        "window_end_ns": samples.end_ns,
        "throughput": count / window,
        "latency_ms": percentiles(latency_us, 1e-3),
        "queue_ms": percentiles(samples.queue_us, 1e-3),
        "compute_ms": percentiles(samples.compute_us, 1e-3),
        "overhead_ms": percentiles(overhead_us, 1e-3),
        "client_cpu_percent": 100.0 * samples.cpu_seconds / window,
        "resent": samples.resent,
    }


# -- the text table and the JSON document ------------------------------------


HEADER = (
    f"{'conc':>5} {'inf/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
    f"{'queue ms':>9} {'compute ms':>10} {'other ms':>9} {'errors':>7} {'client CPU':>10}"
)


def _ms(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"


def format_row(point: Mapping[str, Any]) -> str:
    """One line of the text report (server split columns are p50s)."""
    lat = point["latency_ms"]
    return (
        f"{point['concurrency']:>5} {point['throughput']:>9.1f} {_ms(lat['p50'], 8)} "
        f"{_ms(lat['p90'], 8)} {_ms(lat['p99'], 8)} {_ms(lat['max'], 8)} "
        f"{_ms(point['queue_ms']['p50'], 9)} {_ms(point['compute_ms']['p50'], 10)} "
        f"{_ms(point['overhead_ms']['p50'], 9)} {point['error_count']:>7} "
        f"{point['client_cpu_percent']:>9.0f}%"
    )


def print_point(point: Mapping[str, Any], out: IO[str], *, header: bool) -> None:
    """Print ``point``'s row (after the table's header if ``header``), then its errors."""
    if header:
        print(HEADER, file=out)
    print(format_row(point), file=out)
    for name, count in point["errors"].items():
        print(f"{'':>5} error {name}: {count}", file=out)
    if point.get("resent"):
        print(f"{'':>5} re-sent after a lost connection or GOAWAY: {point['resent']}", file=out)
    out.flush()


def write_json(path: str | Path, document: Mapping[str, Any]) -> None:
    """Write ``document`` (the run and its points) to ``path`` as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2, allow_nan=False, default=_json_default)
        f.write("\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialize {value!r}")


# -- the progress line -------------------------------------------------------


class Progress:
    """A one-line live status on a terminal; silent when ``stream`` is not a TTY."""

    def __init__(self, stream: Any = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = (0.0, 0)

    #: Shortest time between two updates, in seconds.
    interval = 0.25

    def reset(self) -> None:
        """Start a new point."""
        self._last = (time.monotonic(), 0)

    def update(self, label: str, completed: int, elapsed: float, total: float | None) -> None:
        """Show the rate since the last update and elapsed/total seconds.

        Updates closer together than :attr:`interval` are skipped, so the
        rate is never taken over a meaninglessly short time.
        """
        if not self.enabled:
            return
        now = time.monotonic()
        then, before = self._last
        if now - then < self.interval:
            return
        rate = (completed - before) / (now - then)
        self._last = (now, completed)
        of = f"/{total:.1f}" if total is not None else ""
        self.stream.write(f"\r{label}: {rate:8.1f} inf/s  {elapsed:5.1f}{of} s  ({completed} done)")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the line before the report is printed."""
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
