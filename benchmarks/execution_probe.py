"""A quick in-process probe of adaptive execution: latency and throughput by concurrency.

No network and no front end: the real dispatcher, workers and OpenVINO
engines, driven by closed-loop clients on the reactor, for each
``execution`` (``adaptive``, ``throughput``, ``latency``).  Meant as a
sanity check (the full benchmark is ``benchmarks/run.py``)::

    python benchmarks/execution_probe.py --model squeezenet --requests 200 --concurrency 1 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
from twisted.internet import defer, task

from twinfer.config import loads_config
from twinfer.registry import build_dispatcher, load_models
from twinfer.scheduling import Dispatcher

CONFIG = """
[[devices]]
name = "cpu"
target = "CPU"
execution = "{execution}"
tune_seconds = {tune}

[[models]]
name = "{model}"
path = "builtin:{model}"
"""


async def closed_loop(
    dispatcher: Dispatcher, model: str, inputs: dict[str, np.ndarray], requests: int, clients: int
) -> tuple[float, float]:
    """``clients`` closed-loop clients sharing ``requests``: (p50 ms, requests/s)."""
    latencies: list[float] = []

    async def client() -> None:
        while len(latencies) < requests:
            started = time.perf_counter()
            await dispatcher.submit(model, inputs)
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(client()) for _ in range(clients)])
    elapsed = time.perf_counter() - began
    return statistics.median(latencies) * 1000, len(latencies) / elapsed


async def probe(reactor: Any, args: argparse.Namespace) -> None:
    for execution in args.executions:
        text = CONFIG.format(execution=execution, model=args.model, tune=args.tune_seconds)
        config = loads_config(text)
        dispatcher = build_dispatcher(config, load_models(config), reactor)
        dispatcher.start()
        entry = dispatcher.models[args.model]
        port = entry.signature.inputs[0]
        inputs = {port.name: np.zeros(port.smallest_shape or (1,), port.dtype.numpy)}
        chosen = ",".join(f"{d}:{e}" for d, e in entry.execution.items())
        for _ in range(5):  # warm-up
            await dispatcher.submit(args.model, inputs)
        for concurrency in args.concurrency:
            p50, rate = await closed_loop(
                dispatcher, args.model, inputs, args.requests, concurrency
            )
            policy = dispatcher.workers[0].policy
            mode = f", mode {policy.mode.value}, {policy.switches} switches" if policy else ""
            print(
                f"{args.model} execution={execution} ({chosen}) c={concurrency}: "
                f"p50 {p50:.2f} ms, {rate:.1f}/s{mode}",
                flush=True,
            )
        dispatcher.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="squeezenet")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1])
    parser.add_argument("--tune-seconds", type=float, default=0.0)
    parser.add_argument("--executions", nargs="+", default=["adaptive", "throughput", "latency"])
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(probe(reactor, args)))


if __name__ == "__main__":
    main()
