"""``PartitionLog``: one partition's log of record batches, kept in the node's RocksDB.

State (in memory, and in ``meta`` in the same WriteBatch as every change to the data, so a reopen reads
a few keys instead of scanning the log)::

    log_start_offset <= high_watermark <= log_end_offset
    size_bytes       = sum of the stored batches' sizes
    epoch cache      = [(leader_epoch, start_offset)], epochs strictly increasing (KIP-101/279)
    time index       = one entry per batch that raised the largest max_timestamp_ms seen (Kafka's
                       time index), so both its timestamps and its offsets increase

Batches are whole units: truncation and retention remove whole batches. ``delete_before`` may leave
``log_start_offset`` inside the first batch; that batch is kept (and served whole, as Kafka does) until
all of it lies below the log start.
"""

from __future__ import annotations

import bisect
import itertools
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rocksdict import Rdict, WriteBatch

from headwater.storage import _keys as K
from headwater.storage.errors import (
    CorruptRecordError,
    InvalidAppendError,
    OffsetOutOfRangeError,
    StorageError,
)
from headwater.v1.batch import (
    CREATE_TIME,
    LOG_APPEND_TIME,
    RecordBatch,
    batch_crc,
    crc_problem,
    decode_records,
)

if TYPE_CHECKING:
    from headwater.storage.store import LogStore, _Handles

__all__ = ["AppendResult", "PartitionLog", "UNDEFINED_EPOCH", "UNDEFINED_EPOCH_OFFSET"]

UNDEFINED_EPOCH = -1
"""No leader epoch: ``end_offset_for_epoch`` found none (Kafka's UNDEFINED_EPOCH)."""
UNDEFINED_EPOCH_OFFSET = -1
"""No end offset: ``end_offset_for_epoch`` found none (Kafka's UNDEFINED_EPOCH_OFFSET)."""

_MAX_EPOCH = (1 << 31) - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an appended batch landed. ``size_bytes`` is what this batch takes in the log."""

    base_offset: int
    last_offset: int
    max_timestamp_ms: int
    log_start_offset: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class _IndexedBatch:
    """A batch-index entry: what retention and truncation need without reading the batch."""

    base_offset: int
    size_bytes: int
    last_offset_delta: int
    max_timestamp_ms: int

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta


def scan(
    cf: Rdict,
    start: bytes,
    stop: bytes,
    *,
    limit: int | None = None,
    until: Callable[[bytes, bytes], bool] | None = None,
) -> list[tuple[bytes, bytes]]:
    """Items with ``start <= key < stop``, in order, at most ``limit``, ending before the first item
    for which ``until`` holds.

    Iterators keep RocksDB open (``recover()`` must be able to close it), so none outlives a call:
    every read of this package goes through small helpers like this one that return plain data.
    """
    out: list[tuple[bytes, bytes]] = []
    it = cf.iter()
    try:
        it.seek(start)
        while it.valid() and (limit is None or len(out) < limit):
            key = it.key()
            if key >= stop:
                break
            value = it.value()
            if until is not None and until(key, value):
                break
            out.append((key, value))
            it.next()
    finally:
        del it
    return out


def _scan_back(
    cf: Rdict, key: bytes, lower: bytes, until: Callable[[bytes, bytes], bool]
) -> tuple[list[tuple[bytes, bytes]], tuple[bytes, bytes] | None]:
    """From the largest key ``<= key`` down to ``lower``: the items before the first for which
    ``until`` holds, and that item (None if the range ran out)."""
    out: list[tuple[bytes, bytes]] = []
    it = cf.iter()
    try:
        it.seek_for_prev(key)
        while it.valid():
            k = it.key()
            if k < lower:
                break
            v = it.value()
            if until(k, v):
                return out, (k, v)
            out.append((k, v))
            it.prev()
    finally:
        del it
    return out, None


def _last_before(cf: Rdict, key: bytes, lower: bytes) -> tuple[bytes, bytes] | None:
    """The item with the largest key ``<= key`` if that key is ``>= lower``."""
    it = cf.iter()
    try:
        it.seek_for_prev(key)
        if it.valid() and it.key() >= lower:
            return it.key(), it.value()
        return None
    finally:
        del it


def _check_stamped(batch: RecordBatch) -> None:
    """The checks of a batch a leader already stamped (the follower path): CRC and header."""
    at = f"batch at offset {batch.base_offset}"
    problem = crc_problem(batch)
    if problem:
        raise CorruptRecordError(f"{at}: {problem}")
    if batch.last_offset_delta < 0 or not 0 <= batch.record_count <= batch.last_offset_delta + 1:
        raise CorruptRecordError(
            f"{at}: last_offset_delta is {batch.last_offset_delta} and record_count is "
            f"{batch.record_count}, expected last_offset_delta >= 0 and 0 <= record_count <= "
            "last_offset_delta + 1"
        )
    if batch.base_offset < 0 or batch.base_offset + batch.last_offset_delta > _I64_MAX:
        raise CorruptRecordError(
            f"base_offset is {batch.base_offset}, expected >= 0 with base_offset + last_offset_delta "
            f"({batch.last_offset_delta}) <= {_I64_MAX}"
        )
    if not 0 <= batch.partition_leader_epoch <= _MAX_EPOCH:
        raise CorruptRecordError(
            f"{at}: partition_leader_epoch is {batch.partition_leader_epoch}, expected 0..{_MAX_EPOCH}"
        )


def _check_fresh(batch: RecordBatch, index: int) -> None:
    """The checks of a producer's batch, number ``index`` of an ``append_many``: CRC and the
    offset-count header (the node checks them first, in ``headwater.node.produce_checks``)."""
    at = f"batch {index}"
    count = batch.record_count
    if count < 1:
        raise CorruptRecordError(
            f"{at}: record_count is {count}, expected at least 1 (a batch holds at least one record)"
        )
    if batch.last_offset_delta != count - 1:
        raise CorruptRecordError(
            f"{at}: last_offset_delta is {batch.last_offset_delta}, expected {count - 1} (record_count - 1)"
        )
    problem = crc_problem(batch)
    if problem:
        raise CorruptRecordError(f"{at}: {problem}")
    if batch.timestamp_type != CREATE_TIME:
        raise CorruptRecordError(
            f"{at}: timestamp_type is {batch.timestamp_type}, expected 0 (TIMESTAMP_TYPE_CREATE_TIME): "
            "the leader sets it"
        )


class PartitionLog:
    """One partition's log. Obtain it from ``LogStore.open_partition``; thread-safe (a lock per log)."""

    def __init__(self, store: LogStore, pk: bytes) -> None:
        self._store = store
        self._pk = pk
        self._end_pk = K.next_partition_key(pk)
        self._lock = threading.RLock()
        self._deleted = False
        self._log_start_offset = 0
        self._log_end_offset = 0
        self._size_bytes = 0
        self._high_watermark = 0
        self._epochs: list[tuple[int, int]] = []  # (leader_epoch, start_offset), epochs increasing
        self._time_max: tuple[int, int] | None = None  # last time-index entry: (max_timestamp_ms, base)

    def __repr__(self) -> str:
        topic_id, partition = K.split_partition_key(self._pk)
        return (
            f"PartitionLog({topic_id.hex()}-{partition}, start={self._log_start_offset}, "
            f"end={self._log_end_offset}, size={self._size_bytes})"
        )

    # ------------------------------------------------------------------ state

    @property
    def topic_id(self) -> bytes:
        return self._pk[: K.TOPIC_ID_LEN]

    @property
    def partition(self) -> int:
        return int.from_bytes(self._pk[K.TOPIC_ID_LEN :], "big")

    @property
    def log_start_offset(self) -> int:
        return self._log_start_offset

    @property
    def log_end_offset(self) -> int:
        """The offset the next appended record gets."""
        return self._log_end_offset

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    @property
    def high_watermark(self) -> int:
        """The last checkpointed high watermark, kept inside ``[log_start_offset, log_end_offset]``."""
        return self._high_watermark

    @property
    def latest_epoch(self) -> int:
        """The latest leader epoch in the epoch cache, -1 if none."""
        with self._lock:
            return self._epochs[-1][0] if self._epochs else -1

    def _check_invariants(self) -> None:
        assert 0 <= self._log_start_offset <= self._high_watermark <= self._log_end_offset, self
        assert self._size_bytes >= 0, self
        assert (self._size_bytes == 0) == (self._log_start_offset == self._log_end_offset), self
        for (e1, s1), (e2, s2) in itertools.pairwise(self._epochs):
            assert e1 < e2 and s1 < s2, self._epochs
        assert all(s <= self._log_end_offset for _, s in self._epochs), (self._epochs, self)
        assert self._time_max is None or self._time_max[1] < self._log_end_offset, (self._time_max, self)

    def _check_live(self) -> None:
        if self._deleted:
            raise StorageError(f"{self!r} was deleted")

    def _reload(self, h: _Handles) -> bool:
        """Rebuild the in-memory state from ``meta`` and the time index; False if never created."""
        with self._lock:
            raw = h.meta.get(K.state_key(self._pk))
            if raw is None:
                return False
            start, end, size = K.STATE.unpack(raw)
            raw_hw = h.meta.get(K.hw_key(self._pk))
            hw = start if raw_hw is None else K.decode_i64(raw_hw)
            prefix = K.epoch_prefix(self._pk)
            entries = scan(h.meta, prefix, prefix + b"\xff" * 5)
            last = _last_before(h.timeindex, self._end_pk, self._pk)
            self._log_start_offset, self._log_end_offset, self._size_bytes = start, end, size
            self._high_watermark = min(max(hw, start), end)
            self._epochs = [(K.epoch_of(k), K.decode_i64(v)) for k, v in entries]
            self._time_max = None if last is None else (K.ts_of(last[0]), K.decode_u64(last[1]))
            self._check_invariants()
            return True

    # ------------------------------------------------------------------ append

    def append(
        self,
        batch: RecordBatch,
        leader_epoch: int,
        *,
        now_ms: int,
        log_append_time: bool = False,
        sync: bool = False,
    ) -> AppendResult:
        """Append one producer batch as the leader of ``leader_epoch``; see ``append_many``."""
        return self.append_many(
            [batch], leader_epoch, now_ms=now_ms, log_append_time=log_append_time, sync=sync
        )[0]

    def append_many(
        self,
        batches: list[RecordBatch],
        leader_epoch: int,
        *,
        now_ms: int,
        log_append_time: bool = False,
        sync: bool = False,
    ) -> list[AppendResult]:
        """Append producer batches as the leader of ``leader_epoch``, all or none, at consecutive offsets.

        Checks each CRC and header (``record_count >= 1``, ``last_offset_delta == record_count - 1``)
        and raises ``CorruptRecordError`` storing nothing. Stamps each batch in place with
        ``base_offset`` (from the log end on) and ``partition_leader_epoch`` (the CRC does not cover
        them) and never re-encodes its ``records``. With ``log_append_time`` the batch becomes a
        LOG_APPEND_TIME batch, as in Kafka: ``timestamp_type`` says so, ``first_timestamp_ms`` and
        ``max_timestamp_ms`` are ``now_ms``, and every record reads ``max_timestamp_ms`` (its
        producer-given delta is ignored, records.proto); the CRC covers timestamps, so it is
        recomputed. Data, counters, epoch-cache
        and time-index entries of every batch go in ONE atomic WriteBatch through the WAL (fsynced
        when ``sync``): once this returns the batches survive a crash of the process, and a failure
        stores none of them. On any error the batches' fields are restored and the log is as it was.
        """
        if not batches:
            raise ValueError("append_many needs at least one batch")
        for i, batch in enumerate(batches):
            _check_fresh(batch, i)
        if not 0 <= leader_epoch <= _MAX_EPOCH:
            raise ValueError(f"leader_epoch must be in [0, {_MAX_EPOCH}], got {leader_epoch}")
        with self._store._writing() as h, self._lock:
            self._check_live()
            saved = [
                (
                    b.base_offset,
                    b.partition_leader_epoch,
                    b.first_timestamp_ms,
                    b.max_timestamp_ms,
                    b.crc,
                    b.timestamp_type,
                )
                for b in batches
            ]
            try:
                next_offset = self._log_end_offset
                for batch in batches:
                    batch.base_offset = next_offset
                    batch.partition_leader_epoch = leader_epoch
                    next_offset += batch.last_offset_delta + 1
                    if log_append_time:
                        batch.timestamp_type = LOG_APPEND_TIME
                        batch.first_timestamp_ms = batch.max_timestamp_ms = now_ms
                        batch.crc = batch_crc(batch)
                return self._append_locked(h, batches, sync)
            except BaseException:
                for b, fields in zip(batches, saved, strict=True):
                    (
                        b.base_offset,
                        b.partition_leader_epoch,
                        b.first_timestamp_ms,
                        b.max_timestamp_ms,
                        b.crc,
                        b.timestamp_type,
                    ) = fields
                raise

    def append_stamped(self, batch: RecordBatch, *, sync: bool = False) -> AppendResult:
        """Append one batch a leader already stamped; see ``append_replicated``."""
        return self.append_replicated([batch], sync=sync)[0]

    def append_replicated(self, batches: Sequence[RecordBatch], *, sync: bool = False) -> list[AppendResult]:
        """Append batches copied from the leader (the follower path), all or none, byte for byte.

        Nothing is stamped: each batch keeps the leader's ``base_offset``, ``partition_leader_epoch``
        and timestamps, and is stored as it serializes (the leader's bytes). Refused, storing nothing:

        - ``CorruptRecordError``: a CRC that does not match, or a bad header (``record_count`` may be
          below ``last_offset_delta + 1``: a compacted batch keeps its offsets but loses records);
        - ``InvalidAppendError``: a gap or an overlap, with the log end or between the batches (each
          batch starts right after the previous one, the first at ``log_end_offset``), or a leader
          epoch older than the one before it or than the latest epoch here.

        One exception to "the first starts at the log end", as in Kafka's follower: an empty log
        (``log_start_offset == log_end_offset``, e.g. right after ``truncate_fully_and_start_at``)
        accepts a first batch that holds its log start offset, since a leader whose log start lies
        inside a batch serves that batch whole. The log start stays where it was.

        A batch whose epoch is newer than the latest one here starts that epoch in the leader-epoch
        cache (KIP-101), in the same atomic WriteBatch as the data, the counters and the time index
        (through the WAL, fsynced when ``sync``): a crash keeps all of it or none of it.
        """
        if not batches:
            raise ValueError("append_replicated needs at least one batch")
        for batch in batches:
            _check_stamped(batch)
        for prev, batch in itertools.pairwise(batches):
            expected = prev.base_offset + prev.last_offset_delta + 1
            if batch.base_offset != expected:
                what = "gap" if batch.base_offset > expected else "overlap"
                raise InvalidAppendError(
                    f"{what} between batches: {batch.base_offset} follows a batch ending at {expected - 1}"
                )
            if batch.partition_leader_epoch < prev.partition_leader_epoch:
                raise InvalidAppendError(
                    f"leader epoch {batch.partition_leader_epoch} at offset {batch.base_offset} follows "
                    f"the newer epoch {prev.partition_leader_epoch}"
                )
        with self._store._writing() as h, self._lock:
            self._check_live()
            first = batches[0]
            end = self._log_end_offset
            if first.base_offset != end and not self._holds_the_empty_start(first):
                what = "gap" if first.base_offset > end else "overlap"
                raise InvalidAppendError(
                    f"{what}: batch base_offset {first.base_offset} is not the log end offset {end}"
                )
            return self._append_locked(h, list(batches), sync)

    def _holds_the_empty_start(self, batch: RecordBatch) -> bool:
        """The log is empty and ``batch`` holds its start offset (see ``append_replicated``)."""
        start = self._log_start_offset
        return start == self._log_end_offset and batch.base_offset < start <= (
            batch.base_offset + batch.last_offset_delta
        )

    def _append_locked(self, h: _Handles, batches: list[RecordBatch], sync: bool) -> list[AppendResult]:
        """Write stamped batches (contiguous from the log end) in ONE WriteBatch: all or none."""
        end = self._log_end_offset
        size_total = self._size_bytes
        time_max = self._time_max
        epochs = list(self._epochs)
        results: list[AppendResult] = []
        pk = self._pk
        wb = WriteBatch(raw_mode=True)
        for i, batch in enumerate(batches):
            epoch = batch.partition_leader_epoch
            latest = epochs[-1][0] if epochs else -1
            if epoch < latest:
                raise InvalidAppendError(f"leader epoch {epoch} is older than the latest epoch {latest}")
            base = batch.base_offset
            assert base == end or (i == 0 and self._holds_the_empty_start(batch)), (base, end, self)
            data = batch.SerializeToString()
            size = len(data)
            max_ts = batch.max_timestamp_ms
            end = base + batch.last_offset_delta + 1
            wb.put(pk + K.offset_suffix(base), data)
            try:
                index_value = K.BATCH_INDEX.pack(size, batch.last_offset_delta, max_ts)
            except struct.error as e:
                raise CorruptRecordError(f"batch too large to index ({size} bytes)") from e
            wb.put(K.batch_index_key(pk, base), index_value, h.meta_cf)
            if epoch > latest:
                self._start_epoch(h, wb, epochs, epoch, max(base, self._log_start_offset))
            if time_max is None or max_ts > time_max[0]:
                wb.put(pk + K.ts_suffix(max_ts), K.encode_u64(base), h.timeindex_cf)
                time_max = (max_ts, base)
            size_total += size
            results.append(AppendResult(base, end - 1, max_ts, self._log_start_offset, size))
        wb.put(K.state_key(pk), K.STATE.pack(self._log_start_offset, end, size_total), h.meta_cf)
        self._store._write(h, wb, sync=sync)

        # Persisted: now, and only now, the in-memory state follows.
        self._log_end_offset = end
        self._size_bytes = size_total
        self._epochs = epochs
        self._time_max = time_max
        self._check_invariants()
        return results

    def _start_epoch(
        self, h: _Handles, wb: WriteBatch, epochs: list[tuple[int, int]], epoch: int, start_offset: int
    ) -> None:
        """Add ``(epoch, start_offset)`` to ``epochs`` and to ``wb``. A latest epoch that starts at the
        same offset holds no record and goes, as in Kafka's LeaderEpochFileCache.assign: start offsets
        strictly increase, so every cached epoch but the latest holds at least one record."""
        assert not epochs or (epochs[-1][0] < epoch and epochs[-1][1] <= start_offset), (epochs, epoch)
        if epochs and epochs[-1][1] == start_offset:
            wb.delete(K.epoch_key(self._pk, epochs.pop()[0]), h.meta_cf)
        wb.put(K.epoch_key(self._pk, epoch), K.encode_i64(start_offset), h.meta_cf)
        epochs.append((epoch, start_offset))

    # ------------------------------------------------------------------ read

    def read(self, fetch_offset: int, max_bytes: int, max_offset: int | None = None) -> list[bytes]:
        """Serialized batches from the one holding ``fetch_offset`` on.

        Stops before a batch whose last offset is ``>= max_offset`` (the high watermark, for
        consumers) and before going past ``max_bytes``, except that the first batch is returned even
        if bigger than ``max_bytes`` (so a consumer always progresses, as in Kafka). The first batch
        may start before ``fetch_offset``: readers skip the records below it. Raises
        ``OffsetOutOfRangeError`` unless ``log_start_offset <= fetch_offset <= log_end_offset``.
        """
        with self._store._reading() as h:
            with self._lock:
                self._check_live()
                start, end = self._log_start_offset, self._log_end_offset
                if not start <= fetch_offset <= end:
                    raise OffsetOutOfRangeError(
                        f"fetch offset {fetch_offset} is outside [{start}, {end}] of {self!r}"
                    )
                if fetch_offset == end or (max_offset is not None and max_offset <= fetch_offset):
                    return []
                # An iterator reads the database as it was when created: with ``end`` read under the
                # same lock, the scan below sees a consistent log while appends go on.
                it = h.db.iter()
            try:
                return self._scan_batches(it, fetch_offset, end, max_bytes, max_offset)
            finally:
                del it

    def _scan_batches(
        self, it: object, fetch_offset: int, end: int, max_bytes: int, max_offset: int | None
    ) -> list[bytes]:
        pk = self._pk
        it.seek_for_prev(pk + K.offset_suffix(fetch_offset))  # type: ignore[attr-defined]
        assert it.valid() and it.key()[: K.PK_LEN] == pk, (fetch_offset, self)  # type: ignore[attr-defined]
        out: list[bytes] = []
        total = 0
        base = K.offset_of(it.key())  # type: ignore[attr-defined]
        value: bytes = it.value()  # type: ignore[attr-defined]
        while True:
            # A batch's last offset is the next batch's base minus one: offsets are dense.
            it.next()  # type: ignore[attr-defined]
            next_base = end
            if it.valid():  # type: ignore[attr-defined]
                key = it.key()  # type: ignore[attr-defined]
                if key[: K.PK_LEN] == pk:
                    next_base = min(K.offset_of(key), end)
            last = next_base - 1
            assert last >= fetch_offset or out, (base, last, fetch_offset)
            if max_offset is not None and last >= max_offset:
                break
            if out and total + len(value) > max_bytes:
                break
            out.append(value)
            total += len(value)
            if next_base >= end:
                break
            base = next_base
            value = it.value()  # type: ignore[attr-defined]
        return out

    # ------------------------------------------------------------------ truncation and retention

    def truncate_to(self, offset: int, *, sync: bool = False) -> None:
        """Remove every record at or after ``offset`` (the follower's divergence fix, KIP-101).

        Batches are whole: if ``offset`` falls inside a batch, that batch goes too and the log end
        becomes its base offset. An offset below every stored batch empties the log and makes
        ``log_start_offset = log_end_offset = offset``. Epoch cache (the epochs starting at or after
        the new end go; the last kept one now ends at the new end), time index, high-watermark
        checkpoint (lowered to the new end) and counters follow, in ONE WriteBatch: a crash keeps the
        whole truncation or none of it. Unsynced, it survives a crash of the process; the WAL keeps
        order, so any later synced write (or ``LogStore.sync_wal``) makes it durable too.

        An offset at or past the log end removes no record, but an epoch that starts at the log end
        leaves the cache all the same (as in Kafka's truncateTo): a replica that became leader,
        started its epoch and appended nothing before it lost the leadership must not go on fetching
        with that epoch, which the new leader never had.
        """
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        with self._store._writing() as h, self._lock:
            self._check_live()
            if offset >= self._log_end_offset:
                self._drop_epochs_from(h, self._log_end_offset, sync)
                return
            pk = self._pk
            bi_lo, bi_hi = K.batch_index_key(pk, 0), K.META_BATCH + self._end_pk
            holder = _last_before(h.meta, K.batch_index_key(pk, offset), bi_lo)
            if holder is not None:
                cut = K.offset_of(holder[0])
                new_end = cut
            else:
                cut, new_end = 0, offset
            removed = self._indexed(h, K.batch_index_key(pk, cut), bi_hi)
            removed_size = sum(b.size_bytes for b in removed)
            new_start = min(self._log_start_offset, new_end)
            new_hw = min(self._high_watermark, new_end)

            wb = WriteBatch(raw_mode=True)
            wb.delete_range(pk + K.offset_suffix(cut), self._end_pk)
            wb.delete_range(K.batch_index_key(pk, cut), bi_hi, h.meta_cf)
            # Time-index entries increase in offset too: the ones to drop are a suffix.
            dropped, last = _scan_back(
                h.timeindex, self._end_pk, pk, until=lambda _k, v: K.decode_u64(v) < cut
            )
            if dropped:
                wb.delete_range(dropped[-1][0], self._end_pk, h.timeindex_cf)
            kept_epochs = [(e, s) for e, s in self._epochs if s < new_end]
            for e, _ in self._epochs[len(kept_epochs) :]:
                wb.delete(K.epoch_key(pk, e), h.meta_cf)
            wb.put(
                K.state_key(pk), K.STATE.pack(new_start, new_end, self._size_bytes - removed_size), h.meta_cf
            )
            if new_hw != self._high_watermark:
                wb.put(K.hw_key(pk), K.encode_i64(new_hw), h.meta_cf)
            self._store._write(h, wb, sync=sync)

            self._log_start_offset, self._log_end_offset = new_start, new_end
            self._size_bytes -= removed_size
            self._high_watermark = new_hw
            self._epochs = kept_epochs
            self._time_max = None if last is None else (K.ts_of(last[0]), K.decode_u64(last[1]))
            self._check_invariants()

    def _drop_epochs_from(self, h: _Handles, offset: int, sync: bool) -> None:
        """Remove the cached epochs that start at or after ``offset`` (Kafka's truncateFromEnd)."""
        kept = [(e, s) for e, s in self._epochs if s < offset]
        if len(kept) == len(self._epochs):
            return
        wb = WriteBatch(raw_mode=True)
        for e, _ in self._epochs[len(kept) :]:
            wb.delete(K.epoch_key(self._pk, e), h.meta_cf)
        self._store._write(h, wb, sync=sync)
        self._epochs = kept
        self._check_invariants()

    def truncate_fully_and_start_at(self, offset: int, *, sync: bool = False) -> None:
        """Empty the log and restart it at ``offset``: ``log_start_offset = high_watermark =
        log_end_offset = offset`` (Kafka's truncateFullyAndStartAt).

        A follower does this when the leader answers OFFSET_OUT_OF_RANGE because the follower's log end
        lies below the leader's log start (retention moved on while the follower was away), so the
        follower's records cannot be compared with the leader's any more. ``offset`` may lie below or
        above the log end. Batches, batch and time index, the whole leader-epoch cache, the counters
        and the high-watermark checkpoint change in one WriteBatch.
        """
        if not 0 <= offset <= _I64_MAX:
            raise ValueError(f"offset must be in [0, 2**63 - 1], got {offset}")
        with self._store._writing() as h, self._lock:
            self._check_live()
            pk = self._pk
            wb = WriteBatch(raw_mode=True)
            wb.delete_range(pk, self._end_pk)
            wb.delete_range(K.batch_index_key(pk, 0), K.META_BATCH + self._end_pk, h.meta_cf)
            wb.delete_range(pk, self._end_pk, h.timeindex_cf)
            for e, _ in self._epochs:
                wb.delete(K.epoch_key(pk, e), h.meta_cf)
            wb.put(K.state_key(pk), K.STATE.pack(offset, offset, 0), h.meta_cf)
            wb.put(K.hw_key(pk), K.encode_i64(offset), h.meta_cf)
            self._store._write(h, wb, sync=sync)

            self._log_start_offset = self._log_end_offset = self._high_watermark = offset
            self._size_bytes = 0
            self._epochs = []
            self._time_max = None
            self._check_invariants()

    def delete_before(self, new_log_start_offset: int, *, sync: bool = False) -> int:
        """Advance the log start to ``new_log_start_offset`` (Kafka's DeleteRecords) and delete the
        batches lying entirely below it; returns how many. Never moves the start backwards (a no-op);
        ``OffsetOutOfRangeError`` past the log end."""
        with self._store._writing() as h, self._lock:
            self._check_live()
            if new_log_start_offset > self._log_end_offset:
                raise OffsetOutOfRangeError(
                    f"cannot start the log at {new_log_start_offset}, past its end {self._log_end_offset}"
                )
            if new_log_start_offset <= self._log_start_offset:
                return 0
            pk = self._pk
            below = self._indexed(
                h, K.batch_index_key(pk, 0), K.batch_index_key(pk, new_log_start_offset), entire_below=True
            )
            self._drop_prefix(h, below, new_log_start_offset, sync)
            return len(below)

    def apply_retention(
        self, now_ms: int, retention_ms: int, retention_bytes: int, *, sync: bool = False
    ) -> int:
        """Delete whole batches from the oldest on while they are expired (``max_timestamp_ms <
        now_ms - retention_ms``) or the log is bigger than ``retention_bytes``; returns how many.

        -1 (any negative) disables either limit. The log start becomes the next remaining batch's base
        offset; the log end never moves (an emptied log restarts at the same offset).
        """
        if retention_ms < 0 and retention_bytes < 0:
            return 0
        with self._store._writing() as h, self._lock:
            self._check_live()
            pk = self._pk
            expired_before = now_ms - retention_ms if retention_ms >= 0 else None
            left = self._size_bytes
            doomed: list[_IndexedBatch] = []
            for b in self._iter_index(h, K.batch_index_key(pk, 0), K.META_BATCH + self._end_pk):
                expired = expired_before is not None and b.max_timestamp_ms < expired_before
                too_big = retention_bytes >= 0 and left > retention_bytes
                if not (expired or too_big):
                    break
                doomed.append(b)
                left -= b.size_bytes
            if not doomed:
                return 0
            self._drop_prefix(h, doomed, doomed[-1].last_offset + 1, sync)
            return len(doomed)

    def _indexed(
        self, h: _Handles, start: bytes, stop: bytes, *, entire_below: bool = False
    ) -> list[_IndexedBatch]:
        """Batch-index entries in ``[start, stop)``; with ``entire_below``, only the batches that end
        below the offset of ``stop``."""
        limit = K.offset_of(stop) if entire_below else 0
        return list(
            itertools.takewhile(
                lambda b: not entire_below or b.last_offset < limit, self._iter_index(h, start, stop)
            )
        )

    def _iter_index(self, h: _Handles, start: bytes, stop: bytes) -> Iterator[_IndexedBatch]:
        """Batch-index entries in ``[start, stop)``, read a chunk at a time, so a caller that stops
        early (retention stops at the first batch it keeps) reads little of a long log."""
        chunk_size = 256
        while True:
            chunk = scan(h.meta, start, stop, limit=chunk_size)
            for key, value in chunk:
                size, lod, max_ts = K.BATCH_INDEX.unpack(value)
                yield _IndexedBatch(K.offset_of(key), size, lod, max_ts)
            if len(chunk) < chunk_size:
                return
            start = chunk[-1][0] + b"\x00"

    def _drop_prefix(self, h: _Handles, doomed: list[_IndexedBatch], new_start: int, sync: bool) -> None:
        """Delete the first batches ``doomed`` (may be none) and start the log at ``new_start``."""
        assert self._log_start_offset < new_start <= self._log_end_offset
        pk = self._pk
        upto = doomed[-1].last_offset + 1 if doomed else None
        assert upto is None or upto <= new_start
        removed_size = sum(b.size_bytes for b in doomed)
        wb = WriteBatch(raw_mode=True)
        time_max = self._time_max
        if upto is not None:
            wb.delete_range(pk, pk + K.offset_suffix(upto))
            wb.delete_range(K.batch_index_key(pk, 0), K.batch_index_key(pk, upto), h.meta_cf)
            time_max = self._rebuild_time_index_prefix(h, wb, upto)
        # KIP-101 cache from the start: drop the epochs that began at or below the new start but keep
        # the last of them, now starting at the new start (Kafka's truncateFromStart).
        covered = [(e, s) for e, s in self._epochs if s <= new_start]
        epochs = self._epochs[len(covered) :]
        for e, _ in covered:
            wb.delete(K.epoch_key(pk, e), h.meta_cf)
        if covered:
            e = covered[-1][0]
            wb.put(K.epoch_key(pk, e), K.encode_i64(new_start), h.meta_cf)
            epochs.insert(0, (e, new_start))
        new_hw = max(self._high_watermark, new_start)
        if new_hw != self._high_watermark:
            wb.put(K.hw_key(pk), K.encode_i64(new_hw), h.meta_cf)
        new_size = self._size_bytes - removed_size
        wb.put(K.state_key(pk), K.STATE.pack(new_start, self._log_end_offset, new_size), h.meta_cf)
        self._store._write(h, wb, sync=sync)

        self._log_start_offset = new_start
        self._size_bytes = new_size
        self._high_watermark = new_hw
        self._epochs = epochs
        self._time_max = time_max
        self._check_invariants()

    def _rebuild_time_index_prefix(self, h: _Handles, wb: WriteBatch, upto: int) -> tuple[int, int] | None:
        """Time-index changes for deleting the batches below ``upto``; returns the new last entry.

        The index holds the batches that raise the running max timestamp. Dropping a prefix of the log
        can turn batches that were shadowed by a deleted one into raisers: they all lie before the
        first surviving entry (whose timestamp beats every one of them), so only that stretch of the
        batch index is re-read.
        """
        pk = self._pk
        gone = scan(h.timeindex, pk, self._end_pk, until=lambda _k, v: K.decode_u64(v) >= upto)
        if not gone:
            return self._time_max
        survivors = scan(h.timeindex, gone[-1][0] + b"\x00", self._end_pk, limit=1)
        wb.delete_range(pk, survivors[0][0] if survivors else self._end_pk, h.timeindex_cf)
        stop = K.decode_u64(survivors[0][1]) if survivors else self._log_end_offset
        running: int | None = None
        last: tuple[int, int] | None = None
        for b in self._iter_index(h, K.batch_index_key(pk, upto), K.batch_index_key(pk, stop)):
            if running is None or b.max_timestamp_ms > running:
                running = b.max_timestamp_ms
                wb.put(pk + K.ts_suffix(running), K.encode_u64(b.base_offset), h.timeindex_cf)
                last = (running, b.base_offset)
        if survivors:
            assert running is None or running < K.ts_of(survivors[0][0])
            return self._time_max
        return last

    # ------------------------------------------------------------------ high watermark

    def checkpoint_high_watermark(self, high_watermark: int, *, sync: bool = False) -> None:
        """Persist the high watermark (it must lie in ``[log_start_offset, log_end_offset]``)."""
        with self._store._writing() as h, self._lock:
            self._check_live()
            if not self._log_start_offset <= high_watermark <= self._log_end_offset:
                start, end = self._log_start_offset, self._log_end_offset
                raise ValueError(f"high watermark {high_watermark} outside [{start}, {end}]")
            if high_watermark == self._high_watermark:
                return
            wb = WriteBatch(raw_mode=True)
            wb.put(K.hw_key(self._pk), K.encode_i64(high_watermark), h.meta_cf)
            self._store._write(h, wb, sync=sync)
            self._high_watermark = high_watermark
            self._check_invariants()

    # ------------------------------------------------------------------ leader-epoch cache

    def epoch_entries(self) -> list[tuple[int, int]]:
        """The leader-epoch cache: ``(epoch, start_offset)``, oldest first."""
        with self._lock:
            return list(self._epochs)

    def assign_epoch_start(self, leader_epoch: int, *, sync: bool = False) -> None:
        """Start ``leader_epoch`` at the log end in the leader-epoch cache, before any record of it is
        appended (Kafka's maybeAssignEpochStartOffset, called when this replica becomes leader).

        Until its first append, a new leader would otherwise answer ``end_offset_for_epoch`` for an
        epoch between its latest cached one and its own with UNDEFINED instead of the offset where
        its leadership began. A no-op if ``leader_epoch`` is already the latest; ``InvalidAppendError``
        if it is older. A latest epoch that starts at the log end (it holds no record) is replaced.
        """
        if not 0 <= leader_epoch <= _MAX_EPOCH:
            raise ValueError(f"leader_epoch must be in [0, {_MAX_EPOCH}], got {leader_epoch}")
        with self._store._writing() as h, self._lock:
            self._check_live()
            latest = self._epochs[-1][0] if self._epochs else -1
            if leader_epoch == latest:
                return
            if leader_epoch < latest:
                raise InvalidAppendError(f"leader epoch {leader_epoch} is older than the latest, {latest}")
            epochs = list(self._epochs)
            wb = WriteBatch(raw_mode=True)
            self._start_epoch(h, wb, epochs, leader_epoch, self._log_end_offset)
            self._store._write(h, wb, sync=sync)
            self._epochs = epochs
            self._check_invariants()

    def end_offset_for_epoch(self, epoch: int) -> tuple[int, int]:
        """``(leader_epoch, end_offset)`` for a requested epoch, exactly as Kafka's
        LeaderEpochFileCache.endOffsetFor (the answer to OffsetsForLeaderEpoch, KIP-101/279, and the
        leader's check of a follower's ``last_fetched_epoch``, KIP-595/320):

        - ``epoch`` is UNDEFINED (-1 or below), the cache is empty, or ``epoch`` is newer than the
          latest cached epoch: ``(UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET)``;
        - ``epoch`` is the latest cached epoch: ``(epoch, log_end_offset)``;
        - ``epoch`` is older than the earliest cached epoch: ``(epoch, start offset of the earliest
          cached epoch)``. Older epochs may have left the cache with the log start, so this bound may
          be loose, never wrong: nothing here from before that offset can be compared;
        - otherwise ``(e, s)``: ``e`` the largest cached epoch ``<= epoch``, ``s`` the start offset of
          the next cached epoch after it.

        A follower truncates to ``min(end_offset, its own end offset for leader_epoch)`` when its own
        cache has that epoch, and keeps asking with older epochs when it does not.
        """
        with self._lock:
            epochs = self._epochs
            if epoch < 0 or not epochs or epoch > epochs[-1][0]:
                return UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET
            if epoch == epochs[-1][0]:
                return epoch, self._log_end_offset
            if epoch < epochs[0][0]:
                return epoch, epochs[0][1]
            i = bisect.bisect_right(epochs, (epoch, _I64_MAX)) - 1
            return epochs[i][0], epochs[i + 1][1]

    # ------------------------------------------------------------------ timestamps

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None:
        """``(offset, timestamp_ms)`` of the first record at or after the log start whose timestamp is
        ``>= timestamp_ms``, or None (Kafka's ListOffsets by time).

        The time index points at the first batch whose max timestamp reaches ``timestamp_ms``; earlier
        batches cannot hold an answer, so that batch is decoded (and, only if its header overstates its
        records or its answer lies below the log start, the ones after it).
        """
        ts = min(max(timestamp_ms, _I64_MIN), _I64_MAX)
        with self._store._reading() as h, self._lock:
            self._check_live()
            entry = scan(h.timeindex, self._pk + K.ts_suffix(ts), self._end_pk, limit=1)
            if not entry:
                return None
            base = K.decode_u64(entry[0][1])
            start = self._log_start_offset
            for raw in self._batches_from(h, base):
                batch = RecordBatch.FromString(raw)
                if batch.max_timestamp_ms < ts:
                    continue
                for r in decode_records(batch):
                    if r.offset >= start and r.timestamp_ms >= ts:
                        return r.offset, r.timestamp_ms
            return None

    def max_timestamp(self) -> tuple[int, int] | None:
        """``(offset, timestamp_ms)`` of the (first) record with the largest timestamp, or None if the
        log is empty. Cheap: the last time-index entry names its batch."""
        with self._store._reading() as h, self._lock:
            self._check_live()
            if self._time_max is None:
                return None
            raw = h.db.get(self._pk + K.offset_suffix(self._time_max[1]))
            assert raw is not None, self._time_max
            best: tuple[int, int] | None = None
            for r in decode_records(RecordBatch.FromString(raw)):
                if best is None or r.timestamp_ms > best[1]:
                    best = (r.offset, r.timestamp_ms)
            return best

    def _batches_from(self, h: _Handles, base: int) -> Iterator[bytes]:
        """Stored batches from ``base`` on, read a few at a time (no iterator lives between yields)."""
        start = self._pk + K.offset_suffix(base)
        while True:
            chunk = scan(h.db, start, self._end_pk, limit=4)
            for _, value in chunk:
                yield value
            if len(chunk) < 4:
                return
            start = chunk[-1][0] + b"\x00"
