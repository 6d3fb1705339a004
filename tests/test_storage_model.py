"""A hypothesis state machine: PartitionLog against a plain in-memory model of a partition log.

Every step (append as a leader, the follower's appends of stamped batches, refused appends, read,
truncate, a full truncation to a new start, delete_before, retention, leader-epoch assignment,
high-watermark checkpoint, close and reopen of the store) is applied to both; after each step the
offsets, size, high watermark, epoch cache (and Kafka's endOffsetFor over it) and timestamp lookups
must agree.
"""

from __future__ import annotations

import itertools
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from headwater.storage import CorruptRecordError, InvalidAppendError, LogStore, OffsetOutOfRangeError
from headwater.v1.batch import LOG_APPEND_TIME, RecordBatch, batch_crc, build_batch

TOPIC = uuid.UUID(int=7).bytes


@dataclass
class ModelBatch:
    base: int
    data: bytes  # the stored bytes
    timestamps: list[int]  # absolute, per record

    @property
    def last(self) -> int:
        return self.base + len(self.timestamps) - 1

    @property
    def max_ts(self) -> int:
        return max(self.timestamps)


class Model:
    """A partition log as a list, with the rules written the obvious way."""

    def __init__(self) -> None:
        self.batches: list[ModelBatch] = []
        self.start = 0
        self.end = 0
        self.hw = 0
        self.epochs: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return sum(len(b.data) for b in self.batches)

    def append(self, b: ModelBatch, epoch: int) -> None:
        # A follower's empty log also takes a first batch that holds its start offset (Kafka does).
        assert b.base == self.end or (self.start == self.end and b.base < self.start <= b.last)
        self.batches.append(b)
        self.end = b.last + 1
        if not self.epochs or epoch > self.epochs[-1][0]:
            self.start_epoch(epoch, max(b.base, self.start))

    def start_epoch(self, epoch: int, offset: int) -> None:
        # Start offsets strictly increase: a latest epoch starting at the same offset holds no record.
        if self.epochs and self.epochs[-1][1] == offset:
            self.epochs.pop()
        self.epochs.append((epoch, offset))

    def read(self, offset: int, max_bytes: int, max_offset: int | None) -> list[bytes]:
        out: list[bytes] = []
        for b in self.batches:
            if b.last < offset:
                continue
            if max_offset is not None and b.last >= max_offset:
                break
            if out and sum(map(len, out)) + len(b.data) > max_bytes:
                break
            out.append(b.data)
        return out

    def truncate_to(self, offset: int) -> None:
        if offset >= self.end:
            # No record goes, but an epoch started at the log end and never written to does.
            self.epochs = [(e, s) for e, s in self.epochs if s < self.end]
            return
        holder = [b for b in self.batches if b.base <= offset <= b.last]
        new_end = holder[0].base if holder else offset
        self.batches = [b for b in self.batches if b.last < new_end]
        self.end = new_end
        self.start = min(self.start, new_end)
        self.hw = min(self.hw, new_end)
        self.epochs = [(e, s) for e, s in self.epochs if s < new_end]

    def truncate_fully_and_start_at(self, offset: int) -> None:
        self.batches, self.epochs = [], []
        self.start = self.end = self.hw = offset

    def assign_epoch_start(self, epoch: int) -> None:
        if not self.epochs or epoch > self.epochs[-1][0]:
            self.start_epoch(epoch, self.end)

    def _start_at(self, new_start: int) -> None:
        self.start = new_start
        self.hw = max(self.hw, new_start)
        covered = [(e, s) for e, s in self.epochs if s <= new_start]
        self.epochs = self.epochs[len(covered) :]
        if covered:
            self.epochs.insert(0, (covered[-1][0], new_start))

    def delete_before(self, new_start: int) -> int:
        if new_start <= self.start:
            return 0
        doomed = [b for b in self.batches if b.last < new_start]
        self.batches = self.batches[len(doomed) :]
        self._start_at(new_start)
        return len(doomed)

    def apply_retention(self, now_ms: int, retention_ms: int, retention_bytes: int) -> int:
        n = 0
        while self.batches:
            b = self.batches[0]
            expired = retention_ms >= 0 and b.max_ts < now_ms - retention_ms
            too_big = retention_bytes >= 0 and self.size > retention_bytes
            if not (expired or too_big):
                break
            self.batches.pop(0)
            n += 1
            self._start_at(b.last + 1)
        return n

    def end_offset_for_epoch(self, epoch: int) -> tuple[int, int]:
        # Kafka's LeaderEpochFileCache.endOffsetFor, case by case.
        if epoch < 0 or not self.epochs or epoch > self.epochs[-1][0]:
            return -1, -1
        if epoch == self.epochs[-1][0]:
            return epoch, self.end
        newer = [(e, s) for e, s in self.epochs if e > epoch]
        older = [e for e, _ in self.epochs if e <= epoch]
        return (older[-1] if older else epoch), newer[0][1]

    def records(self) -> list[tuple[int, int]]:
        return [(b.base + i, ts) for b in self.batches for i, ts in enumerate(b.timestamps)]

    def offset_for_timestamp(self, ts: int) -> tuple[int, int] | None:
        hits = [(o, t) for o, t in self.records() if o >= self.start and t >= ts]
        return hits[0] if hits else None

    def max_timestamp(self) -> tuple[int, int] | None:
        recs = self.records()
        if not recs:
            return None
        top = max(t for _, t in recs)
        return next((o, t) for o, t in recs if t == top)


timestamps = st.lists(st.integers(0, 60), min_size=1, max_size=4)


class LogMachine(RuleBasedStateMachine):
    base_dir: Path
    counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.path = self.base_dir / f"db{next(self.counter)}"
        self.store = LogStore(str(self.path))
        self.log = self.store.open_partition(TOPIC, 3)
        self.model = Model()
        self.epoch = 0
        self.clock_ms = 100

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.path)

    @rule(ts=timestamps, bump=st.booleans(), log_append_time=st.booleans())
    def append(self, ts: list[int], bump: bool, log_append_time: bool) -> None:
        self.epoch += bump
        self.clock_ms += 7
        b = build_batch([(b"k", b"v" * (i + 1), None, t) for i, t in enumerate(ts)])
        r = self.log.append(b, self.epoch, now_ms=self.clock_ms, log_append_time=log_append_time)
        expected = RecordBatch()
        expected.CopyFrom(b)  # the stamped batch, rebuilt independently below
        expected.base_offset, expected.partition_leader_epoch = self.model.end, self.epoch
        stored_ts = list(ts)
        if log_append_time:
            # Kafka's LogAppendTime: every record reads the append time, the batch's max timestamp.
            stored_ts = [self.clock_ms] * len(ts)
            expected.timestamp_type = LOG_APPEND_TIME
            expected.first_timestamp_ms = expected.max_timestamp_ms = self.clock_ms
            expected.crc = batch_crc(expected)
        data = expected.SerializeToString()
        assert (r.base_offset, r.last_offset, r.size_bytes) == (
            self.model.end,
            self.model.end + len(ts) - 1,
            len(data),
        )
        assert r.max_timestamp_ms == max(stored_ts)
        self.model.append(ModelBatch(self.model.end, data, stored_ts), self.epoch)

    def leader_batches(self, sizes: list[list[int]], bumps: list[bool], base: int) -> list[RecordBatch]:
        """Batches as a leader stamped them: consecutive from ``base``, epochs never decreasing."""
        out = []
        for ts, bump in zip(sizes, bumps, strict=False):
            self.epoch += bump
            b = build_batch([(None, b"x" * (len(out) + 1), None, t) for t in ts])
            b.base_offset, b.partition_leader_epoch = base, self.epoch
            base += len(ts)
            out.append(b)
        return out

    def model_append(self, batches: list[RecordBatch], timestamps: list[list[int]]) -> None:
        for b, ts in zip(batches, timestamps, strict=True):
            self.model.append(
                ModelBatch(b.base_offset, b.SerializeToString(), list(ts)), b.partition_leader_epoch
            )

    @rule(ts=timestamps, bump=st.booleans())
    def append_stamped(self, ts: list[int], bump: bool) -> None:
        [b] = self.leader_batches([ts], [bump], self.model.end)
        self.log.append_stamped(b)
        self.model_append([b], [ts])

    @rule(sizes=st.lists(timestamps, min_size=1, max_size=4), bumps=st.lists(st.booleans(), min_size=4))
    def append_replicated(self, sizes: list[list[int]], bumps: list[bool]) -> None:
        batches = self.leader_batches(sizes, bumps, self.model.end)
        results = self.log.append_replicated(batches)
        assert [r.base_offset for r in results] == [b.base_offset for b in batches]
        self.model_append(batches, sizes)

    @rule(
        sizes=st.lists(timestamps, min_size=2, max_size=3),
        breakage=st.sampled_from(["gap", "overlap", "older epoch", "crc", "log end gap", "log end overlap"]),
    )
    def replicated_append_that_breaks_the_log_is_refused(self, sizes: list[list[int]], breakage: str) -> None:
        latest = self.model.epochs[-1][0] if self.model.epochs else -1
        batches = self.leader_batches(sizes, [True] * len(sizes), self.model.end)
        last = batches[-1]
        if breakage == "gap":
            last.base_offset += 1
        elif breakage == "overlap":
            last.base_offset -= 1
        elif breakage == "older epoch":
            last.partition_leader_epoch = batches[0].partition_leader_epoch - 1
        elif breakage == "crc":
            last.crc ^= 1
        elif breakage == "log end gap":
            for b in batches:
                b.base_offset += 1
        elif breakage == "log end overlap":
            if self.model.end == 0 or self.model.start == self.model.end:
                return  # no offset below the log end to overlap with
            for b in batches:
                b.base_offset -= 1
        with pytest.raises((InvalidAppendError, CorruptRecordError)):
            self.log.append_replicated(batches)
        self.epoch = max(latest, 0)  # nothing was stored: the next epochs follow the stored ones

    @rule(ahead=st.integers(0, 5), inside=st.integers(0, 3), ts=timestamps)
    def restart_at_the_leaders_log_start(self, ahead: int, inside: int, ts: list[int]) -> None:
        """The follower fell behind the leader's log start: it starts over there, and the leader's
        first batch may begin before that start (its log start lies inside the batch)."""
        offset = self.model.end + ahead
        self.log.truncate_fully_and_start_at(offset)
        self.model.truncate_fully_and_start_at(offset)
        base = max(offset - min(inside, len(ts) - 1), 0)
        [b] = self.leader_batches([ts], [True], base)
        self.log.append_replicated([b])
        self.model_append([b], [ts])

    @rule(bump=st.integers(0, 2))
    def assign_epoch_start(self, bump: int) -> None:
        self.epoch += bump
        self.log.assign_epoch_start(self.epoch)
        self.model.assign_epoch_start(self.epoch)

    @rule(ts=timestamps)
    def append_with_a_stale_epoch_is_refused(self, ts: list[int]) -> None:
        latest = self.model.epochs[-1][0] if self.model.epochs else 0
        if latest == 0:
            return
        with pytest.raises(InvalidAppendError):
            self.log.append(build_batch([(None, b"x", None, t) for t in ts]), latest - 1, now_ms=0)

    @rule(data=st.data(), max_bytes=st.integers(0, 400), hw_bound=st.booleans())
    def read(self, data: st.DataObject, max_bytes: int, hw_bound: bool) -> None:
        offset = data.draw(st.integers(max(self.model.start - 2, 0), self.model.end + 2), label="offset")
        max_offset = data.draw(st.integers(0, self.model.end + 1), label="max_offset") if hw_bound else None
        if not self.model.start <= offset <= self.model.end:
            with pytest.raises(OffsetOutOfRangeError):
                self.log.read(offset, max_bytes, max_offset)
            return
        expected = [] if offset == self.model.end else self.model.read(offset, max_bytes, max_offset)
        assert self.log.read(offset, max_bytes, max_offset) == expected

    @rule(data=st.data())
    def truncate_to(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(0, self.model.end + 1), label="offset")
        self.log.truncate_to(offset)
        self.model.truncate_to(offset)

    @rule(data=st.data())
    def delete_before(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(0, self.model.end + 1), label="offset")
        if offset > self.model.end:
            with pytest.raises(OffsetOutOfRangeError):
                self.log.delete_before(offset)
            return
        assert self.log.delete_before(offset) == self.model.delete_before(offset)

    @rule(
        now_ms=st.integers(0, 120),
        retention_ms=st.sampled_from([-1, 0, 10, 40, 80]),
        retention_bytes=st.sampled_from([-1, 0, 100, 300, 600]),
    )
    def apply_retention(self, now_ms: int, retention_ms: int, retention_bytes: int) -> None:
        expected = self.model.apply_retention(now_ms, retention_ms, retention_bytes)
        assert self.log.apply_retention(now_ms, retention_ms, retention_bytes) == expected

    @precondition(lambda self: self.model.start < self.model.end)
    @rule(data=st.data())
    def checkpoint_high_watermark(self, data: st.DataObject) -> None:
        hw = data.draw(st.integers(self.model.start, self.model.end), label="hw")
        self.log.checkpoint_high_watermark(hw)
        self.model.hw = hw

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = LogStore(str(self.path))
        self.log = self.store.open_partition(TOPIC, 3)

    @invariant()
    def same_state(self) -> None:
        m = self.model
        assert (self.log.log_start_offset, self.log.log_end_offset) == (m.start, m.end)
        assert self.log.size_bytes == m.size
        assert self.log.high_watermark == m.hw
        assert self.log.epoch_entries() == m.epochs
        assert self.log.latest_epoch == (m.epochs[-1][0] if m.epochs else -1)
        for epoch in range(-1, self.epoch + 2):
            assert self.log.end_offset_for_epoch(epoch) == m.end_offset_for_epoch(epoch), epoch

    @invariant()
    def same_timestamp_lookups(self) -> None:
        for ts in (0, 15, 30, 45, 60, 61, self.clock_ms, self.clock_ms + 70):
            assert self.log.offset_for_timestamp(ts) == self.model.offset_for_timestamp(ts), ts
        assert self.log.max_timestamp() == self.model.max_timestamp()


def test_partition_log_matches_the_model(tmp_path: Path) -> None:
    class Machine(LogMachine):
        base_dir = tmp_path

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert list(tmp_path.iterdir()) == []  # every example cleaned up after itself
