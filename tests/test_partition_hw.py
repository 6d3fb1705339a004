"""One high watermark per replica: loaded from the log's checkpoint, written back by the node; on a
leader, moved by its followers' fetches (the smallest log end over the ISR), at once to the log end
only when the leader is the whole ISR."""

from __future__ import annotations

import asyncio
from pathlib import Path

from headwater.node.broker import PendingProduce
from headwater.node.partition import Partition
from headwater.storage import LogStore
from headwater.v1 import batch as batch_codec
from headwater.v1 import client_pb2 as pb
from headwater.v1 import errors_pb2 as E

TID = b"\x07" * 16
NOW = 1_700_000_000_000


def _filled(tmp_path: Path, records: int) -> tuple[LogStore, Partition]:
    store = LogStore(str(tmp_path / "log"))
    p = Partition("t", TID, 0, store.open_partition(TID, 0), node_id=1)
    for i in range(records):
        p.log.append(batch_codec.build_batch([(None, b"v%d" % i, None, NOW)]), 0, now_ms=NOW)
    return store, p


def test_the_high_watermark_is_checkpointed_and_loaded_back(tmp_path: Path) -> None:
    store, p = _filled(tmp_path, 5)
    assert p.high_watermark == 0  # nothing committed yet: the checkpoint of a new log
    p.follow(1, 1, 1, (1, 2, 3), (1, 2, 3))  # leader with followers in the ISR: no jump to the end
    assert p.high_watermark == 0
    fetch = {"current_leader_epoch": 1, "last_fetched_epoch": 0, "now_ms": 10}
    p.on_follower_fetch(2, 4, **fetch)
    assert p.high_watermark == 0  # follower 3 has not fetched: it may hold nothing
    p.on_follower_fetch(3, 3, **fetch)
    assert p.high_watermark == 3  # the smallest log end over the ISR
    p.checkpoint_high_watermark(sync=True)
    store.close()
    store = LogStore(str(tmp_path / "log"))
    try:
        again = Partition("t", TID, 0, store.open_partition(TID, 0), node_id=1)
        assert again.high_watermark == 3 and again.log.log_end_offset == 5
        # The leader alone in the ISR: everything it holds is in every in-sync replica's log.
        again.follow(1, 2, 2, (1,), (1,))
        assert again.high_watermark == 5
    finally:
        store.close()


def test_a_follower_keeps_the_checkpoint_and_never_jumps_to_its_log_end(tmp_path: Path) -> None:
    store, p = _filled(tmp_path, 4)
    try:
        p.advance_high_watermark(2)
        p.follow(2, 1, 1, (2, 1), (2, 1))
        assert p.high_watermark == 2
        p.checkpoint_high_watermark()
        assert p.log.high_watermark == 2
    finally:
        store.close()


def test_acks_all_waiters_are_released_by_the_high_watermark_or_failed_by_a_leader_change(
    tmp_path: Path,
) -> None:
    store, p = _filled(tmp_path, 6)

    async def main() -> None:
        p.follow(1, 1, 1, (1, 2), (1, 2))  # a follower in the ISR: the high watermark stays put
        done = p.wait_for_commit(0)
        assert done.done() and done.result() == E.ERROR_CODE_NONE
        w3, w5, w6 = p.wait_for_commit(3), p.wait_for_commit(5), p.wait_for_commit(6)
        p.on_follower_fetch(2, 5, current_leader_epoch=1, last_fetched_epoch=0, now_ms=10)
        assert p.high_watermark == 5
        assert w3.result() == E.ERROR_CODE_NONE and w5.result() == E.ERROR_CODE_NONE
        assert not w6.done()
        # min_insync_replicas=2 and then the ISR shrinks to the leader alone: the write reached it,
        # but not min_insync_replicas members.
        w6b = p.wait_for_commit(6, 2)
        p.follow(1, 1, 2, (1, 2), (1,))
        assert w6.result() == E.ERROR_CODE_NONE and p.high_watermark == 6
        assert w6b.result() == E.ERROR_CODE_NOT_ENOUGH_REPLICAS_AFTER_APPEND
        w7 = p.wait_for_commit(6)
        assert w7.result() == E.ERROR_CODE_NONE
        p.follow(1, 1, 3, (1, 2), (1, 2))  # the follower is back in the ISR
        p.log.append(batch_codec.build_batch([(None, b"late", None, NOW)]), 1, now_ms=NOW)
        p.on_append(7)
        assert p.high_watermark == 6
        w8 = p.wait_for_commit(7)
        cancelled = p.wait_for_commit(7)
        cancelled.cancel()
        await asyncio.sleep(0)  # the done callback forgets the cancelled waiter
        assert p.state is not None and p.state.ack_waiter_count == 1
        p.follow(2, 2, 3, (1, 2), (1, 2))  # another leader now: this one cannot vouch for offset 7
        assert w8.result() == E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER and p.state is None

    try:
        asyncio.run(main())
    finally:
        store.close()


def test_a_pending_produce_answers_timed_out_when_its_commit_does_not_come() -> None:
    async def main() -> None:
        resp = pb.ProduceResponse()
        pr = resp.topics.add(topic="t").partitions.add(partition=0, base_offset=7)
        pending = PendingProduce(resp, timeout_s=0.05)
        never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        pending.waits.append((pr, never))
        out = await pending.settle()
        assert out.topics[0].partitions[0].error_code == E.ERROR_CODE_REQUEST_TIMED_OUT
        assert "timeout_ms=50" in out.topics[0].partitions[0].error_message and never.cancelled()

        resp2 = pb.ProduceResponse()
        pr2 = resp2.topics.add(topic="t").partitions.add(partition=0)
        moved: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        moved.set_result(E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER)
        pending2 = PendingProduce(resp2, timeout_s=5)
        pending2.waits.append((pr2, moved))
        answer = (await pending2.settle()).topics[0].partitions[0]
        assert answer.error_code == E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER

    asyncio.run(main())
