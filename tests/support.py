"""Shared helpers for the tests: configs, models and an in-process server.

Everything here is real: OpenVINO models compiled on the CPU, a real reactor,
real sockets on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from twisted.internet import endpoints, reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from twinfer.config import Config, loads_config
from twinfer.dataplane import DataPlane
from twinfer.frontends.binary import TwinferFactory
from twinfer.netutil import enable_direct_reads
from twinfer.registry import EngineFactory, build_dispatcher, load_models, openvino_engine
from twinfer.scheduling import Dispatcher

TINY_CONFIG = """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 2
properties = { INFERENCE_PRECISION_HINT = "f32", PERFORMANCE_HINT = "THROUGHPUT" }

[[models]]
name = "tiny"
path = "builtin:tiny"
"""


def config_from(text: str, base_dir: Path = Path(".")) -> Config:
    """Parse a TOML config for a test."""
    return loads_config(text, base_dir, "test config")


def save_identity_model(path: Path, dtype: Any, shape: list[int]) -> Path:
    """Write an IR model ``out = x`` (via a Convert/Identity-like op) to ``path``."""
    x = ops.parameter(ov.PartialShape(shape), ov.Type(np.dtype(dtype)), name="x")
    x.output(0).get_tensor().set_names({"x"})
    # Select(cond=true, x, x) keeps every element type (bool included) unchanged.
    cond = ops.constant(np.array(True))
    out = ops.select(cond, x, x)
    out.output(0).get_tensor().set_names({"out"})
    model = ov.Model([out.output(0)], [x], "identity")
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


class ServerTestCase(unittest.TestCase):
    """Trial test case that runs a real twinfer server on 127.0.0.1 in-process."""

    config_text = TINY_CONFIG

    def start_server(
        self,
        config_text: str | None = None,
        engine_factory: EngineFactory = openvino_engine,
        base_dir: Path = Path("."),
        tasks: Any = True,
    ) -> Deferred[int]:
        """Load the config's models, start workers and listen; fires with the port.

        ``tasks``: the data plane's image tasks (True: :mod:`twinfer.tasks`).
        """
        config = config_from(config_text or self.config_text, base_dir)
        self.config = config
        loaded = load_models(config)
        self.dispatcher: Dispatcher = build_dispatcher(config, loaded, reactor, engine_factory)
        self.dispatcher.start()
        self.addCleanup(self.dispatcher.stop)
        self.dataplane = DataPlane(self.dispatcher, tasks=tasks)
        self.factory = TwinferFactory(self.dataplane, config.server)
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        d = endpoint.listen(self.factory)

        def listening(port: Any) -> int:
            enable_direct_reads(port)  # as twistd's listening service does
            self.addCleanup(port.stopListening)
            self.port = port.getHost().port
            return int(self.port)

        return d.addCallback(listening)

    def close_clients_on_cleanup(self, *clients: Any) -> None:
        """Close client connections and wait until the server saw them go."""
        for client in clients:
            self.addCleanup(client.close)


def random_inputs(
    metadata_inputs: Mapping[str, tuple[Any, tuple[int, ...]]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random arrays for ``{name: (dtype, shape)}``."""
    rng = np.random.default_rng(seed)
    return {
        name: rng.random(shape).astype(dtype) for name, (dtype, shape) in metadata_inputs.items()
    }


def memory_owner(array: np.ndarray) -> object:
    """The object that owns an array's memory (the end of its ``base`` chain,
    through a memoryview)."""
    base: object = array
    while True:
        if isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        elif isinstance(base, memoryview):
            base = base.obj
        else:
            return base
