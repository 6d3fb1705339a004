"""The read budget: bytes held for readers are bounded in all and per connection, waiters are
served in order, and a cancelled waiter gives back what it held."""

from __future__ import annotations

import asyncio
import random

import pytest

from headwater.node.flow import ReadBudget


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_requests_are_clipped_to_the_share_and_wait_past_the_total() -> None:
    async def main() -> None:
        b = ReadBudget(total=100, per_connection=40)
        assert await b.acquire("a", 1000) == 40  # clipped to the share
        assert await b.acquire("b", 40) == 40
        third = asyncio.ensure_future(b.acquire("c", 40))  # only 20 left
        await asyncio.sleep(0)
        assert not third.done()
        b.release("a", 40)
        assert await third == 40
        assert b.free == 20 and b.held == {"b": 40, "c": 40}

    run(main())


def test_one_connection_at_its_share_does_not_block_the_others() -> None:
    async def main() -> None:
        b = ReadBudget(total=100, per_connection=30)
        await b.acquire("greedy", 30)
        blocked = asyncio.ensure_future(b.acquire("greedy", 10))
        await asyncio.sleep(0)
        assert not blocked.done()
        # Another connection goes ahead of the greedy one's queued request.
        assert await asyncio.wait_for(b.acquire("polite", 10), 1) == 10
        b.release("greedy", 30)
        assert await blocked == 10

    run(main())


def test_a_cancelled_waiter_leaves_nothing_held() -> None:
    async def main() -> None:
        b = ReadBudget(total=10, per_connection=10)
        await b.acquire("a", 10)
        waiting = asyncio.ensure_future(b.acquire("b", 5))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        b.release("a", 10)
        assert b.free == 10 and b.held == {}
        with pytest.raises(ValueError):
            b.release("a", 1)

    run(main())


@pytest.mark.parametrize("seed", range(20))
def test_random_readers_never_exceed_the_bounds_and_all_finish(seed: int) -> None:
    rng = random.Random(seed)

    async def main() -> None:
        b = ReadBudget(total=1000, per_connection=300)
        peak = {"total": 0, "conn": 0}

        async def reader(conn: str) -> None:
            for _ in range(20):
                async with b.hold(conn, rng.randint(1, 500)):
                    peak["total"] = max(peak["total"], b.total - b.free)
                    peak["conn"] = max(peak["conn"], max(b.held.values()))
                    await asyncio.sleep(rng.random() / 1000)

        await asyncio.wait_for(asyncio.gather(*(reader(f"c{i % 4}") for i in range(12))), 30)
        assert peak["total"] <= 1000 and peak["conn"] <= 300
        assert b.free == 1000 and b.held == {}

    run(main())


def test_a_reader_gets_what_is_left_when_at_least_its_minimum_fits() -> None:
    async def main() -> None:
        b = ReadBudget(total=100, per_connection=50)
        assert await b.acquire("a", 30) == 30
        # 20 left in a's share: a request for 50 with a minimum of 10 gets the 20 at once.
        assert await b.acquire("a", 50, least=10) == 20
        waiting = asyncio.ensure_future(b.acquire("a", 50, least=10))
        await asyncio.sleep(0)
        assert not waiting.done()
        b.release("a", 15)
        assert await waiting == 15

    run(main())
