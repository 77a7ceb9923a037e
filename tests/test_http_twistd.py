"""End to end: a real ``twistd -n twinfer --port ... --http-port ...`` process,
driven over HTTP by ``tritonclient.http`` and over the binary protocol."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from twinfer import codec
from twinfer.builtin import tiny_reference
from twinfer.messages import Hello, InferReply, InferRequest, Message

CONFIG = """
[server]
http_max_body_size = 1048576

[[devices]]
name = "cpu"
target = "CPU"
replicas = 2
properties = { INFERENCE_PRECISION_HINT = "f32" }

[[models]]
name = "tiny"
path = "builtin:tiny"
"""

_LISTENING = re.compile(r"twinfer (?:(?P<front>http) )?listening on (\w+):(.+):(?P<port>\d+)$",
                        re.M)


class Twistd:
    """A running server: its binary and HTTP ports, and its log."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path, ports: dict[str, int]):
        self.process = process
        self.log = log
        self.binary_port = ports["binary"]
        self.http_port = ports["http"]


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 (its own CA) and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def run_twistd(directory: Path, http_port: str) -> Iterator[Twistd]:
    """Start twistd with both front ends, yield it once both listen, stop it."""
    (directory / "twinfer.toml").write_text(CONFIG)
    log = directory / "twistd.log"
    twistd = Path(sys.executable).with_name("twistd")
    process = subprocess.Popen(
        [str(twistd), "--nodaemon", "--pidfile=", f"--logfile={log}", "twinfer",
         "--port=tcp:0:interface=127.0.0.1", f"--http-port={http_port}",
         f"--config={directory / 'twinfer.toml'}"],
        cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        ports: dict[str, int] = {}
        while len(ports) < 2:
            text = log.read_text(errors="replace") if log.exists() else ""
            ports = {m["front"] or "binary": int(m["port"]) for m in _LISTENING.finditer(text)}
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"twistd did not start listening:\n{text}")
            time.sleep(0.05)
        yield Twistd(process, log, ports)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    yield from run_twistd(tmp_path_factory.mktemp("twistd-http"), "tcp:0:interface=127.0.0.1")


def test_tritonclient_json_and_binary_against_twistd(server: Twistd) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        assert client.is_server_ready() and client.is_model_ready("tiny")
        x = np.random.default_rng(7).standard_normal((4, 4)).astype(np.float32)
        expected = tiny_reference(x)
        for binary in (False, True):
            tensor = triton.InferInput("x", [4, 4], "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("y", "label")]
            result = client.infer("tiny", [tensor], outputs=outputs)
            np.testing.assert_allclose(result.as_numpy("y"), expected["y"], rtol=1e-5)
            np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
        with pytest.raises(InferenceServerException) as info:
            client.infer("resnet50", [tensor])
        assert info.value.status() == "404" and "not served here" in info.value.message()
    finally:
        client.close()


def binary_infer(port: int, x: np.ndarray) -> np.ndarray:
    """One inference over the binary protocol, with the sans-I/O codec on a plain socket."""
    decoder = codec.FrameDecoder()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:

        def exchange(request_id: int, message: Message) -> Message:
            sock.sendall(codec.encode_bytes(request_id, message))
            while True:
                frames = decoder.feed(sock.recv(65536))
                if frames:
                    return codec.decode_message(frames[0])

        assert isinstance(exchange(1, Hello()), Hello)
        reply = exchange(2, InferRequest("tiny", {"x": x}))
    assert isinstance(reply, InferReply), reply
    return np.asarray(reply.outputs["y"])


def test_binary_and_http_front_ends_share_the_server(server: Twistd) -> None:
    x = np.ones((1, 4), np.float32)
    over_binary = binary_infer(server.binary_port, x)
    client = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        over_http = client.infer("tiny", [tensor]).as_numpy("y")
    finally:
        client.close()
    np.testing.assert_array_equal(over_http, over_binary)
    assert "twinfer http listening on tcp:127.0.0.1:" in server.log.read_text()


def test_http_over_tls(tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("twistd-https")
    cert, key = self_signed(directory)
    endpoint = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    for server in run_twistd(directory, endpoint):
        assert "twinfer http listening on ssl:127.0.0.1:" in server.log.read_text()
        client = triton.InferenceServerClient(
            f"127.0.0.1:{server.http_port}", ssl=True, ssl_options={"ca_certs": str(cert)}
        )
        try:
            x = np.random.default_rng(8).standard_normal((2, 4)).astype(np.float32)
            tensor = triton.InferInput("x", [2, 4], "FP32")
            tensor.set_data_from_numpy(x)
            result = client.infer("tiny", [tensor])
            np.testing.assert_allclose(result.as_numpy("y"), tiny_reference(x)["y"], rtol=1e-5)
        finally:
            client.close()
        # Really TLS: a client that does not trust the certificate is refused.
        untrusting = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}", ssl=True)
        try:
            with pytest.raises(Exception, match="(?i)certificate"):
                untrusting.is_server_live()
        finally:
            untrusting.close()
