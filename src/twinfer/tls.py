"""TLS for every port and client: TLS 1.2 at least, and mutual TLS as an option.

Server side, :func:`server_endpoint` turns an ``ssl:`` endpoint description
(``ssl:9443:privateKey=key.pem:certKey=cert.pem``, the syntax of Twisted's
``serverFromString``) into an ``SSL4ServerEndpoint`` whose
``CertificateOptions`` refuse anything older than TLS 1.2 and, given a
client CA (``--tls-client-ca`` for every ``ssl:`` port, or ``clientCA=`` on
one port), require a client certificate that chains to it.

Why an endpoint built here rather than ``serverFromString``: Twisted's
``ssl:`` parser has no parameter for client verification, and reaching into
the endpoint it returns for its context factory would mean a private
attribute.  ``SSL4ServerEndpoint(reactor, port, CertificateOptions(...))`` is
the public API, and the description keeps Twisted's syntax and parameter
names (``privateKey``, ``certKey``, ``interface``, ``backlog``,
``extraCertChain``, ``dhParameters``); ``sslmethod`` is refused because it
would override the TLS 1.2 minimum.

Client side, :func:`client_options` and :func:`load_private_certificate`
(Twisted client) and :func:`twinfer.blocking_net.blocking_context` (blocking
client and CLI, kept there so that they do not import Twisted) give the same
minimum and present a client certificate when one is configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from OpenSSL import crypto
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamServerEndpoint
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    DiffieHellmanParameters,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
)
from twisted.python.filepath import FilePath

#: The oldest TLS version any port or client of twinfer speaks.
MINIMUM_TLS = TLSVersion.TLSv1_2

_SERVER_KEYWORDS = frozenset(
    {"privateKey", "certKey", "interface", "backlog", "extraCertChain", "dhParameters", "clientCA"}
)


def split_description(description: str) -> tuple[str, list[str], dict[str, str]]:
    """Split ``kind:arg:key=value`` as Twisted does (``\\:`` is a literal colon).

    Returns (kind, positional arguments, keyword arguments).
    """
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    kind, args, kwargs = parts[0], [], {}
    for part in parts[1:]:
        key, equals, value = part.partition("=")
        if equals and key.isidentifier():
            kwargs[key] = value
        else:
            args.append(part)
    return kind, args, kwargs


def load_certificates(path: str | Path) -> list[crypto.X509]:
    """Every certificate in a PEM bundle (raises ``ValueError`` if it has none)."""
    found = x509.load_pem_x509_certificates(Path(path).read_bytes())
    return [crypto.X509.from_cryptography(c) for c in found]


def server_options(
    cert_file: str,
    key_file: str,
    *,
    client_ca: str | None = None,
    extra_chain: str | None = None,
    dh_parameters: str | None = None,
) -> CertificateOptions:
    """Server ``CertificateOptions``: TLS 1.2 or newer; with ``client_ca`` (a
    PEM bundle), a client certificate chaining to it is required."""
    try:
        private = load_private_certificate(cert_file, key_file)
    except crypto.Error as e:
        raise ValueError(f"cannot load {cert_file} and {key_file}: {e}") from e
    kwargs: dict[str, Any] = {}
    if client_ca is not None:
        kwargs.update(verify=True, caCerts=load_certificates(client_ca), requireCertificate=True)
    if extra_chain is not None:
        kwargs["extraCertChain"] = load_certificates(extra_chain)
    if dh_parameters is not None:
        kwargs["dhParameters"] = DiffieHellmanParameters.fromFile(FilePath(dh_parameters))
    return CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        raiseMinimumTo=MINIMUM_TLS,
        **kwargs,
    )


def server_endpoint(
    reactor: Any, description: str, *, client_ca: str | None = None
) -> IStreamServerEndpoint:
    """An ``SSL4ServerEndpoint`` for an ``ssl:`` description (see the module's doc).

    ``client_ca`` applies unless the description names its own ``clientCA=``.
    Raises ``ValueError`` for a description it cannot serve.
    """
    kind, args, kwargs = split_description(description)
    if kind != "ssl":
        raise ValueError(f"not an ssl: endpoint: {description!r}")
    if "sslmethod" in kwargs:
        raise ValueError("sslmethod= is not supported: twinfer speaks TLS 1.2 or newer only")
    unknown = sorted(set(kwargs) - _SERVER_KEYWORDS)
    if len(args) != 1 or unknown:
        raise ValueError(
            f"expected ssl:PORT:privateKey=KEY[:certKey=CERT][:interface=IP]... "
            f"(unknown: {', '.join(unknown) or ' '.join(args[1:])})"
        )
    key = kwargs.get("privateKey", "server.pem")
    options = server_options(
        kwargs.get("certKey", key),
        key,
        client_ca=kwargs.get("clientCA", client_ca),
        extra_chain=kwargs.get("extraCertChain"),
        dh_parameters=kwargs.get("dhParameters"),
    )
    return SSL4ServerEndpoint(
        reactor,
        int(args[0]),
        options,
        backlog=int(kwargs.get("backlog", 50)),
        interface=kwargs.get("interface", ""),
    )


def load_private_certificate(
    cert_file: str | Path, key_file: str | Path | None
) -> PrivateCertificate:
    """A certificate and its key from PEM files (``key_file`` None: both in ``cert_file``)."""
    pem = Path(cert_file).read_bytes()
    if key_file is not None and Path(key_file) != Path(cert_file):
        pem += b"\n" + Path(key_file).read_bytes()
    return PrivateCertificate.loadPEM(pem)


def client_options(
    host: str,
    trust_root: str | Certificate | None = None,
    client_certificate: PrivateCertificate | None = None,
) -> IOpenSSLClientConnectionCreator:
    """Twisted client TLS options for ``host``: TLS 1.2 or newer, the server
    verified against ``trust_root`` (a PEM path or ``Certificate``; None: the
    platform's trust store), presenting ``client_certificate`` if given."""
    if isinstance(trust_root, str):
        trust_root = Certificate.loadPEM(Path(trust_root).read_bytes())
    return optionsForClientTLS(
        host,
        trustRoot=trust_root,
        clientCertificate=client_certificate,
        extraCertificateOptions={"raiseMinimumTo": MINIMUM_TLS},
    )
