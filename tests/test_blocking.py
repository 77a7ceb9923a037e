"""The blocking client against a real ``twistd -n twinfer`` process (see conftest.py)."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from certs import TLSFiles, make_tls_files
from twinfer.blocking import (
    BlockingClient,
    ConnectFailed,
    ConnectionLost,
    ReplyTimeout,
    parse_endpoint,
)
from twinfer.engines.builtin import tiny_reference
from twinfer.errors import ErrorCode, LocalProtocolError, TwinferError
from twinfer.wire.decode import decode_message
from twinfer.wire.encode import encode_bytes
from twinfer.wire.frames import FrameDecoder
from twinfer.wire.messages import DType, Error, Hello, ListModels
from twistd_process import TWISTD_TINY_CONFIG, ServerProcess, StartTwistd


@pytest.fixture
def client(twistd_server: ServerProcess) -> Iterator[BlockingClient]:
    with BlockingClient.connect(twistd_server.endpoint, timeout=30) as c:
        yield c


def test_handshake_and_ping(client: BlockingClient) -> None:
    assert client.server is not None
    assert client.server.max_version == 2  # shared memory
    assert client.server.agent.startswith("twinfer/")
    assert 0 < client.ping() < 5


def test_models_and_metadata(client: BlockingClient) -> None:
    [info] = client.models()
    assert (info.name, info.devices, info.ready) == ("tiny", ("cpu",), True)
    meta = client.metadata("tiny")
    assert [(s.name, s.dtype, s.shape) for s in meta.inputs] == [("x", DType.F32, (-1, 4))]
    assert [(s.name, s.dtype, s.shape) for s in meta.outputs] == [
        ("y", DType.F32, (-1, 3)),
        ("label", DType.I64, (-1,)),
    ]
    assert meta.devices == ("cpu",)


def test_infer_matches_reference(client: BlockingClient) -> None:
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    outputs = client.infer("tiny", {"x": x})
    expected = tiny_reference(x)
    assert set(outputs) == {"y", "label"}
    np.testing.assert_allclose(outputs["y"], expected["y"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(outputs["label"], expected["label"])
    assert outputs["label"].dtype == np.int64


def test_infer_reply_selected_output(client: BlockingClient) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    reply = client.infer_reply("tiny", {"x": x}, ["label"])
    assert list(reply.outputs) == ["label"]
    np.testing.assert_array_equal(reply.outputs["label"], tiny_reference(x)["label"])
    assert reply.compute_us >= 0 and reply.queue_us >= 0


def test_infer_many_pipelined(client: BlockingClient) -> None:
    rng = np.random.default_rng(2)
    # Different batch sizes so that a reply matched to the wrong request shows.
    batches = [rng.standard_normal((1 + i % 7, 4)).astype(np.float32) for i in range(64)]
    results = client.infer_many("tiny", [{"x": x} for x in batches])
    assert len(results) == 64
    for x, outputs in zip(batches, results, strict=True):
        np.testing.assert_allclose(outputs["y"], tiny_reference(x)["y"], rtol=0, atol=1e-5)


def test_infer_many_small_window_refills(client: BlockingClient) -> None:
    batches = [np.full((2, 4), i, dtype=np.float32) for i in range(20)]
    results = client.infer_many("tiny", ({"x": x} for x in batches), ["y"], window=3)
    assert [list(r) for r in results] == [["y"]] * 20
    for x, outputs in zip(batches, results, strict=True):
        np.testing.assert_allclose(outputs["y"], tiny_reference(x)["y"], rtol=0, atol=1e-5)


def test_infer_many_big_pipeline_reads_while_writing(client: BlockingClient) -> None:
    # 64 requests of 1 MiB whose replies (1.25 MiB each) far exceed the socket
    # buffers: a client that wrote everything before reading would stall once
    # the server stops reading a connection whose replies pile up.
    rng = np.random.default_rng(6)
    batches = [rng.standard_normal((65536, 4)).astype(np.float32) for _ in range(8)]
    results = client.infer_many("tiny", [{"x": batches[i % 8]} for i in range(64)])
    for i, outputs in enumerate(results):
        expected = tiny_reference(batches[i % 8])
        np.testing.assert_allclose(outputs["y"], expected["y"], rtol=0, atol=1e-4)


def test_unknown_model(client: BlockingClient) -> None:
    with pytest.raises(TwinferError) as info:
        client.infer("nope", {"x": np.zeros((1, 4), np.float32)})
    assert info.value.code is ErrorCode.UNKNOWN_MODEL
    assert "nope" in info.value.message
    with pytest.raises(TwinferError) as info:
        client.metadata("nope")
    assert info.value.code is ErrorCode.UNKNOWN_MODEL
    assert client.ping() > 0  # the connection is still usable


def test_wrong_dtype(client: BlockingClient) -> None:
    with pytest.raises(TwinferError) as info:
        client.infer("tiny", {"x": np.zeros((1, 4), np.float64)})
    assert info.value.code is ErrorCode.INVALID_DTYPE
    assert "'x'" in info.value.message


def test_infer_many_error_cancels_the_rest(client: BlockingClient) -> None:
    good = {"x": np.ones((1, 4), np.float32)}
    bad = {"x": np.ones((1, 5), np.float32)}
    with pytest.raises(TwinferError) as info:
        client.infer_many("tiny", [good] * 10 + [bad] + [good] * 10, window=32)
    assert info.value.code is ErrorCode.INVALID_SHAPE
    # Late replies of the abandoned requests are dropped, not mistaken for new ones.
    x = np.full((3, 4), 2.0, np.float32)
    for _ in range(3):
        np.testing.assert_allclose(client.infer("tiny", {"x": x})["y"], tiny_reference(x)["y"])


def test_reply_timeout_leaves_client_usable(client: BlockingClient) -> None:
    big = np.zeros((1_000_000, 4), np.float32)  # 16 MB: cannot be answered in 1 µs
    client.timeout = 1e-6
    with pytest.raises(ReplyTimeout) as info:
        client.infer("tiny", {"x": big})
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert isinstance(info.value, TimeoutError)
    assert "no reply from tcp:127.0.0.1:" in str(info.value)
    client.timeout = 30
    x = np.eye(4, dtype=np.float32)
    np.testing.assert_allclose(client.infer("tiny", {"x": x})["y"], tiny_reference(x)["y"])


def test_oversize_request_refused_before_sending(client: BlockingClient) -> None:
    assert client.server is not None
    rows = client.server.max_frame_size // 16 + 1
    # np.zeros maps untouched pages: nothing is written or sent.
    with pytest.raises(TwinferError) as info:
        client.infer("tiny", {"x": np.zeros((rows, 4), np.float32)})
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert client.ping() > 0


def test_unsupported_dtype_refused_locally(client: BlockingClient) -> None:
    with pytest.raises(TwinferError) as info:
        client.infer("tiny", {"x": np.zeros((1, 4), np.complex64)})
    assert info.value.code is ErrorCode.INVALID_DTYPE


def test_closed_client_raises_unavailable(twistd_server: ServerProcess) -> None:
    client = BlockingClient.connect(twistd_server.endpoint)
    client.close()
    client.close()
    assert client.closed
    with pytest.raises(ConnectionLost) as info:
        client.ping()
    assert info.value.code is ErrorCode.UNAVAILABLE


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused() -> None:
    port = _closed_port()
    with pytest.raises(ConnectFailed) as info:
        BlockingClient.connect(f"tcp:127.0.0.1:{port}", timeout=5)
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert f"tcp:127.0.0.1:{port}" in str(info.value)


@pytest.mark.parametrize(
    ("endpoint", "parsed"),
    [
        ("tcp:127.0.0.1:9000", ("tcp", "127.0.0.1", 9000)),
        ("tls:example.com:443", ("tls", "example.com", 443)),
        ("tcp:[::1]:9000", ("tcp", "::1", 9000)),
    ],
)
def test_parse_endpoint(endpoint: str, parsed: tuple[str, str, int]) -> None:
    assert parse_endpoint(endpoint) == parsed


@pytest.mark.parametrize("endpoint", ["9000", "tcp:9000", "udp:h:1", "tcp:h:x", "tcp:h:70000"])
def test_parse_endpoint_rejects(endpoint: str) -> None:
    with pytest.raises(ValueError, match="tcp:HOST:PORT"):
        parse_endpoint(endpoint)


def test_server_going_away_raises_connection_lost(start_twistd: StartTwistd) -> None:
    server = start_twistd(TWISTD_TINY_CONFIG)
    client = BlockingClient.connect(server.endpoint, timeout=30)
    assert client.ping() > 0
    server.process.kill()
    server.process.wait()
    with pytest.raises(ConnectionLost) as info:
        client.infer("tiny", {"x": np.ones((1, 4), np.float32)})
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert "lost" in info.value.message
    assert client.closed
    with pytest.raises(ConnectionLost, match="is closed"):
        client.ping()


# -- TLS -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(
    start_twistd: StartTwistd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, TLSFiles]]:
    files = make_tls_files(tmp_path_factory.mktemp("tls"), "localhost")
    server = start_twistd(
        TWISTD_TINY_CONFIG,
        port=f"ssl:0:interface=127.0.0.1:privateKey={files.key}:certKey={files.cert}",
    )
    assert server.kind == "ssl"
    yield server, files
    server.stop()


def test_tls_infer(tls_server: tuple[ServerProcess, TLSFiles]) -> None:
    server, files = tls_server
    with BlockingClient.connect(f"tls:localhost:{server.port}", ca_file=str(files.ca)) as client:
        assert client.models()[0].name == "tiny"
        x = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
        np.testing.assert_allclose(
            client.infer("tiny", {"x": x})["y"], tiny_reference(x)["y"], rtol=0, atol=1e-5
        )
        # Big enough to take many TLS records and partial non-blocking writes.
        big = np.random.default_rng(4).standard_normal((200_000, 4)).astype(np.float32)
        results = client.infer_many("tiny", [{"x": big}] * 4 + [{"x": x}] * 16)
        for outputs in results[:4]:
            np.testing.assert_allclose(outputs["y"], tiny_reference(big)["y"], atol=1e-4)
        for outputs in results[4:]:
            np.testing.assert_allclose(outputs["y"], tiny_reference(x)["y"], atol=1e-5)


def test_tls_rejects_certificate_for_another_host(
    tls_server: tuple[ServerProcess, TLSFiles],
) -> None:
    server, files = tls_server
    # The certificate names "localhost" only; reaching the same server as
    # 127.0.0.1 must fail hostname verification.
    with pytest.raises(ConnectFailed) as info:
        BlockingClient.connect(f"tls:127.0.0.1:{server.port}", ca_file=str(files.ca), timeout=10)
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert "127.0.0.1" in str(info.value)


def test_tls_rejects_untrusted_ca(
    tls_server: tuple[ServerProcess, TLSFiles], tmp_path: Path
) -> None:
    server, _ = tls_server
    other = make_tls_files(tmp_path, "localhost")
    with pytest.raises(ConnectFailed) as info:
        BlockingClient.connect(f"tls:localhost:{server.port}", ca_file=str(other.ca), timeout=10)
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


def test_a_request_before_hello_is_refused_locally(twistd_server: ServerProcess) -> None:
    sock = socket.create_connection((twistd_server.host, twistd_server.port), timeout=10)
    with BlockingClient(sock, endpoint=twistd_server.endpoint, timeout=10) as client:
        with pytest.raises(LocalProtocolError) as info:
            client.models()
        assert info.value.code is ErrorCode.HANDSHAKE_FAILED
        # Nothing was sent, so the connection is still good for a handshake.
        assert client.handshake().max_version == 2
        assert client.ping() > 0


@contextlib.contextmanager
def fake_server() -> Iterator[tuple[socket.socket, BlockingClient]]:
    """A blocking client connected over loopback TCP to a socket the test speaks for."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        host, port = listener.getsockname()[:2]
        sock = socket.create_connection((host, port), timeout=10)
        server_side, _ = listener.accept()
        endpoint = f"tcp:{host}:{port}"
        with server_side, BlockingClient(sock, endpoint=endpoint, timeout=10) as client:
            yield server_side, client


def received_messages(server_side: socket.socket) -> list[tuple[int, object]]:
    """Everything the client sent until it closed the connection, decoded."""
    data = b""
    while chunk := server_side.recv(65536):
        data += chunk
    return [(f.request_id, decode_message(f)) for f in FrameDecoder().feed(data)]


def test_connection_level_error_closes_the_client() -> None:
    # The server refuses the handshake, as a twinfer server answers a client
    # whose first frame is not HELLO, and closes the connection.
    with fake_server() as (server_side, client):
        refusal = Error(ErrorCode.HANDSHAKE_FAILED, "the first frame must be HELLO, got Ping")
        server_side.sendall(encode_bytes(0, refusal))
        with pytest.raises(TwinferError) as info:
            client.handshake()
        assert info.value.code is ErrorCode.HANDSHAKE_FAILED
        assert "first frame must be HELLO" in info.value.message
        assert client.closed
        with pytest.raises(ConnectionLost, match="HANDSHAKE_FAILED"):
            client.ping()
        [(rid, hello)] = received_messages(server_side)
        assert rid == 0 and isinstance(hello, Hello)


def test_a_connection_level_error_answering_a_request_goes_to_its_caller() -> None:
    with fake_server() as (server_side, client):
        server_side.sendall(encode_bytes(0, Hello(1, 1, 4096, "fake")))
        assert client.handshake().agent == "fake"
        # The answer to request 1, the first after the HELLO.
        server_side.sendall(encode_bytes(1, Error(ErrorCode.MALFORMED_FRAME, "bad bytes")))
        with pytest.raises(TwinferError) as info:
            client.models()
        assert info.value.code is ErrorCode.MALFORMED_FRAME
        assert not isinstance(info.value, ConnectionLost)
        assert client.closed
        with pytest.raises(ConnectionLost, match="MALFORMED_FRAME: bad bytes"):
            client.ping()
        sent = received_messages(server_side)
        assert [(rid, type(m)) for rid, m in sent] == [(0, Hello), (1, ListModels)]
