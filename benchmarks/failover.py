"""Failover under load: two devices serve one model, one dies halfway; count every request.

Runs a real twinfer server in-process (real OpenVINO models, real sockets on
127.0.0.1) whose device "a" is wrapped in a fault injector: after half of the
requests have been sent it raises ``DeviceError`` on every inference (a device
that fell off the bus; the fault injector is the only stand-in here). Closed-loop
clients keep the load on; every request must end as a result or an error reply,
none may hang. Prints a table and writes ``benchmarks/failover.json``.

    python benchmarks/failover.py [--model squeezenet] [--requests 4000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet import defer, endpoints, task

from twinfer.client import connect
from twinfer.config import loads_config
from twinfer.engines.openvino import Engine
from twinfer.errors import TwinferError
from twinfer.frontends.binary import TwinferFactory
from twinfer.registry import LoadedModel, build_dispatcher, load_models, openvino_engine
from twinfer.scheduling import DeviceError

CONFIG = """
[[devices]]
name = "a"
target = "CPU"
replicas = 1
properties = {{ PERFORMANCE_HINT = "LATENCY", NUM_STREAMS = 1, INFERENCE_NUM_THREADS = 1 }}

[[devices]]
name = "b"
target = "CPU"
replicas = 1
properties = {{ PERFORMANCE_HINT = "LATENCY", NUM_STREAMS = 1, INFERENCE_NUM_THREADS = 1 }}

[[models]]
name = "{model}"
path = "builtin:{model}"
devices = ["a", "b"]
queue_size = 1024
"""


class FaultInjector:
    """Wraps the real engine; once ``broken`` is set, every inference raises DeviceError."""

    def __init__(self, inner: Engine, broken: threading.Event) -> None:
        self.inner = inner
        self.broken = broken
        self.calls = 0

    def run(self, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, Any]:
        self.calls += 1
        if self.broken.is_set():
            raise DeviceError("injected fault: device a stopped answering")
        return self.inner.run(inputs, outputs)


async def run(reactor: Any, model: str, requests: int, concurrency: int) -> dict[str, Any]:
    config = loads_config(CONFIG.format(model=model))
    loaded = load_models(config)
    broken = threading.Event()
    engines: dict[str, Any] = {}

    def factory(loaded_model: LoadedModel, device: str, replica: int) -> Engine:
        engine = openvino_engine(loaded_model, device, replica)
        if device == "a":
            engine = FaultInjector(engine, broken)
        engines[device] = engine
        return engine

    dispatcher = build_dispatcher(config, loaded, reactor, factory)
    dispatcher.start()
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        TwinferFactory(dispatcher, config.server)
    )
    spec = dispatcher.metadata(model).inputs[0]
    shape = tuple(1 if d < 0 else d for d in spec.shape or ())
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    client = await connect(reactor, f"tcp:127.0.0.1:{port.getHost().port}")

    outcomes: Counter[str] = Counter()
    sent = 0
    done_a_before = 0
    started = time.perf_counter()
    broke_at = 0.0

    async def user() -> None:
        nonlocal sent, done_a_before, broke_at
        while sent < requests:
            sent += 1
            if sent == requests // 2 and not broken.is_set():
                done_a_before = dispatcher.workers[0].jobs_done
                broke_at = time.perf_counter() - started
                broken.set()
            try:
                await client.infer(model, {spec.name: x})
                outcomes["OK"] += 1
            except TwinferError as e:
                outcomes[getattr(e.code, "name", str(e.code))] += 1

    users = [defer.ensureDeferred(user()) for _ in range(concurrency)]
    # Every request must be answered: a hang would trip this timeout.
    await defer.gatherResults(users).addTimeout(600, reactor)
    elapsed = time.perf_counter() - started
    a, b = (w for w in dispatcher.workers)
    result = {
        "model": model,
        "requests": requests,
        "concurrency": concurrency,
        "answered": sum(outcomes.values()),
        "lost": requests - sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "fault_injected_after_s": round(broke_at, 3),
        "seconds": round(elapsed, 3),
        "device_a": {"state": a.state.value, "jobs_done_before_fault": done_a_before,
                     "jobs_done": a.jobs_done, "jobs_failed": a.jobs_failed},
        "device_b": {"state": b.state.value, "jobs_done": b.jobs_done},
        "dispatcher": dispatcher.counters.as_dict(),
    }  # fmt: skip
    client.close()
    await port.stopListening()
    dispatcher.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="squeezenet", choices=["squeezenet", "resnet50", "tiny"])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", default=str(Path(__file__).with_name("failover.json")))
    args = parser.parse_args()

    async def go(reactor: Any) -> None:
        result = await run(reactor, args.model, args.requests, args.concurrency)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        verdict = "ZERO requests lost" if result["lost"] == 0 else f"{result['lost']} LOST"
        print(
            f"\n{result['answered']}/{result['requests']} answered: {verdict}; "
            f"outcomes {result['outcomes']}; device a {result['device_a']['state']}, "
            f"device b served {result['device_b']['jobs_done']} jobs"
        )

    task.react(lambda reactor: defer.ensureDeferred(go(reactor)))


if __name__ == "__main__":
    main()
