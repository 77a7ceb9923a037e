"""Configuration parsing: good configs load, bad ones name the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinfer.config import (
    QUEUE_PER_DEVICE,
    ConfigError,
    default_config,
    load_config,
    loads_config,
)

GOOD = """
[server]
max_frame_size = 1048576
max_inflight_per_connection = 8

[[devices]]
name = "cpu0"
target = "CPU"
replicas = 2
properties = { PERFORMANCE_HINT = "THROUGHPUT", NUM_STREAMS = 2 }

[[devices]]
name = "fpga"
target = "CPU"
replicas = 1

[[models]]
name = "tiny"
path = "builtin:tiny"
devices = ["cpu0", "fpga"]
queue_size = 4
queue = "per-device"
properties = { INFERENCE_PRECISION_HINT = "f32" }
"""


def test_a_full_config_parses_into_typed_values() -> None:
    config = loads_config(GOOD)
    assert config.server.max_frame_size == 1048576
    assert config.server.max_inflight_per_connection == 8
    assert [d.name for d in config.devices] == ["cpu0", "fpga"]
    assert config.devices[0].replicas == 2
    assert config.devices[0].properties == {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": "2"}
    [model] = config.models
    assert model.devices == ("cpu0", "fpga")
    assert model.queue == QUEUE_PER_DEVICE and model.queue_size == 4
    assert model.properties == {"INFERENCE_PRECISION_HINT": "f32"}


def test_the_embedded_default_serves_real_architectures_and_a_tiny_model() -> None:
    config = default_config()
    assert {m.name for m in config.models} >= {"squeezenet", "resnet50", "tiny"}
    assert config.devices[0].target == "CPU"


def test_model_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.onnx").write_bytes(b"")
    (tmp_path / "t.toml").write_text(
        '[[devices]]\nname="cpu"\ntarget="CPU"\n[[models]]\nname="m"\npath="models/m.onnx"\n'
    )
    config = load_config(tmp_path / "t.toml")
    assert config.model_path(config.models[0]) == str(tmp_path / "models" / "m.onnx")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s.replace("max_frame_size = 1048576", "max_frame_size = 0"),
            "server.max_frame_size: must be at least 1",
        ),
        (lambda s: s.replace("[server]", "[server]\nport = 1"), "server.port: unknown key"),
        (lambda s: s.replace("replicas = 2", 'replicas = "many"'), "devices[0].replicas"),
        (
            lambda s: s.replace("replicas = 2", "replicas = 0"),
            "devices[0].replicas: must be between",
        ),
        (
            lambda s: s.replace('target = "CPU"\nreplicas = 2', "replicas = 2"),
            "devices[0].target: required key is missing",
        ),
        (
            lambda s: s.replace('name = "fpga"', 'name = "cpu0"'),
            "devices[1].name: device 'cpu0' is defined twice",
        ),
        (
            lambda s: s.replace('["cpu0", "fpga"]', '["cpu0", "gpu"]'),
            "models[0].devices: unknown device 'gpu'",
        ),
        (lambda s: s.replace('"per-device"', '"random"'), "models[0].queue"),
        (lambda s: s.replace("queue_size = 4", "queue_size = -1"), "models[0].queue_size"),
        (
            lambda s: s.replace('"builtin:tiny"', '"no/such/model.xml"'),
            "models[0].path: no such file",
        ),
        (lambda s: s.replace('name = "tiny"', 'name = "has space"'), "models[0].name"),
        (
            lambda s: s.replace("queue_size = 4", "queue_size = true"),
            "models[0].queue_size: expected int",
        ),
        (
            lambda s: s + "\n[[models]]\nname='tiny'\npath='builtin:tiny'\ndevices=['cpu0']\n",
            "models[1].name: model 'tiny' is defined twice",
        ),
        (
            lambda s: s.replace('devices = ["cpu0", "fpga"]\n', ""),
            "models[0].devices: required when more than one device",
        ),
        (lambda s: s + "\n[extra]\n", "config.extra: unknown key"),
        (
            lambda s: s.replace("replicas = 1", 'replicas = 1\nexecution = "fast"'),
            'devices[1].execution: expected "adaptive" or "throughput" or "latency", got \'fast\'',
        ),
        (
            lambda s: s.replace("queue_size = 4", "queue_size = 4\nexecution = 1"),
            'models[0].execution: expected "adaptive" or "throughput" or "latency", got 1',
        ),
        (
            lambda s: s.replace("replicas = 1", "replicas = 1\ntune_seconds = -0.5"),
            "devices[1].tune_seconds: must be between 0 and 60, got -0.5",
        ),
        (
            lambda s: s.replace("replicas = 1", 'replicas = 1\ntune_seconds = "1s"'),
            "devices[1].tune_seconds: expected a number, got '1s'",
        ),
        (lambda s: s.replace("[server]", "[server"), "not valid TOML"),
    ],
)
def test_bad_configs_name_the_key_and_the_problem(edit, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as e:
        loads_config(edit(GOOD))
    assert message in str(e.value)


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml")


EXECUTION = """
[[devices]]
name = "cpu"
target = "CPU"
{cpu}

[[devices]]
name = "gpu"
target = "GPU.1"

[[models]]
name = "tiny"
path = "builtin:tiny"
devices = ["cpu", "gpu"]
{model}
"""


@pytest.mark.parametrize(
    ("cpu", "model", "on_cpu", "on_gpu"),
    [
        ("", "", "adaptive", "throughput"),  # the defaults by target
        ('execution = "latency"', "", "latency", "throughput"),
        ("", 'execution = "throughput"', "throughput", "throughput"),  # the model wins
        ('execution = "throughput"', 'execution = "adaptive"', "adaptive", "adaptive"),
        ('properties = { PERFORMANCE_HINT = "LATENCY" }', "", "properties", "throughput"),
        # Explicit properties win over the model's execution too.
        (
            "",
            'execution = "adaptive"\nproperties = { NUM_STREAMS = 2 }',
            "properties",
            "properties",
        ),
    ],
)
def test_execution_per_device_and_model(cpu: str, model: str, on_cpu: str, on_gpu: str) -> None:
    config = loads_config(EXECUTION.format(cpu=cpu, model=model))
    [tiny] = config.models
    assert (config.execution(tiny, "cpu"), config.execution(tiny, "gpu")) == (on_cpu, on_gpu)
    assert config.devices[0].tune_seconds == 0.5
