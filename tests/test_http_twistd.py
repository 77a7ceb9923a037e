"""End to end: a real ``twistd -n twinfer --port ... --http-port ...`` process,
driven over HTTP by ``tritonclient.http`` and over the binary protocol."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from twinfer.blocking import BlockingClient
from twinfer.engines.builtin import tiny_reference
from twistd_process import TWISTD_TINY_CONFIG, ServerProcess, StartTwistd, with_server_table

CONFIG = with_server_table(TWISTD_TINY_CONFIG, http_max_body_size=1048576)


class Twistd:
    """A running server (the shared ``start_twistd`` fixture's) and its HTTP port."""

    def __init__(self, process: ServerProcess) -> None:
        self.process = process
        self.binary_port = process.port
        # From the server's port file: written once every port listens.
        self.http_port = process.ports["http"]

    def log(self) -> str:
        return self.process.log()


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


@pytest.fixture(scope="module")
def server(start_twistd: StartTwistd) -> Iterator[Twistd]:
    process = start_twistd(CONFIG, args=["--http-port=tcp:0:interface=127.0.0.1"])
    yield Twistd(process)
    process.stop()


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


def test_binary_and_http_front_ends_share_the_server(server: Twistd) -> None:
    x = np.ones((1, 4), np.float32)
    with BlockingClient.connect(f"tcp:127.0.0.1:{server.binary_port}", timeout=30) as binary:
        over_binary = binary.infer("tiny", {"x": x})["y"]
    client = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        over_http = client.infer("tiny", [tensor]).as_numpy("y")
    finally:
        client.close()
    np.testing.assert_array_equal(over_http, over_binary)
    assert "twinfer http listening on tcp:127.0.0.1:" in server.log()


def test_http_over_tls(start_twistd: StartTwistd, tmp_path_factory: pytest.TempPathFactory) -> None:
    cert, key = self_signed(tmp_path_factory.mktemp("https"))
    endpoint = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    process = start_twistd(CONFIG, args=[f"--http-port={endpoint}"])
    try:
        server = Twistd(process)
        assert "twinfer http listening on ssl:127.0.0.1:" in server.log()
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
    finally:
        process.stop()


def test_load_and_unload_need_allow_admin(server: Twistd) -> None:
    """This server was started without ``--allow-admin``: Triton's load and
    unload are refused (403, naming the flag) and change nothing."""
    client = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        for call in (client.unload_model, client.load_model):
            with pytest.raises(InferenceServerException) as info:
                call("tiny")
            assert info.value.status() == "403"
            assert "start it with --allow-admin" in info.value.message()
        assert client.is_model_ready("tiny")
        assert client.get_model_repository_index() == [
            {"name": "tiny", "version": "1", "state": "READY", "reason": ""}
        ]
    finally:
        client.close()
