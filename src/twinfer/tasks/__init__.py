"""Image tasks: classification and detection on encoded images.

A model whose config sets ``task = "classify"`` or ``task = "detect"`` takes
encoded images (JPEG, PNG...) through :func:`submit_image` (which the data
plane calls for the binary protocol's IMAGE_REQUEST and the HTTP front end)
and answers with labelled boxes and scores.  See :mod:`twinfer.taskconfig`
for the options.
"""

from twinfer.tasks.service import (
    ImageTask,
    PredictionDict,
    predict_image,
    prepare,
    submit_image,
    task_info,
)

__all__ = ["ImageTask", "PredictionDict", "predict_image", "prepare", "submit_image", "task_info"]
