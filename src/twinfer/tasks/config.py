"""The ``task`` part of a model's configuration, parsed and validated.

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

Errors raise :class:`~twinfer.config.ConfigError` naming the key
(``models[0].detect.iou_threshold``).  Option names of the ``anchors``
decoder are those of MediaPipe's ``SsdAnchorsCalculatorOptions`` and
``TensorsToDetectionsCalculatorOptions``, so a MediaPipe graph's ``.pbtxt``
values can be copied as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from twinfer.config import ConfigError
from twinfer.tasks.labels import load_labels

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


@attrs.frozen
class PreprocessConfig:
    """How a decoded RGB image becomes the model's input (see :mod:`twinfer.tasks.preprocess`)."""

    #: Name of the image input; ``None``: the model's only (or first 4-D) input.
    input: str | None = None
    #: The model input's layout, ``"NCHW"`` or ``"NHWC"``; ``None``: guessed from its shape.
    layout: str | None = None
    #: The channel order the model expects.
    color: str = "RGB"
    #: Subtracted from each channel (0-255 scale), one value or one per channel (model order).
    mean: tuple[float, ...] = (0.0,)
    #: Then divided by this, one value or one per channel.
    scale: tuple[float, ...] = (1.0,)
    #: ``"stretch"`` to the input size, or ``"letterbox"``: keep the aspect
    #: ratio and pad (bottom/right) with zeros.
    resize: str = "stretch"
    #: OpenVINO's resize algorithm (``bilinear_pillow`` matches Pillow's).
    resize_algorithm: str = "linear"
    #: An extra input filled with ``[height, width, 1]`` of the network input
    #: (Faster R-CNN IRs' ``image_info``); ``None`` for none.
    image_info: str | None = None


@attrs.frozen
class ClassifyConfig:
    """Classification post-processing."""

    #: Predictions returned, best first.
    top_k: int = 5
    #: Apply a softmax to the output first (for models that output logits).
    softmax: bool = False
    #: Output holding the scores; ``None``: the model's first output.
    output: str | None = None


@attrs.frozen
class AnchorOptions:
    """MediaPipe's ``SsdAnchorsCalculatorOptions`` (same names, same defaults)."""

    num_layers: int
    min_scale: float
    max_scale: float
    strides: tuple[int, ...]
    #: ``None``: the model's input size.
    input_size_height: int | None = None
    input_size_width: int | None = None
    anchor_offset_x: float = 0.5
    anchor_offset_y: float = 0.5
    feature_map_width: tuple[int, ...] = ()
    feature_map_height: tuple[int, ...] = ()
    aspect_ratios: tuple[float, ...] = (1.0,)
    reduce_boxes_in_lowest_layer: bool = False
    interpolated_scale_aspect_ratio: float = 1.0
    fixed_anchor_size: bool = False


@attrs.frozen
class DetectConfig:
    """Detection decoding; which options matter depends on ``decoder``."""

    decoder: str
    #: Detections scoring below this are dropped.
    score_threshold: float = 0.5
    #: Non-maximum suppression merges boxes overlapping more than this (IoU).
    iou_threshold: float = 0.45
    #: At most this many detections are returned, best first.
    max_detections: int = 100
    #: ``"hard"`` (greedy, per class) or ``"weighted"`` (MediaPipe's: a
    #: cluster's boxes are averaged by score).
    nms: str = "hard"
    #: ssd: the ``[1,1,N,7]`` output; ``None``: the model's first output.
    output: str | None = None
    # -- yolo
    #: Anchor boxes (width, height in input pixels) of region outputs, finest grid first.
    yolo_anchors: tuple[tuple[float, float], ...] = YOLOV3_ANCHORS
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
    box_coord_offset: int = 0
    #: True: boxes are (x, y, w, h); False: (y, x, h, w).
    reverse_output_order: bool = False
    #: ``None``: the anchors' input size (MediaPipe's configs use exactly that).
    x_scale: float | None = None
    y_scale: float | None = None
    w_scale: float | None = None
    h_scale: float | None = None
    apply_exponential_on_box_size: bool = False
    sigmoid_score: bool = True
    #: Raw scores are clipped to +-this before the sigmoid (0: no clipping).
    score_clipping_thresh: float = 0.0


@attrs.frozen
class TaskConfig:
    """A model's image task: what it is, its labels and its pre/post-processing."""

    kind: str
    #: Class names; class id i is ``labels[i]``.
    labels: tuple[str, ...] = ()
    #: The labels file, resolved (for messages); ``None`` when there is none.
    labels_path: str | None = None
    #: Largest image accepted, in pixels (checked before decoding).
    max_image_pixels: int = 40_000_000
    preprocess: PreprocessConfig = PreprocessConfig()
    classify: ClassifyConfig = ClassifyConfig()
    detect: DetectConfig | None = None


# --------------------------------------------------------------------------
# Parsing


def _check_keys(table: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _table(parent: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.{key}: expected a table")
    return value


def _bool(table: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def _int(
    table: Mapping[str, Any], key: str, where: str, default: int | None, minimum: int = 0
) -> Any:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}.{key}: must be at least {minimum}, got {value}")
    return value


def _float(
    table: Mapping[str, Any],
    key: str,
    where: str,
    default: float | None,
    low: float = -math.inf,
    high: float = math.inf,
) -> Any:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{where}.{key}: must be between {low} and {high}, got {value}")
    return float(value)


def _choice(
    table: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...], default: str | None
) -> Any:
    if key not in table:
        return default
    value = table[key]
    if value not in choices:
        allowed = " or ".join(f'"{c}"' for c in choices)
        raise ConfigError(f"{where}.{key}: expected {allowed}, got {value!r}")
    return value


def _str(table: Mapping[str, Any], key: str, where: str) -> str | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value


def _numbers(
    table: Mapping[str, Any], key: str, where: str, default: tuple[float, ...], positive: bool
) -> tuple[float, ...]:
    if key not in table:
        return default
    value = table[key]
    values = value if isinstance(value, list) else [value]
    if not values or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in values
    ):
        raise ConfigError(f"{where}.{key}: expected a number or a list of numbers, got {value!r}")
    if positive and any(v <= 0 for v in values):
        raise ConfigError(f"{where}.{key}: every value must be positive, got {value!r}")
    return tuple(float(v) for v in values)


def _int_list(table: Mapping[str, Any], key: str, where: str) -> tuple[int, ...]:
    if key not in table:
        return ()
    value = table[key]
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    ):
        raise ConfigError(f"{where}.{key}: expected a list of positive integers, got {value!r}")
    return tuple(value)


def _parse_preprocess(table: Mapping[str, Any], where: str) -> PreprocessConfig:
    _check_keys(table, where, set(attrs.fields_dict(PreprocessConfig)))
    mean = _numbers(table, "mean", where, (0.0,), positive=False)
    scale = _numbers(table, "scale", where, (1.0,), positive=True)
    for key, values in (("mean", mean), ("scale", scale)):
        if len(values) not in (1, 3):
            raise ConfigError(f"{where}.{key}: expected one value or three, got {len(values)}")
    return PreprocessConfig(
        input=_str(table, "input", where),
        layout=_choice(table, "layout", where, LAYOUTS, None),
        color=_choice(table, "color", where, COLORS, "RGB"),
        mean=mean,
        scale=scale,
        resize=_choice(table, "resize", where, RESIZE_MODES, "stretch"),
        resize_algorithm=_choice(table, "resize_algorithm", where, RESIZE_ALGORITHMS, "linear"),
        image_info=_str(table, "image_info", where),
    )


def _parse_classify(table: Mapping[str, Any], where: str) -> ClassifyConfig:
    _check_keys(table, where, set(attrs.fields_dict(ClassifyConfig)))
    return ClassifyConfig(
        top_k=_int(table, "top_k", where, 5, minimum=1),
        softmax=_bool(table, "softmax", where, False),
        output=_str(table, "output", where),
    )


def _parse_anchors(table: Mapping[str, Any], where: str) -> AnchorOptions:
    fields = attrs.fields_dict(AnchorOptions)
    _check_keys(table, where, set(fields))
    for key in ("num_layers", "min_scale", "max_scale", "strides"):
        if key not in table:
            raise ConfigError(f"{where}.{key}: required key is missing")
    num_layers = _int(table, "num_layers", where, None, minimum=1)
    strides = _int_list(table, "strides", where)
    if len(strides) != num_layers:
        raise ConfigError(
            f"{where}.strides: expected num_layers = {num_layers} strides, got {len(strides)}"
        )
    fm_w = _int_list(table, "feature_map_width", where)
    fm_h = _int_list(table, "feature_map_height", where)
    for key, values in (("feature_map_width", fm_w), ("feature_map_height", fm_h)):
        if values and len(values) != num_layers:
            raise ConfigError(
                f"{where}.{key}: expected num_layers = {num_layers} values, got {len(values)}"
            )
    if bool(fm_w) != bool(fm_h):
        raise ConfigError(f"{where}.feature_map_width: give feature_map_height too (or neither)")
    aspect_ratios = _numbers(table, "aspect_ratios", where, (1.0,), positive=True)
    return AnchorOptions(
        num_layers=num_layers,
        min_scale=_float(table, "min_scale", where, None, 0.0),
        max_scale=_float(table, "max_scale", where, None, 0.0),
        strides=strides,
        input_size_height=_int(table, "input_size_height", where, None, minimum=1),
        input_size_width=_int(table, "input_size_width", where, None, minimum=1),
        anchor_offset_x=_float(table, "anchor_offset_x", where, 0.5),
        anchor_offset_y=_float(table, "anchor_offset_y", where, 0.5),
        feature_map_width=fm_w,
        feature_map_height=fm_h,
        aspect_ratios=aspect_ratios,
        reduce_boxes_in_lowest_layer=_bool(table, "reduce_boxes_in_lowest_layer", where, False),
        interpolated_scale_aspect_ratio=_float(
            table, "interpolated_scale_aspect_ratio", where, 1.0
        ),
        fixed_anchor_size=_bool(table, "fixed_anchor_size", where, False),
    )


def _parse_yolo_anchors(table: Mapping[str, Any], where: str) -> tuple[tuple[float, float], ...]:
    if "yolo_anchors" not in table:
        return YOLOV3_ANCHORS
    value = table["yolo_anchors"]
    flat = _numbers(table, "yolo_anchors", where, (), positive=True)
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        flat = tuple(float(x) for pair in value for x in pair)  # [[w, h], ...] also accepted
    if not flat or len(flat) % 2:
        raise ConfigError(f"{where}.yolo_anchors: expected width, height pairs, got {value!r}")
    return tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


def _parse_detect(table: Mapping[str, Any], where: str) -> DetectConfig:
    fields = attrs.fields_dict(DetectConfig)
    _check_keys(table, where, set(fields))
    if "decoder" not in table:
        raise ConfigError(f"{where}.decoder: required key is missing ({' or '.join(DECODERS)})")
    decoder = _choice(table, "decoder", where, DECODERS, None)
    anchors = None
    if decoder == "anchors":
        if "anchors" not in table:
            raise ConfigError(
                f"{where}.anchors: the anchors decoder needs a [models.detect.anchors] table"
            )
        anchors = _parse_anchors(_table(table, "anchors", where), f"{where}.anchors")
    elif "anchors" in table:
        raise ConfigError(f"{where}.anchors: only the anchors decoder takes anchor options")
    yolo_anchors = table.get("yolo_anchors")
    if isinstance(yolo_anchors, list) and yolo_anchors and isinstance(yolo_anchors[0], list):
        if not all(isinstance(p, list) and len(p) == 2 for p in yolo_anchors):
            raise ConfigError(f"{where}.yolo_anchors: expected [width, height] pairs")
        table = {**table, "yolo_anchors": [x for p in yolo_anchors for x in p]}
    return DetectConfig(
        decoder=decoder,
        score_threshold=_float(table, "score_threshold", where, 0.5, 0.0, 1.0),
        iou_threshold=_float(table, "iou_threshold", where, 0.45, 0.0, 1.0),
        max_detections=_int(table, "max_detections", where, 100, minimum=1),
        nms=_choice(table, "nms", where, NMS_KINDS, "hard"),
        output=_str(table, "output", where),
        yolo_anchors=_parse_yolo_anchors(table, where),
        yolo_logits=_bool(table, "yolo_logits", where, True),
        anchors=anchors,
        boxes_output=_str(table, "boxes_output", where),
        scores_output=_str(table, "scores_output", where),
        box_coord_offset=_int(table, "box_coord_offset", where, 0),
        reverse_output_order=_bool(table, "reverse_output_order", where, False),
        x_scale=_float(table, "x_scale", where, None, 1e-9),
        y_scale=_float(table, "y_scale", where, None, 1e-9),
        w_scale=_float(table, "w_scale", where, None, 1e-9),
        h_scale=_float(table, "h_scale", where, None, 1e-9),
        apply_exponential_on_box_size=_bool(table, "apply_exponential_on_box_size", where, False),
        sigmoid_score=_bool(table, "sigmoid_score", where, True),
        score_clipping_thresh=_float(table, "score_clipping_thresh", where, 0.0, 0.0),
    )


#: Keys of a ``[[models]]`` table that belong to the task.
MODEL_KEYS = {"task", "labels", "max_image_pixels", "preprocess", "classify", "detect"}


def parse_task(table: Mapping[str, Any], where: str, base_dir: Path) -> TaskConfig | None:
    """The task of the ``[[models]]`` table at ``where``, or ``None`` if it has none.

    ``labels`` is read now (relative to ``base_dir``), so a missing file stops
    start-up with a message naming the key.
    """
    if "task" not in table:
        for key in sorted(MODEL_KEYS & set(table)):
            raise ConfigError(f'{where}.{key}: only image models take this (add task = "...")')
        return None
    kind = _choice(table, "task", where, TASKS, None)
    labels: tuple[str, ...] = ()
    labels_path = None
    if "labels" in table:
        name = _str(table, "labels", where)
        assert name is not None
        path = (base_dir / name).resolve()
        try:
            labels = load_labels(path)
        except OSError as e:
            raise ConfigError(f"{where}.labels: cannot read {path}: {e.strerror}") from e
        except ValueError as e:
            raise ConfigError(f"{where}.labels: {path}: {e}") from e
        labels_path = str(path)
    if kind == CLASSIFY and "detect" in table:
        raise ConfigError(f'{where}.detect: only for task = "detect"')
    if kind == DETECT and "classify" in table:
        raise ConfigError(f'{where}.classify: only for task = "classify"')
    if kind == DETECT and "detect" not in table:
        raise ConfigError(
            f'{where}.detect: task = "detect" needs a [models.detect] table with a decoder'
        )
    detect = None
    if kind == DETECT:
        detect = _parse_detect(_table(table, "detect", where), f"{where}.detect")
    return TaskConfig(
        kind=kind,
        labels=labels,
        labels_path=labels_path,
        max_image_pixels=_int(table, "max_image_pixels", where, 40_000_000, minimum=1),
        preprocess=_parse_preprocess(_table(table, "preprocess", where), f"{where}.preprocess"),
        classify=_parse_classify(_table(table, "classify", where), f"{where}.classify"),
        detect=detect,
    )
