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
        # Waiters by connection, each queue in arrival order; connections in turn (a connection
        # served goes to the back). Waking costs one look per connection, not one per waiter.
        self._queues: dict[str, deque[_Waiter]] = {}

    def _room(self, key: str) -> int:
        return min(self.free, self.per_connection - self.held.get(key, 0))

    def _take(self, key: str, size: int) -> None:
        self.free -= size
        self.held[key] = self.held.get(key, 0) + size

    async def acquire(self, key: str, size: int, least: int | None = None) -> int:
        """Wait until at least ``least`` bytes (default ``size``) fit, take up to ``size`` and
        return how many. One connection's waiters are served in order; waiting connections take
        turns, and one at its share lets the others go first."""
        size = max(1, min(size, self.per_connection))
        least = size if least is None else max(1, min(least, size))
        if key not in self._queues and self._room(key) >= least:
            granted = min(size, self._room(key))
            self._take(key, granted)
            return granted
        waiter = _Waiter(key, size, least, asyncio.get_running_loop().create_future())
        self._queues.setdefault(key, deque()).append(waiter)
        self._wake()  # it may go ahead of waiters whose connections are at their share
        try:
            return await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(key, waiter.future.result())  # granted as it was cancelled: give back
            else:
                queue = self._queues.get(key)
                if queue is not None:
                    with contextlib.suppress(ValueError):
                        queue.remove(waiter)
                    if not queue:
                        del self._queues[key]
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
        """Serve each waiting connection's queue in order, as far as its share and the budget
        allow; the connections are visited in turn, and each goes to the back once visited."""
        for key in list(self._queues):
            if self.free <= 0:
                return
            queue = self._queues.pop(key)
            while queue:
                w = queue[0]
                if w.future.done():  # cancelled while queued
                    queue.popleft()
                    continue
                room = self._room(key)
                if room < w.least:
                    break  # this connection is at its share, or the budget is short
                queue.popleft()
                granted = min(w.size, room)
                self._take(key, granted)
                w.future.set_result(granted)
            if queue:
                self._queues[key] = queue

    @contextlib.asynccontextmanager
    async def hold(self, key: str, size: int) -> AsyncIterator[int]:
        """``acquire`` for the body of a ``with``, released after it."""
        granted = await self.acquire(key, size)
        try:
            yield granted
        finally:
            self.release(key, granted)
