"""KServe v2 conformance, shown with a real third-party client: ``tritonclient.http``.

The last tests drive Triton's extensions (repository index, load/unload,
statistics, model configuration) on a real ``twistd --allow-admin``.

tritonclient is blocking (geventhttpclient), so its calls run in a thread
while the in-process server's reactor keeps running: always the same one
thread, because gevent ties a client's connections to the thread (hub) that
made them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import openvino as ov
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException
from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from http_support import HTTPServerTestCase
from twinfer.engines import openvino as backend
from twinfer.engines.builtin import tiny_reference
from twinfer.frontends import http
from twinfer.frontends.http import kserve
from twistd_process import SQUEEZENET_MODEL, TWISTD_TINY_CONFIG, StartTwistd, with_server_table

T = TypeVar("T")

CONFIG = with_server_table(TWISTD_TINY_CONFIG + SQUEEZENET_MODEL, http_max_body_size=4194304)


def squeezenet_reference(x: np.ndarray) -> np.ndarray:
    """SqueezeNet run directly on OpenVINO, without twinfer."""
    core = ov.Core()
    model = backend.read_model(core, "builtin:squeezenet")
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled({0: x})[0])


class TritonClientTests(HTTPServerTestCase):
    config_text = CONFIG
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        await self.start_http()
        self.client_thread = ThreadPool(minthreads=1, maxthreads=1, name="tritonclient")
        self.client_thread.start()
        self.addCleanup(self.client_thread.stop)
        self.client = await self.call(triton.InferenceServerClient, f"127.0.0.1:{self.http_port}")
        self.addCleanup(lambda: self.call(self.client.close))

    async def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await deferToThreadPool(reactor, self.client_thread, function, *args, **kwargs)

    def tiny_input(self, x: np.ndarray, binary: bool) -> triton.InferInput:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        return tensor

    async def test_health_and_metadata(self) -> None:
        assert await self.call(self.client.is_server_live)
        assert await self.call(self.client.is_server_ready)
        assert await self.call(self.client.is_model_ready, "tiny")
        assert await self.call(self.client.is_model_ready, "tiny", "1")
        assert not await self.call(self.client.is_model_ready, "nope")
        server = await self.call(self.client.get_server_metadata)
        assert server["name"] == "twinfer" and "binary_tensor_data" in server["extensions"]
        metadata = await self.call(self.client.get_model_metadata, "squeezenet")
        assert metadata["inputs"] == [
            {"name": "data_0", "datatype": "FP32", "shape": [1, 3, 224, 224]}
        ]
        assert [o["datatype"] for o in metadata["outputs"]] == ["FP32"]

    async def test_json_tensors(self) -> None:
        x = np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32)
        outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in ("y", "label")]
        result = await self.call(
            self.client.infer,
            "tiny",
            [self.tiny_input(x, False)],
            outputs=outputs,
            request_id="json-1",
        )
        expected = tiny_reference(x)
        np.testing.assert_allclose(result.as_numpy("y"), expected["y"], rtol=1e-5)
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
        assert result.get_response()["id"] == "json-1"
        assert result.get_output("y")["data"]  # really sent as JSON

    async def test_binary_tensors_all_outputs(self) -> None:
        x = np.random.default_rng(3).standard_normal((9, 4)).astype(np.float32)
        # No outputs listed: tritonclient asks binary_data_output for all of them.
        result = await self.call(self.client.infer, "tiny", [self.tiny_input(x, True)])
        expected = tiny_reference(x)
        np.testing.assert_allclose(result.as_numpy("y"), expected["y"], rtol=1e-5)
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
        assert result.get_output("y")["parameters"]["binary_data_size"] == 9 * 3 * 4

    async def test_one_output_binary_the_other_json(self) -> None:
        x = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)
        outputs = [
            triton.InferRequestedOutput("label", binary_data=True),
            triton.InferRequestedOutput("y", binary_data=False),
        ]
        result = await self.call(
            self.client.infer,
            "tiny",
            [self.tiny_input(x, True)],
            outputs=outputs,
            model_version="1",
        )
        expected = tiny_reference(x)
        np.testing.assert_allclose(result.as_numpy("y"), expected["y"], rtol=1e-5)
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])

    async def test_squeezenet_binary_and_json_match_openvino(self) -> None:
        x = np.random.default_rng(5).random((1, 3, 224, 224), dtype=np.float32)
        expected = squeezenet_reference(x)
        for binary in (True, False):  # JSON: 150k numbers, parsed off the reactor thread
            tensor = triton.InferInput("data_0", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            name = (await self.call(self.client.get_model_metadata, "squeezenet"))["outputs"][0]
            outputs = [triton.InferRequestedOutput(name["name"], binary_data=binary)]
            result = await self.call(self.client.infer, "squeezenet", [tensor], outputs=outputs)
            got = result.as_numpy(name["name"])
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
        assert len(x.tobytes()) > http.v2.THREAD_THRESHOLD

    async def test_large_json_is_parsed_and_serialised_off_the_reactor_thread(self) -> None:
        threads: dict[str, list[str]] = {"decode": [], "encode": []}
        decode, encode = kserve.decode_infer_request, kserve.encode_infer_response

        def recording(kind: str, function: Callable[..., T]) -> Callable[..., T]:
            def wrapper(*args: Any, **kwargs: Any) -> T:
                threads[kind].append(threading.current_thread().name)
                return function(*args, **kwargs)

            return wrapper

        # Observe (not replace) the codec calls, to see which thread runs them.
        self.patch(kserve, "decode_infer_request", recording("decode", decode))
        self.patch(kserve, "encode_infer_response", recording("encode", encode))
        small = np.ones((2, 4), np.float32)
        large = np.random.default_rng(6).standard_normal((20_000, 4)).astype(np.float32)
        for x in (small, large):
            outputs = [triton.InferRequestedOutput("y", binary_data=False)]
            result = await self.call(
                self.client.infer, "tiny", [self.tiny_input(x, False)], outputs=outputs
            )
            np.testing.assert_allclose(result.as_numpy("y"), tiny_reference(x)["y"], rtol=1e-5)
        reactor_thread = threading.current_thread().name
        assert threads["decode"][0] == reactor_thread  # small: inline, cheaper than a hop
        assert threads["encode"][0] == reactor_thread
        assert threads["decode"][1].startswith("PoolThread-twinfer-http-codec")
        assert threads["encode"][1].startswith("PoolThread-twinfer-http-codec")

    async def test_errors_reach_the_client_with_status_and_message(self) -> None:
        x = np.ones((1, 4), np.float32)
        cases: list[tuple[dict[str, Any], str, str]] = [
            (
                {"model_name": "nope", "inputs": [self.tiny_input(x, True)]},
                "404",
                "model 'nope' is not served here",
            ),
            (
                {"model_name": "tiny", "model_version": "3", "inputs": [self.tiny_input(x, False)]},
                "404",
                "has no version '3'",
            ),
            (
                {
                    "model_name": "tiny",
                    "inputs": [self.tiny_input(np.ones((1, 5), np.float32), True)],
                },
                "400",
                "takes shape [?,4], got [1,5]",
            ),
            (
                {
                    "model_name": "tiny",
                    "inputs": [self.tiny_input(x, False)],
                    "outputs": [triton.InferRequestedOutput("nope")],
                },
                "400",
                "has no output 'nope'",
            ),
        ]
        wrong = triton.InferInput("x", [1, 4], "FP64")
        wrong.set_data_from_numpy(np.ones((1, 4), np.float64), binary_data=True)
        cases.append(({"model_name": "tiny", "inputs": [wrong]}, "400", "takes f32, got f64"))
        for kwargs, status, needle in cases:
            with pytest.raises(InferenceServerException) as info:
                await self.call(self.client.infer, **kwargs)
            assert info.value.status() == status, info.value
            assert needle in info.value.message()

    async def test_an_oversized_request_is_refused_by_the_limit(self) -> None:
        x = np.zeros((300_000, 4), np.float32)  # 4.8 MB > http_max_body_size 4 MiB
        with pytest.raises(InferenceServerException) as info:
            await self.call(self.client.infer, "tiny", [self.tiny_input(x, True)])
        # The server answers 413 as soon as it sees Content-Length and hangs
        # up; depending on timing the client reads the 413 or sees the
        # connection reset while it is still sending.
        message = str(info.value)
        refused = info.value.status() == "413" and "larger than the limit" in message
        cut_off = any(word in message.lower() for word in ("reset", "broken pipe"))
        assert refused or cut_off, message


# -- Triton's extensions against a real ``twistd --allow-admin`` ------------------

ADMIN_CONFIG = with_server_table(
    TWISTD_TINY_CONFIG
    + """
[[models]]
name = "batched"
path = "builtin:tiny"
max_batch_size = 4
preferred_batch_sizes = [2]
""",
    http_max_body_size=65536,
)


@pytest.fixture(scope="module")
def admin_client(start_twistd: StartTwistd) -> Iterator[triton.InferenceServerClient]:
    """``tritonclient.http`` to a ``twistd`` started with ``--allow-admin``."""
    process = start_twistd(
        ADMIN_CONFIG, args=["--http-port=tcp:0:interface=127.0.0.1", "--allow-admin"]
    )
    client = triton.InferenceServerClient(f"127.0.0.1:{process.ports['http']}")
    yield client
    client.close()
    process.stop()


def infer_tiny(client: triton.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor])
    np.testing.assert_allclose(result.as_numpy("y"), tiny_reference(x)["y"], rtol=1e-5)
    return result.as_numpy("y")


def test_repository_index_unload_and_load(admin_client: triton.InferenceServerClient) -> None:
    client = admin_client
    ready = {"version": "1", "state": "READY", "reason": ""}
    assert client.get_model_repository_index() == [
        {"name": "batched", **ready},
        {"name": "tiny", **ready},
    ]
    x = np.ones((2, 4), np.float32)
    client.unload_model("batched")
    assert client.get_model_repository_index()[0] == {
        "name": "batched",
        "version": "1",
        "state": "UNAVAILABLE",
        "reason": "unloaded",
    }
    assert not client.is_model_ready("batched")
    with pytest.raises(InferenceServerException) as info:
        infer_tiny(client, "batched", x)
    assert info.value.status() == "404"
    infer_tiny(client, "tiny", x)  # the other model serves on

    client.load_model("batched")  # loaded as configured, by name
    assert client.is_model_ready("batched")
    infer_tiny(client, "batched", x)
    client.load_model("tiny")  # a served model: compiled again, swapped in
    infer_tiny(client, "tiny", x)
    with pytest.raises(InferenceServerException) as info:
        client.load_model("resnet50")
    assert info.value.status() == "404"
    assert "model 'resnet50' is not in the repository" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.unload_model("resnet50")
    assert info.value.status() == "404"


def test_statistics_count_inferences(admin_client: triton.InferenceServerClient) -> None:
    client = admin_client

    def stats() -> dict[str, Any]:
        [entry] = client.get_inference_statistics("tiny")["model_stats"]
        return entry  # type: ignore[no-any-return]

    before = stats()
    x = np.ones((3, 4), np.float32)
    for _ in range(3):
        infer_tiny(client, "tiny", x)
    with pytest.raises(InferenceServerException):
        infer_tiny(client, "tiny", np.ones((3, 5), np.float32))  # INVALID_SHAPE
    after = stats()
    assert after["name"] == "tiny" and after["version"] == "1"
    assert after["inference_count"] == before["inference_count"] + 3
    assert after["execution_count"] == before["execution_count"] + 3
    inference, earlier = after["inference_stats"], before["inference_stats"]
    for kind in ("success", "queue", "compute_infer"):
        assert inference[kind]["count"] == earlier[kind]["count"] + 3, kind
        assert inference[kind]["ns"] > earlier[kind]["ns"], kind
    assert inference["fail"]["count"] == earlier["fail"]["count"] + 1
    # Milliseconds since the epoch: the server's clock is this machine's.
    assert abs(after["last_inference"] / 1000 - time.time()) < 60
    assert count_of(after, 3) == count_of(before, 3) + 3  # 3 rows each, run alone
    every = client.get_inference_statistics()["model_stats"]
    assert [s["name"] for s in every] == ["batched", "tiny"]
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("nope")
    assert info.value.status() == "404" and "'nope'" in info.value.message()


def count_of(stats: dict[str, Any], batch_size: int) -> int:
    """Executions of ``batch_size`` rows in a statistics entry."""
    for batch in stats["batch_stats"]:
        if batch["batch_size"] == batch_size:
            return int(batch["compute_infer"]["count"])
    return 0


def test_model_config_matches_metadata(admin_client: triton.InferenceServerClient) -> None:
    client = admin_client
    for name, max_batch_size in (("tiny", 0), ("batched", 4)):
        config = client.get_model_config(name)
        metadata = client.get_model_metadata(name)
        assert (config["name"], config["platform"]) == (name, "openvino")
        assert config["max_batch_size"] == max_batch_size
        skip = 1 if max_batch_size else 0  # Triton leaves out the batch dimension
        for tensors, described in (
            (config["input"], metadata["inputs"]),
            (config["output"], metadata["outputs"]),
        ):
            assert [(t["name"], t["data_type"], t["dims"]) for t in tensors] == [
                (m["name"], f"TYPE_{m['datatype']}", m["shape"][skip:]) for m in described
            ]
        assert config["instance_group"] == [
            {"name": f"{name}_cpu", "kind": "KIND_CPU", "count": 2, "gpus": []}
        ]
    assert client.get_model_config("batched")["dynamic_batching"] == {
        "preferred_batch_size": [2],
        "max_queue_delay_microseconds": 500,
    }
    assert "dynamic_batching" not in client.get_model_config("tiny")
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config("nope")
    assert info.value.status() == "404" and "'nope'" in info.value.message()
