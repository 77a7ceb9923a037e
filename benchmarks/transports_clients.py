#!/usr/bin/env python3
"""One client process of ``transports.py``: closed-loop load with Triton's own clients.

``python transports_clients.py KIND URL MODEL USERS DURATION WARMUP`` with
KIND one of

- ``grpc``: ``tritonclient.grpc``, raw tensors (``raw_input_contents``);
- ``grpc-shm``: ``tritonclient.grpc`` with ``tritonclient.utils.shared_memory``
  regions: each user registers one input region (written once, as
  ``twinfer bench --shared-memory`` does) and one output region the server
  writes into; the client reads the output as a view of its region;
- ``http``: ``tritonclient.http`` with ``binary_data=True`` for inputs and outputs.

Each user is a thread with its own ``InferenceServerClient`` calling the
blocking ``infer()`` in a loop (the client libraries release the GIL while
waiting).  The process prints one JSON line when ready (``{"ready": true}``,
or ``{"unavailable": REASON}`` if the server refuses shared-memory regions
as not implemented), then reads the start time (``time.monotonic_ns``, the
system-wide clock) from stdin, runs ``WARMUP`` seconds unmeasured and
``DURATION`` measured, and prints its figures as one JSON line:
latencies (µs) of the requests completed in the window, errors by status,
and its own CPU seconds over the window (``time.process_time``: every thread).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

#: Kinds of client this module runs.
KINDS = ("grpc", "grpc-shm", "http")


def _describe(error: BaseException) -> str:
    status = getattr(error, "status", None)
    found = status() if callable(status) else None
    return str(found) if found else type(error).__name__


def _shape(dims: list[Any]) -> list[int]:
    return [int(d) if int(d) > 0 else 1 for d in dims]


def _input_data(spec: dict[str, Any], seed: int) -> np.ndarray:
    """Random data for the input ``spec`` (Triton model metadata), 1 for a
    dynamic dimension; the same data for the same ``seed``."""
    from tritonclient.utils import triton_to_np_dtype

    data = np.random.default_rng(seed).random(_shape(spec["shape"]))
    return data.astype(triton_to_np_dtype(spec["datatype"]))


class User(threading.Thread):
    """One closed-loop user: calls ``request()`` until stopped, timing each call."""

    def __init__(self, request: Callable[[], None], start_ns: int, end_ns: int) -> None:
        super().__init__(daemon=True)
        self.request = request
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.latencies_us: list[float] = []
        self.errors: Counter[str] = Counter()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            t0 = time.monotonic_ns()
            error = None
            try:
                self.request()
            except Exception as e:  # every failure is a figure, the loop goes on
                error = _describe(e)
            t1 = time.monotonic_ns()
            if self.start_ns <= t1 <= self.end_ns:
                if error is None:
                    self.latencies_us.append((t1 - t0) / 1e3)
                else:
                    self.errors[error] += 1


#: A user's request callables and a cleanup to call once they are done.
Requests = tuple[list[Callable[[], None]], Callable[[], None]]


def _infer(client: Any, model: str, inputs: list, outputs: list, names: list[str]) -> None:
    """One request; its outputs decoded into arrays as a user would."""
    result = client.infer(model, inputs, outputs=outputs)
    for name in names:
        result.as_numpy(name)


def _infer_shm(client: Any, model: str, inputs: list, outputs: list, views: list) -> None:
    """One request with shared-memory tensors; each output read as a view of its region."""
    import tritonclient.utils.shared_memory as shm

    client.infer(model, inputs, outputs=outputs)
    for handle, dtype, shape in views:
        shm.get_contents_as_numpy(handle, dtype, shape)


class Unavailable(Exception):
    """The server does not implement what this kind of client needs."""


def grpc_requests(url: str, model: str, users: int) -> Requests:
    """``users`` request callables for ``grpc``/``grpc-shm`` and a cleanup callable."""
    import tritonclient.grpc as grpcclient

    metadata = grpcclient.InferenceServerClient(url).get_model_metadata(model, as_json=True)
    calls: list[Callable[[], None]] = []
    for u in range(users):
        client = grpcclient.InferenceServerClient(url)
        inputs = []
        for i, spec in enumerate(metadata["inputs"]):
            shape = _shape(spec["shape"])
            data = _input_data(spec, u * 31 + i)
            tensor = grpcclient.InferInput(spec["name"], shape, spec["datatype"])
            tensor.set_data_from_numpy(data)
            inputs.append(tensor)
        outputs = [grpcclient.InferRequestedOutput(o["name"]) for o in metadata["outputs"]]
        names = [o["name"] for o in metadata["outputs"]]

        calls.append(functools.partial(_infer, client, model, inputs, outputs, names))
    return calls, lambda: None


def grpc_shm_requests(url: str, model: str, users: int) -> Requests:
    """Like :func:`grpc_requests` with every tensor in a registered region."""
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm
    from tritonclient.utils import InferenceServerException, triton_to_np_dtype

    admin = grpcclient.InferenceServerClient(url)
    metadata = admin.get_model_metadata(model, as_json=True)
    regions: list[tuple[str, Any]] = []

    def cleanup() -> None:
        while regions:  # each region once, however often this is called
            name, handle = regions.pop()
            with contextlib.suppress(InferenceServerException):
                admin.unregister_system_shared_memory(name)
            shm.destroy_shared_memory_region(handle)

    def region(name: str, size: int) -> Any:
        handle = shm.create_shared_memory_region(name, f"/{name}", size)
        regions.append((name, handle))
        try:
            admin.register_system_shared_memory(name, f"/{name}", size)
        except InferenceServerException as e:
            if "UNIMPLEMENTED" in str(e.status()):
                cleanup()
                raise Unavailable(str(e)) from e
            raise
        return handle

    calls: list[Callable[[], None]] = []
    try:
        for u in range(users):
            client = grpcclient.InferenceServerClient(url)
            inputs = []
            for i, spec in enumerate(metadata["inputs"]):
                shape = _shape(spec["shape"])
                data = _input_data(spec, u * 31 + i)
                name = f"twtr-{os.getpid()}-{u}-in{i}"
                shm.set_shared_memory_region(region(name, data.nbytes), [data])
                tensor = grpcclient.InferInput(spec["name"], shape, spec["datatype"])
                tensor.set_shared_memory(name, data.nbytes)
                inputs.append(tensor)
            outputs, views = [], []
            for i, spec in enumerate(metadata["outputs"]):
                shape = _shape(spec["shape"])
                dtype = triton_to_np_dtype(spec["datatype"])
                size = int(np.prod(shape)) * np.dtype(dtype).itemsize
                name = f"twtr-{os.getpid()}-{u}-out{i}"
                handle = region(name, size)
                tensor = grpcclient.InferRequestedOutput(spec["name"])
                tensor.set_shared_memory(name, size)
                outputs.append(tensor)
                views.append((handle, dtype, shape))

            calls.append(functools.partial(_infer_shm, client, model, inputs, outputs, views))
    except Exception:
        cleanup()
        raise
    return calls, cleanup


def http_requests(url: str, model: str, users: int) -> Requests:
    """``users`` request callables for ``http`` (binary tensors) and a cleanup callable."""
    import tritonclient.http as httpclient

    metadata = httpclient.InferenceServerClient(url).get_model_metadata(model)
    calls: list[Callable[[], None]] = []
    for u in range(users):
        client = httpclient.InferenceServerClient(url)
        inputs = []
        for i, spec in enumerate(metadata["inputs"]):
            shape = _shape(spec["shape"])
            data = _input_data(spec, u * 31 + i)
            tensor = httpclient.InferInput(spec["name"], shape, spec["datatype"])
            tensor.set_data_from_numpy(data, binary_data=True)
            inputs.append(tensor)
        names = [o["name"] for o in metadata["outputs"]]
        outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in names]

        calls.append(functools.partial(_infer, client, model, inputs, outputs, names))
    return calls, lambda: None


BUILDERS = {"grpc": grpc_requests, "grpc-shm": grpc_shm_requests, "http": http_requests}


def _sleep_until(ns: int) -> None:
    while (left := ns - time.monotonic_ns()) > 0:
        time.sleep(left / 1e9)


def main(argv: list[str]) -> int:
    kind, url, model, users, duration, warmup = argv
    try:
        calls, cleanup = BUILDERS[kind](url, model, int(users))
    except Unavailable as e:
        print(json.dumps({"unavailable": str(e)}), flush=True)
        return 0
    print(json.dumps({"ready": True}), flush=True)
    start_at = int(sys.stdin.readline())
    window_start = start_at + int(float(warmup) * 1e9)
    window_end = window_start + int(float(duration) * 1e9)
    running = [User(call, window_start, window_end) for call in calls]
    _sleep_until(start_at)
    for user in running:
        user.start()
    _sleep_until(window_start)
    cpu0 = time.process_time()
    _sleep_until(window_end)
    cpu1 = time.process_time()
    for user in running:
        user.halt.set()
    for user in running:
        user.join()
    cleanup()
    errors: Counter[str] = Counter()
    for user in running:
        errors.update(user.errors)
    result = {
        "latencies_us": [x for user in running for x in user.latencies_us],
        "errors": dict(errors),
        "cpu_seconds": cpu1 - cpu0,
        "window_start_ns": window_start,
        "window_end_ns": window_end,
        "users": len(running),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
