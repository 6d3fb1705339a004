"""What a follower and a leader need from storage (KIP-101/279/320/595), read like a spec.

The follower copies the leader's batches verbatim, truncates where its log diverged, restarts at the
leader's log start when it fell behind it; the leader answers "where did this epoch end" from its
leader-epoch cache; both keep a high-watermark checkpoint; a crash at any point (``kill -9``, writes
not synced) leaves a log equal to the one before or after the step it interrupted.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_storage_model import Model, ModelBatch

from headwater.storage import (
    UNDEFINED_EPOCH,
    UNDEFINED_EPOCH_OFFSET,
    CorruptRecordError,
    InvalidAppendError,
    LogStore,
    PartitionLog,
    StorageError,
)
from headwater.v1 import records_pb2, replication_pb2
from headwater.v1.batch import RecordBatch, batch_crc, build_batch, crc_is_valid, encode_varint

TOPIC = uuid.UUID(int=0xF011).bytes
UNDEFINED = (UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LogStore]:
    s = LogStore(str(tmp_path / "db"))
    yield s
    s.close()


def batch(n: int, *, ts: int = 1_000) -> RecordBatch:
    return build_batch([(b"k", b"v%d" % i, None, ts + i) for i in range(n)])


def stamped(base: int, epoch: int, n: int = 2) -> RecordBatch:
    """A batch as a leader stamped it."""
    b = batch(n)
    b.base_offset, b.partition_leader_epoch = base, epoch
    return b


def lead(log: PartitionLog, epochs_and_sizes: list[tuple[int, int]]) -> None:
    for epoch, n in epochs_and_sizes:
        log.append(batch(n), epoch, now_ms=0)


def copy_of(raw: list[bytes]) -> list[RecordBatch]:
    """What a follower gets from the leader: its stored batches, parsed."""
    return [RecordBatch.FromString(b) for b in raw]


def state(log: PartitionLog) -> tuple[object, ...]:
    return (
        log.log_start_offset,
        log.log_end_offset,
        log.size_bytes,
        log.high_watermark,
        log.epoch_entries(),
        log.read(log.log_start_offset, 1 << 30),
    )


def assert_consistent(log: PartitionLog) -> None:
    """The invariants of a log, from its batches alone: dense offsets up to the log end, the size, CRCs,
    every batch's epoch is the epoch the cache names for its first offset, the high watermark inside."""
    start, end = log.log_start_offset, log.log_end_offset
    assert 0 <= start <= log.high_watermark <= end
    raw = log.read(start, 1 << 30)
    assert sum(map(len, raw)) == log.size_bytes
    assert (raw == []) == (start == end)
    epochs = log.epoch_entries()
    assert all(e1 < e2 and s1 < s2 for (e1, s1), (e2, s2) in zip(epochs, epochs[1:], strict=False))
    next_offset = None
    for b in copy_of(raw):
        assert crc_is_valid(b)
        assert next_offset is None or b.base_offset == next_offset
        next_offset = b.base_offset + b.last_offset_delta + 1
        first = max(b.base_offset, start)
        covering = [e for e, s in epochs if s <= first]
        assert covering and covering[-1] == b.partition_leader_epoch, (b.base_offset, epochs)
    assert next_offset in (None, end)


# ---------------------------------------------------------------------- the follower's append


def test_a_follower_stores_the_leaders_batches_verbatim_with_the_leaders_offsets_and_epochs(
    store: LogStore,
) -> None:
    leader = store.open_partition(TOPIC, 0)
    lead(leader, [(1, 2)])
    zstd = build_batch([(b"k", b"z" * 50, None, 2_000)] * 3, records_pb2.COMPRESSION_TYPE_ZSTD)
    leader.append(zstd, 1, now_ms=0)  # 2..4
    leader.append(batch(1), 4, now_ms=9_000, log_append_time=True)  # 5: the leader's clock, new CRC
    lead(leader, [(6, 2)])
    follower = store.open_partition(TOPIC, 1)
    raw = leader.read(0, 1 << 30)
    results = follower.append_replicated(copy_of(raw[:3]))
    assert [(r.base_offset, r.last_offset) for r in results] == [(0, 1), (2, 4), (5, 5)]
    follower.append_replicated(copy_of(raw[3:]))
    assert follower.read(0, 1 << 30) == raw  # byte for byte
    assert follower.epoch_entries() == leader.epoch_entries() == [(1, 0), (4, 5), (6, 6)]
    assert follower.log_end_offset == leader.log_end_offset == 8
    assert follower.size_bytes == leader.size_bytes
    for epoch in range(-1, 8):
        assert follower.end_offset_for_epoch(epoch) == leader.end_offset_for_epoch(epoch)
    assert_consistent(follower)


def test_stored_batches_join_a_replicate_response_and_reach_the_follower_byte_for_byte(
    store: LogStore,
) -> None:
    leader = store.open_partition(TOPIC, 0)
    lead(leader, [(2, 3), (2, 1), (5, 2)])
    raw = leader.read(0, 1 << 30)
    header = replication_pb2.ReplicatePartitionResponse(
        topic_id=TOPIC, partition=0, high_watermark=4, log_start_offset=0, log_end_offset=6
    )
    # The leader appends its stored bytes as entries of the repeated field (number 11, as in
    # FetchPartitionResponse.batches): no batch is parsed or re-encoded on the way out.
    tag = bytes([(11 << 3) | 2])
    wire = header.SerializeToString() + b"".join(tag + encode_varint(len(b)) + b for b in raw)
    got = replication_pb2.ReplicatePartitionResponse.FromString(wire)
    assert not got.HasField("diverging_epoch") and got.high_watermark == 4
    follower = store.open_partition(TOPIC, 1)
    follower.append_replicated(list(got.batches))
    follower.checkpoint_high_watermark(min(got.high_watermark, follower.log_end_offset))
    assert follower.read(0, 1 << 30) == raw
    assert (follower.high_watermark, follower.epoch_entries()) == (4, [(2, 0), (5, 4)])


@pytest.mark.parametrize(
    ("breakage", "error"),
    [
        ("gap after the log end", InvalidAppendError),
        ("overlap with the log", InvalidAppendError),
        ("gap between batches", InvalidAppendError),
        ("overlap between batches", InvalidAppendError),
        ("older epoch than the log's", InvalidAppendError),
        ("older epoch than the batch before", InvalidAppendError),
        ("crc", CorruptRecordError),
        ("negative epoch", CorruptRecordError),
        ("more records than offsets", CorruptRecordError),
    ],
)
def test_a_replicated_append_that_would_break_the_log_stores_nothing(
    store: LogStore, breakage: str, error: type[Exception]
) -> None:
    log = store.open_partition(TOPIC, 0)
    log.append_replicated([stamped(0, 3), stamped(2, 3)])  # 0..3 in epoch 3
    before = state(log)
    first, second = stamped(4, 3), stamped(6, 5)
    if breakage == "gap after the log end":
        first.base_offset, second.base_offset = 5, 7
    elif breakage == "overlap with the log":
        first.base_offset, second.base_offset = 3, 5
    elif breakage == "gap between batches":
        second.base_offset = 7
    elif breakage == "overlap between batches":
        second.base_offset = 5
    elif breakage == "older epoch than the log's":
        first.partition_leader_epoch = 2
    elif breakage == "older epoch than the batch before":
        first.partition_leader_epoch, second.partition_leader_epoch = 5, 4
    elif breakage == "crc":
        second.crc ^= 1
    elif breakage == "negative epoch":
        second.partition_leader_epoch = -1
    elif breakage == "more records than offsets":
        second.last_offset_delta = 0
    with pytest.raises(error):
        log.append_replicated([first, second])
    assert state(log) == before
    assert [r.base_offset for r in log.append_replicated([stamped(4, 3), stamped(6, 5)])] == [4, 6]
    assert log.epoch_entries() == [(3, 0), (5, 6)]


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("crc", r"batch at offset 4: crc is 0x[0-9a-f]{8}, expected 0x[0-9a-f]{8} \(CRC32C over the 44-byte"),
        ("epoch", r"batch at offset 4: partition_leader_epoch is -1, expected 0\.\.2147483647"),
        (
            "offsets",
            r"batch at offset 4: last_offset_delta is 0 and record_count is 2, expected last_offset_delta "
            r">= 0 and 0 <= record_count <= last_offset_delta \+ 1",
        ),
        ("base_offset", r"base_offset is -1, expected >= 0"),
    ],
)
def test_a_refused_replicated_batch_names_the_rule_and_the_expected_value(
    store: LogStore, breakage: str, message: str
) -> None:
    log = store.open_partition(TOPIC, 0)
    log.append_replicated([stamped(0, 3), stamped(2, 3)])
    bad = stamped(4, 3)
    if breakage == "crc":
        bad.crc ^= 1
    elif breakage == "epoch":
        bad.partition_leader_epoch = -1  # not covered by the CRC
    elif breakage == "offsets":
        bad.last_offset_delta = 0
        bad.crc = batch_crc(bad)
    else:
        bad.base_offset = -1
    with pytest.raises(CorruptRecordError, match=message):
        log.append_replicated([bad])
    assert log.log_end_offset == 4


def test_a_compacted_batch_keeps_its_offsets_with_fewer_records(store: LogStore) -> None:
    log = store.open_partition(TOPIC, 0)
    b = stamped(0, 1, n=1)
    b.last_offset_delta = 4  # offsets 0..4, one record left; the CRC covers last_offset_delta
    b.crc = batch_crc(b)
    log.append_replicated([b])
    assert log.log_end_offset == 5
    log.append_replicated([stamped(5, 1)])
    assert_consistent(log)


def test_a_follower_behind_the_leaders_log_start_starts_over_there(store: LogStore) -> None:
    leader = store.open_partition(TOPIC, 0)
    lead(leader, [(1, 3), (2, 3), (2, 3)])  # 0..2, 3..5, 6..8
    leader.delete_before(4)  # the leader's log starts inside the batch 3..5, served whole
    follower = store.open_partition(TOPIC, 1)
    follower.append_replicated([stamped(0, 0, n=1)])  # what it held before it fell behind
    follower.checkpoint_high_watermark(1)
    # Its fetch at 1 is below the leader's log start 4: OFFSET_OUT_OF_RANGE, and it starts over at 4.
    follower.truncate_fully_and_start_at(leader.log_start_offset)
    assert state(follower) == (4, 4, 0, 4, [], [])
    with pytest.raises(InvalidAppendError):  # a batch that does not hold the log start is a gap
        follower.append_replicated(copy_of(leader.read(6, 1 << 30)))
    follower.append_replicated(copy_of(leader.read(4, 1 << 30)))  # the first batch begins at 3
    assert (follower.log_start_offset, follower.log_end_offset) == (4, 9)
    assert follower.read(4, 1 << 30) == leader.read(4, 1 << 30)
    assert follower.epoch_entries() == leader.epoch_entries() == [(2, 4)]
    assert_consistent(follower)
    store.close()
    with LogStore(store.path) as again:
        assert state(again.open_partition(TOPIC, 1)) == state(again.open_partition(TOPIC, 0))


def test_truncate_fully_and_start_at_may_move_the_log_back(store: LogStore) -> None:
    log = store.open_partition(TOPIC, 0)
    lead(log, [(1, 3), (2, 3)])
    log.checkpoint_high_watermark(6)
    log.truncate_fully_and_start_at(2)
    assert state(log) == (2, 2, 0, 2, [], [])
    assert log.end_offset_for_epoch(2) == UNDEFINED
    assert log.max_timestamp() is None and log.offset_for_timestamp(0) is None
    log.append(batch(1), 3, now_ms=0)
    assert log.epoch_entries() == [(3, 2)] and log.log_end_offset == 3
    with pytest.raises(ValueError):
        log.truncate_fully_and_start_at(-1)


# ---------------------------------------------------------------------- truncation


def test_truncate_drops_the_epochs_past_the_point_and_clamps_the_high_watermark_durably(
    store: LogStore,
) -> None:
    log = store.open_partition(TOPIC, 0)
    log.append_replicated([stamped(0, 1), stamped(2, 3), stamped(4, 3), stamped(6, 5), stamped(8, 6)])
    log.checkpoint_high_watermark(9)
    log.truncate_to(6)  # at the boundary where epoch 5 begins
    assert log.epoch_entries() == [(1, 0), (3, 2)]  # the last kept epoch ends at the new log end
    assert log.end_offset_for_epoch(3) == (3, 6)
    assert log.end_offset_for_epoch(5) == UNDEFINED
    assert log.high_watermark == 6
    log.truncate_to(3)  # inside the batch 2..3: the whole batch goes
    assert (log.log_end_offset, log.high_watermark, log.epoch_entries()) == (2, 2, [(1, 0)])
    expected = state(log)
    store.close()
    with LogStore(store.path) as again:
        log = again.open_partition(TOPIC, 0)
        assert state(log) == expected
        assert_consistent(log)
        log.append_replicated([stamped(2, 7)])  # a new leader's batches follow at once
        assert log.epoch_entries() == [(1, 0), (7, 2)]


# ---------------------------------------------------------------------- the leader-epoch cache


def test_end_offset_for_epoch_is_kafkas_end_offset_for(store: LogStore) -> None:
    log = store.open_partition(TOPIC, 0)
    assert log.end_offset_for_epoch(0) == UNDEFINED  # empty cache
    log.truncate_fully_and_start_at(10)  # a follower that started over at the leader's log start
    log.append_replicated([stamped(10, 2, 3)])
    log.append_replicated([stamped(13, 2, 2), stamped(15, 4, 3), stamped(18, 7, 1)])
    assert log.epoch_entries() == [(2, 10), (4, 15), (7, 18)]
    cases = {
        -1: UNDEFINED,  # the requested epoch is UNDEFINED
        0: (0, 10),  # older than every cached epoch: the start of the earliest, as Kafka
        1: (1, 10),
        2: (2, 15),  # a cached epoch ends where the next one starts
        3: (2, 15),  # not cached: the largest cached epoch below it, and where the next starts
        4: (4, 18),
        5: (4, 18),
        6: (4, 18),
        7: (7, 19),  # the latest epoch ends at the log end
        8: UNDEFINED,  # newer than the latest: UNDEFINED
    }
    assert {epoch: log.end_offset_for_epoch(epoch) for epoch in cases} == cases


def test_a_new_leader_starts_its_epoch_in_the_cache_before_its_first_append(store: LogStore) -> None:
    log = store.open_partition(TOPIC, 0)
    lead(log, [(1, 2), (3, 2)])  # 0..1 in epoch 1, 2..3 in epoch 3
    # A follower that fetched epoch 4 from a leader that lost its leadership asks this new leader.
    assert log.end_offset_for_epoch(4) == UNDEFINED  # without the new epoch: nothing to go by
    log.assign_epoch_start(5)
    assert log.epoch_entries() == [(1, 0), (3, 2), (5, 4)]
    assert log.end_offset_for_epoch(4) == (3, 4)  # truncate to 4 at most
    assert log.end_offset_for_epoch(5) == (5, 4)
    log.assign_epoch_start(5)  # idempotent
    with pytest.raises(InvalidAppendError):
        log.assign_epoch_start(4)
    log.assign_epoch_start(6)  # epoch 5 held no record: epoch 6 replaces it (start offsets increase)
    assert log.epoch_entries() == [(1, 0), (3, 2), (6, 4)]
    log.append(batch(2), 6, now_ms=0)
    assert log.epoch_entries() == [(1, 0), (3, 2), (6, 4)]
    assert log.end_offset_for_epoch(6) == (6, 6)
    with pytest.raises(InvalidAppendError):  # the leader's own epoch is the floor for appends now
        log.append(batch(1), 5, now_ms=0)
    store.close()
    with LogStore(store.path) as again:
        assert again.open_partition(TOPIC, 0).epoch_entries() == [(1, 0), (3, 2), (6, 4)]


# ---------------------------------------------------------------------- the high-watermark checkpoint


def test_the_high_watermark_checkpoint_is_loaded_at_open_and_follows_truncation(store: LogStore) -> None:
    log = store.open_partition(TOPIC, 0)
    lead(log, [(1, 3), (1, 3)])
    log.checkpoint_high_watermark(5)
    log.checkpoint_high_watermark(5)  # unchanged: nothing written
    store.close()
    with LogStore(store.path) as again:
        log = again.open_partition(TOPIC, 0)
        assert log.high_watermark == 5
        log.truncate_to(2)  # the batch 0..2 goes: the log is empty at 0
        assert (log.log_end_offset, log.high_watermark) == (0, 0)
        with pytest.raises(ValueError):
            log.checkpoint_high_watermark(1)
    with LogStore(store.path) as third:
        assert third.open_partition(TOPIC, 0).high_watermark == 0


# ---------------------------------------------------------------------- the protocol's rules over storage


@dataclass(frozen=True)
class Answer:
    """A leader's answer for one partition, as ReplicatePartitionResponse carries it."""

    out_of_range: bool
    diverging_epoch: tuple[int, int] | None
    batches: list[bytes]
    high_watermark: int
    log_start_offset: int
    log_end_offset: int


def leader_answer(leader: PartitionLog, fetch_offset: int, last_fetched_epoch: int, max_bytes: int) -> Answer:
    """Checks 4 to 6 of ReplicatePartitionResponse (the epoch checks are the node's, not storage's)."""
    start, end = leader.log_start_offset, leader.log_end_offset

    def answer(out_of_range: bool, diverging: tuple[int, int] | None, batches: list[bytes]) -> Answer:
        return Answer(out_of_range, diverging, batches, leader.high_watermark, start, end)

    if last_fetched_epoch >= 0:
        epoch, end_offset = leader.end_offset_for_epoch(last_fetched_epoch)
        if end_offset == UNDEFINED_EPOCH_OFFSET or fetch_offset < start:
            return answer(True, None, [])
        if epoch < last_fetched_epoch or end_offset < fetch_offset:
            return answer(False, (epoch, end_offset), [])
    if not start <= fetch_offset <= end:
        return answer(True, None, [])
    return answer(False, None, leader.read(fetch_offset, max_bytes))


def follower_apply(follower: PartitionLog, a: Answer) -> None:
    """What ReplicatePartitionResponse tells a follower to do with an answer."""
    end = follower.log_end_offset
    if a.diverging_epoch is not None:
        epoch, end_offset = a.diverging_epoch
        own_epoch, own_end = follower.end_offset_for_epoch(epoch)
        assert own_end != UNDEFINED_EPOCH_OFFSET, "the leader answers with an epoch <= the follower's latest"
        if own_epoch == epoch:
            follower.truncate_to(min(end_offset, own_end, end))
        else:
            follower.truncate_to(min(own_end, end))
        return
    if a.out_of_range:
        if a.log_end_offset < end:
            follower.truncate_to(a.log_end_offset)
        else:
            assert end < a.log_start_offset, "an epoch the leader lacks: it assigned its own, so never"
            follower.truncate_fully_and_start_at(a.log_start_offset)
        return
    if a.batches:
        follower.append_replicated(copy_of(a.batches))
    follower.checkpoint_high_watermark(
        max(min(a.high_watermark, follower.log_end_offset), follower.log_start_offset)
    )
    if follower.log_start_offset < min(a.log_start_offset, follower.log_end_offset):
        follower.delete_before(min(a.log_start_offset, follower.log_end_offset))


def fetch_once(leader: PartitionLog, follower: PartitionLog, max_bytes: int) -> Answer:
    a = leader_answer(leader, follower.log_end_offset, follower.latest_epoch, max_bytes)
    follower_apply(follower, a)
    return a


def catch_up(leader: PartitionLog, follower: PartitionLog) -> int:
    """Fetch until the follower holds the leader's log; returns the number of fetches."""
    for n in range(1, 200):
        a = fetch_once(leader, follower, 1 << 30)
        if not (a.out_of_range or a.diverging_epoch or a.batches):
            return n
    raise AssertionError(f"{follower!r} never caught up with {leader!r}")


def test_a_follower_that_led_without_appending_drops_that_epoch_and_catches_up(store: LogStore) -> None:
    a, b = store.open_partition(TOPIC, 0), store.open_partition(TOPIC, 1)
    lead(a, [(1, 2), (1, 2)])
    catch_up(a, b)
    b.assign_epoch_start(2)  # b led epoch 2 and wrote nothing; a leads epoch 3 and writes
    a.assign_epoch_start(3)
    lead(a, [(3, 1)])
    assert fetch_once(a, b, 1 << 30).diverging_epoch == (1, 4)  # a never had epoch 2
    assert b.epoch_entries() == [(1, 0)] and b.log_end_offset == 4
    catch_up(a, b)
    assert b.read(0, 1 << 30) == a.read(0, 1 << 30)
    assert b.epoch_entries() == a.epoch_entries() == [(1, 0), (3, 4)]


def test_kip_101_a_follower_keeps_what_the_new_leader_has_and_drops_only_the_diverged_suffix(
    store: LogStore,
) -> None:
    """KIP-101's second scenario: both replicas die, the one with the shorter log comes back first and
    leads; the other must drop only what the new leader never had, not trust its high watermark."""
    a, b = store.open_partition(TOPIC, 0), store.open_partition(TOPIC, 1)
    lead(a, [(1, 1)])  # offset 0, epoch 1
    catch_up(a, b)
    lead(a, [(1, 1)])  # offset 1 on a only
    b.assign_epoch_start(2)  # b leads epoch 2 and writes its own offset 1
    b.append(batch(1), 2, now_ms=0)
    a_view = fetch_once(b, a, 1 << 30)  # a now follows b
    assert a_view.diverging_epoch == (1, 1)
    assert a.log_end_offset == 1  # a dropped its offset 1 (epoch 1), which b never had
    catch_up(b, a)
    assert a.read(0, 1 << 30) == b.read(0, 1 << 30)
    assert a.epoch_entries() == b.epoch_entries() == [(1, 0), (2, 1)]


@pytest.mark.parametrize("seed", range(30))
def test_random_leader_changes_end_with_every_follower_holding_the_leaders_log(
    store: LogStore, seed: int
) -> None:
    """Leaders change at random (unclean elections included: any replica may lead), each appends a
    little, followers copy part of it between changes, retention moves log starts; then a last leader
    is elected and every follower catches up. Whatever happened, the rules of replication.proto over
    this storage end with identical logs and epoch caches, every log consistent after every fetch."""
    rng = random.Random(seed)
    replicas = [store.open_partition(TOPIC, i) for i in range(3)]
    epoch = 0
    for _ in range(rng.randint(3, 10)):
        epoch += rng.randint(1, 2)
        leader = rng.choice(replicas)
        leader.assign_epoch_start(epoch)
        for _ in range(rng.randint(0, 4)):
            leader.append(batch(rng.randint(1, 3)), epoch, now_ms=0)
            for follower in replicas:
                if follower is leader:
                    continue
                for _ in range(rng.randint(0, 2)):
                    fetch_once(leader, follower, rng.choice([1, 200, 1 << 30]))
                    assert_consistent(follower)
        if rng.random() < 0.5 and leader.log_end_offset > leader.log_start_offset:
            leader.delete_before(rng.randint(leader.log_start_offset, leader.log_end_offset))
    epoch += 1
    leader = rng.choice(replicas)
    leader.assign_epoch_start(epoch)
    leader.append(batch(1), epoch, now_ms=0)
    for follower in replicas:
        if follower is not leader:
            catch_up(leader, follower)
            assert_consistent(follower)
            # A follower that started over at an earlier leader's log start may start later.
            start = max(leader.log_start_offset, follower.log_start_offset)
            assert follower.log_end_offset == leader.log_end_offset
            assert follower.read(start, 1 << 30) == leader.read(start, 1 << 30)
            assert cache_from(follower.epoch_entries(), start) == cache_from(leader.epoch_entries(), start)


def cache_from(entries: list[tuple[int, int]], start: int) -> list[tuple[int, int]]:
    """An epoch cache as it reads from ``start`` on (Kafka's truncateFromStart): the epoch holding
    ``start`` starts there."""
    covered = [e for e, s in entries if s <= start]
    return ([(covered[-1], start)] if covered else []) + [(e, s) for e, s in entries if s > start]


# ---------------------------------------------------------------------- crashes


_TRUNCATE_CHILD = """
import sys, uuid
from headwater.storage import LogStore
from headwater.v1.batch import build_batch
store = LogStore(sys.argv[1])
log = store.open_partition(uuid.UUID(int=0xF011).bytes, 0)
for i in range(30):
    log.append(build_batch([(b"k", b"%d" % i, None, 1000 + i)] * 2), i // 10, now_ms=0)
log.checkpoint_high_watermark(55)
log.truncate_to(35)  # inside the batch 34..35, in epoch 1; not synced
print("truncated", flush=True)
sys.stdin.read()  # wait for the kill
"""


def test_a_truncation_not_synced_survives_kill_9_whole(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    child = subprocess.Popen(
        [sys.executable, "-c", _TRUNCATE_CHILD, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "truncated\n"
    child.kill()  # SIGKILL: no close, no flush; the truncation's WriteBatch is in the WAL or not at all
    child.wait()
    with LogStore(path) as store:
        log = store.open_partition(TOPIC, 0)
        assert (log.log_start_offset, log.high_watermark, log.log_end_offset) == (0, 34, 34)
        assert log.epoch_entries() == [(0, 0), (1, 20)]
        assert log.end_offset_for_epoch(1) == (1, 34)
        assert_consistent(log)


_RANDOM_CHILD = """
import sys
sys.path.insert(0, sys.argv[3])
from test_storage_replication import apply_step, scripted_steps, TOPIC
from headwater.storage import LogStore
store = LogStore(sys.argv[1])
log = store.open_partition(TOPIC, 0)
for i, step in enumerate(scripted_steps(int(sys.argv[2]))):
    apply_step(log, step)  # not synced
    print(i + 1, flush=True)
"""

Step = tuple[str, object]


def scripted_steps(seed: int) -> Iterator[Step]:
    """An endless seeded script of appends (as leader and as follower), truncations, full truncations,
    deletions from the start, epoch assignments and checkpoints, each valid for the log it leads to."""
    rng = random.Random(seed)
    model, epoch = Model(), 0
    while True:
        step: Step
        roll = rng.random()
        if roll < 0.45:
            batches = []
            for _ in range(rng.randint(1, 3)):
                epoch += rng.random() < 0.2
                b = build_batch(
                    [(None, b"x" * rng.randint(1, 9), None, rng.randint(1, 99))] * rng.randint(1, 4)
                )
                b.base_offset, b.partition_leader_epoch = model.end, epoch
                ts = [b.first_timestamp_ms] * (b.last_offset_delta + 1)
                model.append(ModelBatch(b.base_offset, b.SerializeToString(), ts), epoch)
                batches.append(b)
            step = (
                "replicated"
                if roll < 0.25 or len({b.partition_leader_epoch for b in batches}) > 1
                else "leader",
                batches,
            )
        elif roll < 0.65:
            offset = rng.randint(model.start, model.end)
            model.truncate_to(offset)
            step = ("truncate_to", offset)
        elif roll < 0.8:
            hw = rng.randint(model.start, model.end)
            model.hw = hw
            step = ("checkpoint_high_watermark", hw)
        elif roll < 0.88:
            epoch += 1
            model.assign_epoch_start(epoch)
            step = ("assign_epoch_start", epoch)
        elif roll < 0.95:
            offset = rng.randint(model.start, model.end)
            model.delete_before(offset)
            step = ("delete_before", offset)
        else:
            offset = model.end + rng.randint(0, 3)
            model.truncate_fully_and_start_at(offset)
            step = ("truncate_fully_and_start_at", offset)
        yield step


def model_after(seed: int, steps: int) -> Model:
    """The model of the log after the first ``steps`` steps of the script."""
    model = Model()
    for step in itertools.islice(scripted_steps(seed), steps):
        apply_to_model(model, step)
    return model


def apply_to_model(model: Model, step: Step) -> None:
    op, arg = step
    if op in ("leader", "replicated"):
        assert isinstance(arg, list)
        for b in arg:
            ts = [b.first_timestamp_ms] * (b.last_offset_delta + 1)
            model.append(ModelBatch(b.base_offset, b.SerializeToString(), ts), b.partition_leader_epoch)
    elif op == "checkpoint_high_watermark":
        assert isinstance(arg, int)
        model.hw = arg
    else:
        getattr(model, op)(arg)


def apply_step(log: PartitionLog, step: Step) -> None:
    op, arg = step
    if op == "leader":
        assert isinstance(arg, list)
        log.append_many(arg, arg[0].partition_leader_epoch, now_ms=0)
    elif op == "replicated":
        assert isinstance(arg, list)
        log.append_replicated(arg)
    else:
        getattr(log, op)(arg)


def assert_matches(log: PartitionLog, model: Model) -> None:
    assert (log.log_start_offset, log.log_end_offset, log.high_watermark) == (
        model.start,
        model.end,
        model.hw,
    )
    assert log.size_bytes == model.size
    assert log.epoch_entries() == model.epochs
    assert log.read(model.start, 1 << 30) == model.read(model.start, 1 << 30, None)


@pytest.mark.parametrize("seed", range(12))
def test_seeded_scripts_match_the_model_across_reopens(tmp_path: Path, seed: int) -> None:
    rng = random.Random(-seed)
    store = LogStore(str(tmp_path / "db"))
    try:
        log = store.open_partition(TOPIC, 0)
        model = Model()
        for step in itertools.islice(scripted_steps(seed), 250):
            apply_step(log, step)
            apply_to_model(model, step)
            if rng.random() < 0.1:
                store.close()
                store = LogStore(str(tmp_path / "db"))
                log = store.open_partition(TOPIC, 0)
            assert_matches(log, model)
        assert_consistent(log)
    finally:
        store.close()


@pytest.mark.parametrize("seed", range(8))
def test_kill_9_at_a_random_step_leaves_the_log_of_the_step_before_or_after(
    tmp_path: Path, seed: int
) -> None:
    path = str(tmp_path / "db")
    tests_dir = str(Path(__file__).parent)
    child = subprocess.Popen(
        [sys.executable, "-c", _RANDOM_CHILD, path, str(seed), tests_dir],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    kill_after = random.Random(seed).randint(20, 600)
    done = 0
    for _ in range(kill_after):
        done = int(child.stdout.readline())
    child.kill()  # while the child goes on: the kill lands anywhere in a step
    rest = child.stdout.read().split()
    child.wait()
    done = int(rest[-1]) if rest else done
    with LogStore(path) as store:
        log = store.open_partition(TOPIC, 0)
        assert_consistent(log)
        before, after = model_after(seed, done), model_after(seed, done + 1)
        try:
            assert_matches(log, before)
        except AssertionError:
            assert_matches(log, after)


# ---------------------------------------------------------------------- group commit


def test_sync_wal_syncs_everything_appended_before_it(store: LogStore) -> None:
    log = store.open_partition(TOPIC, 0)
    for _ in range(10):
        log.append(batch(1), 0, now_ms=0)  # sync=False: in the WAL, not yet on the disk
    store.sync_wal()  # one fsync for the ten: now they survive losing power, and may be acknowledged
    assert log.log_end_offset == 10
    store.close()
    with pytest.raises(StorageError):
        store.sync_wal()
