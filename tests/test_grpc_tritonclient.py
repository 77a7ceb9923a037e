"""End to end over gRPC: a real ``twistd -n twinfer --grpc-port ...`` process,
driven by a real third-party client, ``tritonclient.grpc``, and checked
against the binary protocol's answers for the same inputs.

Triton's extensions (configuration, statistics, repository, load/unload,
system shared memory) are at the end, against a server without
``--allow-admin``/``--allow-shm`` and one with both."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as triton_shm
from tritonclient.utils import InferenceServerException

from certs import ClientFiles, make_client_files, make_tls_files
from support import save_identity_model
from twinfer.blocking import BlockingClient
from twinfer.engines.builtin import tiny_reference
from twinfer.frontends.grpc import grpc_service_pb2 as pb
from twinfer.frontends.grpc import grpc_service_pb2_grpc as pb_grpc
from twistd_process import (
    SQUEEZENET_MODEL,
    TWISTD_TINY_CONFIG,
    ServerProcess,
    StartTwistd,
    with_server_table,
)

CONFIG = with_server_table(TWISTD_TINY_CONFIG + SQUEEZENET_MODEL, max_inflight_per_connection=64)
GRPC_PORT = "--grpc-port=tcp:0:interface=127.0.0.1"


@pytest.fixture(scope="module")
def server(start_twistd: StartTwistd) -> Iterator[ServerProcess]:
    process = start_twistd(CONFIG, args=[GRPC_PORT])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    # The port file names the gRPC port once it listens.
    with triton.InferenceServerClient(f"127.0.0.1:{server.ports['grpc']}") as client:
        yield client


@pytest.fixture(scope="module")
def binary(server: ServerProcess) -> Iterator[BlockingClient]:
    with BlockingClient.connect(f"tcp:127.0.0.1:{server.port}") as client:
        yield client


def tiny_input(x: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput("x", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def error_of(call: Any, *args: Any, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert error_of(client.is_model_ready, "nope").status() == "StatusCode.NOT_FOUND"
    server = client.get_server_metadata()
    assert server.name == "twinfer" and server.version
    metadata = client.get_model_metadata("squeezenet")
    assert metadata.versions == ["1"] and metadata.platform == "openvino"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("data_0", "FP32", [1, 3, 224, 224])
    ]
    tiny = client.get_model_metadata("tiny", as_json=True)
    assert tiny["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]


def test_raw_contents_match_the_binary_protocol(
    client: triton.InferenceServerClient, binary: BlockingClient
) -> None:
    x = np.random.default_rng(1).standard_normal((7, 4)).astype(np.float32)
    result = client.infer("tiny", [tiny_input(x)], request_id="raw-1")
    expected = binary.infer("tiny", {"x": x})
    np.testing.assert_allclose(result.as_numpy("y"), expected["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    response = result.get_response()
    assert response.id == "raw-1" and response.model_version == "1"
    assert len(response.raw_output_contents) == 2  # answered raw, as Triton does


def test_typed_contents_and_requested_outputs(
    server: ServerProcess, binary: BlockingClient
) -> None:
    # tritonclient sends raw_input_contents only: typed contents over a plain stub.
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="tiny", id="typed")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[3, 4])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="label")
    with grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc']}") as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert [o.name for o in response.outputs] == ["label"]
    label = np.frombuffer(response.raw_output_contents[0], np.int64)
    np.testing.assert_array_equal(label, binary.infer("tiny", {"x": x})["label"])


def test_squeezenet_raw_input_matches_the_binary_protocol(
    client: triton.InferenceServerClient, binary: BlockingClient
) -> None:
    x = np.random.default_rng(3).random((1, 3, 224, 224), dtype=np.float32)
    tensor = triton.InferInput("data_0", [1, 3, 224, 224], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("squeezenet", [tensor])
    (name,) = [o.name for o in client.get_model_metadata("squeezenet").outputs]
    expected = binary.infer("squeezenet", {"data_0": x})[name]
    np.testing.assert_allclose(result.as_numpy(name), expected, rtol=1e-5, atol=1e-5)


def test_stream_with_several_requests_in_flight(
    client: triton.InferenceServerClient, binary: BlockingClient
) -> None:
    replies: queue.Queue[tuple[Any, Any]] = queue.Queue()
    inputs = {
        f"r{i}": np.random.default_rng(10 + i).standard_normal((i + 1, 4)).astype(np.float32)
        for i in range(6)
    }
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        for request_id, x in inputs.items():  # sent back to back: all in flight at once
            client.async_stream_infer("tiny", [tiny_input(x)], request_id=request_id)
        # A bad request in the middle fails alone; the stream stays open.
        client.async_stream_infer("tiny", [tiny_input(np.ones((1, 5), np.float32))])
        client.async_stream_infer("nope", [tiny_input(inputs["r0"])], request_id="lost")
        client.async_stream_infer("tiny", [tiny_input(inputs["r5"])], request_id="after")
        answers = [replies.get(timeout=30) for _ in range(len(inputs) + 3)]
    finally:
        client.stop_stream()
    errors = [str(error) for result, error in answers if error is not None]
    assert len(errors) == 2
    assert any("shape" in e for e in errors)
    assert any("'nope'" in e for e in errors)
    results = {r.get_response().id: r for r, error in answers if error is None}
    assert set(results) == {*inputs, "after"}
    for request_id, x in [*inputs.items(), ("after", inputs["r5"])]:
        expected = binary.infer("tiny", {"x": x})
        np.testing.assert_allclose(
            results[request_id].as_numpy("y"), expected["y"], rtol=1e-5, atol=1e-5
        )


def test_errors_have_status_codes_and_the_server_keeps_serving(
    client: triton.InferenceServerClient,
) -> None:
    x = np.ones((2, 4), np.float32)
    cases = [
        (("nope", [tiny_input(x)]), {}, "StatusCode.NOT_FOUND", "'nope'"),
        (("tiny", [tiny_input(x)]), {"model_version": "7"}, "StatusCode.NOT_FOUND", "version"),
        (
            ("tiny", [tiny_input(x.astype(np.float64), "FP64")]),
            {},
            "StatusCode.INVALID_ARGUMENT",
            "f64",
        ),
        (
            ("tiny", [tiny_input(np.ones((2, 5), np.float32))]),
            {},
            "StatusCode.INVALID_ARGUMENT",
            "shape",
        ),
        (
            ("tiny", [tiny_input(x)]),
            {"outputs": [triton.InferRequestedOutput("z")]},
            "StatusCode.INVALID_ARGUMENT",
            "'z'",
        ),
    ]
    for args, kwargs, status, words in cases:
        error = error_of(client.infer, *args, **kwargs)
        assert (error.status(), words in error.message()) == (status, True), error
    result = client.infer("tiny", [tiny_input(x)])
    assert result.as_numpy("y").shape == (2, 3)


def test_client_deadline_is_deadline_exceeded(
    client: triton.InferenceServerClient, server: ServerProcess
) -> None:
    big = np.zeros((1_000_000, 4), np.float32)  # 16 MB: not answered within 1 ms
    error = error_of(client.infer, "tiny", [tiny_input(big)], client_timeout=0.001)
    assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
    x = np.eye(4, dtype=np.float32)
    assert client.infer("tiny", [tiny_input(x)]).as_numpy("y").shape == (4, 3)


def test_cuda_shared_memory_is_unimplemented(client: triton.InferenceServerClient) -> None:
    error = error_of(client.get_cuda_shared_memory_status)
    assert error.status() == "StatusCode.UNIMPLEMENTED"


def test_mutual_tls(start_twistd: StartTwistd, tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("grpc-tls")
    tls = make_tls_files(directory, "localhost")
    member = make_client_files(directory, tls, "client")
    elsewhere = tmp_path_factory.mktemp("grpc-other-ca")
    stranger = make_client_files(elsewhere, make_tls_files(elsewhere, "localhost"), "stranger")
    port = f"ssl:0:interface=127.0.0.1:privateKey={tls.key}:certKey={tls.cert}"
    server = start_twistd(
        TWISTD_TINY_CONFIG, args=[f"--tls-client-ca={tls.ca}", f"--grpc-port={port}"]
    )
    try:

        def connect(client: ClientFiles) -> triton.InferenceServerClient:
            return triton.InferenceServerClient(
                f"localhost:{server.ports['grpc']}",
                ssl=True,
                root_certificates=str(tls.ca),
                private_key=str(client.key),
                certificate_chain=str(client.cert),
            )

        with connect(member) as client:
            x = np.eye(4, dtype=np.float32)
            assert client.infer("tiny", [tiny_input(x)]).as_numpy("y").shape == (4, 3)
        with connect(stranger) as client:
            assert error_of(client.is_server_live).status() == "StatusCode.UNAVAILABLE"
    finally:
        server.stop()


# -- Triton's extensions ---------------------------------------------------------------


def test_model_config(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("squeezenet").config
    assert (config.name, config.platform, config.backend) == ("squeezenet", "openvino", "openvino")
    assert config.max_batch_size == 0  # no dynamic batching: dims are the whole shape
    assert [(t.name, list(t.dims)) for t in config.input] == [("data_0", [1, 3, 224, 224])]
    [group] = config.instance_group
    assert (group.name, group.count) == ("squeezenet_cpu", 2)
    as_json = client.get_model_config("tiny", "1", as_json=True)["config"]
    assert as_json["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["-1", "4"]}]
    for args, status in [(("nope",), "NOT_FOUND"), (("tiny", "2"), "NOT_FOUND")]:
        assert error_of(client.get_model_config, *args).status() == f"StatusCode.{status}"


def test_statistics_count_the_inferences_just_made(client: triton.InferenceServerClient) -> None:
    def tiny_stats() -> Any:
        [stats] = client.get_inference_statistics("tiny").model_stats
        return stats

    before = tiny_stats()
    x = np.ones((2, 4), np.float32)
    for _ in range(5):
        client.infer("tiny", [tiny_input(x)])
    error_of(client.infer, "tiny", [tiny_input(np.ones((2, 5), np.float32))])  # refused
    after = tiny_stats()
    assert after.inference_count - before.inference_count == 5
    assert after.execution_count - before.execution_count == 5  # one at a time: no batches
    success, fail = after.inference_stats.success, after.inference_stats.fail
    assert success.count - before.inference_stats.success.count == 5
    assert fail.count - before.inference_stats.fail.count == 1
    assert success.ns > before.inference_stats.success.ns
    assert after.last_inference >= before.last_inference and after.last_inference > 0
    every = client.get_inference_statistics().model_stats
    assert sorted(s.name for s in every) == ["squeezenet", "tiny"]
    assert error_of(client.get_inference_statistics, "nope").status() == "StatusCode.NOT_FOUND"


def test_repository_index(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index().models
    assert [(m.name, m.version, m.state) for m in index] == [
        ("squeezenet", "1", "READY"),
        ("tiny", "1", "READY"),
    ]


def test_load_and_unload_need_allow_admin(client: triton.InferenceServerClient) -> None:
    for call in (client.unload_model, client.load_model):
        error = error_of(call, "tiny")
        assert error.status() == "StatusCode.PERMISSION_DENIED"
        assert "start it with --allow-admin" in error.message()
    assert client.is_model_ready("tiny")


def test_shared_memory_needs_allow_shm(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_shared_memory("r", 16)
    for call, args in [
        (client.register_system_shared_memory, ("r", "/whatever", 16)),
        (client.get_system_shared_memory_status, ()),
        (client.unregister_system_shared_memory, ()),
        (client.infer, ("tiny", [tensor])),
    ]:
        error = error_of(call, *args)
        assert error.status() == "StatusCode.UNIMPLEMENTED", error
        assert "start it with --allow-shm" in error.message()
    x = np.ones((1, 4), np.float32)
    assert client.infer("tiny", [tiny_input(x)]).as_numpy("y").shape == (1, 3)


@pytest.fixture(scope="module")
def admin_server(
    start_twistd: StartTwistd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    model = save_identity_model(tmp_path_factory.mktemp("model") / "id.xml", np.float32, [2, 3])
    config = TWISTD_TINY_CONFIG + f'\n[[models]]\nname = "identity"\npath = "{model}"\n'
    http = "--http-port=tcp:0:interface=127.0.0.1"
    process = start_twistd(config, args=[GRPC_PORT, http, "--allow-admin", "--allow-shm"])
    yield process
    process.stop()


@pytest.fixture
def admin_client(admin_server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(f"127.0.0.1:{admin_server.ports['grpc']}") as client:
        yield client
        client.unregister_system_shared_memory()


@pytest.fixture
def regions() -> Iterator[list[object]]:
    handles: list[object] = []
    yield handles
    for handle in handles:
        triton_shm.destroy_shared_memory_region(handle)


def test_unload_and_load_with_allow_admin(admin_client: triton.InferenceServerClient) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = triton.InferInput("x", [2, 3], "FP32")
    tensor.set_data_from_numpy(x)
    admin_client.unload_model("identity")  # answered once it no longer serves
    assert error_of(admin_client.is_model_ready, "identity").status() == "StatusCode.NOT_FOUND"
    states = {m.name: (m.state, m.reason) for m in admin_client.get_model_repository_index().models}
    assert states == {"identity": ("UNAVAILABLE", "unloaded"), "tiny": ("READY", "")}
    assert error_of(admin_client.infer, "identity", [tensor]).status() == "StatusCode.NOT_FOUND"
    admin_client.load_model("identity")  # answered once it serves again
    assert admin_client.is_model_ready("identity")
    np.testing.assert_array_equal(admin_client.infer("identity", [tensor]).as_numpy("out"), x)
    error = error_of(admin_client.load_model, "nope")
    assert error.status() == "StatusCode.NOT_FOUND" and "'nope'" in error.message()
    error = error_of(admin_client.load_model, "tiny", config='{"max_batch_size": 8}')
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "own configuration" in str(error)


def test_shared_memory_regions_inputs_and_outputs(
    admin_client: triton.InferenceServerClient,
    admin_server: ServerProcess,
    regions: list[object],
) -> None:
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    key_in, key_out = f"/tw-gin-{uuid.uuid4().hex[:8]}", f"/tw-gout-{uuid.uuid4().hex[:8]}"
    handle_in = triton_shm.create_shared_memory_region("input", key_in, 256)
    handle_out = triton_shm.create_shared_memory_region("output", key_out, 256)
    regions += [handle_in, handle_out]
    triton_shm.set_shared_memory_region(handle_in, [x])
    admin_client.register_system_shared_memory("input", key_in, 256)
    admin_client.register_system_shared_memory("output", key_out, 128, offset=64)
    status = admin_client.get_system_shared_memory_status().regions
    assert {n: (r.key, r.offset, r.byte_size) for n, r in status.items()} == {
        "input": (key_in, 0, 256),
        "output": (key_out, 64, 128),
    }
    # Triton's semantics: the regions are server-wide, HTTP sees them too.
    http = triton_http.InferenceServerClient(f"127.0.0.1:{admin_server.ports['http']}")
    try:
        assert sorted(r["name"] for r in http.get_system_shared_memory_status()) == [
            "input",
            "output",
        ]
    finally:
        http.close()

    tensor = triton.InferInput("x", [3, 4], "FP32")
    tensor.set_shared_memory("input", x.nbytes)
    y = triton.InferRequestedOutput("y")
    y.set_shared_memory("output", 3 * 3 * 4, offset=16)
    result = admin_client.infer("tiny", [tensor], outputs=[y, triton.InferRequestedOutput("label")])
    with BlockingClient.connect(f"tcp:127.0.0.1:{admin_server.port}") as binary:
        expected = binary.infer("tiny", {"x": x})
    # The region "output" starts at byte 64 of its shm object; y at 16 in it.
    written = triton_shm.get_contents_as_numpy(handle_out, np.float32, [3, 3], offset=64 + 16)
    np.testing.assert_allclose(written, expected["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    [described] = [o for o in result.get_response().outputs if o.name == "y"]
    assert list(described.shape) == [3, 3]
    assert described.parameters["shared_memory_region"].string_param == "output"

    # The same over a stream: an input in a region, the output in the reply.
    replies: queue.Queue[tuple[Any, Any]] = queue.Queue()
    admin_client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        admin_client.async_stream_infer("tiny", [tensor], request_id="shm")
        streamed, error = replies.get(timeout=30)
    finally:
        admin_client.stop_stream()
    assert error is None and streamed.get_response().id == "shm"
    np.testing.assert_allclose(streamed.as_numpy("y"), expected["y"], rtol=1e-5, atol=1e-5)

    admin_client.unregister_system_shared_memory("input")
    assert list(admin_client.get_system_shared_memory_status().regions) == ["output"]
    admin_client.unregister_system_shared_memory()
    assert not admin_client.get_system_shared_memory_status().regions


def test_bad_regions_get_precise_errors_and_the_server_keeps_serving(
    admin_client: triton.InferenceServerClient, regions: list[object]
) -> None:
    key = f"/tw-gbad-{uuid.uuid4().hex[:8]}"
    regions.append(triton_shm.create_shared_memory_region("small", key, 64))
    admin_client.register_system_shared_memory("small", key, 64)

    def infer_error(region: str, byte_size: int, offset: int = 0) -> InferenceServerException:
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_shared_memory(region, byte_size, offset)
        return error_of(admin_client.infer, "tiny", [tensor])

    cases = [
        (infer_error("nope", 16), "NOT_FOUND", "no shared-memory region 'nope' is registered"),
        (
            infer_error("small", 16, 56),
            "INVALID_ARGUMENT",
            "offset 56 + byte_size 16 is beyond region 'small' of 64 bytes",
        ),
        (
            error_of(admin_client.register_system_shared_memory, "evil", "/../etc/passwd", 16),
            "INVALID_ARGUMENT",
            "not the name of a POSIX shared-memory object",
        ),
        (
            error_of(admin_client.register_system_shared_memory, "past", key, 16, 60),
            "INVALID_ARGUMENT",
            "beyond the 64 bytes",
        ),
        (
            error_of(admin_client.unregister_system_shared_memory, "nope"),
            "NOT_FOUND",
            "no shared-memory region 'nope'",
        ),
        (
            error_of(admin_client.get_system_shared_memory_status, "nope"),
            "NOT_FOUND",
            "no shared-memory region 'nope'",
        ),
    ]
    for error, status, words in cases:
        assert (error.status(), words in error.message()) == (f"StatusCode.{status}", True), error
    x = np.ones((1, 4), np.float32)
    result = admin_client.infer("tiny", [tiny_input(x)])
    np.testing.assert_allclose(result.as_numpy("y"), tiny_reference(x)["y"], atol=1e-5)
    assert list(admin_client.get_system_shared_memory_status().regions) == ["small"]
