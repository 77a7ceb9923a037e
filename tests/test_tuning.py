"""The two engines of an adaptive model, with real OpenVINO: compiled, timed, equal.

The builtin ``tiny`` model and SqueezeNet from the onnx package's light
models (``builtin:squeezenet``) are compiled with both hints on the CPU,
as the server does at load.
"""

from __future__ import annotations

import re

import numpy as np
import openvino as ov
import pytest
from twisted.internet.testing import MemoryReactor

from twinfer.config import Config, loads_config
from twinfer.engines.openvino import OpenVINOEngine
from twinfer.engines.tuning import EngineTiming, Tuning, choose, sample_inputs, time_engine
from twinfer.frontends.console.commands import describe_execution
from twinfer.registry import LoadedModel, build_dispatcher, load_models

CONFIG = """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 2
tune_seconds = {seconds}
{device}

[[models]]
name = "{name}"
path = "builtin:{name}"
properties = {{ INFERENCE_PRECISION_HINT = "f32" }}
{model}
"""


def load(
    name: str, seconds: float = 0, device: str = "", model: str = ""
) -> tuple[Config, LoadedModel]:
    config = loads_config(CONFIG.format(name=name, seconds=seconds, device=device, model=model))
    return config, load_models(config)[name]


def hint(compiled: ov.CompiledModel) -> str:
    return str(compiled.get_property("PERFORMANCE_HINT"))


@pytest.mark.parametrize("name", ["tiny", "squeezenet"])
def test_both_engines_give_the_same_outputs(name: str) -> None:
    _, loaded = load(name)
    assert loaded.execution == {"cpu": "adaptive"}
    throughput = loaded.compiled["cpu"]
    latency = loaded.latency["cpu"]
    assert (hint(throughput), hint(latency)) == ("THROUGHPUT", "LATENCY")
    signature = loaded.signature
    rng = np.random.default_rng(3)
    inputs = {}
    for port in signature.inputs:
        shape = port.smallest_shape
        inputs[port.name] = rng.standard_normal(shape).astype(port.dtype.numpy)
    fast = OpenVINOEngine(latency, signature).run(inputs, ())
    streams = OpenVINOEngine(throughput, signature).run(inputs, ())
    assert fast.keys() == streams.keys()
    for key in fast:
        np.testing.assert_allclose(fast[key], streams[key], atol=1e-5, rtol=0)


def test_one_engine_for_throughput_latency_and_explicit_properties() -> None:
    for model, expected in [
        ('execution = "throughput"', "THROUGHPUT"),
        ('execution = "latency"', "LATENCY"),
    ]:
        _, loaded = load("tiny", model=model)
        assert loaded.latency == {}
        assert hint(loaded.compiled["cpu"]) == expected
    _, loaded = load("tiny", device='properties = { PERFORMANCE_HINT = "LATENCY" }')
    assert loaded.execution == {"cpu": "properties"} and loaded.latency == {}
    assert hint(loaded.compiled["cpu"]) == "LATENCY"


def test_the_warm_up_measures_both_engines_and_keeps_the_facts() -> None:
    _, loaded = load("tiny", seconds=0.05)
    [(device, tuning)] = loaded.tuning.items()
    assert device == "cpu" and isinstance(tuning, Tuning)
    assert tuning.latency.threads == 1 and tuning.throughput.threads >= 1
    for timing in (tuning.latency, tuning.throughput):
        assert timing.latency_ms > 0 and timing.throughput > 0
    assert tuning.choice == choose(tuning.throughput, tuning.latency)
    # The choice is applied: a winner on both counts is used alone.
    if tuning.choice == "adaptive":
        assert set(loaded.latency) == {"cpu"}
    else:
        assert loaded.latency == {}
        assert hint(loaded.compiled["cpu"]) == tuning.choice.upper()
    assert loaded.execution == {"cpu": tuning.choice}
    assert tuning.choice in tuning.describe()


def test_the_warm_up_is_bounded_by_a_number_of_runs_for_fast_models() -> None:
    _, loaded = load("tiny")
    inputs = sample_inputs(loaded.signature)
    assert inputs is not None
    timing = time_engine(loaded.latency["cpu"], inputs, 1, seconds=60.0)
    # 200 single runs of a dense layer take milliseconds, not the minute allowed.
    assert timing.throughput > 200 / 60 and timing.threads == 1


@pytest.mark.parametrize(
    ("latency", "throughput", "choice"),
    [
        ((5.9, 181.0), (9.1, 194.0), "adaptive"),  # squeezenet on the AMD kind
        ((5.0, 190.0), (9.1, 172.0), "latency"),  # the latency engine wins both
        # A tie in throughput is not a win: the server's own work per request
        # costs the one all-core engine more than the streams.
        ((4.45, 222.1), (8.61, 220.7), "adaptive"),
        ((5.0, 188.0), (9.1, 172.0), "adaptive"),  # 9 % more: within the margin
        ((9.0, 150.0), (8.0, 200.0), "throughput"),
        ((55.0, 16.2), (126.0, 16.8), "adaptive"),  # resnet50
    ],
)
def test_choose_uses_one_engine_alone_only_when_it_wins_both(
    latency: tuple[float, float], throughput: tuple[float, float], choice: str
) -> None:
    assert choose(EngineTiming(*throughput, 2), EngineTiming(*latency, 1)) == choice


def test_an_adaptive_device_shares_one_policy_and_gives_each_replica_both_engines() -> None:
    config, loaded = load("tiny")
    dispatcher = build_dispatcher(config, {"tiny": loaded}, MemoryReactor())  # type: ignore[arg-type]
    workers = dispatcher.workers
    assert len(workers) == 2
    [policy] = {id(w.policy): w.policy for w in workers}.values()
    assert policy is not None and policy.adaptive and policy.enter_waiting == 2
    assert all(set(w.latency_engines) == {"tiny"} for w in workers)
    assert dispatcher.models["tiny"].execution == {"cpu": "adaptive"}


def test_the_console_shows_the_execution_and_the_measured_figures() -> None:
    config, loaded = load("tiny", seconds=0.05)
    dispatcher = build_dispatcher(config, {"tiny": loaded}, MemoryReactor())  # type: ignore[arg-type]
    shown = describe_execution(dispatcher.models["tiny"])
    choice = loaded.tuning["cpu"].choice
    assert re.fullmatch(rf"cpu:{choice}\(lat [0-9.]+ms \d+/s, thr [0-9.]+ms \d+/s\)", shown)
