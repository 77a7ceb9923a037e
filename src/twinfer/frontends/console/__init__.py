"""The operators' debug console: a line protocol for ``telnet`` or ``nc``.

The package, one module per job:

* :mod:`.protocol`: the session (login, then one command per line) and its factory;
* :mod:`.commands`: every command and the table that names them;
* :mod:`.auth`: password hashes, the credentials file, the ``twisted.cred``
  realm and portal, and ``python -m twinfer.frontends.console USER``
  (:mod:`.__main__`) to make a credentials line;
* :mod:`.levels`: the log-level filter the ``loglevel`` command sets;
* :mod:`.telnet`: the bits of telnet a line protocol needs (the password's
  echo, the client's commands dropped from the input);
* :mod:`.text`: tables and numbers as text.

What other modules use is re-exported here.
"""

from twinfer.frontends.console.auth import (
    ConsoleRealm,
    ConsoleUser,
    CredentialsFileChecker,
    IConsoleUser,
    hash_password,
    main,
    make_portal,
    read_credentials,
    verify_password,
)
from twinfer.frontends.console.commands import COMMANDS, UsageError
from twinfer.frontends.console.levels import LogLevels
from twinfer.frontends.console.protocol import (
    MAX_LOGIN_ATTEMPTS,
    PROMPT,
    ConsoleFactory,
    ConsoleProtocol,
)
from twinfer.frontends.console.text import duration, ms, one_line, table

__all__ = [
    "COMMANDS",
    "MAX_LOGIN_ATTEMPTS",
    "PROMPT",
    "ConsoleFactory",
    "ConsoleProtocol",
    "ConsoleRealm",
    "ConsoleUser",
    "CredentialsFileChecker",
    "IConsoleUser",
    "LogLevels",
    "UsageError",
    "duration",
    "hash_password",
    "main",
    "make_portal",
    "ms",
    "one_line",
    "read_credentials",
    "table",
    "verify_password",
]
