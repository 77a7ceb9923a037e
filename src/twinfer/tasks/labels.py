"""Label files: one class name a line, line ``i`` naming class id ``i``."""

from __future__ import annotations

from pathlib import Path

#: Largest labels file read (a label file is small; this catches a wrong path).
MAX_LABELS_BYTES = 4 * 1024 * 1024


def load_labels(path: str | Path) -> tuple[str, ...]:
    """Read a labels file: UTF-8, one label a line, trailing blank lines ignored.

    Raises ``OSError`` if it cannot be read and ``ValueError`` if it is too
    large or not UTF-8.
    """
    path = Path(path)
    if path.stat().st_size > MAX_LABELS_BYTES:
        raise ValueError(f"larger than {MAX_LABELS_BYTES} bytes: not a labels file")
    try:
        text = path.read_text("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e})") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return tuple(lines)


def label_name(labels: tuple[str, ...], class_id: int) -> str:
    """The name of ``class_id``, or its number as text when the labels do not name it."""
    if 0 <= class_id < len(labels) and labels[class_id]:
        return labels[class_id]
    return str(class_id)
