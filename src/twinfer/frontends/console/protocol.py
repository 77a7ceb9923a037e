"""The console session: a line-based text protocol for ``telnet`` or ``nc``, and its factory.

Served on ``--debug-port`` (loopback only unless a credentials file is
given).  With ``--debug-credentials FILE`` a session starts with a login
checked through a ``twisted.cred`` portal (:mod:`.auth`); without one
(loopback only) the session starts logged in.

Plain lines in, plain text out.  Telnet's commands are removed from the
input before it is split into lines, and an interrupt (Ctrl-C at
``telnet``) or Ctrl-D closes the session; the password prompt turns the
client's echo off and on again (:mod:`.telnet`).  Every reply ends with the
``twinfer> `` prompt.  A line is one command of :data:`.commands.COMMANDS`;
unknown commands and wrong arguments get one line starting with
``error:``, and the session stays open.
"""

from __future__ import annotations

from typing import Any

from twisted.cred import credentials, error
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

import twinfer
from twinfer.errors import TwinferError
from twinfer.frontends.console.auth import ConsoleUser, IConsoleUser
from twinfer.frontends.console.commands import COMMANDS, UsageError
from twinfer.frontends.console.levels import LogLevels
from twinfer.frontends.console.telnet import HIDE_INPUT, SHOW_INPUT, TelnetInput
from twinfer.frontends.console.text import one_line
from twinfer.ops.control import Controller

log = Logger()

PROMPT = b"twinfer> "
#: Failed logins before the connection is closed.
MAX_LOGIN_ATTEMPTS = 3
#: Ctrl-D in a line ends the session (telnet's own interrupts: :mod:`.telnet`).
_END_OF_INPUT = b"\x04"


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
        self.telnet = TelnetInput()

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

    def dataReceived(self, data: bytes) -> None:
        if self.telnet.interrupted:
            return  # closing
        text = self.telnet.feed(data)
        if self.telnet.interrupted:
            self.transport.loseConnection()
            return
        # Even b"": resumeProducing() feeds that to split the lines buffered
        # while paused.
        super().dataReceived(text)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.write(b"error: line too long\r\n")
        self.transport.loseConnection()

    def lineReceived(self, raw: bytes) -> None:
        if _END_OF_INPUT in raw:
            self.transport.loseConnection()
            return
        line = raw.rstrip(b"\r").decode("utf-8", "replace").strip()
        if self.state == "user":
            self.user = line
            self.state = "password"
            self.transport.write(HIDE_INPUT + b"Password: ")
        elif self.state == "password":
            self.transport.write(SHOW_INPUT)
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
