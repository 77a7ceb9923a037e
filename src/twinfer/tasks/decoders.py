"""Turning model outputs into labelled boxes and scores: pure numpy.

Nothing here knows OpenVINO, Twisted or images: each decoder takes output
arrays and returns :class:`Detections` with boxes normalized to the network
input (0..1, x1 y1 x2 y2), which :mod:`twinfer.tasks.service` maps back to the
original image.  These run in a device thread, never on the reactor.

* :func:`decode_ssd`: OpenVINO ``DetectionOutput`` rows ``[1, 1, N, 7]``;
* :func:`decode_yolo`: YOLOv3 region outputs ``[1, A*(5+C), H, W]`` and the
  flat ``[1, N, 5+C]`` / ``[1, 4+C, N]`` outputs of later YOLOs;
* :func:`decode_anchors`: anchor-based SSD heads (MediaPipe's
  ``TensorsToDetectionsCalculator``), with anchors from :mod:`twinfer.tasks.anchors`;
* :func:`non_max_suppression` (greedy or MediaPipe's weighted) and
  :func:`top_k` for classification.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np

from twinfer.tasks.config import DetectConfig


@attrs.frozen(eq=False)
class Detections:
    """Boxes with their scores and classes, best first after NMS."""

    #: ``[N, 4]`` float32 (x1, y1, x2, y2), normalized to the network input.
    boxes: np.ndarray
    #: ``[N]`` float32 confidences in 0..1.
    scores: np.ndarray
    #: ``[N]`` int64 class ids.
    class_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        """No detections."""
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def take(self, index: np.ndarray) -> Detections:
        """The detections at ``index`` (an index array or boolean mask)."""
        return Detections(self.boxes[index], self.scores[index], self.class_ids[index])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a large negative overflows to inf harmlessly (1/inf = 0); silence the warning.
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


# --------------------------------------------------------------------------
# SSD (DetectionOutput)


def decode_ssd(output: np.ndarray, score_threshold: float) -> Detections:
    """Decode ``DetectionOutput`` rows ``[image_id, label, conf, x1, y1, x2, y2]``.

    The layer has done NMS already.  Rows stop at the first ``image_id`` of
    -1 (OpenVINO pads with such rows); only image 0 is read.
    """
    if output.ndim < 2 or output.shape[-1] != 7:
        raise ValueError(f"an ssd output must be [1, 1, N, 7], got {list(output.shape)}")
    rows = output.reshape(-1, 7).astype(np.float32, copy=False)
    ends = np.flatnonzero(rows[:, 0] < 0)
    if len(ends):
        rows = rows[: ends[0]]
    rows = rows[(rows[:, 0] == 0) & (rows[:, 2] >= score_threshold)]
    order = np.argsort(-rows[:, 2], kind="stable")
    rows = rows[order]
    return Detections(
        np.clip(rows[:, 3:7], 0.0, 1.0), rows[:, 2].copy(), rows[:, 1].astype(np.int64)
    )


# --------------------------------------------------------------------------
# YOLO


def _yolo_region(
    output: np.ndarray,
    anchors: Sequence[tuple[float, float]],
    input_hw: tuple[int, int],
    logits: bool,
    threshold: float,
) -> Detections:
    _, channels, grid_h, grid_w = output.shape
    count = len(anchors)
    attributes = channels // count
    if attributes * count != channels or attributes < 6:
        raise ValueError(
            f"a YOLO region output of {channels} channels does not hold {count} anchors "
            f"of 5 + classes values"
        )
    t = output.reshape(count, attributes, grid_h, grid_w).astype(np.float32, copy=False)
    act = _sigmoid if logits else (lambda a: a)
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    cx = (cols + act(t[:, 0])) / grid_w
    cy = (rows + act(t[:, 1])) / grid_h
    with np.errstate(over="ignore"):
        anchor = np.asarray(anchors, np.float32)
        w = np.exp(t[:, 2]) * anchor[:, 0, None, None] / input_hw[1]
        h = np.exp(t[:, 3]) * anchor[:, 1, None, None] / input_hw[0]
    scores = act(t[:, 4])[:, None] * act(t[:, 5:])  # [A, C, H, W]
    # Every (box, class) pair over the threshold is a candidate, as in YOLOv3.
    a, c, y, x = np.nonzero(scores >= threshold)
    boxes = np.stack(
        [
            cx[a, y, x] - w[a, y, x] / 2,
            cy[a, y, x] - h[a, y, x] / 2,
            cx[a, y, x] + w[a, y, x] / 2,
            cy[a, y, x] + h[a, y, x] / 2,
        ],
        axis=1,
    ).astype(np.float32)
    return Detections(boxes.reshape(-1, 4), scores[a, c, y, x], c.astype(np.int64))


def _yolo_flat(output: np.ndarray, input_hw: tuple[int, int], threshold: float) -> Detections:
    table = output.reshape(output.shape[1], output.shape[2]).astype(np.float32, copy=False)
    if table.shape[0] < table.shape[1]:
        # [4+C, N] (YOLOv8 and later): class scores, no objectness.
        table = table.T
        scores_all = table[:, 4:]
    else:
        # [N, 5+C] (YOLOv5/v7): objectness times class scores.
        scores_all = table[:, 4:5] * table[:, 5:]
    if scores_all.shape[1] < 1:
        raise ValueError(f"a flat YOLO output needs class scores, got {list(output.shape)}")
    class_ids = scores_all.argmax(axis=1)
    scores = scores_all[np.arange(len(table)), class_ids]
    keep = scores >= threshold
    xywh = table[keep, :4]
    boxes = np.empty_like(xywh)
    boxes[:, 0] = (xywh[:, 0] - xywh[:, 2] / 2) / input_hw[1]
    boxes[:, 1] = (xywh[:, 1] - xywh[:, 3] / 2) / input_hw[0]
    boxes[:, 2] = (xywh[:, 0] + xywh[:, 2] / 2) / input_hw[1]
    boxes[:, 3] = (xywh[:, 1] + xywh[:, 3] / 2) / input_hw[0]
    return Detections(boxes, scores[keep], class_ids[keep].astype(np.int64))


def decode_yolo(
    outputs: Sequence[np.ndarray], input_hw: tuple[int, int], config: DetectConfig
) -> Detections:
    """Decode YOLO outputs into candidates (before NMS), normalized boxes.

    Rank-4 outputs are YOLOv3 region outputs ``[1, A*(5+C), H, W]``: sorted
    from the finest grid to the coarsest, each takes the next A anchors of
    ``config.yolo_anchors`` (pixels of the network input).  A rank-3 output
    is flat, boxes as centre/size in network-input pixels: ``[1, N, 5+C]``
    (with objectness) when its last axis is the shorter, else ``[1, 4+C, N]``.
    """
    regions = [o for o in outputs if o.ndim == 4]
    if regions:
        regions.sort(key=lambda o: -(o.shape[2] * o.shape[3]))
        per = len(config.yolo_anchors) // len(regions)
        if per * len(regions) != len(config.yolo_anchors):
            raise ValueError(
                f"{len(config.yolo_anchors)} yolo_anchors cannot be shared by "
                f"{len(regions)} region outputs"
            )
        parts = [
            _yolo_region(
                o,
                config.yolo_anchors[i * per : (i + 1) * per],
                input_hw,
                config.yolo_logits,
                config.score_threshold,
            )
            for i, o in enumerate(regions)
        ]
        return Detections(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.class_ids for p in parts]),
        )
    flat = [o for o in outputs if o.ndim == 3]
    if len(flat) != 1:
        shapes = [list(o.shape) for o in outputs]
        raise ValueError(f"expected YOLO region outputs or one [1, N, K] output, got {shapes}")
    return _yolo_flat(flat[0], input_hw, config.score_threshold)


# --------------------------------------------------------------------------
# Anchor-based SSD heads (MediaPipe)


def decode_anchors(
    raw_boxes: np.ndarray,
    raw_scores: np.ndarray,
    anchors: np.ndarray,
    config: DetectConfig,
    input_hw: tuple[int, int],
) -> Detections:
    """Decode raw regressors ``[1, N, num_coords]`` and scores ``[1, N, classes]``.

    Follows MediaPipe's ``TensorsToDetectionsCalculator``: each box is an
    offset from its anchor scaled by ``x_scale``.. (default: the input size),
    scores go through a sigmoid after clipping, and the best class of each
    box is kept.  Returns candidates over the score threshold (before NMS).
    """
    boxes = raw_boxes.reshape(-1, raw_boxes.shape[-1]).astype(np.float32, copy=False)
    scores_all = raw_scores.reshape(len(boxes), -1).astype(np.float32, copy=False)
    if len(boxes) != len(anchors):
        raise ValueError(
            f"the model outputs {len(boxes)} boxes but the anchor options make {len(anchors)}"
        )
    offset = config.box_coord_offset
    if boxes.shape[1] < offset + 4:
        raise ValueError(f"boxes have {boxes.shape[1]} values, box_coord_offset is {offset}")
    if config.score_clipping_thresh > 0:
        limit = config.score_clipping_thresh
        scores_all = np.clip(scores_all, -limit, limit)
    if config.sigmoid_score:
        scores_all = _sigmoid(scores_all)
    class_ids = scores_all.argmax(axis=1)
    scores = scores_all[np.arange(len(boxes)), class_ids]
    keep = np.flatnonzero(scores >= config.score_threshold)
    b = boxes[keep, offset : offset + 4]
    a = anchors[keep]
    anchor_opts = config.anchors
    in_h = (anchor_opts.input_size_height if anchor_opts else None) or input_hw[0]
    in_w = (anchor_opts.input_size_width if anchor_opts else None) or input_hw[1]
    x_scale = config.x_scale or in_w
    y_scale = config.y_scale or in_h
    w_scale = config.w_scale or in_w
    h_scale = config.h_scale or in_h
    if config.reverse_output_order:
        x, y, w, h = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    else:
        y, x, h, w = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    x_center = x / x_scale * a[:, 2] + a[:, 0]
    y_center = y / y_scale * a[:, 3] + a[:, 1]
    if config.apply_exponential_on_box_size:
        with np.errstate(over="ignore"):
            w = np.exp(w / w_scale) * a[:, 2]
            h = np.exp(h / h_scale) * a[:, 3]
    else:
        w = w / w_scale * a[:, 2]
        h = h / h_scale * a[:, 3]
    decoded = np.stack(
        [x_center - w / 2, y_center - h / 2, x_center + w / 2, y_center + h / 2], axis=1
    ).astype(np.float32)
    return Detections(decoded.reshape(-1, 4), scores[keep], class_ids[keep].astype(np.int64))


# --------------------------------------------------------------------------
# NMS and top-k


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box ``[4]`` with each of ``boxes`` ``[N, 4]``."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = max(box[2] - box[0], 0) * max(box[3] - box[1], 0)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(
        boxes[:, 3] - boxes[:, 1], 0, None
    )
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def non_max_suppression(
    detections: Detections, iou_threshold: float, max_detections: int, kind: str = "hard"
) -> Detections:
    """Suppress overlapping boxes of the same class; best first, at most ``max_detections``.

    ``kind="hard"`` keeps the best box of each overlapping group (boxes
    overlapping it by more than ``iou_threshold`` are dropped).
    ``kind="weighted"`` (MediaPipe's WEIGHTED algorithm) replaces the best box
    with the score-weighted mean of its group, keeping the best score.
    """
    order = np.argsort(-detections.scores, kind="stable")
    boxes = detections.boxes[order]
    scores = detections.scores[order]
    classes = detections.class_ids[order]
    remaining = np.ones(len(order), dtype=bool)
    out_boxes: list[np.ndarray] = []
    out_scores: list[float] = []
    out_classes: list[int] = []
    for i in range(len(order)):
        if len(out_scores) >= max_detections:
            break
        if not remaining[i]:
            continue
        candidates = np.flatnonzero(remaining & (classes == classes[i]))
        overlap = iou(boxes[i], boxes[candidates])
        group = candidates[overlap > iou_threshold]
        group = np.union1d(group, [i])
        remaining[group] = False
        box = boxes[i]
        if kind == "weighted" and len(group) > 1:
            weights = scores[group]
            box = (boxes[group] * weights[:, None]).sum(axis=0) / weights.sum()
        out_boxes.append(box)
        out_scores.append(scores[i])
        out_classes.append(classes[i])
    if not out_scores:
        return Detections.empty()
    return Detections(
        np.asarray(out_boxes, np.float32),
        np.asarray(out_scores, np.float32),
        np.asarray(out_classes, np.int64),
    )


def top_k(output: np.ndarray, k: int, softmax: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best classes of a classifier output (batch of one): (ids, scores), best first."""
    scores = output.reshape(-1).astype(np.float32)
    if softmax:
        shifted = np.exp(scores - scores.max())
        scores = shifted / shifted.sum()
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best], kind="stable")]
    return best.astype(np.int64), scores[best]
