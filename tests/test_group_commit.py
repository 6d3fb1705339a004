"""Group commit: every caller waits for a sync that started after it called, and concurrent
callers share syncs."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from headwater.node.group_commit import GroupCommit


def test_concurrent_callers_share_syncs_and_each_waits_for_one_that_started_after_it() -> None:
    started: list[float] = []
    lock = threading.Lock()

    def slow_sync() -> None:
        with lock:
            started.append(time.monotonic())
        time.sleep(0.02)

    gc = GroupCommit(slow_sync)

    async def caller(delay: float) -> tuple[float, float]:
        await asyncio.sleep(delay)
        called = time.monotonic()
        await gc.sync()
        return called, time.monotonic()

    async def main() -> list[tuple[float, float]]:
        return await asyncio.gather(*(caller(i * 0.001) for i in range(50)))

    try:
        calls = asyncio.run(main())
    finally:
        gc.close()
    assert gc.syncs == len(started)
    assert 1 <= gc.syncs <= 10, gc.syncs  # 50 callers, ~50 ms of calls, 20 ms syncs
    for called, done in calls:
        # Some sync started after the call and finished before the caller went on.
        assert any(called <= s and s + 0.02 <= done + 1e-3 for s in started), (called, done, started)


def test_a_failed_sync_fails_its_callers_and_the_next_sync_is_tried_afresh() -> None:
    outcomes = iter([OSError("disk gone"), None])

    def flaky_sync() -> None:
        err = next(outcomes)
        if err is not None:
            raise err

    gc = GroupCommit(flaky_sync)

    async def main() -> None:
        with pytest.raises(OSError, match="disk gone"):
            await gc.sync()
        await gc.sync()

    try:
        asyncio.run(main())
    finally:
        gc.close()
    assert gc.syncs == 1
