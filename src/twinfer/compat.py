"""The few private Twisted names twinfer cannot avoid, in one place.

Each function here reaches past Twisted's public API because there is no
public way to do what it does; ``tests/test_compat.py`` checks every one of
those names on the installed Twisted (checked with Twisted 26.10.0), so an
upgrade that renames or removes one fails the test suite loudly instead of
silently changing the server's behaviour.  Nothing outside this module may
use a private Twisted attribute.

- :func:`exit_normally`: ``twistd`` re-raises the signal that stopped the
  reactor once it has shut down (``reactor._exitSignal``), so a graceful
  drain after SIGTERM would end with "killed by SIGTERM";
- :func:`twistd_log_observer`: the log observer ``twistd`` would install for
  its own ``--logfile`` / ``--syslog`` / ``--nodaemon`` options
  (``AppLogger._getLogObserver``), so that a level filter can be put in
  front of it through the public ``ILogObserver`` component.

The in-place receive transport (:mod:`twinfer.netutil`) uses only public
names of ``twisted.internet.tcp`` (``Port.transport``, ``Connection.socket``,
``doRead``); the compat test pins those too.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import ILogObserver, LegacyLogObserverWrapper


def exit_normally(reactor: Any) -> None:
    """Make ``twistd`` exit with status 0 even though a signal stopped ``reactor``.

    Called at the end of a finished graceful drain.  A reactor that does not
    record exit signals (a test's ``Clock``) is left alone.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


def twistd_log_observer(twistd_options: Any) -> ILogObserver:
    """The observer ``twistd`` builds from its own options when nothing overrides it.

    ``twistd_options`` is twistd's ``ServerOptions`` (a plugin's options'
    ``parent``).  Called once, before ``twistd`` starts logging; opening the
    log file (and, for a file, the SIGUSR1 rotation handler) happen here.
    """
    from twisted.scripts import twistd

    app_logger = twistd._SomeApplicationRunner.loggerFactory(twistd_options)
    observer = app_logger._getLogObserver()
    if not ILogObserver.providedBy(observer):  # --syslog gives a legacy observer
        observer = LegacyLogObserverWrapper(observer)
    return observer  # type: ignore[no-any-return]
