"""Figures for the HTTP front end: KServe codec cost, and end-to-end latency.

Run: ``python benchmarks/http_api.py`` (starts its own ``twistd`` on
127.0.0.1; ``--codec-only`` skips that).  Prints medians; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from twinfer.frontends.http import kserve

CONFIG = """
[server]
http_max_body_size = 16777216

[[devices]]
name = "cpu"
target = "CPU"
replicas = 2
properties = { INFERENCE_PRECISION_HINT = "f32" }

[[models]]
name = "tiny"
path = "builtin:tiny"

[[models]]
name = "squeezenet"
path = "builtin:squeezenet"
"""


def median_ms(function: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def request_bodies(x: np.ndarray, name: str) -> dict[str, tuple[bytearray, str | None]]:
    tensor = {"name": name, "shape": list(x.shape), "datatype": "FP32"}
    as_json = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
    header = json.dumps(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}]}
    ).encode()
    return {
        "json": (bytearray(as_json), None),
        "binary": (bytearray(header + x.tobytes()), str(len(header))),
    }


def codec_figures() -> None:
    print("KServe codec (median of 20, one thread):")
    rng = np.random.default_rng(0)
    for label, x, name in (
        ("tiny 1x4", rng.random((1, 4), dtype=np.float32), "x"),
        ("squeezenet 1x3x224x224", rng.random((1, 3, 224, 224), dtype=np.float32), "data_0"),
    ):
        for kind, (body, header) in request_bodies(x, name).items():
            ms = median_ms(lambda b=body, h=header: kserve.decode_infer_request(b, h), 20)
            print(f"  decode {label:24s} {kind:6s} {len(body):>9d} B  {ms:8.3f} ms")
    y = rng.random((1, 1000), dtype=np.float32)
    y = np.ndarray(y.shape, y.dtype, buffer=y.tobytes())  # bytes-backed, like the backend's
    for binary in (False, True):
        request = kserve.InferRequest({}, (), None, binary)
        ms = median_ms(lambda r=request: kserve.encode_infer_response("m", r, {"y": y}), 20)
        print(
            f"  encode 1x1000 output          {'binary' if binary else 'json':6s}"
            f"              {ms:8.3f} ms"
        )


def end_to_end_figures() -> None:
    import tritonclient.http as triton

    directory = Path(tempfile.mkdtemp(prefix="twinfer-http-bench-"))
    (directory / "twinfer.toml").write_text(CONFIG)
    log = directory / "twistd.log"
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("twistd")),
            "--nodaemon",
            "--pidfile=",
            f"--logfile={log}",
            "twinfer",
            "--port=tcp:0:interface=127.0.0.1",
            "--http-port=tcp:0:interface=127.0.0.1",
            f"--config={directory / 'twinfer.toml'}",
        ],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pattern = re.compile(r"twinfer http listening on tcp:127\.0\.0\.1:(\d+)")
        deadline = time.monotonic() + 60
        while not (match := pattern.search(log.read_text() if log.exists() else "")):
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"twistd did not start:\n{log.read_text()}")
            time.sleep(0.05)
        client = triton.InferenceServerClient(f"127.0.0.1:{match[1]}")
        print("End to end, tritonclient.http over loopback, sequential (median):")
        rng = np.random.default_rng(1)
        for label, model, name, shape, output, repeat in (
            ("tiny 1x4", "tiny", "x", (1, 4), "y", 200),
            (
                "squeezenet 1x3x224x224",
                "squeezenet",
                "data_0",
                (1, 3, 224, 224),
                "softmaxout_1",
                20,
            ),
        ):
            x = rng.random(shape, dtype=np.float32)
            for binary in (False, True):
                tensor = triton.InferInput(name, list(shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=binary)
                outputs = [triton.InferRequestedOutput(output, binary_data=binary)]
                client.infer(model, [tensor], outputs=outputs)  # warm up
                ms = median_ms(
                    lambda t=tensor, o=outputs, m=model: client.infer(m, [t], outputs=o), repeat
                )
                print(
                    f"  {label:24s} {'binary' if binary else 'json':6s}  {ms:8.3f} ms"
                    f"  ({repeat} requests)"
                )
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--codec-only", action="store_true")
    args = parser.parse_args()
    codec_figures()
    if not args.codec_only:
        end_to_end_figures()


if __name__ == "__main__":
    main()
