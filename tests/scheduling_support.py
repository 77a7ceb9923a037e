"""Helpers for the in-memory scheduling tests: no threads, no sockets, no sleeps.

A :class:`HandRunner` stands for a worker's thread: it records what the
worker hands to it and runs it only when the test says so, so pipeline
depth, failures and probes are stepped exactly.  The engines are real: the
builtin ``tiny`` model compiled on the CPU, run in the test's own thread.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import openvino as ov
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from twinfer.engines import builtin
from twinfer.engines.openvino import Engine, OpenVINOEngine, Signature
from twinfer.scheduling import DeviceError, Job


@functools.cache
def _compiled_tiny() -> ov.CompiledModel:
    return ov.Core().compile_model(builtin.tiny_model(), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def tiny_signature() -> Signature:
    """The builtin ``tiny`` model's signature (x f32 [?, 4] -> y, label)."""
    return Signature.of(builtin.tiny_model())


def tiny_engine() -> OpenVINOEngine:
    """A real engine (its own infer request) on the builtin ``tiny`` model."""
    return OpenVINOEngine(_compiled_tiny(), tiny_signature())


def rows(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random rows for ``tiny``."""
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def tiny_job(x: np.ndarray, model: str = "tiny", enqueued: float = 0.0) -> Job:
    """A job for ``model`` on inputs ``{"x": x}``."""
    return Job(model, {"x": x}, (), enqueued)


class HandRunner:
    """Test double for a worker's one-thread pool: ``runner(f, *args)`` returns a
    Deferred and does nothing more until the test calls :meth:`run_next`."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((f, args, d))
        return d

    @property
    def handed(self) -> int:
        """Calls handed to the thread and not run yet."""
        return len(self.pending)

    def run_next(self) -> None:
        """Run the oldest call, as the thread would, and fire its Deferred."""
        f, args, d = self.pending.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback(Failure())
        else:
            d.callback(result)


class BreakableDevice:
    """Test double around a REAL engine: a device that can break (every call,
    probes included, raises ``error`` until :meth:`repair`) and counts its
    inferences."""

    def __init__(self, inner: Engine, error: Exception | None = None) -> None:
        self._inner = inner
        self.error = error
        self.calls = 0

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self._inner.run(inputs, outputs)

    def probe(self) -> None:
        if self.error is not None:
            raise self.error

    def break_down(self, error: Exception | None = None) -> None:
        self.error = error or DeviceError("device stopped answering")

    def repair(self) -> None:
        self.error = None


def outcome(d: Deferred[Any]) -> list[Any]:
    """A list that receives what ``d`` fires with: its result, or its Failure
    (then consumed, so an expected error is not logged as unhandled)."""
    box: list[Any] = []
    d.addBoth(box.append)
    return box
