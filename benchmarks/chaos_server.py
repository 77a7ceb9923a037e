"""``twistd twinfer`` with one stand-in device, for the chaos soak (``chaos.py``).

Usage: ``python benchmarks/chaos_server.py FAULT_FILE DEVICE TWISTD-ARGS...``

Runs the real ``twistd`` in this process with the real ``twinfer`` plugin
(options, configuration, the same service tree as
:func:`twinfer.tap.makeService`: data plane, binary and HTTP front ends,
console, metrics, graceful drain) with one difference: the engines of
device ``DEVICE`` are stand-ins that wrap the real OpenVINO engine.  While
the file ``FAULT_FILE`` exists, a stand-in raises
:class:`~twinfer.scheduling.DeviceError` on every inference and on every
health probe (a device that fell off the bus); once the file is gone they
run the real model again, so the worker's health probe brings the device
back.  The stand-in exists because a real CPU device cannot be made to fail
and recover on command; everything else is the real server.

It is put in place by replacing two module attributes before ``twistd``
starts: ``twinfer.tap.build_dispatcher`` (the serving graph at start-up)
and ``twinfer.ops.control.Controller`` (the engines made by ``reload``),
each given the stand-in engine factory.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np


class StandInDevice:
    """The real engine, failing with ``DeviceError`` while ``fault_file`` exists."""

    def __init__(self, inner: Any, fault_file: str, device: str) -> None:
        self.inner = inner
        self.fault_file = fault_file
        self.device = device

    def _check(self) -> None:
        from twinfer.scheduling import DeviceError

        if os.path.exists(self.fault_file):
            raise DeviceError(f"injected fault: device {self.device} stopped answering")

    def run(self, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, Any]:
        self._check()
        return self.inner.run(inputs, outputs)  # type: ignore[no-any-return]

    def probe(self) -> None:
        self._check()
        self.inner.probe()


def stand_in_factory(fault_file: str, failing_device: str) -> Any:
    """An ``EngineFactory``: the real engine, wrapped on ``failing_device``."""
    from twinfer.registry import openvino_engine

    def factory(model: Any, device: str, replica: int) -> Any:
        engine = openvino_engine(model, device, replica)
        if device == failing_device:
            return StandInDevice(engine, fault_file, device)
        return engine

    return factory


def install(fault_file: str, failing_device: str) -> None:
    """Make ``twistd twinfer`` build its engines with :func:`stand_in_factory`."""
    import twinfer.ops.control as control
    import twinfer.tap as tap
    from twinfer.registry import build_dispatcher

    factory = stand_in_factory(fault_file, failing_device)
    tap.build_dispatcher = functools.partial(build_dispatcher, engine_factory=factory)  # type: ignore[assignment]
    real_controller = control.Controller

    class StandInController(real_controller):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("engine_factory", factory)
            super().__init__(*args, **kwargs)

    control.Controller = StandInController  # type: ignore[misc]


def main() -> None:
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    fault_file, device, *twistd_args = sys.argv[1:]
    install(os.path.abspath(fault_file), device)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *twistd_args]
    run()


if __name__ == "__main__":
    main()
