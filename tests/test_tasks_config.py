"""The image-task configuration: values, defaults and precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinfer.config import ConfigError, loads_config

HEAD = (
    '[[devices]]\nname = "cpu"\ntarget = "CPU"\n\n[[models]]\nname = "m"\npath = "builtin:tiny"\n'
)


def _task(body: str, base_dir: Path = Path(".")):
    return loads_config(HEAD + body, base_dir).models[0].task


def test_plain_model_has_no_task():
    assert _task("") is None


def test_face_detector_example_config():
    etc = Path(__file__).parent.parent / "etc"
    text = (
        (etc / "face-detection.toml")
        .read_text()
        .replace('path = "face_detection_short_range.tflite"', 'path = "builtin:tiny"')
    )
    task = loads_config(text, etc).models[0].task
    assert task.kind == "detect" and task.labels == ("face",)
    assert task.preprocess.resize == "letterbox" and task.preprocess.mean == (127.5,)
    assert task.detect.decoder == "anchors" and task.detect.nms == "weighted"
    assert task.detect.anchors.strides == (8, 16, 16, 16)
    assert task.detect.anchors.fixed_anchor_size is True


def test_defaults_and_labels(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n\n")
    task = _task('task = "classify"\nlabels = "labels.txt"\n', tmp_path)
    assert task.labels == ("cat", "dog")
    assert task.classify.top_k == 5 and task.preprocess.color == "RGB"
    detect = _task('task = "detect"\n[models.detect]\ndecoder = "yolo"\n').detect
    assert (detect.score_threshold, detect.iou_threshold, detect.max_detections) == (0.5, 0.45, 100)
    assert detect.yolo_anchors[0] == (10.0, 13.0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('task = "segment"\n', 'models[0].task: expected "classify" or "detect"'),
        ('labels = "x.txt"\n', "models[0].labels: only image models take this"),
        ('task = "classify"\nlabels = "missing.txt"\n', "models[0].labels: cannot read"),
        ('task = "detect"\n', 'models[0].detect: task = "detect" needs a [models.detect]'),
        ('task = "detect"\n[models.detect]\n', "models[0].detect.decoder: required key"),
        ('task = "detect"\n[models.detect]\ndecoder = "rcnn"\n', "models[0].detect.decoder"),
        (
            'task = "detect"\n[models.detect]\ndecoder = "ssd"\niou_threshold = 1.5\n',
            "models[0].detect.iou_threshold: must be between 0.0 and 1.0, got 1.5",
        ),
        (
            'task = "detect"\n[models.detect]\ndecoder = "anchors"\n',
            "models[0].detect.anchors: the anchors decoder needs",
        ),
        (
            'task = "detect"\n[models.detect]\ndecoder = "anchors"\n[models.detect.anchors]\n'
            "num_layers = 2\nmin_scale = 0.1\nmax_scale = 0.7\nstrides = [8]\n",
            "models[0].detect.anchors.strides: expected num_layers = 2 strides, got 1",
        ),
        (
            'task = "classify"\n[models.preprocess]\nmean = [1, 2]\n',
            "models[0].preprocess.mean: expected one value or three, got 2",
        ),
        ('task = "classify"\n[models.preprocess]\nscale = 0\n', "preprocess.scale: every value"),
        ('task = "classify"\n[models.preprocess]\nlayout = "CHW"\n', "preprocess.layout"),
        ('task = "classify"\n[models.classify]\ntop_k = 0\n', "classify.top_k: must be at least 1"),
        ('task = "classify"\n[models.classify]\ntopk = 3\n', "classify.topk: unknown key"),
        ('task = "classify"\n[models.detect]\ndecoder = "ssd"\n', 'only for task = "detect"'),
    ],
)
def test_errors_name_the_key(body, message):
    with pytest.raises(ConfigError) as caught:
        _task(body)
    assert message in str(caught.value)
