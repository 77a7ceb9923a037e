"""The log-level filter in front of twistd's log observer (set by the ``loglevel`` command)."""

from __future__ import annotations

from typing import Any

from twisted.logger import FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate


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
