"""One high watermark per replica: loaded from the log's checkpoint, written back by the node, and
set to the log end only when the leader is the whole ISR."""

from __future__ import annotations

from pathlib import Path

from headwater.node.partition import Partition
from headwater.storage import LogStore
from headwater.v1 import batch as batch_codec

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
    p.advance_high_watermark(3)
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
