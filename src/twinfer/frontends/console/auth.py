"""The console's login: password hashes, the credentials file and the ``twisted.cred`` portal.

Credentials file: one ``user:password`` per line, where the password is
``pbkdf2_sha256$ITERATIONS$SALT$HEX`` (see :func:`hash_password`; run
``python -m twinfer.frontends.console USER`` to make a line, :func:`main`) or,
discouraged, plain text.  ``#`` starts a comment.  The file is re-read at each
login, and hashes are checked in a pool thread, never on the reactor.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
from pathlib import Path
from typing import Any

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from zope.interface import Interface, implementer


def hash_password(password: str, iterations: int = 300_000, salt: bytes | None = None) -> str:
    """A PBKDF2-SHA256 hash in the credentials file's format."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (a hash or, discouraged, plain text)."""
    if stored.startswith("pbkdf2_sha256$"):
        try:
            _, iterations, salt, expected = stored.split("$")
            digest = hashlib.pbkdf2_hmac(
                "sha256", password.encode(), bytes.fromhex(salt), int(iterations)
            )
        except ValueError:
            return False
        return hmac.compare_digest(digest.hex(), expected)
    return hmac.compare_digest(password.encode(), stored.encode())


def read_credentials(path: str | Path) -> dict[str, str]:
    """Parse a credentials file into ``{user: stored password}``; raises ``ValueError``."""
    users = {}
    for number, line in enumerate(Path(path).read_text("utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user or not stored:
            raise ValueError(f"{path}:{number}: expected user:password")
        users[user] = stored
    return users


@implementer(ICredentialsChecker)
class CredentialsFileChecker:
    """Checks usernames and passwords against a credentials file (re-read per login)."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        read_credentials(self.path)  # fail at start-up, not at the first login

    def requestAvatarId(self, creds: Any) -> Deferred[bytes | tuple[()]]:
        """Fires with the user name (bytes) in a pool thread's time, or fails
        with ``UnauthorizedLogin``."""
        username = creds.username.decode("utf-8", "replace")
        password = creds.password.decode("utf-8", "replace")

        def check() -> bytes:
            stored = read_credentials(self.path).get(username)
            # Hash even for unknown users, so timing does not reveal them.
            ok = verify_password(password, stored or hash_password("", 1000, b"x"))
            if stored is None or not ok:
                raise error.UnauthorizedLogin("bad username or password")
            return creds.username  # type: ignore[no-any-return]

        return deferToThread(check)


class IConsoleUser(Interface):
    """A logged-in console user (the avatar)."""


@implementer(IConsoleUser)
class ConsoleUser:
    """Who is logged in; kept for the log lines."""

    def __init__(self, name: str) -> None:
        self.name = name


@implementer(IRealm)
class ConsoleRealm:
    """Gives each authenticated user a :class:`ConsoleUser`."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, ...]:
        if IConsoleUser not in interfaces:
            raise NotImplementedError("the console only knows IConsoleUser")
        name = avatarId.decode("utf-8", "replace")
        return IConsoleUser, ConsoleUser(name), lambda: None


def make_portal(credentials_file: str | Path) -> Portal:
    """A portal checking logins against ``credentials_file``."""
    realm: Any = ConsoleRealm()
    checker: Any = CredentialsFileChecker(credentials_file)
    return Portal(realm, [checker])


def main(argv: list[str] | None = None) -> int:
    """``python -m twinfer.frontends.console USER``: print a credentials line
    (the password is read from the terminal, or from stdin's first line)."""
    import getpass

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or ":" in args[0]:
        print(
            "usage: python -m twinfer.frontends.console USER  (prints USER:HASH)", file=sys.stderr
        )
        return 2
    password = getpass.getpass() if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    print(f"{args[0]}:{hash_password(password)}")
    return 0
