# Failures that last (a full disk, no descriptors left) are said when they begin and when they end.
# No I/O of its own besides the log: the daemon's retry loops call it around what they try.
"""One log line when a retried operation starts failing, one when it works again.

A disk that stays full, or a descriptor limit that stays reached, makes the
daemon retry the same thing at every flush, check or request: logging each
failure would bury the log (and fill the disk that is already full). Each
operation is named (``"ROTATE pg/wal"``, ``"usage counters"``); its first failure
is logged as an error, later ones are not, and the first success after them is
logged as news.
"""

from __future__ import annotations

import logging
from collections.abc import Collection


class LastingFailures:
    """The named operations whose last try failed, each logged once until it works again."""

    __slots__ = ("_failing", "_log")

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._failing: set[str] = set()

    def failed(self, what: str, message: str) -> None:
        """``what`` failed: log ``message`` as an error unless it was failing already."""
        if what not in self._failing:
            self._failing.add(what)
            self._log.error("%s", message, stacklevel=2)  # (names the caller)

    def worked(self, what: str, message: str) -> None:
        """``what`` worked: log ``message`` if it was failing until now."""
        if what in self._failing:
            self._failing.discard(what)
            self._log.info("%s", message, stacklevel=2)

    def is_failing(self, what: str) -> bool:
        return what in self._failing

    def forget(self, what: str) -> None:
        """Say the next failure of ``what`` again, and no recovery before it."""
        self._failing.discard(what)

    def keep_only(self, names: Collection[str]) -> None:
        """Forget every operation not in ``names`` (say, keys that stopped rotating)."""
        self._failing.intersection_update(names)
