"""The blocking client over several endpoints: it moves when a connection is
lost or its server sends GOAWAY, and re-sends inference (only) once.

The servers are real ``twistd twinfer`` processes, or a socket the test
speaks for when the test needs the server to say something exact (GOAWAY).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twinfer.blocking import BlockingClient, ConnectFailed, ConnectionLost
from twinfer.errors import ErrorCode
from twinfer.wire.encode import encode_bytes
from twinfer.wire.messages import Error, GoAway, Hello, Pong
from twistd_process import TWISTD_TINY_CONFIG, ServerProcess, StartTwistd

X = np.ones((1, 4), np.float32)


def closed_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp:127.0.0.1:{s.getsockname()[1]}"


def test_the_first_endpoint_that_answers_is_used(twistd_server: ServerProcess) -> None:
    dead = closed_endpoint()
    with BlockingClient.connect(f"{dead},{twistd_server.endpoint}", timeout=30) as client:
        assert client.endpoint == twistd_server.endpoint
        assert client.endpoints == [dead, twistd_server.endpoint]
        assert client.infer("tiny", {"x": X})["y"].shape == (1, 3)


def test_no_endpoint_answering_names_them_all() -> None:
    a, b = closed_endpoint(), closed_endpoint()
    with pytest.raises(ConnectFailed) as info:
        BlockingClient.connect([a, b], timeout=5)
    assert a in info.value.message and b in info.value.message
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_a_killed_server_costs_no_inference(
    start_twistd: StartTwistd, twistd_server: ServerProcess
) -> None:
    doomed = start_twistd(TWISTD_TINY_CONFIG)
    client = BlockingClient.connect([doomed.endpoint, twistd_server.endpoint], timeout=30)
    expected = client.infer("tiny", {"x": X})["y"]
    assert client.endpoint == doomed.endpoint
    doomed.process.kill()
    doomed.process.wait()
    np.testing.assert_array_equal(client.infer("tiny", {"x": X})["y"], expected)
    assert client.endpoint == twistd_server.endpoint and client.resent == 1
    client.close()


def test_a_pipeline_whose_connection_died_is_resent_on_the_next(
    start_twistd: StartTwistd, twistd_server: ServerProcess
) -> None:
    doomed = start_twistd(TWISTD_TINY_CONFIG)
    with BlockingClient.connect([doomed.endpoint, twistd_server.endpoint], timeout=30) as client:
        doomed.process.kill()
        doomed.process.wait()
        outputs = client.infer_many("tiny", [{"x": X * i} for i in range(40)], window=8)
        assert [float(o["y"][0, 0]) for o in outputs] == [
            float(client.infer("tiny", {"x": X * i})["y"][0, 0]) for i in range(40)
        ]
        assert client.resent == 8  # the window in flight when the loss was seen


def test_a_lost_connection_never_resends_other_requests(start_twistd: StartTwistd) -> None:
    doomed = start_twistd(TWISTD_TINY_CONFIG)
    client = BlockingClient.connect(doomed.endpoint, timeout=30)
    assert client.ping() > 0
    doomed.process.kill()
    doomed.process.wait()
    with pytest.raises(ConnectionLost) as info:
        client.models()
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert f"connection to {doomed.endpoint} lost with a ListModels in flight" in str(info.value)
    assert "not re-sent" in info.value.message and client.resent == 0


def fake_server_then(
    twistd_server: ServerProcess, *frames: bytes
) -> tuple[BlockingClient, socket.socket]:
    """A client connected (handshake done) to a socket that then sends
    ``frames`` and stops listening; its second endpoint is the real server.
    Returns the client and the fake's end of the connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        host, port = listener.getsockname()[:2]
        fake = f"tcp:{host}:{port}"
        sock = socket.create_connection((host, port), timeout=10)
        server_side, _ = listener.accept()
    client = BlockingClient(
        sock, endpoint=fake, endpoints=[fake, twistd_server.endpoint], timeout=10
    )
    server_side.sendall(encode_bytes(0, Hello(1, 1, 1 << 20, "fake")))
    client.handshake()
    server_side.sendall(b"".join(frames))
    return client, server_side


def test_goaway_moves_the_next_call_to_a_new_connection(twistd_server: ServerProcess) -> None:
    # The fake answers the ping (request 1) right behind its GOAWAY.
    client, fake = fake_server_then(
        twistd_server, encode_bytes(0, GoAway(1, "bye")), encode_bytes(1, Pong())
    )
    with fake, client:
        assert client.ping() >= 0
        assert client.endpoint != twistd_server.endpoint
        # Nothing in flight: the next call leaves (the fake no longer listens).
        assert client.infer("tiny", {"x": X})["y"].shape == (1, 3)
        assert client.endpoint == twistd_server.endpoint and client.resent == 0


def test_inference_refused_after_goaway_is_resent_once(twistd_server: ServerProcess) -> None:
    refusal = Error(ErrorCode.UNAVAILABLE, "the server is shutting down")
    client, fake = fake_server_then(
        twistd_server, encode_bytes(0, GoAway(0, "bye")), encode_bytes(1, refusal)
    )
    with fake, client:
        assert client.infer("tiny", {"x": X})["y"].shape == (1, 3)
        assert client.endpoint == twistd_server.endpoint and client.resent == 1


def test_the_cli_takes_several_servers(
    twistd_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    from twinfer.cli import main

    status = main(["models", "--server", f"{closed_endpoint()},{twistd_server.endpoint}"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "tiny" in out


def test_bench_spreads_its_connections_over_several_servers(
    start_twistd: StartTwistd, tmp_path: Path
) -> None:
    servers = [start_twistd(TWISTD_TINY_CONFIG) for _ in range(2)]
    out = tmp_path / "result.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "twinfer.bench",
            "--model",
            "tiny",
            "--server",
            ",".join(server.endpoint for server in servers),
            "--connections",
            "4",
            "--concurrency",
            "8",
            "--requests",
            "200",
            "--warmup",
            "0",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    [point] = json.loads(out.read_text())["points"]
    assert point["count"] == 200 and point["error_count"] == 0 and point["resent"] == 0
    # Both servers served: each one's log says how many it answered.
    answered = []
    for server in servers:
        assert server.stop() == 0
        found = re.search(r"twinfer stopped: (\d+) inference requests answered", server.log())
        assert found is not None, server.log()
        answered.append(int(found.group(1)))
    assert sum(answered) == 200 and min(answered) > 0, answered
