"""Shared memory against a real ``twistd twinfer --allow-shm``: the blocking
client's ``shared_memory=True`` and Triton's own client
(``tritonclient.http`` with ``tritonclient.utils.shared_memory``)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.utils.shared_memory as triton_shm
from tritonclient.utils import InferenceServerException

from support import save_identity_model
from twinfer.blocking import BlockingClient
from twinfer.engines.builtin import tiny_reference
from twinfer.errors import ErrorCode
from twinfer.wire.decode import decode_message
from twinfer.wire.encode import encode_bytes
from twinfer.wire.frames import FrameDecoder
from twinfer.wire.messages import Error, Hello, InferReply, InferRequest, Ping, Pong, RegisterRegion
from twistd_process import TWISTD_TINY_CONFIG, ServerProcess, StartTwistd

HTTP = "--http-port=tcp:0:interface=127.0.0.1"


@pytest.fixture(scope="module")
def shm_server(
    start_twistd: StartTwistd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    model = save_identity_model(tmp_path_factory.mktemp("model") / "id.xml", np.float32, [2, 3])
    config = TWISTD_TINY_CONFIG + f'\n[[models]]\nname = "identity"\npath = "{model}"\n'
    server = start_twistd(config, args=["--allow-shm", HTTP])
    yield server
    server.stop()


def test_blocking_client_shared_memory_matches_the_socket(shm_server: ServerProcess) -> None:
    rng = np.random.default_rng(3)
    with BlockingClient.connect(shm_server.endpoint, timeout=30) as client:
        for _ in range(3):
            x = rng.random((4, 4), dtype=np.float32)
            direct = client.infer("tiny", {"x": x})
            shared = client.infer("tiny", {"x": x}, shared_memory=True)
            for name in direct:
                np.testing.assert_allclose(shared[name], direct[name], atol=1e-5)
            x = rng.random((2, 3), dtype=np.float32)
            np.testing.assert_array_equal(
                client.infer("identity", {"x": x}, shared_memory=True)["out"], x
            )
        pool = client._shm.pool
        assert pool is not None and pool.objects == 1 and client._shm.off is None
    assert client._shm.pool is None  # closed: its objects are unlinked


def test_blocking_client_without_allow_shm_uses_the_socket(
    twistd_server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    x = np.ones((1, 4), np.float32)
    with BlockingClient.connect(twistd_server.endpoint, timeout=30) as client:
        with caplog.at_level("INFO", logger="twinfer.blocking"):
            shared = client.infer("tiny", {"x": x}, shared_memory=True)
        np.testing.assert_allclose(shared["y"], tiny_reference(x)["y"], atol=1e-5)
        assert "--allow-shm" in caplog.text and "through the socket" in caplog.text


@pytest.fixture
def triton_client(shm_server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(f"127.0.0.1:{shm_server.ports['http']}")
    yield client
    client.unregister_system_shared_memory()
    client.close()


@pytest.fixture
def regions() -> Iterator[list[object]]:
    handles: list[object] = []
    yield handles
    for handle in handles:
        triton_shm.destroy_shared_memory_region(handle)


def test_tritonclient_registers_infers_in_shared_memory_and_unregisters(
    triton_client: triton.InferenceServerClient, regions: list[object]
) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    key_in, key_out = f"/tw-in-{uuid.uuid4().hex[:8]}", f"/tw-out-{uuid.uuid4().hex[:8]}"
    handle_in = triton_shm.create_shared_memory_region("input", key_in, 256)
    handle_out = triton_shm.create_shared_memory_region("output", key_out, 256)
    regions += [handle_in, handle_out]
    triton_shm.set_shared_memory_region(handle_in, [x])
    triton_client.register_system_shared_memory("input", key_in, 256)
    triton_client.register_system_shared_memory("output", key_out, 256)
    status = triton_client.get_system_shared_memory_status()
    assert sorted((r["name"], r["key"], r["byte_size"]) for r in status) == [
        ("input", key_in, 256),
        ("output", key_out, 256),
    ]
    tensor = triton.InferInput("x", [3, 4], "FP32")
    tensor.set_shared_memory("input", x.nbytes)
    wanted = triton.InferRequestedOutput("y", binary_data=True)
    wanted.set_shared_memory("output", 3 * 3 * 4, offset=64)
    label = triton.InferRequestedOutput("label", binary_data=True)
    result = triton_client.infer("tiny", [tensor], outputs=[wanted, label])
    expected = tiny_reference(x)
    y = triton_shm.get_contents_as_numpy(handle_out, np.float32, [3, 3], offset=64)
    np.testing.assert_allclose(y, expected["y"], atol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    [output] = [o for o in result.get_response()["outputs"] if o["name"] == "y"]
    assert output["shape"] == [3, 3] and output["parameters"]["shared_memory_region"] == "output"
    assert "data" not in output  # its bytes are in the region, not the response

    triton_client.unregister_system_shared_memory("input")
    [left] = triton_client.get_system_shared_memory_status()
    assert left["name"] == "output"
    triton_client.unregister_system_shared_memory()
    assert triton_client.get_system_shared_memory_status() == []


def test_tritonclient_bad_regions_get_precise_errors_and_the_server_keeps_serving(
    triton_client: triton.InferenceServerClient, regions: list[object]
) -> None:
    key = f"/tw-bad-{uuid.uuid4().hex[:8]}"
    regions.append(triton_shm.create_shared_memory_region("small", key, 64))
    triton_client.register_system_shared_memory("small", key, 64)

    def infer(region: str, byte_size: int, offset: int = 0) -> str:
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_shared_memory(region, byte_size, offset)
        with pytest.raises(InferenceServerException) as e:
            triton_client.infer("tiny", [tensor])
        return str(e.value)

    assert "no shared-memory region 'nope'" in infer("nope", 16)
    assert "offset 56 + byte_size 16 is beyond region 'small' of 64 bytes" in infer("small", 16, 56)
    with pytest.raises(InferenceServerException) as e:
        triton_client.register_system_shared_memory("evil", "/../etc/passwd", 16)
    assert "not the name of a POSIX shared-memory object" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        triton_client.register_system_shared_memory("past", key, 16, offset=60)
    assert "beyond the 64 bytes" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        triton_client.unregister_system_shared_memory("nope")
    assert "no shared-memory region 'nope'" in str(e.value)
    assert triton_client.is_server_live()
    x = np.ones((1, 4), np.float32)
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(x)
    result = triton_client.infer("tiny", [tensor])
    np.testing.assert_allclose(result.as_numpy("y"), tiny_reference(x)["y"], atol=1e-5)


def test_tritonclient_shared_memory_off_names_the_flag(
    start_twistd: StartTwistd, tmp_path: Path
) -> None:
    server = start_twistd(TWISTD_TINY_CONFIG, args=[HTTP])
    client = triton.InferenceServerClient(f"127.0.0.1:{server.ports['http']}")
    try:
        for call in (
            lambda: client.register_system_shared_memory("r", "/whatever", 16),
            client.get_system_shared_memory_status,
        ):
            with pytest.raises(InferenceServerException) as e:
                call()
            assert "start it with --allow-shm" in str(e.value)
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_shared_memory("r", 16)
        with pytest.raises(InferenceServerException) as e:
            client.infer("tiny", [tensor])
        assert "--allow-shm" in str(e.value)
        assert client.is_server_ready()
    finally:
        client.close()
        server.stop()


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "twinfer.bench", "--warmup", "0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("processes", [1, 2])
def test_bench_shared_memory(shm_server: ServerProcess, tmp_path: Path, processes: int) -> None:
    out = tmp_path / "result.json"
    done = run_bench(
        "--model", "identity", "--server", shm_server.endpoint, "--requests", "30",
        "--concurrency", "1,3", "--processes", str(processes), "--shared-memory",
        "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    points = json.loads(out.read_text())["points"]
    assert [(p["count"], p["error_count"]) for p in points] == [(30, 0), (30, 0)]


def test_bench_shared_memory_needs_allow_shm(twistd_server: ServerProcess) -> None:
    done = run_bench(
        "--model", "tiny", "--server", twistd_server.endpoint, "--requests", "5", "--shared-memory"
    )
    assert done.returncode == 2 and "--allow-shm" in done.stderr, done.stderr


def test_a_version_1_client_keeps_working_and_is_refused_v2_messages(
    shm_server: ServerProcess,
) -> None:
    x = np.ones((1, 4), np.float32)
    requests = [
        (0, Hello(1, 1, 0, "v1-client")),
        (1, RegisterRegion("in", "/whatever", 0, 64)),
        (2, Ping()),
        (3, InferRequest("tiny", {"x": x})),
    ]
    with socket.create_connection((shm_server.host, shm_server.port), timeout=30) as sock:
        sock.sendall(b"".join(encode_bytes(rid, message) for rid, message in requests))
        decoder, replies = FrameDecoder(), []
        while len(replies) < 4:
            data = sock.recv(65536)
            assert data, "the server closed the connection"
            replies += [(f.request_id, decode_message(f)) for f in decoder.feed(data)]
    (_, hello), (_, refused), (_, pong), (_, reply) = replies
    assert isinstance(hello, Hello) and (hello.min_version, hello.max_version) == (1, 1)
    assert isinstance(refused, Error) and refused.code == ErrorCode.UNSUPPORTED_MESSAGE
    assert "needs protocol version 2; this connection negotiated version 1" in refused.message
    assert isinstance(pong, Pong) and isinstance(reply, InferReply)
    np.testing.assert_allclose(reply.outputs["y"], tiny_reference(x)["y"], atol=1e-5)
