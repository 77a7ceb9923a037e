"""Label names: line ``i`` of a model's labels file names class id ``i``.

The file is read with the configuration (:func:`twinfer.taskconfig.read_labels`).
"""

from __future__ import annotations


def label_name(labels: tuple[str, ...], class_id: int) -> str:
    """The name of ``class_id``, or its number as text when the labels do not name it."""
    if 0 <= class_id < len(labels) and labels[class_id]:
        return labels[class_id]
    return str(class_id)
