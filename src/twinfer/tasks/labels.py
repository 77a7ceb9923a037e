"""Label files: one class name a line, line ``i`` naming class id ``i``.

They are read with the configuration (:func:`load_labels`, in
:mod:`twinfer.taskconfig` so that the configuration need not import this package).
"""

from __future__ import annotations

from twinfer.taskconfig import MAX_LABELS_BYTES, load_labels

__all__ = ["MAX_LABELS_BYTES", "label_name", "load_labels"]


def label_name(labels: tuple[str, ...], class_id: int) -> str:
    """The name of ``class_id``, or its number as text when the labels do not name it."""
    if 0 <= class_id < len(labels) and labels[class_id]:
        return labels[class_id]
    return str(class_id)
