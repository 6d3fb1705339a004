"""One budget for the bytes a node holds for its readers, with a share per connection.

Every Subscribe stream and Fetch takes bytes from ``ReadBudget`` before it reads from the log and
gives them back once its answer has gone out. So the memory that readers hold together is bounded
however many of them there are and however slowly they read: past the bound a reader waits for its
turn, in arrival order, instead of the node reading more. One connection may hold at most
``per_connection`` of it, so a single client that never reads cannot lock every other reader out.

The budget is plain bookkeeping on the event loop (no thread, no clock); callers add their own
timeouts (``asyncio.wait_for``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

__all__ = ["ReadBudget"]


@dataclass(slots=True)
class _Waiter:
    key: str
    size: int
    least: int
    future: asyncio.Future[int]


class ReadBudget:
    """``total`` bytes for all readers; ``per_connection`` bytes for the readers of one connection
    (``key``). ``acquire`` grants between ``least`` and ``size`` bytes (both clipped to
    ``per_connection``) and returns how many: the reader reads no more than that."""

    def __init__(self, total: int, per_connection: int) -> None:
        if total <= 0 or not 0 < per_connection <= total:
            raise ValueError("need 0 < per_connection <= total")
        self.total = total
        self.per_connection = per_connection
        self.free = total
        self.held: dict[str, int] = {}
        self._waiters: deque[_Waiter] = deque()

    def _room(self, key: str) -> int:
        return min(self.free, self.per_connection - self.held.get(key, 0))

    def _take(self, key: str, size: int) -> None:
        self.free -= size
        self.held[key] = self.held.get(key, 0) + size

    async def acquire(self, key: str, size: int, least: int | None = None) -> int:
        """Wait until at least ``least`` bytes (default ``size``) fit, take up to ``size`` and
        return how many. Waiters are served in order, except that one whose connection is at its
        share lets the next go first."""
        size = max(1, min(size, self.per_connection))
        least = size if least is None else max(1, min(least, size))
        if not self._waiters and self._room(key) >= least:
            granted = min(size, self._room(key))
            self._take(key, granted)
            return granted
        waiter = _Waiter(key, size, least, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._wake()  # it may go ahead of waiters whose connections are at their share
        try:
            return await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(key, waiter.future.result())  # granted as it was cancelled: give back
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self, key: str, size: int) -> None:
        """Give back ``size`` bytes taken for ``key`` and wake the waiters that now fit."""
        if size <= 0:
            return
        left = self.held.get(key, 0) - size
        if left < 0:
            raise ValueError(f"releasing {size} bytes for {key!r}, which holds {self.held.get(key, 0)}")
        if left:
            self.held[key] = left
        else:
            self.held.pop(key, None)
        self.free += size
        self._wake()

    def _wake(self) -> None:
        blocked: set[str] = set()
        for w in list(self._waiters):
            if w.future.done():
                self._waiters.remove(w)
                continue
            if w.least > self.free:
                break  # in order: a smaller request behind does not overtake a large one
            room = self._room(w.key)
            if w.key in blocked or room < w.least:
                blocked.add(w.key)  # this connection is at its share; others may go
                continue
            self._waiters.remove(w)
            granted = min(w.size, room)
            self._take(w.key, granted)
            w.future.set_result(granted)

    @contextlib.asynccontextmanager
    async def hold(self, key: str, size: int) -> AsyncIterator[int]:
        """``acquire`` for the body of a ``with``, released after it."""
        granted = await self.acquire(key, size)
        try:
            yield granted
        finally:
            self.release(key, granted)
