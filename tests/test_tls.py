"""twinfer.tls in one process: the ``ssl:`` description parser, the TLS 1.2
minimum, per-port ``clientCA=`` and ``--tls-client-ca`` validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import TLSVersion
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest

from certs import make_client_files, make_tls_files
from twinfer import tap
from twinfer.tls import (
    MINIMUM_TLS,
    client_options,
    load_private_certificate,
    server_endpoint,
    server_options,
    split_description,
)


def test_split_description_follows_twisted_syntax() -> None:
    kind, args, kwargs = split_description(
        r"ssl:9443:privateKey=/k\:ey.pem:certKey=c.pem:interface=\:\:1"
    )
    assert (kind, args) == ("ssl", ["9443"])
    assert kwargs == {"privateKey": "/k:ey.pem", "certKey": "c.pem", "interface": "::1"}


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ("tcp:9000", "not an ssl: endpoint"),
        ("ssl:9443:privateKey=k.pem:sslmethod=TLSv1_METHOD", "TLS 1.2 or newer only"),
        ("ssl:9443:privateKey=k.pem:verify=no", "unknown: verify"),
        ("ssl:9443:k.pem", "expected ssl:PORT"),
    ],
)
def test_server_endpoint_refuses_what_it_cannot_serve(description: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        server_endpoint(reactor, description)


def test_server_options_raise_the_minimum_to_tls12(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path, "localhost")
    options = server_options(str(tls.cert), str(tls.key), client_ca=str(tls.ca))
    # Public attributes of CertificateOptions: what it was built with.
    assert MINIMUM_TLS is TLSVersion.TLSv1_2
    assert options.verify and options.requireCertificate
    assert [c.get_subject().CN for c in options.caCerts] == ["twinfer test CA"]


def test_a_bad_certificate_file_is_a_value_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ValueError, match="cannot load"):
        server_options(str(bad), str(bad))


def test_tls_client_ca_must_be_a_pem_bundle(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("nothing")
    with pytest.raises(usage.UsageError, match="bad --tls-client-ca"):
        tap.Options().parseOptions([f"--tls-client-ca={bad}"])
    good = make_tls_files(tmp_path, "localhost").ca
    options = tap.Options()
    options.parseOptions([f"--tls-client-ca={good}"])
    assert options["tls-client-ca"] == str(good)


class _Greeter(Protocol):
    def __init__(self, closed: list[Deferred[None]]) -> None:
        self.closed: Deferred[None] = Deferred()
        closed.append(self.closed)

    def connectionMade(self) -> None:
        self.transport.write(b"hello\n")

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.closed.callback(None)


class _Reader(Protocol):
    def __init__(self) -> None:
        self.done: Deferred[bytes] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\n" in self.data and not self.done.called:
            self.done.callback(self.data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if not self.done.called:
            self.done.errback(reason)
        self.closed.callback(None)

    def close(self) -> Deferred[None]:
        self.transport.loseConnection()
        return self.closed


class PerPortClientCATests(unittest.TestCase):
    """``clientCA=`` on one port, over real loopback sockets in this process."""

    def setUp(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        self.tls = make_tls_files(directory, "localhost")
        self.client = make_client_files(directory, self.tls, "client")
        #: Fire as the server's connections close; the test waits for all of them.
        self.server_closed: list[Deferred[None]] = []
        self.addCleanup(lambda: gatherResults(self.server_closed))

    async def listen(self, description: str) -> int:
        endpoint = server_endpoint(reactor, description)
        port = await endpoint.listen(Factory.forProtocol(lambda: _Greeter(self.server_closed)))
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def read_greeting(self, port: int, with_certificate: bool) -> bytes:
        certificate = (
            load_private_certificate(self.client.cert, self.client.key)
            if with_certificate
            else None
        )
        options = client_options("localhost", str(self.tls.ca), certificate)
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        protocol = _Reader()
        await endpoint.connect(Factory.forProtocol(lambda: protocol))
        self.addCleanup(protocol.close)
        return await protocol.done

    def description(self, *extra: str) -> str:
        return ":".join(
            [
                f"ssl:0:interface=127.0.0.1:privateKey={self.tls.key}:certKey={self.tls.cert}",
                *extra,
            ]
        )

    async def test_a_port_with_client_ca_needs_a_certificate(self) -> None:
        port = await self.listen(self.description(f"clientCA={self.tls.ca}"))
        assert await self.read_greeting(port, with_certificate=True) == b"hello\n"
        with self.assertRaises(Exception) as e:
            await self.read_greeting(port, with_certificate=False)
        assert "certificate required" in str(e.exception).lower()

    async def test_a_port_without_client_ca_serves_anyone(self) -> None:
        port = await self.listen(self.description())
        assert await self.read_greeting(port, with_certificate=False) == b"hello\n"
