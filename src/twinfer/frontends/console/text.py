"""Plain-text formatting for the console's replies: tables, durations, milliseconds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart, with a header line."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def one_line(text: str) -> str:
    """Collapse a (possibly multi-line, e.g. OpenVINO's) message onto one line."""
    return " ".join(text.split())


def duration(seconds: float) -> str:
    """``1d 02:03:04`` / ``02:03:04``."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    text = f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


def ms(seconds: float) -> str:
    """Milliseconds with sensible precision."""
    value = seconds * 1000
    return f"{value:.3f}" if value < 1 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def counts(by_name: Mapping[str, int]) -> str:
    """``OK:5,INVALID_SHAPE:1``: ``OK`` first, then by name; ``-`` when empty."""
    names = sorted(by_name, key=lambda name: (name != "OK", name))
    return ",".join(f"{name}:{by_name[name]}" for name in names) or "-"
