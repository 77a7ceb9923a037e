"""The debug console: a line-based text protocol for ``telnet`` or ``nc``.

Served on ``--debug-port`` (loopback only unless a credentials file is
given).  With ``--debug-credentials FILE`` a session starts with a login
checked by :class:`CredentialsFileChecker` through a ``twisted.cred`` portal;
without one (loopback only) the session starts logged in.

Plain lines in, plain text out: no telnet option negotiation, so ``nc``
works as well as ``telnet`` (telnet's own IAC commands, e.g. from Ctrl-C,
are stripped from lines; an interrupt closes the session).  Every reply ends
with the ``twinfer> `` prompt.  Unknown commands and wrong arguments get one
line starting with ``error:``; the session stays open.

Credentials file: one ``user:password`` per line, where the password is
``pbkdf2_sha256$ITERATIONS$SALT$HEX`` (see :func:`hash_password`; run
``python -m twinfer.frontends.console USER`` to make a line) or, discouraged, plain
text.  ``#`` starts a comment.  The file is re-read at each login, and
hashes are checked in a pool thread, never on the reactor.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
)
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

import twinfer
from twinfer.errors import ErrorCode, TwinferError
from twinfer.ops.control import Controller
from twinfer.scheduling import WorkerState

log = Logger()

PROMPT = b"twinfer> "
#: Failed logins before the connection is closed.
MAX_LOGIN_ATTEMPTS = 3
_IAC = re.compile(rb"\xff[\xfb-\xfe].|\xff\xfa.*?\xff\xf0|\xff[\xf0-\xfa]", re.S)
_INTERRUPT = (b"\xff\xf4", b"\xff\xed", b"\x04")  # IAC IP, IAC SUSP, Ctrl-D


# -- credentials ---------------------------------------------------------------


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


# -- log levels ----------------------------------------------------------------


class LogLevels:
    """The level filter in front of ``twistd``'s log observer.

    One ``LogLevelFilterPredicate`` shared by the observers :meth:`filtering`
    makes; ``twistd twinfer`` logs through such an observer from start-up on
    (see :class:`twinfer.tap.TwinferService`), and the console's
    ``loglevel`` command adjusts the predicate with :meth:`set`.
    """

    def __init__(self) -> None:
        self.predicate: Any = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)

    def filtering(self, observer: ILogObserver) -> ILogObserver:
        """``observer`` behind this filter."""
        filtered: ILogObserver = FilteringLogObserver(observer, [self.predicate])
        return filtered

    def set(self, level: LogLevel, namespace: str = "") -> None:
        """Log events at ``level`` and above (for ``namespace`` and below, if given)."""
        # The empty namespace is the default level (``predicate.defaultLogLevel``
        # is only read when the predicate is created or cleared).
        self.predicate.setLogLevelForNamespace(namespace, level)


# -- formatting ----------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart, with a header line."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def one_line(text: str) -> str:
    """Collapse a (possibly multi-line, e.g. OpenVINO's) message onto one line."""
    return " ".join(text.split())


def duration(seconds: float) -> str:
    """``1d 02:03:04`` / ``02:03:04``."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    text = f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


def ms(seconds: float) -> str:
    """Milliseconds with sensible precision."""
    value = seconds * 1000
    return f"{value:.3f}" if value < 1 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


# -- the protocol --------------------------------------------------------------


Command = Callable[["ConsoleProtocol", list[str]], "str | Deferred[str]"]


class UsageError(Exception):
    """Wrong arguments to a console command."""


class ConsoleProtocol(LineReceiver):
    """One console session."""

    delimiter = b"\n"
    MAX_LENGTH = 4096
    factory: ConsoleFactory
    #: An ITCPTransport (typed Any: mypy cannot check zope interfaces).
    transport: Any

    def __init__(self) -> None:
        self.state = "user"
        self.user = ""
        self.attempts = 0

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()
        banner = f"twinfer {twinfer.__version__} debug console\r\n"
        if self.factory.portal is None:
            self.state = "command"
            self.user = "(loopback)"
            self.transport.write(banner.encode() + b"Type 'help' for the commands.\r\n" + PROMPT)
        else:
            self.transport.write(banner.encode() + b"Username: ")
        self.factory.sessions.add(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.factory.sessions.discard(self)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.write(b"error: line too long\r\n")
        self.transport.loseConnection()

    def lineReceived(self, raw: bytes) -> None:
        if any(code in raw for code in _INTERRUPT):
            self.transport.loseConnection()
            return
        line = _IAC.sub(b"", raw).rstrip(b"\r").decode("utf-8", "replace").strip()
        if self.state == "user":
            self.user = line
            self.state = "password"
            self.transport.write(b"Password: ")
        elif self.state == "password":
            self._login(line)
        elif self.state == "command":
            self._command(line)

    def _login(self, password: str) -> None:
        self.state = "checking"
        self.pauseProducing()
        assert self.factory.portal is not None
        creds: Any = credentials.UsernamePassword(self.user.encode(), password.encode())
        d = self.factory.portal.login(creds, None, IConsoleUser)
        d.addCallbacks(self._logged_in, self._login_failed)
        d.addBoth(lambda _: self.resumeProducing())

    def _logged_in(self, result: tuple[Any, ConsoleUser, Any]) -> None:
        self.state = "command"
        log.info("console login by {user} from {peer}", user=self.user, peer=self.peer)
        self.transport.write(b"\r\nLogged in. Type 'help' for the commands.\r\n" + PROMPT)

    def _login_failed(self, failure: Failure) -> None:
        failure.trap(error.UnauthorizedLogin)
        self.attempts += 1
        log.warn("failed console login as {user!r} from {peer}", user=self.user, peer=self.peer)
        if self.attempts >= MAX_LOGIN_ATTEMPTS:
            self.transport.write(b"\r\nLogin incorrect. Goodbye.\r\n")
            self.transport.loseConnection()
            return
        self.state = "user"
        self.transport.write(b"\r\nLogin incorrect.\r\nUsername: ")

    def _command(self, line: str) -> None:
        words = line.split()
        if not words:
            self.transport.write(PROMPT)
            return
        name, args = words[0].lower(), words[1:]
        entry = COMMANDS.get(name)
        if entry is None:
            self._say(f"error: unknown command {name!r}; type 'help' for the commands")
            return
        handler, usage, _ = entry
        try:
            result = handler(self, args)
        except UsageError as e:
            self._say(f"error: {e}; usage: {usage}")
            return
        except TwinferError as e:
            self._say(f"error: {one_line(e.message)}")
            return
        except Exception as e:  # a bug must not leave the session hanging
            log.failure("console command {line!r} failed", line=line)
            self._say(f"error: internal error: {e}")
            return
        if isinstance(result, Deferred):
            # One command at a time: stop reading until this one is answered.
            self.pauseProducing()
            result.addCallbacks(self._say, self._failed)
            result.addBoth(lambda _: self.resumeProducing())
        else:
            self._say(result)

    def _failed(self, failure: Failure) -> None:
        if failure.check(TwinferError):
            self._say(f"error: {one_line(failure.value.message)}")  # type: ignore[union-attr]
        else:
            log.failure("console command failed", failure)
            self._say(f"error: internal error: {failure.getErrorMessage()}")

    def _say(self, text: str | None) -> None:
        if text is None:  # quit
            return
        if not self.transport.connected:
            return
        body = text.replace("\n", "\r\n") + "\r\n" if text else ""
        self.transport.write(body.encode("utf-8") + PROMPT)


# -- commands ------------------------------------------------------------------


def _nargs(args: list[str], low: int, high: int | None = None) -> None:
    high = low if high is None else high
    if not low <= len(args) <= high:
        raise UsageError(f"expected {low}{'' if high == low else f'-{high}'} argument(s)")


def cmd_help(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 0)
    return table(("COMMAND", "DESCRIPTION"), [(u, d) for _, u, d in COMMANDS.values()])


def cmd_status(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 0)
    c = session.factory.controller
    stats = c.stats
    health = c.health()
    errors = sum(n for code, n in stats.totals.items() if code != "OK")
    rows = [
        ("version", twinfer.__version__),
        ("uptime", duration(time.monotonic() - stats.started)),
        ("state", "ready" if health.ready else f"not ready: {health.detail}"),
        ("connections", len(c.connections())),
        ("console sessions", len(session.factory.sessions)),
        ("in flight", c.inflight()),
        ("requests", stats.answered),
        ("ok", stats.totals.get("OK", 0)),
        ("errors", errors),
        ("models", len(c.dispatcher.model_names())),
        ("workers", len(c.dispatcher.workers)),
        ("control", c.busy_with or "idle"),
    ]
    return table(("FIELD", "VALUE"), rows)


def cmd_models(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 0)
    c = session.factory.controller
    rows = []
    for entry in c.dispatcher.entries():
        name = entry.name
        config = c.models.get(name)
        model_stats = c.stats.models.get(name)
        inputs = ",".join(
            f"{p.name}:{p.dtype.short_name}{p.describe_shape()}" for p in entry.signature.inputs
        )
        rows.append(
            (
                name,
                ",".join(entry.devices),
                sum(q.depth for q in entry.queues),
                inputs,
                model_stats.count if model_stats else 0,
                model_stats.errors if model_stats else 0,
                config.path if config else "?",
            )
        )
    return table(("MODEL", "DEVICES", "QUEUED", "INPUTS", "REQUESTS", "ERRORS", "PATH"), rows)


def cmd_devices(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 0)
    c = session.factory.controller
    now = time.monotonic()
    rows = []
    for worker in c.dispatcher.workers:
        if not worker.alive:
            state = "stopped"
        elif worker.paused:
            state = "draining" if worker.busy else "drained"
        elif worker.state is WorkerState.FAILED:
            state = "failed"
        else:
            state = "busy" if worker.busy else "idle"
        jobs = worker.jobs()
        current = "-"
        if jobs:
            batch = f" x{len(jobs)}" if len(jobs) > 1 else ""
            current = f"{jobs[0].model}{batch} ({ms(now - jobs[0].enqueued)} ms)"
        age = max(now - c.born.get(worker, c.stats.started), 1e-9)
        busy = 100.0 * min(worker.busy_seconds / age, 1.0)
        rows.append(
            (
                worker.device,
                worker.name,
                state,
                current,
                worker.jobs_done,
                worker.jobs_failed,
                f"{busy:.1f}",
            )
        )
    return table(("DEVICE", "WORKER", "STATE", "CURRENT", "DONE", "FAILED", "BUSY%"), rows)


def cmd_queues(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 0)
    c = session.factory.controller
    now = time.monotonic()
    rows = []
    for entry in c.dispatcher.entries():
        for queue in entry.queues:
            waiting = queue.waiting()
            devices = queue.name.split("@", 1)[1] if "@" in queue.name else ",".join(entry.devices)
            oldest = f"{ms(now - waiting[0].enqueued)} ms" if waiting else "-"
            rows.append((queue.name, entry.name, devices, queue.depth, queue.size, oldest))
    return table(("QUEUE", "MODEL", "DEVICES", "DEPTH", "SIZE", "OLDEST WAIT"), rows)


def cmd_stats(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 1)
    c = session.factory.controller
    name = args[0]
    model_stats = c.stats.models.get(name)
    if model_stats is None:
        if c.dispatcher.model(name) is None:
            known = ", ".join(c.dispatcher.model_names())
            raise TwinferError(ErrorCode.UNKNOWN_MODEL, f"no model {name!r} (models: {known})")
        return f"{name}: no requests yet"
    lines = [f"{name}: {model_stats.count} requests, {model_stats.errors} errors"]
    lines.append(table(("CODE", "COUNT"), sorted(model_stats.codes.items())))
    rows = []
    for label, histogram in (
        ("queue", model_stats.queue),
        ("compute", model_stats.compute),
        ("end-to-end", model_stats.latency),
    ):
        p = histogram.percentiles()
        window = len(histogram.recent or ())
        rows.append((label, *(ms(v) for v in p), window) if p else (label, "-", "-", "-", 0))
    lines.append("")
    lines.append(table(("TIME (ms)", "P50", "P90", "P99", "OVER LAST"), rows))
    return "\n".join(lines)


def cmd_load(session: ConsoleProtocol, args: list[str]) -> Deferred[str]:
    _nargs(args, 2, 3)
    devices = tuple(d for d in args[2].split(",") if d) if len(args) == 3 else ()
    return session.factory.controller.load(args[0], args[1], devices)


def cmd_unload(session: ConsoleProtocol, args: list[str]) -> Deferred[str]:
    _nargs(args, 1)
    return session.factory.controller.unload(args[0])


def cmd_reload(session: ConsoleProtocol, args: list[str]) -> Deferred[str]:
    _nargs(args, 1, 2)
    return session.factory.controller.reload(args[0], args[1] if len(args) == 2 else "")


def cmd_drain(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 1)
    log.info("console: {user} drains {device}", user=session.user, device=args[0])
    return session.factory.controller.drain(args[0])


def cmd_undrain(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 1)
    log.info("console: {user} undrains {device}", user=session.user, device=args[0])
    return session.factory.controller.undrain(args[0])


def cmd_loglevel(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 1, 2)
    try:
        level = LogLevel.levelWithName(args[0].lower())
    except Exception:
        names = ", ".join(lv.name for lv in LogLevel.iterconstants())
        raise UsageError(f"unknown level {args[0]!r} (levels: {names})") from None
    namespace = args[1] if len(args) == 2 else ""
    session.factory.log_levels.set(level, namespace)
    log.info(
        "console: {user} set the log level of {ns} to {new}",
        user=session.user,
        ns=namespace or "everything",
        new=level.name,
    )
    return f"log level of {namespace or 'everything'} set to {level.name}"


def cmd_quit(session: ConsoleProtocol, args: list[str]) -> None:
    _nargs(args, 0)
    session.transport.write(b"bye\r\n")
    session.transport.loseConnection()
    return None


#: name -> (handler, usage, description)
COMMANDS: dict[str, tuple[Any, str, str]] = {
    "help": (cmd_help, "help", "this list"),
    "status": (cmd_status, "status", "uptime, connections, in-flight requests, totals"),
    "models": (cmd_models, "models", "served models, their devices, inputs and counts"),
    "devices": (cmd_devices, "devices", "device workers: state, current job, jobs, busy %"),
    "queues": (cmd_queues, "queues", "queue depth per model and device, oldest wait"),
    "stats": (cmd_stats, "stats MODEL", "requests, errors by code, time percentiles"),
    "load": (cmd_load, "load NAME PATH [DEV1,DEV2]", "compile and serve a new model"),
    "unload": (cmd_unload, "unload NAME", "stop serving a model (queued: UNAVAILABLE)"),
    "reload": (cmd_reload, "reload NAME [PATH]", "recompile a model and swap it in"),
    "drain": (cmd_drain, "drain DEVICE", "finish current jobs, take no new ones"),
    "undrain": (cmd_undrain, "undrain DEVICE", "take jobs again"),
    "loglevel": (cmd_loglevel, "loglevel LEVEL [NAMESPACE]", "debug, info, warn, error"),
    "quit": (cmd_quit, "quit", "close this session"),
}


class ConsoleFactory(Factory):
    """Creates :class:`ConsoleProtocol` sessions; ``portal`` None means no login."""

    protocol: Any = ConsoleProtocol
    noisy = False

    def __init__(
        self,
        controller: Controller,
        portal: Portal | None = None,
        log_levels: LogLevels | None = None,
    ) -> None:
        self.controller = controller
        self.portal = portal
        self.log_levels = log_levels or LogLevels()
        self.sessions: set[ConsoleProtocol] = set()


def make_portal(credentials_file: str | Path) -> Portal:
    """A portal checking logins against ``credentials_file``."""
    realm: Any = ConsoleRealm()
    checker: Any = CredentialsFileChecker(credentials_file)
    return Portal(realm, [checker])


def main(argv: list[str] | None = None) -> int:
    """``python -m twinfer.frontends.console USER``: print a credentials line
    (the password is read from stdin)."""
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


if __name__ == "__main__":
    raise SystemExit(main())
