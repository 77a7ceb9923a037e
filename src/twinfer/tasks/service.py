"""Image tasks at serving time: from encoded image bytes to labelled predictions.

:func:`prepare` runs at load time: it compiles the preprocessing into the
model and precomputes what decoding needs (the anchors, the output names).
:func:`predict_image` runs on the reactor thread and only queues a job; the
job (:meth:`ImageTask.run`) decodes the image, infers and post-processes in
the device thread, so neither Pillow nor numpy ever block the reactor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np
import openvino as ov
from twisted.internet import defer
from twisted.internet.defer import Deferred

from twinfer.engines.openvino import Engine
from twinfer.errors import ErrorCode, TwinferError
from twinfer.scheduling import Dispatcher
from twinfer.tasks import decoders
from twinfer.tasks.anchors import ssd_anchors
from twinfer.tasks.config import CLASSIFY, DETECT, TASKS, TaskConfig
from twinfer.tasks.labels import label_name
from twinfer.tasks.preprocess import ModelInput, build_model, decode_image

#: One prediction, as :func:`predict_image` returns it (and HTTP/JSON carry it).
PredictionDict = dict[str, Any]


def _output_name(port: ov.Output, index: int) -> str:
    # The same naming rule as twinfer.engines.openvino's Signature (unnamed: output_i).
    try:
        return str(port.any_name)
    except RuntimeError:
        return f"output_{index}"


@attrs.frozen(eq=False)
class ImageTask:
    """A model's image task, ready to run: config, input geometry, anchors."""

    model: str
    config: TaskConfig
    input: ModelInput
    #: Output names in the model's order.
    outputs: tuple[str, ...]
    #: ``[N, 4]`` anchors for the anchors decoder, else ``None``.
    anchors: np.ndarray | None = None

    @property
    def kind(self) -> str:
        """``"classify"`` or ``"detect"``."""
        return self.config.kind

    def info(self) -> dict[str, Any]:
        """What :func:`task_info` reports."""
        detect = self.config.detect
        return {
            "task": self.kind,
            "labels": list(self.config.labels),
            "decoder": detect.decoder if detect else None,
            "input_size": {"height": self.input.size[0], "width": self.input.size[1]},
        }

    def run(self, engine: Engine, image: bytes | bytearray | memoryview) -> list[PredictionDict]:
        """Decode ``image``, infer on ``engine`` and post-process: in the device thread.

        Raises :class:`TwinferError` (``INVALID_INPUT``) for a bad image.
        """
        config = self.config
        decoded = decode_image(
            image, self.input.size, config.preprocess.resize, config.max_image_pixels
        )
        inputs = {self.input.name: decoded.tensor}
        if config.preprocess.image_info:
            height, width = self.input.size
            inputs[config.preprocess.image_info] = np.array([[height, width, 1]], np.float32)
        outputs = engine.run(inputs, ())
        if self.kind == CLASSIFY:
            return self._classify(outputs, decoded.original)
        detections = self._detect(outputs)
        sx, sy = decoded.box_scale
        width, height = decoded.original
        boxes = detections.boxes.astype(np.float64) * np.array([sx, sy, sx, sy])
        boxes = np.clip(boxes, 0.0, np.array([width, height, width, height], np.float64))
        return [
            {
                "label_id": int(c),
                "label": label_name(config.labels, int(c)),
                "confidences": float(s),
                "detection_box": [round(float(v), 2) for v in box],
            }
            for box, s, c in zip(boxes, detections.scores, detections.class_ids, strict=True)
        ]

    def _pick(self, outputs: Mapping[str, np.ndarray], name: str | None) -> np.ndarray:
        if name is None:
            return outputs[self.outputs[0]]
        try:
            return outputs[name]
        except KeyError:
            raise TwinferError(
                ErrorCode.INTERNAL, f"model {self.model!r} has no output {name!r}"
            ) from None

    def _classify(
        self, outputs: Mapping[str, np.ndarray], original: tuple[int, int]
    ) -> list[PredictionDict]:
        options = self.config.classify
        ids, scores = decoders.top_k(
            self._pick(outputs, options.output), options.top_k, options.softmax
        )
        whole = [0.0, 0.0, float(original[0]), float(original[1])]
        return [
            {
                "label_id": int(i),
                "label": label_name(self.config.labels, int(i)),
                "confidences": float(s),
                "detection_box": list(whole),
            }
            for i, s in zip(ids, scores, strict=True)
        ]

    def _detect(self, outputs: Mapping[str, np.ndarray]) -> decoders.Detections:
        options = self.config.detect
        assert options is not None
        if options.decoder == "ssd":
            found = decoders.decode_ssd(
                self._pick(outputs, options.output), options.score_threshold
            )
            return found.take(np.arange(min(len(found), options.max_detections)))
        if options.decoder == "yolo":
            if options.output is not None:
                chosen = [self._pick(outputs, options.output)]
            else:
                chosen = [outputs[name] for name in self.outputs]
            candidates = decoders.decode_yolo(chosen, self.input.size, options)
        else:
            assert self.anchors is not None
            raw_boxes, raw_scores = self._anchor_outputs(outputs)
            candidates = decoders.decode_anchors(
                raw_boxes, raw_scores, self.anchors, options, self.input.size
            )
        return decoders.non_max_suppression(
            candidates, options.iou_threshold, options.max_detections, options.nms
        )

    def _anchor_outputs(self, outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        options = self.config.detect
        assert options is not None
        if options.boxes_output and options.scores_output:
            return (
                self._pick(outputs, options.boxes_output),
                self._pick(outputs, options.scores_output),
            )
        arrays = [outputs[name] for name in self.outputs]
        if len(arrays) != 2:
            raise TwinferError(
                ErrorCode.INTERNAL,
                f"model {self.model!r} has {len(arrays)} outputs: set detect.boxes_output "
                f"and detect.scores_output",
            )
        # The regressors have more values per anchor than the class scores.
        first, second = arrays
        return (first, second) if first.shape[-1] >= second.shape[-1] else (second, first)


def prepare(name: str, model: ov.Model, config: TaskConfig) -> tuple[ov.Model, ImageTask]:
    """Add ``config``'s preprocessing to ``model`` and make its :class:`ImageTask`.

    Raises ``ValueError`` when the model does not fit the task (no image
    input, anchors that do not match its outputs...).
    """
    model, found = build_model(model, config.preprocess)
    outputs = tuple(_output_name(port, i) for i, port in enumerate(model.outputs))
    detect = config.detect
    anchors = None
    if config.kind == DETECT and detect is not None:
        for key in ("output", "boxes_output", "scores_output"):
            value = getattr(detect, key)
            if value is not None and value not in outputs:
                raise ValueError(f"detect.{key}: the model has no output {value!r} ({outputs})")
        if detect.decoder == "anchors":
            assert detect.anchors is not None
            anchors = ssd_anchors(detect.anchors, *found.size)
            counts = {
                int(np.prod([d.get_length() for d in p.get_partial_shape()[:-1]]))
                for p in model.outputs
                if p.get_partial_shape().is_static
            }
            if counts and len(anchors) not in counts:
                raise ValueError(
                    f"detect.anchors: the options make {len(anchors)} anchors, but the "
                    f"model outputs {sorted(counts)} boxes"
                )
    if config.classify.output is not None and config.classify.output not in outputs:
        raise ValueError(
            f"classify.output: the model has no output {config.classify.output!r} ({outputs})"
        )
    if config.preprocess.image_info is not None and not any(
        config.preprocess.image_info in p.get_names() for p in model.inputs
    ):
        raise ValueError(
            f"preprocess.image_info: the model has no input {config.preprocess.image_info!r}"
        )
    return model, ImageTask(name, config, found, outputs, anchors)


def _task(dispatcher: Dispatcher, model: str, task: str | None) -> ImageTask:
    entry = dispatcher.entry(model)
    image_task = entry.task
    if not isinstance(image_task, ImageTask):
        raise TwinferError(
            ErrorCode.WRONG_TASK,
            f'model {model!r} is not an image model (its config sets no task = "classify" '
            f'or "detect")',
        )
    if task is not None and task != image_task.kind:
        raise TwinferError(
            ErrorCode.WRONG_TASK,
            f"model {model!r} is configured to {image_task.kind}, not to {task}",
        )
    return image_task


def submit_image(
    dispatcher: Dispatcher,
    model: str,
    image: bytes | bytearray | memoryview,
    task: str | None = None,
) -> tuple[str, Deferred[list[PredictionDict]]]:
    """Queue the image model ``model`` on encoded image bytes; returns the
    model's task kind and the job's Deferred.

    The Deferred fires with a list of predictions, best first, each
    ``{"label_id": int, "label": str, "confidences": float,
    "detection_box": [x1, y1, x2, y2]}`` in original-image pixels (the whole
    image for classification), or fails with :class:`TwinferError`
    (``INVALID_INPUT`` for bytes that are not an image; the dispatcher's
    errors).  Cancelling it withdraws the job.  Raises
    :class:`TwinferError` at once: ``UNKNOWN_MODEL``; ``INVALID_INPUT`` for an
    unknown ``task``; ``WRONG_TASK`` when the model has no image task (or not
    ``task``); ``OVERLOADED``/``UNAVAILABLE`` like any job.  Call on the
    reactor thread: it only queues the job, whose decoding, inference and
    post-processing run in the device thread.
    """
    if task and task not in TASKS:
        raise TwinferError(
            ErrorCode.INVALID_INPUT, f"unknown task {task!r} (expected {' or '.join(TASKS)})"
        )
    image_task = _task(dispatcher, model, task or None)
    if not len(image):
        raise TwinferError(ErrorCode.INVALID_INPUT, "the image is empty")

    def work(engine: Engine) -> list[PredictionDict]:
        return image_task.run(engine, image)

    return image_task.kind, dispatcher.submit_call(model, work)


def predict_image(
    dispatcher: Dispatcher,
    model: str,
    image: bytes | bytearray | memoryview,
    task: str | None = None,
) -> Deferred[list[PredictionDict]]:
    """:func:`submit_image`'s Deferred, with its immediate errors as a failed Deferred."""
    try:
        return submit_image(dispatcher, model, image, task)[1]
    except TwinferError as e:
        return defer.fail(e)


def task_info(dispatcher: Dispatcher, model: str) -> dict[str, Any] | None:
    """``model``'s image task: ``{"task", "labels", "decoder", "input_size"}``.

    Returns ``None`` for a served model without an image task; raises
    :class:`TwinferError` ``UNKNOWN_MODEL`` for a model not served here.
    """
    entry = dispatcher.entry(model)
    return entry.task.info() if isinstance(entry.task, ImageTask) else None
