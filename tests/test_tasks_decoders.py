"""Detection decoders and classification, on OpenVINO models with known outputs.

Each model is built with OpenVINO's opset and outputs tensors written by
hand (see ``tasks_support.constant_outputs_model``); the expected boxes were
worked out by hand from each format's definition, in the comments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks_support import blank_png, constant_outputs_model, runnable
from twinfer.errors import ErrorCode, TwinferError
from twinfer.tasks import decoders
from twinfer.tasks.anchors import ssd_anchors
from twinfer.tasks.config import AnchorOptions


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _boxes(predictions: list[dict]) -> list[list[float]]:
    return [p["detection_box"] for p in predictions]


# --------------------------------------------------------------------------
# ssd


SSD_ROWS = np.array(
    [
        # image_id, label, confidence, x1, y1, x2, y2 (normalized)
        [0, 1, 0.30, 0.0, 0.0, 0.5, 0.5],  # under the 0.5 threshold
        [0, 3, 0.70, 0.5, 0.5, 0.9, 1.0],
        [0, 2, 0.95, 0.1, 0.2, 0.5, 0.6],
        [-1, 0, 0, 0, 0, 0, 0],  # end of the detections...
        [0, 1, 0.99, 0.0, 0.0, 1.0, 1.0],  # ...so this padding row is not one
    ],
    np.float32,
)[None, None]


def test_ssd_detection_output(tmp_path):
    (tmp_path / "l.txt").write_text("background\nperson\ncar\ndog\n")
    model = constant_outputs_model([1, 3, 30, 40], {"detection_out": SSD_ROWS})
    task, engine = runnable(
        model,
        'task = "detect"\nlabels = "l.txt"\n[models.detect]\ndecoder = "ssd"\n',
        str(tmp_path),
    )
    # A 200x100 image stretched to the input: x * 200, y * 100.
    predictions = task.run(engine, blank_png(200, 100))
    assert predictions == [
        {"label_id": 2, "label": "car", "confidences": pytest.approx(0.95),
         "detection_box": [20.0, 20.0, 100.0, 60.0]},
        {"label_id": 3, "label": "dog", "confidences": pytest.approx(0.70),
         "detection_box": [100.0, 50.0, 180.0, 100.0]},
    ]  # fmt: skip


def test_ssd_max_detections_and_threshold():
    model = constant_outputs_model([1, 3, 30, 40], {"out": SSD_ROWS})
    task, engine = runnable(
        model,
        'task = "detect"\n[models.detect]\ndecoder = "ssd"\nscore_threshold = 0.2\n'
        "max_detections = 2\n",
    )
    predictions = task.run(engine, blank_png(10, 10))
    assert [p["label_id"] for p in predictions] == [2, 3]  # best two of three
    assert predictions[0]["label"] == "2"  # no labels file: the id as text


# --------------------------------------------------------------------------
# yolo: v3 region outputs


def _region(grid: int, attributes: int) -> np.ndarray:
    """A region output where every objectness logit is -10 (nothing)."""
    t = np.zeros((3, attributes, grid, grid), np.float32)
    t[:, 4] = -10.0
    t[:, 5:] = -10.0
    return t


def test_yolo_v3_regions():
    # 64x64 input, 2 classes, anchors (px) finest grid first: the 4x4 grid
    # takes 4, 8, 12; the 2x2 grid takes 16, 24, 32.
    coarse, fine = _region(2, 7), _region(4, 7)
    # Coarse cell (row 1, col 0), anchor 16: sigmoid(tx) = 0.75 -> cx =
    # (0 + 0.75) / 2 = 0.375, cy = (1 + 0.75) / 2 = 0.875; tw = 0 -> w = 16/64.
    # Box [0.25, 0.75, 0.5, 1.0] -> [16, 48, 32, 64] px; class 1, score ~1.
    coarse[0, :, 1, 0] = [math.log(3), math.log(3), 0, 0, 10, -10, 10]
    # The same box from the fine grid, cell (3, 1), anchor 12 scaled by 16/12,
    # with a lower score: NMS must drop it.
    fine[2, :, 3, 1] = [0, 0, math.log(16 / 12), math.log(16 / 12), 2, -10, 10]
    # Fine cell (0, 0), anchor 4 doubled: box [4, 4, 12, 12] px, class 0,
    # score sigmoid(10) * sigmoid(1).
    fine[0, :, 0, 0] = [0, 0, math.log(2), math.log(2), 10, 1, -10]
    model = constant_outputs_model(
        [1, 3, 64, 64],
        # Coarse first: the decoder must sort the outputs by grid size.
        {"coarse": coarse.reshape(1, 21, 2, 2), "fine": fine.reshape(1, 21, 4, 4)},
    )
    task, engine = runnable(
        model,
        'task = "detect"\n[models.detect]\ndecoder = "yolo"\n'
        "yolo_anchors = [[4, 4], [8, 8], [12, 12], [16, 16], [24, 24], [32, 32]]\n",
    )
    predictions = task.run(engine, blank_png(64, 64))
    assert [p["label_id"] for p in predictions] == [1, 0]
    assert _boxes(predictions) == [
        pytest.approx([16, 48, 32, 64], abs=0.01),
        pytest.approx([4, 4, 12, 12], abs=0.01),
    ]
    assert predictions[0]["confidences"] == pytest.approx(_sigmoid(10) ** 2, rel=1e-4)
    assert predictions[1]["confidences"] == pytest.approx(_sigmoid(10) * _sigmoid(1), rel=1e-4)


def test_yolo_v3_regions_already_activated():
    # An IR ending in RegionYolo has applied the logistic: yolo_logits = false.
    t = np.zeros((3, 6, 1, 1), np.float32)
    t[1, :, 0, 0] = [0.5, 0.5, 0.0, 0.0, 0.8, 0.9]  # centre of the only cell, anchor 2
    model = constant_outputs_model([1, 3, 32, 32], {"region": t.reshape(1, 18, 1, 1)})
    task, engine = runnable(
        model,
        'task = "detect"\n[models.detect]\ndecoder = "yolo"\nyolo_logits = false\n'
        "yolo_anchors = [8, 8, 16, 8, 32, 32]\n",
    )
    [prediction] = task.run(engine, blank_png(32, 32))
    # Anchor 16x8 around (16, 16): [8, 12, 24, 20]; score 0.8 * 0.9.
    assert prediction["detection_box"] == pytest.approx([8, 12, 24, 20], abs=0.01)
    assert prediction["confidences"] == pytest.approx(0.72, rel=1e-5)


# --------------------------------------------------------------------------
# yolo: flat outputs

# cx, cy, w, h (input px), objectness, class 0, class 1
V5_ROWS = np.array(
    [
        [32, 32, 20, 20, 0.9, 0.1, 0.8],  # class 1, 0.72: [22, 22, 42, 42]
        [33, 32, 20, 20, 0.8, 0.1, 0.7],  # class 1, 0.56, overlaps the first: suppressed
        [10, 10, 8, 8, 0.9, 0.9, 0.1],  # class 0, 0.81: [6, 6, 14, 14]
        [50, 50, 4, 4, 0.2, 0.5, 0.5],  # 0.1: under the threshold
        [34, 32, 20, 20, 0.9, 0.7, 0.1],  # class 0, 0.63: overlaps the first, other class: kept
    ],
    np.float32,
)


def _flat_task(table: np.ndarray):
    model = constant_outputs_model([1, 64, 64, 3], {"output0": table[None]})
    return runnable(model, 'task = "detect"\n[models.detect]\ndecoder = "yolo"\n')


def test_yolo_flat_with_objectness():
    # Padded with empty boxes so that N > 5 + C, as in any real model: the
    # decoder tells [N, 5+C] from [4+C, N] by which axis is longer.
    task, engine = _flat_task(np.concatenate([V5_ROWS, np.zeros((5, 7), np.float32)]))
    # A 128x64 image stretched to 64x64: x * 2.
    predictions = task.run(engine, blank_png(128, 64))
    assert [(p["label_id"], round(p["confidences"], 4)) for p in predictions] == [
        (0, 0.81), (1, 0.72), (0, 0.63),
    ]  # fmt: skip
    assert _boxes(predictions) == [
        pytest.approx([12, 6, 28, 14]),
        pytest.approx([44, 22, 84, 42]),
        pytest.approx([48, 22, 88, 42]),
    ]


def test_yolo_flat_transposed_without_objectness():
    # [1, 4 + C, N] (YOLOv8): the same boxes, the class scores as they were
    # multiplied out above, padded to 8 boxes (so N > 4 + C) with empty ones.
    scores = V5_ROWS[:, 4:5] * V5_ROWS[:, 5:]
    rows = np.concatenate([V5_ROWS[:, :4], scores], axis=1)
    rows = np.concatenate([rows, np.zeros((3, 6), np.float32)])
    task, engine = _flat_task(rows.T.copy())
    predictions = task.run(engine, blank_png(128, 64))
    assert [(p["label_id"], round(p["confidences"], 4)) for p in predictions] == [
        (0, 0.81), (1, 0.72), (0, 0.63),
    ]  # fmt: skip
    assert _boxes(predictions)[1] == pytest.approx([44, 22, 84, 42])


# --------------------------------------------------------------------------
# anchors (MediaPipe SSD heads)

FACE_ANCHORS = """
[models.detect.anchors]
num_layers = 4
min_scale = 0.1484375
max_scale = 0.75
input_size_height = 128
input_size_width = 128
strides = [8, 16, 16, 16]
aspect_ratios = [1.0]
fixed_anchor_size = true
"""


def test_face_detector_anchors():
    options = AnchorOptions(
        num_layers=4, min_scale=0.1484375, max_scale=0.75, strides=(8, 16, 16, 16),
        fixed_anchor_size=True,
    )  # fmt: skip
    anchors = ssd_anchors(options, 128, 128)
    # 16x16 cells x 2 anchors (1.0 and the interpolated scale) + 8x8 x 3 layers x 2.
    assert anchors.shape == (896, 4)
    # Row-major cells, the anchors of a cell together.
    assert anchors[0].tolist() == [1 / 32, 1 / 32, 1, 1]
    assert anchors[1].tolist() == [1 / 32, 1 / 32, 1, 1]
    assert anchors[2].tolist() == [3 / 32, 1 / 32, 1, 1]
    assert anchors[32].tolist() == [1 / 32, 3 / 32, 1, 1]
    assert anchors[512].tolist() == [1 / 16, 1 / 16, 1, 1]
    assert anchors[518].tolist() == [3 / 16, 1 / 16, 1, 1]
    assert anchors[-1].tolist() == [15 / 16, 15 / 16, 1, 1]


def test_anchor_sizes_without_fixed_size():
    # Two layers of different strides; scales 0.2 and 0.6 (min and max),
    # interpolated sqrt(0.2 * 0.6) and sqrt(0.6 * 1.0); aspect ratio 4
    # makes w = s * 2, h = s / 2.
    options = AnchorOptions(
        num_layers=2, min_scale=0.2, max_scale=0.6, strides=(16, 32), aspect_ratios=(1.0, 4.0),
    )  # fmt: skip
    anchors = ssd_anchors(options, 64, 32)  # height 64, width 32
    assert anchors.shape == (4 * 2 * 3 + 2 * 1 * 3, 4)
    first = anchors[:3]
    np.testing.assert_allclose(
        first,
        [[0.25, 0.125, 0.2, 0.2], [0.25, 0.125, 0.4, 0.1],
         [0.25, 0.125, math.sqrt(0.12), math.sqrt(0.12)]],
        rtol=1e-6,
    )  # fmt: skip
    np.testing.assert_allclose(anchors[-1], [0.5, 0.75, math.sqrt(0.6), math.sqrt(0.6)], rtol=1e-6)


def test_mediapipe_palm_and_pose_anchor_counts():
    # palm_detection (192x192) and pose_detection (224x224) options from
    # their MediaPipe graphs; their models output 2016 and 2254 boxes.
    palm = AnchorOptions(
        num_layers=4, min_scale=0.1484375, max_scale=0.75, strides=(8, 16, 16, 16),
        fixed_anchor_size=True,
    )  # fmt: skip
    pose = AnchorOptions(
        num_layers=5, min_scale=0.1484375, max_scale=0.75, strides=(8, 16, 32, 32, 32),
        fixed_anchor_size=True,
    )  # fmt: skip
    assert len(ssd_anchors(palm, 192, 192)) == 2016
    assert len(ssd_anchors(pose, 224, 224)) == 2254


def _face_like_model() -> tuple[np.ndarray, np.ndarray]:
    regressors = np.zeros((1, 896, 16), np.float32)
    scores = np.full((1, 896, 1), -50.0, np.float32)
    # Anchor 144 = layer 0, cell (y 4, x 8), first anchor: centre (8.5/16,
    # 4.5/16).  (x, y, w, h) = (0, 0, 32, 16) / 128 -> w 0.25, h 0.125:
    # [0.40625, 0.21875, 0.65625, 0.34375].
    regressors[0, 144, :4] = [0, 0, 32, 16]
    scores[0, 144, 0] = 3.0
    # Anchor 145, the same cell's second anchor, 4 px (of 128) to the right,
    # less sure: weighted NMS averages it in.
    regressors[0, 145, :4] = [4, 0, 32, 16]
    scores[0, 145, 0] = 2.0
    # Anchor 512 + (2 * 8 + 2) * 6 + 3: layer 1 cell (y 2, x 2), centre
    # (2.5/8, 2.5/8); w = h = 16/128: [0.25, 0.25, 0.375, 0.375].
    regressors[0, 512 + 18 * 6 + 3, :4] = [0, 0, 16, 16]
    scores[0, 512 + 18 * 6 + 3, 0] = 1000.0  # clipped to 100 before the sigmoid
    return regressors, scores


def test_anchors_decoder_mediapipe_face_head():
    regressors, scores = _face_like_model()
    model = constant_outputs_model(
        [1, 128, 128, 3], {"regressors": regressors, "classificators": scores}
    )
    task, engine = runnable(
        model,
        'task = "detect"\n[models.preprocess]\nresize = "letterbox"\nmean = 127.5\n'
        'scale = 127.5\n[models.detect]\ndecoder = "anchors"\nreverse_output_order = true\n'
        'score_clipping_thresh = 100.0\nnms = "weighted"\niou_threshold = 0.3\n' + FACE_ANCHORS,
    )
    # 256x128, letterboxed into 256x256 (padding below): normalized * 256.
    predictions = task.run(engine, blank_png(256, 128))
    assert [p["confidences"] for p in predictions] == pytest.approx(
        [_sigmoid(100), _sigmoid(3)], rel=1e-6
    )
    assert predictions[0]["detection_box"] == pytest.approx([64, 64, 96, 96], abs=0.01)
    s1, s2 = _sigmoid(3), _sigmoid(2)
    shift = 4 / 128 * 256 * s2 / (s1 + s2)  # the score-weighted mean of the two boxes
    assert predictions[1]["detection_box"] == pytest.approx(
        [104 + shift, 56, 168 + shift, 88], abs=0.01
    )


def test_anchors_decoder_hard_nms_and_yxhw_order():
    regressors, scores = _face_like_model()
    # (y, x, h, w) order, as MediaPipe's default reverse_output_order = false.
    regressors[..., :4] = regressors[..., [1, 0, 3, 2]]
    model = constant_outputs_model([1, 128, 128, 3], {"boxes": regressors, "scores": scores})
    task, engine = runnable(
        model,
        'task = "detect"\n[models.detect]\ndecoder = "anchors"\nscore_threshold = 0.6\n'
        'iou_threshold = 0.3\nboxes_output = "boxes"\nscores_output = "scores"\n' + FACE_ANCHORS,
    )
    predictions = task.run(engine, blank_png(128, 128))
    assert _boxes(predictions) == [
        pytest.approx([32, 32, 48, 48], abs=0.01),
        pytest.approx([52, 28, 84, 44], abs=0.01),  # hard NMS: the better box as it is
    ]


def test_anchor_count_must_match_the_model():
    model = constant_outputs_model(
        [1, 128, 128, 3],
        {"regressors": np.zeros((1, 100, 16)), "classificators": np.zeros((1, 100, 1))},
    )
    with pytest.raises(ValueError, match="make 896 anchors, but the model outputs \\[100\\]"):
        runnable(model, 'task = "detect"\n[models.detect]\ndecoder = "anchors"\n' + FACE_ANCHORS)


# --------------------------------------------------------------------------
# NMS, top-k and classification


def test_hard_nms_is_per_class_and_greedy():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    found = decoders.Detections(
        boxes, np.array([0.9, 0.8, 0.7, 0.6], np.float32), np.array([0, 0, 1, 0])
    )
    kept = decoders.non_max_suppression(found, 0.5, 10)
    # Box 1 overlaps box 0 (IoU 9/11) and goes; box 2 is another class.
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert decoders.non_max_suppression(found, 0.5, 2).scores.tolist() == pytest.approx([0.9, 0.7])
    assert len(decoders.non_max_suppression(decoders.Detections.empty(), 0.5, 2)) == 0


def test_top_k_with_softmax():
    ids, scores = decoders.top_k(np.array([[1.0, 3.0, 2.0, 0.0]]), 2, softmax=True)
    assert ids.tolist() == [1, 2]
    total = sum(math.exp(v) for v in (1, 3, 2, 0))
    assert scores.tolist() == pytest.approx([math.exp(3) / total, math.exp(2) / total])


def test_classification_of_image_colours(tmp_path):
    """A real (tiny) classifier: the mean of each channel, so a green image is "green"."""
    import openvino as ov
    import openvino.opset13 as ops

    image = ops.parameter([1, 3, 16, 16], ov.Type.f32, name="image")
    mean = ops.reduce_mean(image, ops.constant(np.array([2, 3])), keep_dims=False)
    mean.output(0).get_tensor().set_names({"scores"})
    (tmp_path / "colours.txt").write_text("red\ngreen\nblue\n")
    task, engine = runnable(
        ov.Model([mean.output(0)], [image], "colours"),
        'task = "classify"\nlabels = "colours.txt"\n[models.preprocess]\nscale = 255.0\n'
        "[models.classify]\ntop_k = 2\n",
        str(tmp_path),
    )
    predictions = task.run(engine, blank_png(40, 30, (20, 200, 100)))
    assert [(p["label"], round(p["confidences"], 4)) for p in predictions] == [
        ("green", round(200 / 255, 4)), ("blue", round(100 / 255, 4)),
    ]  # fmt: skip
    assert predictions[0]["detection_box"] == [0.0, 0.0, 40.0, 30.0]


def test_undecodable_image_is_invalid_input():
    model = constant_outputs_model([1, 3, 30, 40], {"out": SSD_ROWS})
    task, engine = runnable(model, 'task = "detect"\n[models.detect]\ndecoder = "ssd"\n')
    with pytest.raises(TwinferError) as caught:
        task.run(engine, b"GIF89a but not really an image")
    assert caught.value.code is ErrorCode.INVALID_INPUT
    assert "cannot decode the image" in caught.value.message
