"""Mutual TLS against a real ``twistd -n twinfer``: every port requires a
client certificate from the CA given with ``--tls-client-ca``.

The CAs and certificates are made in the test (tests/certs.py): a client
with a certificate from the right CA is served; without one, or with one from
another CA, or speaking TLS 1.1, it is refused: on the binary, HTTP, metrics
and console ports, and by the Twisted client, the blocking client and the CLI.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator

import attrs
import numpy as np
import pytest
from twisted.internet import reactor
from twisted.trial import unittest

from certs import ClientFiles, TLSFiles, make_client_files, make_tls_files
from twinfer import cli
from twinfer.blocking import BlockingClient, ConnectFailed, TransportError
from twinfer.client import connect
from twinfer.engines.builtin import tiny_reference
from twinfer.errors import ErrorCode, TwinferError
from twistd_process import TWISTD_TINY_CONFIG, ServerProcess, StartTwistd


@attrs.frozen
class MutualTLS:
    """A server requiring client certificates, and the files to talk to it."""

    server: ServerProcess
    #: The server's CA, which also signs the accepted client certificates.
    tls: TLSFiles
    #: A client certificate from that CA.
    client: ClientFiles
    #: A client certificate from another CA, which the server does not trust.
    stranger: ClientFiles

    def endpoint(self) -> str:
        return f"tls:localhost:{self.server.port}"


@pytest.fixture(scope="module")
def mtls(
    start_twistd: StartTwistd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MutualTLS]:
    directory = tmp_path_factory.mktemp("mtls")
    tls = make_tls_files(directory, "localhost")
    client = make_client_files(directory, tls, "client")
    elsewhere = tmp_path_factory.mktemp("other-ca")
    stranger = make_client_files(elsewhere, make_tls_files(elsewhere, "localhost"), "stranger")
    ssl_port = f"ssl:0:interface=127.0.0.1:privateKey={tls.key}:certKey={tls.cert}"
    server = start_twistd(
        TWISTD_TINY_CONFIG,
        port=ssl_port,
        args=[
            f"--tls-client-ca={tls.ca}",
            f"--http-port={ssl_port}",
            f"--metrics-port={ssl_port}",
            f"--debug-port={ssl_port}",
        ],
    )
    yield MutualTLS(server, tls, client, stranger)
    server.stop()


def client_context(mtls: MutualTLS, client: ClientFiles | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(mtls.tls.ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


@contextlib.contextmanager
def https(
    mtls: MutualTLS, port_name: str, client: ClientFiles | None
) -> Iterator[http.client.HTTPSConnection]:
    connection = http.client.HTTPSConnection(
        "localhost", mtls.server.ports[port_name], context=client_context(mtls, client), timeout=30
    )
    try:
        yield connection
    finally:
        connection.close()


def refusal(error: BaseException) -> str:
    """The TLS alert a refused client got (with TLS 1.3 it comes after the
    client's side of the handshake, at its first read)."""
    assert isinstance(error, ssl.SSLError), repr(error)
    return str(error).lower()


# -- HTTP and metrics ports ---------------------------------------------------------


@pytest.mark.parametrize(
    ("port_name", "path"), [("http", "/v2/health/ready"), ("metrics", "/metrics")]
)
def test_http_ports_serve_a_client_with_a_certificate_from_the_ca(
    mtls: MutualTLS, port_name: str, path: str
) -> None:
    with https(mtls, port_name, mtls.client) as connection:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200
        body = response.read()
    if port_name == "metrics":
        assert b"# TYPE" in body


@pytest.mark.parametrize("port_name", ["http", "metrics"])
@pytest.mark.parametrize("who", ["nobody", "stranger"])
def test_http_ports_refuse_a_client_without_a_trusted_certificate(
    mtls: MutualTLS, port_name: str, who: str
) -> None:
    client = None if who == "nobody" else mtls.stranger
    with https(mtls, port_name, client) as connection, pytest.raises(OSError) as info:
        connection.request("GET", "/metrics" if port_name == "metrics" else "/v2/health/ready")
        connection.getresponse()
    reason = refusal(info.value)
    assert ("certificate required" if who == "nobody" else "unknown ca") in reason


# -- the debug console over TLS ------------------------------------------------------


def test_console_over_tls_greets_a_client_with_a_certificate(mtls: MutualTLS) -> None:
    context = client_context(mtls, mtls.client)
    port = mtls.server.ports["console"]
    with context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost"
    ) as sock:
        greeting = b""
        while b"debug console" not in greeting:
            chunk = sock.recv(4096)
            assert chunk, greeting
            greeting += chunk


def test_console_over_tls_refuses_a_client_without_a_certificate(mtls: MutualTLS) -> None:
    context = client_context(mtls, None)
    port = mtls.server.ports["console"]
    with (
        context.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost"
        ) as sock,
        pytest.raises(OSError) as info,
    ):
        sock.recv(4096)
    assert "certificate required" in refusal(info.value)


# -- TLS 1.1 ---------------------------------------------------------------------------


def tls11_context(mtls: MutualTLS) -> ssl.SSLContext:
    """A client context speaking TLS 1.1 at most, or skip if OpenSSL cannot make one."""
    context = client_context(mtls, mtls.client)
    try:
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        # OpenSSL 3 allows TLS 1.1 only at security level 0.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as e:
        pytest.skip(f"this OpenSSL cannot make a TLS 1.1 client: {e}")
    return context


@pytest.mark.parametrize("port_name", ["binary", "http", "metrics", "console"])
def test_a_tls11_client_is_refused(mtls: MutualTLS, port_name: str) -> None:
    context = tls11_context(mtls)
    sock = socket.create_connection(("127.0.0.1", mtls.server.ports[port_name]), timeout=30)
    with sock, pytest.raises(ssl.SSLError) as info:
        context.wrap_socket(sock, server_hostname="localhost")
    reason = str(info.value).lower()
    if "no protocols available" in reason or "no ciphers available" in reason:
        pytest.skip(f"this OpenSSL refuses to send a TLS 1.1 hello: {reason}")
    # The server's alert (not the client's own refusal): it does not speak that version.
    assert "alert protocol version" in reason, reason


# -- the blocking client and the CLI -------------------------------------------------


def test_blocking_client_with_a_certificate_is_served(mtls: MutualTLS) -> None:
    with BlockingClient.connect(
        mtls.endpoint(),
        ca_file=str(mtls.tls.ca),
        cert_file=str(mtls.client.cert),
        key_file=str(mtls.client.key),
        timeout=30,
    ) as client:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        np.testing.assert_allclose(
            client.infer("tiny", {"x": x})["y"], tiny_reference(x)["y"], atol=1e-5
        )


@pytest.mark.parametrize("who", ["nobody", "stranger"])
def test_blocking_client_without_a_trusted_certificate_is_refused(
    mtls: MutualTLS, who: str
) -> None:
    cert = None if who == "nobody" else str(mtls.stranger.cert)
    key = None if who == "nobody" else str(mtls.stranger.key)
    with pytest.raises((ConnectFailed, TransportError)) as info:
        BlockingClient.connect(
            mtls.endpoint(), ca_file=str(mtls.tls.ca), cert_file=cert, key_file=key, timeout=30
        )
    assert info.value.code is ErrorCode.UNAVAILABLE
    expected = "certificate required" if who == "nobody" else "unknown ca"
    assert expected in info.value.message.lower()


def test_cli_with_cert_and_key_is_served(
    mtls: MutualTLS, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["models", "--server", mtls.endpoint(), "--ca", str(mtls.tls.ca)]
    assert cli.main([*args, "--cert", str(mtls.client.cert), "--key", str(mtls.client.key)]) == 0
    assert "tiny" in capsys.readouterr().out


@pytest.mark.parametrize("who", ["nobody", "stranger"])
def test_cli_without_a_trusted_certificate_is_refused(
    mtls: MutualTLS, who: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["models", "--server", mtls.endpoint(), "--ca", str(mtls.tls.ca)]
    if who == "stranger":
        args += ["--cert", str(mtls.stranger.cert), "--key", str(mtls.stranger.key)]
    assert cli.main(args) == cli.EXIT_UNREACHABLE
    expected = "certificate required" if who == "nobody" else "unknown ca"
    assert expected in capsys.readouterr().err.lower()


def test_cli_key_without_cert_is_a_usage_error(
    mtls: MutualTLS, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["models", "--server", mtls.endpoint(), "--key", str(mtls.client.key)]
    assert cli.main(args) == cli.EXIT_ERROR
    assert "--key needs --cert" in capsys.readouterr().err


def run_bench(mtls: MutualTLS, *certificate: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twinfer.bench", "--model", "tiny", "--server", mtls.endpoint()]
        + ["--ca", str(mtls.tls.ca), "--requests", "8", "--warmup", "0", *certificate],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bench_with_cert_and_key_is_served_and_without_refused(mtls: MutualTLS) -> None:
    served = run_bench(mtls, "--cert", str(mtls.client.cert), "--key", str(mtls.client.key))
    assert served.returncode == 0, served.stderr
    assert "inf/s" in served.stdout
    refused = run_bench(mtls)
    assert refused.returncode != 0
    assert "certificate required" in refused.stderr.lower(), refused.stderr


# -- the Twisted client (one connection, and a ClientPool) ---------------------------


@pytest.fixture(scope="class")
def mtls_on_class(request: pytest.FixtureRequest, mtls: MutualTLS) -> None:
    request.cls.mtls = mtls


@pytest.mark.usefixtures("mtls_on_class")
class TwistedClientMutualTLSTests(unittest.TestCase):
    mtls: MutualTLS

    async def check_served(self, **kwargs: object) -> None:
        client = await connect(
            reactor,
            self.mtls.endpoint() if "connections" not in kwargs else [self.mtls.endpoint()],
            trust_root=str(self.mtls.tls.ca),
            **kwargs,  # type: ignore[arg-type]
        )
        self.addCleanup(client.close)
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        out = await client.infer("tiny", {"x": x})
        np.testing.assert_allclose(out["y"], tiny_reference(x)["y"], atol=1e-5)

    async def test_a_client_certificate_from_the_ca_is_served(self) -> None:
        await self.check_served(
            client_cert=str(self.mtls.client.cert), client_key=str(self.mtls.client.key)
        )

    async def test_a_client_pool_with_a_certificate_is_served(self) -> None:
        await self.check_served(
            client_cert=str(self.mtls.client.cert),
            client_key=str(self.mtls.client.key),
            connections=2,
        )

    async def check_refused(self, client: ClientFiles | None, expected: str) -> None:
        files = (
            {}
            if client is None
            else {"client_cert": str(client.cert), "client_key": str(client.key)}
        )
        with self.assertRaises(TwinferError) as e:
            await connect(reactor, self.mtls.endpoint(), trust_root=str(self.mtls.tls.ca), **files)
        assert e.exception.code == ErrorCode.UNAVAILABLE
        assert expected in e.exception.message.lower(), e.exception.message

    async def test_no_client_certificate_is_refused(self) -> None:
        await self.check_refused(None, "certificate required")

    async def test_a_certificate_from_another_ca_is_refused(self) -> None:
        await self.check_refused(self.mtls.stranger, "unknown ca")


def test_a_key_without_its_certificate_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="client_key needs client_cert"):
        connect(reactor, "tls:localhost:1", client_key="key.pem")
