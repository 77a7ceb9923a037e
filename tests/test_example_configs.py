"""Every example configuration in etc/ parses and its models really compile.

The examples are documentation; this keeps them from rotting. Models are read
and compiled with OpenVINO on the CPU, as the server would at start-up.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import openvino as ov
import pytest
from twisted.internet.testing import MemoryReactor

from twinfer.config import QUEUE_PER_DEVICE, load_config
from twinfer.registry import build_dispatcher, load_models, replica_counts

ETC = Path(__file__).parent.parent / "etc"
EXAMPLES = sorted(ETC.glob("*.toml"))


@pytest.fixture(scope="module")
def core() -> ov.Core:
    return ov.Core()


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"twinfer.toml", "cpu-and-fpga-style.toml"}


def with_models_fetched(path: Path, tmp_path: Path) -> Path:
    """``path`` itself, or a copy of etc/ with the models that ship outside the
    repository (the MediaPipe face detector) fetched beside it."""
    if "face_detection_short_range.tflite" not in path.read_text("utf-8"):
        return path
    from mediapipe_model import face_model  # skips the test when it cannot be had

    copy = tmp_path / "etc"
    shutil.copytree(ETC, copy)
    (copy / "face_detection_short_range.tflite").symlink_to(face_model())
    return copy / path.name


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path: Path, core: ov.Core, tmp_path: Path) -> None:
    config = load_config(with_models_fetched(path, tmp_path))
    loaded = load_models(config, core)
    assert set(loaded) == {m.name for m in config.models}
    for model in config.models:
        assert set(loaded[model.name].compiled) == set(model.devices)
    # Wiring the queues and workers must work too (the reactor is never run).
    dispatcher = build_dispatcher(config, loaded, MemoryReactor())  # type: ignore[arg-type]
    for model in config.models:
        queues = dispatcher.models[model.name].queues
        expected = len(model.devices) if model.queue == QUEUE_PER_DEVICE else 1
        assert len(queues) == expected


def test_twinfer_example_uses_every_key() -> None:
    text = (ETC / "twinfer.toml").read_text("utf-8")
    keys = [
        "max_frame_size",
        "max_inflight_per_connection",
        "agent_maxconn",
        "name",
        "target",
        "replicas",
        "properties",
        "path",
        "devices",
        "queue_size",
        "queue",
        "max_consecutive_failures",
        "health_check_interval_s",
        "execution",
        "tune_seconds",
        "max_batch_size",
        "max_queue_delay_us",
        "preferred_batch_sizes",
        "default_timeout_ms",
        "priority_levels",
        "default_priority",
        "priority_aging_ms",
    ]
    uncommented = [line.split("#")[0] for line in text.splitlines()]
    for key in keys:
        assert any(line.strip().startswith(f"{key} =") for line in uncommented), key


def test_fpga_style_device_has_one_thread_for_both_models(core: ov.Core) -> None:
    config = load_config(ETC / "cpu-and-fpga-style.toml")
    loaded = load_models(config, core)
    assert replica_counts(config, loaded) == {"cpu": 2, "fpga": 1}
    dispatcher = build_dispatcher(config, loaded, MemoryReactor())  # type: ignore[arg-type]
    fpga_workers = [w for w in dispatcher.workers if w.device == "fpga"]
    assert len(fpga_workers) == 1
    assert [q.name for q in dispatcher.models["squeezenet"].queues] == [
        "squeezenet@fpga",
        "squeezenet@cpu",
    ]
    assert [q.name for q in dispatcher.models["tiny"].queues] == ["tiny@fpga", "tiny@cpu"]
