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
    future: asyncio.Future[None]


class ReadBudget:
    """``total`` bytes for all readers; ``per_connection`` bytes for the readers of one connection
    (``key``). A request for more than ``per_connection`` is clipped to it: ``acquire`` returns the
    bytes granted, and the reader reads no more than that."""

    def __init__(self, total: int, per_connection: int) -> None:
        if total <= 0 or not 0 < per_connection <= total:
            raise ValueError("need 0 < per_connection <= total")
        self.total = total
        self.per_connection = per_connection
        self.free = total
        self.held: dict[str, int] = {}
        self._waiters: deque[_Waiter] = deque()

    def _fits(self, key: str, size: int) -> bool:
        return size <= self.free and self.held.get(key, 0) + size <= self.per_connection

    def _take(self, key: str, size: int) -> None:
        self.free -= size
        self.held[key] = self.held.get(key, 0) + size

    async def acquire(self, key: str, size: int) -> int:
        """Wait until ``size`` bytes (at least 1, at most ``per_connection``) fit, take them and
        return how many. Waiters are served in order, except that one whose connection is at its
        share lets the next go first."""
        size = max(1, min(size, self.per_connection))
        if not self._waiters and self._fits(key, size):
            self._take(key, size)
            return size
        waiter = _Waiter(key, size, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._wake()  # it may go ahead of waiters whose connections are at their share
        try:
            await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(key, size)  # granted as it was cancelled: hand the bytes back
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        return size

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
            if w.size > self.free:
                break  # in order: a smaller request behind does not overtake a large one
            if w.key in blocked or not self._fits(w.key, w.size):
                blocked.add(w.key)  # this connection is at its share; others may go
                continue
            self._waiters.remove(w)
            self._take(w.key, w.size)
            w.future.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, key: str, size: int) -> AsyncIterator[int]:
        """``acquire`` for the body of a ``with``, released after it."""
        granted = await self.acquire(key, size)
        try:
            yield granted
        finally:
            self.release(key, granted)
