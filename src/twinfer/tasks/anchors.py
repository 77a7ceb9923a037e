"""A port of MediaPipe's ``SsdAnchorsCalculator`` (the anchor part of its SSD heads).

MediaPipe's face, palm and pose detectors output raw box regressors relative
to a fixed list of anchors that the graph generates from a handful of
options.  :func:`ssd_anchors` generates the same list, in the same order, so
the models' outputs can be decoded here (see
:func:`twinfer.tasks.decoders.decode_anchors`).  The option names and
defaults are MediaPipe's (``ssd_anchors_calculator.proto``).
"""

from __future__ import annotations

import math

import numpy as np

from twinfer.tasks.config import AnchorOptions


def _scale(min_scale: float, max_scale: float, index: int, count: int) -> float:
    if count == 1:
        return (min_scale + max_scale) * 0.5
    return min_scale + (max_scale - min_scale) * index / (count - 1.0)


def ssd_anchors(options: AnchorOptions, input_height: int, input_width: int) -> np.ndarray:
    """The anchors as an ``[N, 4]`` float32 array of (x_center, y_center, w, h), normalized.

    ``input_height``/``input_width`` are used when the options do not give
    ``input_size_height``/``input_size_width``.
    """
    height = options.input_size_height or input_height
    width = options.input_size_width or input_width
    strides = options.strides
    anchors: list[tuple[float, float, float, float]] = []
    layer = 0
    while layer < options.num_layers:
        heights: list[float] = []
        widths: list[float] = []
        ratios: list[float] = []
        scales: list[float] = []
        # Consecutive layers with the same stride share one feature map:
        # their anchors are interleaved at each position.
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            scale = _scale(options.min_scale, options.max_scale, last, len(strides))
            if last == 0 and options.reduce_boxes_in_lowest_layer:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, scale, scale]
            else:
                for ratio in options.aspect_ratios:
                    ratios.append(ratio)
                    scales.append(scale)
                if options.interpolated_scale_aspect_ratio > 0.0:
                    following = (
                        1.0
                        if last == len(strides) - 1
                        else _scale(options.min_scale, options.max_scale, last + 1, len(strides))
                    )
                    scales.append(math.sqrt(scale * following))
                    ratios.append(options.interpolated_scale_aspect_ratio)
            last += 1
        for ratio, scale in zip(ratios, scales, strict=True):
            root = math.sqrt(ratio)
            heights.append(scale / root)
            widths.append(scale * root)
        if options.feature_map_height:
            fm_height = options.feature_map_height[layer]
            fm_width = options.feature_map_width[layer]
        else:
            fm_height = math.ceil(height / strides[layer])
            fm_width = math.ceil(width / strides[layer])
        for y in range(fm_height):
            for x in range(fm_width):
                x_center = (x + options.anchor_offset_x) / fm_width
                y_center = (y + options.anchor_offset_y) / fm_height
                for w, h in zip(widths, heights, strict=True):
                    if options.fixed_anchor_size:
                        anchors.append((x_center, y_center, 1.0, 1.0))
                    else:
                        anchors.append((x_center, y_center, w, h))
        layer = last
    return np.array(anchors, dtype=np.float32).reshape(-1, 4)
