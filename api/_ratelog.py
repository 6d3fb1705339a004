"""Log lines that a flood of requests can cause, at a bounded rate.

A warning per refused request lets whoever can send requests fill the node's disk with log lines.
``RateLimitedLog`` writes the first line of a kind at once, then at most one line per kind and
interval, each saying how many of its kind were left out since the last one written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most one line per key per ``interval_s`` on ``logger``; the clock is an input.

    Keys are the kinds of event (``("refused", "RegisterNode")``), never per-caller values, so that
    the table of keys stays small; past ``max_keys`` kinds the table starts over."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        assert interval_s >= 0 and max_keys > 0
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._max_keys = max_keys
        # key -> (time of the last line written, lines left out since)
        self._last: dict[Hashable, tuple[float, int]] = {}

    def log(self, level: int, key: Hashable, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Write ``msg % args`` unless a line of ``key`` was written less than the interval ago;
        returns whether it was written."""
        if not self._logger.isEnabledFor(level):
            return False
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        if last is None and len(self._last) >= self._max_keys:
            self._last.clear()
        self._last[key] = (now, 0)
        if last is not None and last[1]:
            msg = f"{msg} (and {last[1]} more like it in the last {now - last[0]:.0f} s)"
        self._logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def exception(self, key: Hashable, msg: str, *args: object) -> bool:
        """An ERROR with the traceback of the exception being handled."""
        return self.log(logging.ERROR, key, msg, *args, exc_info=True)
