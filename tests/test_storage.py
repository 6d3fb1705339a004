"""Unit tests of headwater.storage: the partition log in RocksDB, read like a spec."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fill_disk, mounted_tmpfs

from headwater.storage import (
    AppendResult,
    CorruptRecordError,
    InvalidAppendError,
    LogStore,
    LogWriteError,
    OffsetOutOfRangeError,
    PartitionLog,
    StorageError,
)
from headwater.v1 import errors_pb2
from headwater.v1.batch import LOG_APPEND_TIME, RecordBatch, build_batch, crc_is_valid, decode_records

TOPIC = uuid.UUID(int=0xFEED).bytes
OTHER = uuid.UUID(int=0xBEEF).bytes


def batch(*timestamps: int, value: bytes = b"v", key: bytes | None = b"k") -> RecordBatch:
    """A producer's batch: one record per timestamp."""
    return build_batch([(key, value + b"-%d" % i, None, ts) for i, ts in enumerate(timestamps)])


def offsets(raw: list[bytes]) -> list[int]:
    return [RecordBatch.FromString(b).base_offset for b in raw]


def state(p: PartitionLog) -> tuple[object, ...]:
    return (
        p.log_start_offset,
        p.log_end_offset,
        p.size_bytes,
        p.high_watermark,
        p.latest_epoch,
        p.epoch_entries(),
        p.max_timestamp(),
        p.read(p.log_start_offset, 1 << 30),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LogStore]:
    s = LogStore(str(tmp_path / "db"))
    yield s
    s.close()


@pytest.fixture
def log(store: LogStore) -> PartitionLog:
    return store.open_partition(TOPIC, 0)


def fill(log: PartitionLog, sizes: list[int], *, epoch: int = 0, ts0: int = 1_000) -> list[AppendResult]:
    """Append one batch per entry of ``sizes`` (records per batch), timestamps rising by 10 ms."""
    out = []
    ts = ts0
    for n in sizes:
        out.append(log.append(batch(*range(ts, ts + n)), epoch, now_ms=0))
        ts += 10
    return out


# ---------------------------------------------------------------------- append


def test_append_assigns_dense_offsets_and_stamps_only_offset_and_epoch(log: PartitionLog) -> None:
    b1, b2 = batch(10, 11, 12), batch(20)
    records_before = b1.records
    r1 = log.append(b1, 3, now_ms=99)
    r2 = log.append(b2, 3, now_ms=99)
    assert (r1.base_offset, r1.last_offset, r1.max_timestamp_ms) == (0, 2, 12)
    assert (r2.base_offset, r2.last_offset, r2.max_timestamp_ms) == (3, 3, 20)
    assert r1.size_bytes == len(b1.SerializeToString()) and r1.log_start_offset == 0
    assert log.log_end_offset == 4 and log.log_start_offset == 0
    assert log.size_bytes == r1.size_bytes + r2.size_bytes
    stored = RecordBatch.FromString(log.read(0, 1 << 20)[0])
    assert stored.base_offset == 0 and stored.partition_leader_epoch == 3
    assert stored.records == records_before and crc_is_valid(stored)
    assert stored.first_timestamp_ms == 10  # create time kept
    assert [r.offset for r in decode_records(RecordBatch.FromString(log.read(3, 1)[0]))] == [3]


def test_log_append_time_stamps_every_record_with_the_append_time_and_keeps_crc_valid(
    log: PartitionLog,
) -> None:
    log.append(batch(1), 0, now_ms=5)
    sent = batch(100, 103, 101)
    records = sent.records
    r = log.append(sent, 0, now_ms=5_000, log_append_time=True)
    assert r.max_timestamp_ms == 5_000
    stored = RecordBatch.FromString(log.read(1, 1 << 20)[0])
    assert crc_is_valid(stored) and stored.records == records  # stamped, never re-encoded
    assert stored.timestamp_type == LOG_APPEND_TIME
    assert (stored.first_timestamp_ms, stored.max_timestamp_ms) == (5_000, 5_000)
    # As in Kafka: each record reads the batch's max timestamp, whatever its producer-given delta.
    assert [x.timestamp_ms for x in decode_records(stored)] == [5_000, 5_000, 5_000]
    assert log.offset_for_timestamp(4_000) == (1, 5_000)
    assert log.offset_for_timestamp(5_001) is None
    assert log.max_timestamp() == (1, 5_000)


def test_a_producer_batch_that_claims_log_append_time_is_refused(log: PartitionLog) -> None:
    b = batch(10)
    b.timestamp_type = LOG_APPEND_TIME  # not covered by the CRC: the leader's field
    with pytest.raises(
        CorruptRecordError, match=r"batch 0: timestamp_type is 1, expected 0 \(TIMESTAMP_TYPE_CREATE"
    ):
        log.append(b, 0, now_ms=5_000)
    assert log.log_end_offset == 0


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("crc", r"batch 0: crc is 0x[0-9a-f]{8}, expected 0x[0-9a-f]{8} \(CRC32C over the 44-byte header"),
        ("records", "batch 0: crc is "),
        ("timestamp", "batch 0: crc is "),  # the CRC covers max_timestamp_ms
        ("record_count", r"batch 0: record_count is 0, expected at least 1 \(a batch holds"),
        ("last_offset_delta", r"batch 0: last_offset_delta is 5, expected 2 \(record_count - 1\)"),
    ],
)
def test_corrupt_batch_is_refused_and_nothing_is_stored(store: LogStore, breakage: str, message: str) -> None:
    log = store.open_partition(TOPIC, 0)
    fill(log, [2])
    before = state(log)
    bad = batch(50, 51, 52)
    if breakage == "crc":
        bad.crc ^= 1
    elif breakage == "records":
        bad.records = bad.records[:-1] + bytes([bad.records[-1] ^ 0xFF])
    elif breakage == "timestamp":
        bad.max_timestamp_ms += 1
    else:  # header lies, CRC recomputed to match the lie
        from headwater.v1.batch import batch_crc

        if breakage == "record_count":
            bad.record_count = 0
            bad.last_offset_delta = -1
        else:
            bad.last_offset_delta = 5
        bad.crc = batch_crc(bad)
    with pytest.raises(CorruptRecordError, match=message) as info:
        log.append(bad, 0, now_ms=0)
    assert info.value.error_code == errors_pb2.ERROR_CODE_CORRUPT_MESSAGE
    assert state(log) == before
    store.close()
    with LogStore(store.path) as again:
        assert state(again.open_partition(TOPIC, 0)) == before


def test_append_with_an_older_epoch_is_refused(log: PartitionLog) -> None:
    log.append(batch(1), 5, now_ms=0)
    with pytest.raises(InvalidAppendError):
        log.append(batch(2), 4, now_ms=0)
    with pytest.raises(ValueError):
        log.append(batch(2), -1, now_ms=0)
    assert log.log_end_offset == 1 and log.epoch_entries() == [(5, 0)]


def test_append_stamped_stores_the_leaders_bytes_and_requires_the_log_end(
    store: LogStore, log: PartitionLog
) -> None:
    fill(log, [2, 3], epoch=1)
    follower = store.open_partition(TOPIC, 1)
    for raw in log.read(0, 1 << 20):
        follower.append_stamped(RecordBatch.FromString(raw))
    assert follower.read(0, 1 << 20) == log.read(0, 1 << 20)
    assert follower.epoch_entries() == [(1, 0)] and follower.log_end_offset == 5
    wrong_base = batch(1)
    wrong_base.base_offset, wrong_base.partition_leader_epoch = 7, 1
    with pytest.raises(InvalidAppendError):
        follower.append_stamped(wrong_base)
    stale = batch(1)
    stale.base_offset, stale.partition_leader_epoch = 5, 0
    with pytest.raises(InvalidAppendError):
        follower.append_stamped(stale)
    bad = batch(1)
    bad.base_offset, bad.partition_leader_epoch, bad.crc = 5, 2, bad.crc ^ 1
    with pytest.raises(CorruptRecordError, match=r"batch at offset 5: crc is 0x[0-9a-f]{8}, expected 0x"):
        follower.append_stamped(bad)
    assert follower.log_end_offset == 5
    good = batch(1)
    good.base_offset, good.partition_leader_epoch = 5, 2
    assert follower.append_stamped(good).base_offset == 5
    assert follower.epoch_entries() == [(1, 0), (2, 5)]


# ---------------------------------------------------------------------- read


def test_read_returns_the_batch_holding_the_offset_and_what_follows(log: PartitionLog) -> None:
    fill(log, [3, 3, 3])  # batches at 0, 3, 6
    assert offsets(log.read(0, 1 << 20)) == [0, 3, 6]
    assert offsets(log.read(4, 1 << 20)) == [3, 6]
    assert offsets(log.read(8, 1 << 20)) == [6]
    assert log.read(9, 1 << 20) == []


def test_read_stops_at_max_bytes_but_always_returns_a_first_batch(log: PartitionLog) -> None:
    sizes = [r.size_bytes for r in fill(log, [3, 3, 3])]
    assert offsets(log.read(0, 1)) == [0]  # bigger than max_bytes, still returned
    assert offsets(log.read(0, sizes[0] + sizes[1] - 1)) == [0]
    assert offsets(log.read(0, sizes[0] + sizes[1])) == [0, 3]
    assert offsets(log.read(0, 0)) == [0]


def test_read_stops_before_a_batch_reaching_max_offset(log: PartitionLog) -> None:
    fill(log, [3, 3, 3])
    assert offsets(log.read(0, 1 << 20, max_offset=6)) == [0, 3]
    assert offsets(log.read(0, 1 << 20, max_offset=5)) == [0]  # batch 3..5 is not wholly below
    assert log.read(0, 1 << 20, max_offset=2) == []  # not even the first batch
    assert log.read(0, 1 << 20, max_offset=0) == []
    assert offsets(log.read(0, 1 << 20, max_offset=9)) == [0, 3, 6]


def test_read_outside_the_log_raises_offset_out_of_range(log: PartitionLog) -> None:
    fill(log, [3, 3])
    log.delete_before(3)
    with pytest.raises(OffsetOutOfRangeError) as info:
        log.read(2, 100)
    assert info.value.error_code == errors_pb2.ERROR_CODE_OFFSET_OUT_OF_RANGE
    with pytest.raises(OffsetOutOfRangeError):
        log.read(7, 100)
    assert log.read(6, 100) == []
    assert offsets(log.read(3, 100)) == [3]


def test_partitions_do_not_see_each_others_batches(store: LogStore) -> None:
    a, b, c = store.open_partition(TOPIC, 0), store.open_partition(TOPIC, 1), store.open_partition(OTHER, 0)
    fill(a, [1, 1])
    fill(b, [2])
    fill(c, [1, 1, 1])
    assert offsets(a.read(0, 1 << 20)) == [0, 1]
    assert offsets(b.read(0, 1 << 20)) == [0]
    assert offsets(c.read(2, 1 << 20)) == [2]
    assert a.offset_for_timestamp(1_010) == (1, 1_010)
    assert b.offset_for_timestamp(1_002) is None


# ---------------------------------------------------------------------- restart


def test_reopen_rebuilds_identical_state(store: LogStore, tmp_path: Path) -> None:
    log = store.open_partition(TOPIC, 7)
    fill(log, [3, 1, 2], epoch=1)
    fill(log, [2, 2], epoch=4, ts0=500)
    log.delete_before(2)
    log.truncate_to(8)
    log.checkpoint_high_watermark(5)
    log.append(batch(9_000), 6, now_ms=0)
    before = state(log)
    lookups = [log.offset_for_timestamp(ts) for ts in (0, 1_010, 1_020, 9_000, 9_001)]
    epochs = [log.end_offset_for_epoch(e) for e in range(8)]
    store.close()
    with LogStore(store.path) as again:
        reopened = again.open_partition(TOPIC, 7)
        assert state(reopened) == before
        assert [reopened.offset_for_timestamp(ts) for ts in (0, 1_010, 1_020, 9_000, 9_001)] == lookups
        assert [reopened.end_offset_for_epoch(e) for e in range(8)] == epochs
        assert again.list_partitions() == [(TOPIC, 7)]
        assert reopened.append(batch(1), 6, now_ms=0).base_offset == before[1]


def test_open_partition_returns_one_log_per_partition(store: LogStore) -> None:
    assert store.open_partition(TOPIC, 0) is store.open_partition(TOPIC, 0)
    assert store.open_partition(TOPIC, 0) is not store.open_partition(TOPIC, 1)
    with pytest.raises(ValueError):
        store.open_partition(b"short", 0)
    with pytest.raises(ValueError):
        store.open_partition(TOPIC, -1)


def test_closed_store_refuses_use_and_close_is_idempotent(store: LogStore) -> None:
    log = store.open_partition(TOPIC, 0)
    store.close()
    store.close()
    with pytest.raises(StorageError):
        log.read(0, 1)
    with pytest.raises(StorageError):
        log.append(batch(1), 0, now_ms=0)
    with pytest.raises(StorageError):
        store.get_meta(b"x")


_KILL_CHILD = """
import sys, uuid
from headwater.storage import LogStore
from headwater.v1.batch import build_batch
store = LogStore(sys.argv[1])
log = store.open_partition(uuid.UUID(int=0xFEED).bytes, 0)
for i in range(200):
    r = log.append(build_batch([(b"k", b"%d" % i, None, i)]), 0, now_ms=0)
    print(r.base_offset, flush=True)  # acknowledged: the append returned
sys.stdin.read()  # wait for the kill
"""


def test_acknowledged_appends_survive_kill_9(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acked = [int(child.stdout.readline()) for _ in range(200)]
    child.kill()  # SIGKILL: no close, no flush
    child.wait()
    assert child.returncode == -9
    with LogStore(path) as store:
        log = store.open_partition(TOPIC, 0)
        assert log.log_end_offset == acked[-1] + 1 == 200
        values = [
            r.value for raw in log.read(0, 1 << 30) for r in decode_records(RecordBatch.FromString(raw))
        ]
        assert values == [b"%d" % i for i in range(200)]


# ---------------------------------------------------------------------- truncation


def test_truncate_inside_a_batch_removes_the_whole_batch(log: PartitionLog) -> None:
    fill(log, [3, 3, 3], epoch=1)  # 0..2, 3..5, 6..8
    log.checkpoint_high_watermark(9)
    size_first = len(log.read(0, 1)[0])
    log.truncate_to(4)
    assert (log.log_end_offset, log.high_watermark, log.size_bytes) == (3, 3, size_first)
    assert offsets(log.read(0, 1 << 20)) == [0]
    assert log.offset_for_timestamp(1_010) is None and log.max_timestamp() == (2, 1_002)
    assert log.append(batch(5), 1, now_ms=0).base_offset == 3


def test_truncate_at_a_boundary_beyond_the_end_and_below_the_start(log: PartitionLog) -> None:
    fill(log, [3, 3, 3])
    log.truncate_to(6)
    assert log.log_end_offset == 6
    log.truncate_to(100)  # nothing at or after 100
    assert log.log_end_offset == 6
    log.delete_before(4)  # start inside batch 3..5
    log.truncate_to(4)  # removes batch 3..5: the log empties at 3
    assert (log.log_start_offset, log.log_end_offset, log.size_bytes) == (3, 3, 0)
    assert log.read(3, 100) == [] and log.max_timestamp() is None
    with pytest.raises(ValueError):
        log.truncate_to(-1)


def test_truncate_fixes_the_epoch_cache(log: PartitionLog) -> None:
    fill(log, [2], epoch=1)
    fill(log, [2], epoch=3)
    fill(log, [2], epoch=5)
    assert log.epoch_entries() == [(1, 0), (3, 2), (5, 4)]
    log.truncate_to(3)  # inside epoch 3's batch 2..3
    assert log.epoch_entries() == [(1, 0)]
    assert log.end_offset_for_epoch(1) == (1, 2)  # the latest epoch ends at the new log end
    assert log.end_offset_for_epoch(3) == (-1, -1)  # newer than any cached epoch: UNDEFINED
    log.append(batch(1), 6, now_ms=0)
    assert log.epoch_entries() == [(1, 0), (6, 2)]


# ---------------------------------------------------------------------- log start and retention


def test_delete_before_advances_the_start_and_drops_only_whole_batches(log: PartitionLog) -> None:
    results = fill(log, [3, 3, 3])
    assert log.delete_before(4) == 1
    assert log.log_start_offset == 4 and log.high_watermark == 4
    assert log.size_bytes == results[1].size_bytes + results[2].size_bytes
    assert offsets(log.read(4, 1 << 20)) == [3, 6]  # batch 3..5 still served whole
    assert log.delete_before(2) == 0 and log.log_start_offset == 4  # never backwards
    with pytest.raises(OffsetOutOfRangeError):
        log.delete_before(10)
    assert log.delete_before(9) == 2
    assert (log.log_start_offset, log.log_end_offset, log.size_bytes) == (9, 9, 0)
    assert log.append(batch(1), 0, now_ms=0).base_offset == 9


def test_retention_by_time_deletes_expired_batches_from_the_oldest(log: PartitionLog) -> None:
    for ts in (100, 200, 150, 300):  # one batch each, max timestamps
        log.append(batch(ts), 0, now_ms=0)
    assert log.apply_retention(now_ms=1_000, retention_ms=-1, retention_bytes=-1) == 0
    assert log.apply_retention(now_ms=1_000, retention_ms=850, retention_bytes=-1) == 1  # 100 < 150
    assert log.log_start_offset == 1
    # 200 is not expired: retention stops there even though 150 behind it is.
    assert log.apply_retention(now_ms=1_000, retention_ms=801, retention_bytes=-1) == 0
    assert log.apply_retention(now_ms=1_000, retention_ms=750, retention_bytes=-1) == 2
    assert (log.log_start_offset, log.log_end_offset) == (3, 4)
    assert log.apply_retention(now_ms=1_000, retention_ms=0, retention_bytes=-1) == 1
    assert (log.log_start_offset, log.log_end_offset, log.size_bytes) == (4, 4, 0)  # end never moves back
    assert log.read(4, 100) == []
    assert log.append(batch(5), 0, now_ms=0).base_offset == 4


def test_retention_by_bytes_keeps_the_log_within_the_limit(log: PartitionLog) -> None:
    sizes = [r.size_bytes for r in fill(log, [1, 1, 1, 1])]
    assert log.apply_retention(now_ms=0, retention_ms=-1, retention_bytes=sum(sizes)) == 0
    assert log.apply_retention(now_ms=0, retention_ms=-1, retention_bytes=sum(sizes) - 1) == 1
    assert log.size_bytes == sum(sizes[1:]) and log.log_start_offset == 1
    assert log.apply_retention(now_ms=0, retention_ms=-1, retention_bytes=sizes[3]) == 2
    assert (log.log_start_offset, log.size_bytes) == (3, sizes[3])
    assert log.apply_retention(now_ms=0, retention_ms=-1, retention_bytes=0) == 1
    assert (log.log_start_offset, log.log_end_offset, log.size_bytes) == (4, 4, 0)


def test_retention_survives_reopen(store: LogStore) -> None:
    log = store.open_partition(TOPIC, 0)
    fill(log, [2, 2, 2])
    log.apply_retention(now_ms=0, retention_ms=-1, retention_bytes=1)
    store.close()
    with LogStore(store.path) as again:
        log = again.open_partition(TOPIC, 0)
        assert (log.log_start_offset, log.log_end_offset, log.size_bytes) == (6, 6, 0)
        with pytest.raises(OffsetOutOfRangeError):
            log.read(0, 100)


# ---------------------------------------------------------------------- leader-epoch cache


def test_epoch_cache_records_the_start_of_each_new_epoch(log: PartitionLog) -> None:
    assert log.epoch_entries() == [] and log.latest_epoch == -1
    assert log.end_offset_for_epoch(0) == (-1, -1)
    fill(log, [2, 2], epoch=2)  # 0..3
    fill(log, [3], epoch=4)  # 4..6
    fill(log, [1], epoch=7)  # 7
    assert log.epoch_entries() == [(2, 0), (4, 4), (7, 7)] and log.latest_epoch == 7
    assert log.end_offset_for_epoch(2) == (2, 4)
    assert log.end_offset_for_epoch(3) == (2, 4)  # largest epoch <= 3 is 2
    assert log.end_offset_for_epoch(4) == (4, 7)
    assert log.end_offset_for_epoch(6) == (4, 7)
    assert log.end_offset_for_epoch(7) == (7, 8)  # the latest ends at the log end
    assert log.end_offset_for_epoch(9) == (-1, -1)  # newer than the latest: UNDEFINED, as in Kafka
    assert log.end_offset_for_epoch(1) == (1, 0)  # below the earliest: the earliest's start
    assert log.end_offset_for_epoch(-1) == (-1, -1)


def test_epoch_cache_follows_the_log_start(log: PartitionLog) -> None:
    fill(log, [2], epoch=1)  # 0..1
    fill(log, [2], epoch=2)  # 2..3
    fill(log, [2], epoch=3)  # 4..5
    log.delete_before(3)
    assert log.epoch_entries() == [(2, 3), (3, 4)]  # epoch 1 gone, epoch 2 starts at the log start
    assert log.end_offset_for_epoch(1) == (1, 3)  # older than the cache: bounded by its first start
    log.apply_retention(now_ms=0, retention_ms=-1, retention_bytes=0)  # empties the log
    assert log.epoch_entries() == [(3, 6)]
    assert log.end_offset_for_epoch(3) == (3, 6)
    log.append(batch(1), 4, now_ms=0)  # epoch 3 holds no record any more: epoch 4 replaces it
    assert log.epoch_entries() == [(4, 6)]


# ---------------------------------------------------------------------- timestamps


def test_offset_for_timestamp_finds_the_first_record_at_or_after(log: PartitionLog) -> None:
    log.append(batch(100, 130, 110), 0, now_ms=0)  # 0..2
    log.append(batch(120, 125), 0, now_ms=0)  # 3..4: max 125 does not raise the max, not indexed
    log.append(batch(90, 200, 140), 0, now_ms=0)  # 5..7
    assert log.offset_for_timestamp(0) == (0, 100)
    assert log.offset_for_timestamp(100) == (0, 100)
    assert log.offset_for_timestamp(101) == (1, 130)
    assert log.offset_for_timestamp(130) == (1, 130)
    assert log.offset_for_timestamp(131) == (6, 200)
    assert log.offset_for_timestamp(200) == (6, 200)
    assert log.offset_for_timestamp(201) is None
    assert log.max_timestamp() == (6, 200)


def test_offset_for_timestamp_after_deleting_the_batch_that_shadowed_others(log: PartitionLog) -> None:
    log.append(batch(500), 0, now_ms=0)  # 0: a far-future timestamp shadows the next batches
    log.append(batch(100), 0, now_ms=0)  # 1
    log.append(batch(300), 0, now_ms=0)  # 2
    log.append(batch(200), 0, now_ms=0)  # 3
    log.append(batch(600), 0, now_ms=0)  # 4
    assert log.offset_for_timestamp(150) == (0, 500)
    log.delete_before(1)
    assert log.offset_for_timestamp(150) == (2, 300)
    assert log.offset_for_timestamp(50) == (1, 100)
    assert log.offset_for_timestamp(301) == (4, 600)
    assert log.max_timestamp() == (4, 600)
    log.truncate_to(4)
    assert log.max_timestamp() == (2, 300)
    assert log.offset_for_timestamp(301) is None


def test_offset_for_timestamp_skips_records_below_the_log_start(log: PartitionLog) -> None:
    log.append(batch(100, 200, 300), 0, now_ms=0)
    log.delete_before(2)
    assert log.offset_for_timestamp(0) == (2, 300)
    assert log.offset_for_timestamp(301) is None


def test_timestamps_on_an_empty_log(log: PartitionLog) -> None:
    assert log.offset_for_timestamp(0) is None and log.max_timestamp() is None


# ---------------------------------------------------------------------- high watermark


def test_high_watermark_checkpoint_persists_and_stays_inside_the_log(store: LogStore) -> None:
    log = store.open_partition(TOPIC, 0)
    fill(log, [2, 2])
    assert log.high_watermark == 0
    log.checkpoint_high_watermark(4)
    with pytest.raises(ValueError):
        log.checkpoint_high_watermark(5)
    store.close()
    with LogStore(store.path) as again:
        log = again.open_partition(TOPIC, 0)
        assert log.high_watermark == 4
        log.delete_before(1)
        with pytest.raises(ValueError):
            log.checkpoint_high_watermark(0)


# ---------------------------------------------------------------------- store


def test_list_and_delete_partitions(store: LogStore) -> None:
    for tid, n in ((OTHER, 1), (TOPIC, 0), (TOPIC, 2)):
        fill(store.open_partition(tid, n), [1, 1])
    doomed = store.open_partition(TOPIC, 0)
    assert store.list_partitions() == sorted([(OTHER, 1), (TOPIC, 0), (TOPIC, 2)])
    store.delete_partition(TOPIC, 0)
    store.delete_partition(TOPIC, 9)  # never existed: nothing to do
    assert store.list_partitions() == sorted([(OTHER, 1), (TOPIC, 2)])
    with pytest.raises(StorageError):
        doomed.read(0, 1)
    fresh = store.open_partition(TOPIC, 0)
    assert (fresh.log_end_offset, fresh.size_bytes, fresh.epoch_entries()) == (0, 0, [])
    assert fresh.offset_for_timestamp(0) is None
    assert offsets(store.open_partition(TOPIC, 2).read(0, 1 << 20)) == [0, 1]


def test_catalog_namespace(store: LogStore) -> None:
    fill(store.open_partition(TOPIC, 0), [1])
    store.put_meta(b"topic/b", b"2")
    store.put_meta(b"topic/a", b"1")
    store.put_meta(b"other", b"x")
    assert store.get_meta(b"topic/a") == b"1" and store.get_meta(b"nope") is None
    assert list(store.iter_meta(b"topic/")) == [(b"topic/a", b"1"), (b"topic/b", b"2")]
    assert len(list(store.iter_meta(b""))) == 3  # no partition metadata leaks in
    store.delete_meta(b"topic/a")
    store.delete_meta(b"never")
    assert list(store.iter_meta(b"topic/")) == [(b"topic/b", b"2")]
    assert store.list_partitions() == [(TOPIC, 0)]
    store.close()
    with LogStore(store.path) as again:
        assert again.get_meta(b"topic/b") == b"2" and again.get_meta(b"topic/a") is None


def test_concurrent_appends_and_reads_keep_offsets_dense(log: PartitionLog) -> None:
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(100):
                log.append(batch(i, i), 0, now_ms=0)
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        try:
            for _ in range(200):
                raw = log.read(log.log_start_offset, 1 << 20)
                assert offsets(raw) == list(range(0, 2 * len(raw), 2))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(3)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert log.log_end_offset == 600
    assert offsets(log.read(0, 1 << 30)) == list(range(0, 600, 2))


# ---------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs."""
    with mounted_tmpfs(tmp_path / "disk", "16m") as mountpoint:
        yield mountpoint


def test_full_disk_fails_the_write_keeps_the_log_readable_and_writes_resume(small_disk: Path) -> None:
    payload = os.urandom(32 * 1024)
    store = LogStore(str(small_disk / "db"))
    try:
        log = store.open_partition(TOPIC, 0)
        for _ in range(10):
            log.append(batch(1, value=payload), 0, now_ms=0)
        store.put_meta(b"topic", b"t")
        before = state(log)
        fill_disk(small_disk / "filler")

        b = batch(2, value=payload)
        crc = b.crc
        with pytest.raises(LogWriteError) as info:
            log.append(b, 1, now_ms=0, log_append_time=True)
        assert info.value.retriable and info.value.error_code == errors_pb2.ERROR_CODE_STORAGE_ERROR
        assert (b.base_offset, b.crc) == (0, crc)  # the caller's batch is as it was
        assert state(log) == before  # memory untouched, log readable
        with pytest.raises(LogWriteError):
            store.recover()  # still full: reopening fails, reads go on
        with pytest.raises(LogWriteError):
            log.append(batch(3), 1, now_ms=0)
        with pytest.raises(LogWriteError):
            log.truncate_to(0)
        assert state(log) == before and store.get_meta(b"topic") == b"t"

        (small_disk / "filler").unlink()
        r = log.append(batch(4, value=payload), 1, now_ms=0)  # recovers by itself
        assert r.base_offset == before[1]
        assert offsets(log.read(0, 1 << 30))[-1] == r.base_offset
        assert log.epoch_entries() == [(0, 0), (1, r.base_offset)]
    finally:
        store.close()
    with LogStore(str(small_disk / "db")) as again:
        log = again.open_partition(TOPIC, 0)
        assert log.log_end_offset == before[1] + 1
        assert again.get_meta(b"topic") == b"t"


def test_explicit_recover_reopens_after_space_returns(small_disk: Path) -> None:
    with LogStore(str(small_disk / "db")) as store:
        log = store.open_partition(TOPIC, 0)
        fill(log, [2, 2])
        fill_disk(small_disk / "filler")
        with pytest.raises(LogWriteError):
            for _ in range(1000):  # the WAL may have a little room left
                log.append(batch(1, value=os.urandom(8192)), 0, now_ms=0)
        end = log.log_end_offset
        (small_disk / "filler").unlink()
        store.recover()
        assert log.log_end_offset == end  # reloaded from the database
        assert log.append(batch(1), 0, now_ms=0).base_offset == end


def test_retention_and_truncation_over_many_batches(log: PartitionLog) -> None:
    sizes = [log.append(batch(1_000 - i % 7), 0, now_ms=0).size_bytes for i in range(700)]
    assert log.apply_retention(now_ms=0, retention_ms=-1, retention_bytes=sum(sizes[550:])) == 550
    assert (log.log_start_offset, log.size_bytes) == (550, sum(sizes[550:]))
    # batch 550 has timestamp 1000 - 550 % 7 = 997; the first 1000 is at 553
    assert log.offset_for_timestamp(998) == (553, 1_000)
    assert log.max_timestamp() == (553, 1_000)
    log.truncate_to(600)
    assert (log.log_end_offset, log.size_bytes) == (600, sum(sizes[550:600]))
    assert log.apply_retention(now_ms=10_000, retention_ms=8_999, retention_bytes=-1) == 50
    assert (log.log_start_offset, log.log_end_offset, log.size_bytes) == (600, 600, 0)
