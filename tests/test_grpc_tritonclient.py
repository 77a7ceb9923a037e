"""End to end over gRPC: a real ``twistd -n twinfer --grpc-port ...`` process,
driven by a real third-party client, ``tritonclient.grpc``, and checked
against the binary protocol's answers for the same inputs."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from certs import ClientFiles, make_client_files, make_tls_files
from twinfer.blocking import BlockingClient
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


def test_extensions_served_elsewhere_are_unimplemented(
    client: triton.InferenceServerClient,
) -> None:
    error = error_of(client.get_model_config, "tiny")
    assert error.status() == "StatusCode.UNIMPLEMENTED" and "ModelConfig" in error.message()


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
