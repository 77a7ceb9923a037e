"""The ``task`` part of a model's configuration: image classification or detection.

A model becomes an image model with ``task = "classify"`` or ``task =
"detect"`` plus optional sub-tables::

    [[models]]
    name = "face"
    path = "face_detection_short_range.tflite"
    task = "detect"
    labels = "face.labels"          # one label a line; line i is class id i

    [models.preprocess]             # compiled into the model (PrePostProcessor)
    layout = "NHWC"                 # the model's input layout (default: guessed)
    color = "RGB"                   # the model's channel order
    mean = 127.5                    # (x - mean) / scale, per channel or one value
    scale = 127.5
    resize = "letterbox"            # or "stretch"

    [models.detect]
    decoder = "anchors"             # "ssd", "yolo" or "anchors"
    score_threshold = 0.5

    [models.detect.anchors]         # MediaPipe SsdAnchorsCalculatorOptions names
    num_layers = 4
    ...

Each sub-table is the attrs class below of the same name, its keys the
class's fields (structured by :mod:`twinfer.schema`); errors raise
:class:`~twinfer.errors.ConfigError` naming the key
(``models[0].detect.iou_threshold``).  Option names of the ``anchors``
decoder are those of MediaPipe's ``SsdAnchorsCalculatorOptions`` and
``TensorsToDetectionsCalculatorOptions``, so a MediaPipe graph's ``.pbtxt``
values can be copied as they are.

This module imports nothing of :mod:`twinfer.tasks` (which imports the
serving stack) nor :mod:`twinfer.config`, which structures a model's task
keys with :func:`structure_task`; :mod:`twinfer.tasks.config` re-exports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import attrs

from twinfer.schema import (
    Invalid,
    PositiveInt,
    Raw,
    at,
    at_least,
    between,
    each,
    non_empty,
    one_of,
    positive,
    rule,
    structure,
    table,
)

CLASSIFY = "classify"
DETECT = "detect"
TASKS = (CLASSIFY, DETECT)
DECODERS = ("ssd", "yolo", "anchors")
RESIZE_MODES = ("stretch", "letterbox")
RESIZE_ALGORITHMS = ("linear", "nearest", "cubic", "bilinear_pillow", "bicubic_pillow")
LAYOUTS = ("NCHW", "NHWC")
COLORS = ("RGB", "BGR")
NMS_KINDS = ("hard", "weighted")

#: YOLOv3's anchors (width, height in input pixels), finest grid first.
YOLOV3_ANCHORS = (
    (10.0, 13.0), (16.0, 30.0), (33.0, 23.0),
    (30.0, 61.0), (62.0, 45.0), (59.0, 119.0),
    (116.0, 90.0), (156.0, 198.0), (373.0, 326.0),
)  # fmt: skip

#: Largest labels file read (a label file is small; this catches a wrong path).
MAX_LABELS_BYTES = 4 * 1024 * 1024


def _one_or_more(value: Any) -> tuple[float, ...]:
    """A number or a non-empty list of numbers, as a tuple."""
    if not isinstance(value, list):
        return (structure(value, float),)
    return non_empty(structure(value, tuple[float, ...]))  # type: ignore[no-any-return]


_every_value_positive = rule(
    lambda vs: all(v > 0 for v in vs), "every value must be positive, got {}"
)


def _one_or_three(values: tuple[float, ...]) -> tuple[float, ...]:
    if len(values) not in (1, 3):
        raise Invalid(f"expected one value or three, got {len(values)}")
    return values


def _width_height_pairs(value: Any) -> tuple[tuple[float, float], ...]:
    """``[w, h, w, h, ...]`` or ``[[w, h], [w, h], ...]``, all positive."""
    if isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        if not all(len(p) == 2 for p in value):
            raise Invalid("expected [width, height] pairs")
        value = [x for pair in value for x in pair]
    flat = _every_value_positive(non_empty(structure(value, tuple[float, ...])))
    if len(flat) % 2:
        raise Invalid(f"expected width, height pairs, got {value!r}")
    return tuple(zip(flat[::2], flat[1::2]))


@attrs.frozen
class PreprocessConfig:
    """How a decoded RGB image becomes the model's input (see :mod:`twinfer.tasks.preprocess`)."""

    #: Name of the image input; ``None``: the model's only (or first 4-D) input.
    input: str | None = None
    #: The model input's layout, ``"NCHW"`` or ``"NHWC"``; ``None``: guessed from its shape.
    layout: Annotated[str, one_of(*LAYOUTS)] | None = None
    #: The channel order the model expects.
    color: Annotated[str, one_of(*COLORS)] = "RGB"
    #: Subtracted from each channel (0-255 scale), one value or one per channel (model order).
    mean: Annotated[tuple[float, ...], Raw(_one_or_more), _one_or_three] = (0.0,)
    #: Then divided by this, one value or one per channel.
    scale: Annotated[tuple[float, ...], Raw(_one_or_more), _every_value_positive, _one_or_three] = (
        1.0,
    )
    #: ``"stretch"`` to the input size, or ``"letterbox"``: keep the aspect
    #: ratio and pad (bottom/right) with zeros.
    resize: Annotated[str, one_of(*RESIZE_MODES)] = "stretch"
    #: OpenVINO's resize algorithm (``bilinear_pillow`` matches Pillow's).
    resize_algorithm: Annotated[str, one_of(*RESIZE_ALGORITHMS)] = "linear"
    #: An extra input filled with ``[height, width, 1]`` of the network input
    #: (Faster R-CNN IRs' ``image_info``); ``None`` for none.
    image_info: str | None = None


@attrs.frozen
class ClassifyConfig:
    """Classification post-processing."""

    #: Predictions returned, best first.
    top_k: PositiveInt = 5
    #: Apply a softmax to the output first (for models that output logits).
    softmax: bool = False
    #: Output holding the scores; ``None``: the model's first output.
    output: str | None = None


PositiveInts = Annotated[tuple[int, ...], each(at_least(1))]


@attrs.frozen
class AnchorOptions:
    """MediaPipe's ``SsdAnchorsCalculatorOptions`` (same names, same defaults)."""

    num_layers: PositiveInt
    min_scale: Annotated[float, at_least(0.0)]
    max_scale: Annotated[float, at_least(0.0)]
    strides: PositiveInts
    #: ``None``: the model's input size.
    input_size_height: PositiveInt | None = None
    input_size_width: PositiveInt | None = None
    anchor_offset_x: float = 0.5
    anchor_offset_y: float = 0.5
    feature_map_width: PositiveInts = ()
    feature_map_height: PositiveInts = ()
    aspect_ratios: Annotated[tuple[float, ...], Raw(_one_or_more), _every_value_positive] = (1.0,)
    reduce_boxes_in_lowest_layer: bool = False
    interpolated_scale_aspect_ratio: float = 1.0
    fixed_anchor_size: bool = False


def _check_anchors(options: AnchorOptions, _: Mapping[str, Any]) -> AnchorOptions:
    layers = options.num_layers
    if len(options.strides) != layers:
        raise Invalid(
            f"expected num_layers = {layers} strides, got {len(options.strides)}", "strides"
        )
    for key in ("feature_map_width", "feature_map_height"):
        values = getattr(options, key)
        if values and len(values) != layers:
            raise Invalid(f"expected num_layers = {layers} values, got {len(values)}", key)
    if bool(options.feature_map_width) != bool(options.feature_map_height):
        raise Invalid("give feature_map_height too (or neither)", "feature_map_width")
    return options


Scale = Annotated[float, positive]


@attrs.frozen
class DetectConfig:
    """Detection decoding; which options matter depends on ``decoder``."""

    decoder: Annotated[str, one_of(*DECODERS)]
    #: Detections scoring below this are dropped.
    score_threshold: Annotated[float, between(0.0, 1.0)] = 0.5
    #: Non-maximum suppression merges boxes overlapping more than this (IoU).
    iou_threshold: Annotated[float, between(0.0, 1.0)] = 0.45
    #: At most this many detections are returned, best first.
    max_detections: PositiveInt = 100
    #: ``"hard"`` (greedy, per class) or ``"weighted"`` (MediaPipe's: a
    #: cluster's boxes are averaged by score).
    nms: Annotated[str, one_of(*NMS_KINDS)] = "hard"
    #: ssd: the ``[1,1,N,7]`` output; ``None``: the model's first output.
    output: str | None = None
    # -- yolo
    #: Anchor boxes (width, height in input pixels) of region outputs, finest grid first.
    yolo_anchors: Annotated[tuple[tuple[float, float], ...], Raw(_width_height_pairs)] = (
        YOLOV3_ANCHORS
    )
    #: Whether the region outputs still need the logistic (False when the IR
    #: ends in ``RegionYolo``, which applies it).
    yolo_logits: bool = True
    # -- anchors (MediaPipe TensorsToDetectionsCalculatorOptions names)
    anchors: AnchorOptions | None = None
    #: The output with the raw boxes ``[1, N, num_coords]``; ``None``: the
    #: output whose last dimension is larger.
    boxes_output: str | None = None
    #: The output with the raw scores ``[1, N, classes]``.
    scores_output: str | None = None
    box_coord_offset: Annotated[int, at_least(0)] = 0
    #: True: boxes are (x, y, w, h); False: (y, x, h, w).
    reverse_output_order: bool = False
    #: ``None``: the anchors' input size (MediaPipe's configs use exactly that).
    x_scale: Scale | None = None
    y_scale: Scale | None = None
    w_scale: Scale | None = None
    h_scale: Scale | None = None
    apply_exponential_on_box_size: bool = False
    sigmoid_score: bool = True
    #: Raw scores are clipped to +-this before the sigmoid (0: no clipping).
    score_clipping_thresh: Annotated[float, at_least(0.0)] = 0.0


def _check_detect(detect: DetectConfig, _: Mapping[str, Any]) -> DetectConfig:
    if detect.decoder == "anchors" and detect.anchors is None:
        raise Invalid("the anchors decoder needs a [models.detect.anchors] table", "anchors")
    if detect.decoder != "anchors" and detect.anchors is not None:
        raise Invalid("only the anchors decoder takes anchor options", "anchors")
    return detect


@attrs.frozen
class TaskConfig:
    """A model's image task: what it is, its labels and its pre/post-processing."""

    kind: Annotated[str, one_of(*TASKS)]
    #: Class names; class id i is ``labels[i]``.
    labels: tuple[str, ...] = ()
    #: The labels file, resolved (for messages); ``None`` when there is none.
    labels_path: str | None = None
    #: Largest image accepted, in pixels (checked before decoding).
    max_image_pixels: PositiveInt = 40_000_000
    preprocess: PreprocessConfig = PreprocessConfig()
    classify: ClassifyConfig = ClassifyConfig()
    detect: DetectConfig | None = None


table(AnchorOptions, check=_check_anchors)
table(DetectConfig, check=_check_detect)

#: Keys of a ``[[models]]`` table that belong to the task.
MODEL_KEYS = frozenset({"task", "labels", "max_image_pixels", "preprocess", "classify", "detect"})


def structure_task(model: Mapping[str, Any]) -> TaskConfig | None:
    """The task of a ``[[models]]`` table (its :data:`MODEL_KEYS`), ``None`` if it has none.

    ``labels`` stays a file name (in ``labels_path``) until :func:`read_labels`.
    Raises cattrs' errors or :class:`~twinfer.schema.Invalid` with key paths
    below the model's table.
    """
    keys = {k: v for k, v in model.items() if k in MODEL_KEYS}
    if "task" not in keys:
        for key in sorted(keys):
            raise Invalid('only image models take this (add task = "...")', key)
        return None
    kind = at("task", one_of(*TASKS), keys.pop("task"))
    if kind == CLASSIFY and "detect" in keys:
        raise Invalid('only for task = "detect"', "detect")
    if kind == DETECT and "classify" in keys:
        raise Invalid('only for task = "classify"', "classify")
    if kind == DETECT and "detect" not in keys:
        raise Invalid('task = "detect" needs a [models.detect] table with a decoder', "detect")
    if "labels" in keys:
        keys["labels_path"] = at("labels", lambda v: structure(v, str), keys.pop("labels"))
    return structure({**keys, "kind": kind}, TaskConfig)


def read_labels(task: TaskConfig, base_dir: Path) -> TaskConfig:
    """``task`` with its labels file (relative to ``base_dir``) read: UTF-8, one
    label a line, trailing blank lines ignored.  Read with the configuration, so
    that a file that cannot be read stops start-up with a message naming the key."""
    if task.labels_path is None:
        return task
    if "\0" in task.labels_path:  # the OS would refuse it with a ValueError, not an OSError
        raise Invalid(f"{task.labels_path!r}: a path cannot contain a NUL byte", "labels")
    path = (base_dir / task.labels_path).resolve()
    try:
        text = path.read_text("utf-8") if path.stat().st_size <= MAX_LABELS_BYTES else None
    except OSError as e:
        raise Invalid(f"cannot read {path}: {e.strerror}", "labels") from e
    except UnicodeDecodeError as e:
        raise Invalid(f"{path}: not UTF-8 text ({e})", "labels") from None
    if text is None:
        raise Invalid(f"{path}: larger than {MAX_LABELS_BYTES} bytes: not a labels file", "labels")
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return attrs.evolve(task, labels=tuple(lines), labels_path=str(path))
