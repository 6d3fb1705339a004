"""The consumer: assigned partitions, positions, and a background fetcher feeding ``poll``.

A fetcher thread keeps one long-poll ``Fetch`` in flight per leader node, covering every assigned
partition that node leads, and queues the batches it gets back for ``poll``, which decodes them a
batch at a time as it hands out records (as Kafka's consumer does): the fetcher asks for the next
data as soon as an answer is queued, so the node reads it while ``poll`` decodes the last.
The queue is bounded by ``max_prefetch_bytes``: past it the fetcher waits for ``poll`` to catch up.
Every partition carries a seek epoch, bumped by ``seek`` and resets, so records fetched for an old
position are dropped instead of returned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import grpc

from headwater.client._checks import require_positive
from headwater.client._cluster import STALE_METADATA_CODES, Cluster
from headwater.client.errors import (
    ClientClosedError,
    CorruptMessageError,
    HeadwaterError,
    HeadwaterTimeoutError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    UnknownTopicOrPartitionError,
    error_for_code,
    error_for_rpc,
)
from headwater.client.types import ConsumerRecord, OffsetAndTimestamp, TopicPartition
from headwater.v1 import client_pb2, errors_pb2, records_pb2
from headwater.v1.batch import LOG_APPEND_TIME, decompress

__all__ = ["Consumer", "EARLIEST", "LATEST"]

_log = logging.getLogger("headwater.client.consumer")

#: ListOffsets timestamps with special meaning.
EARLIEST = -2
LATEST = -1

# A batch may inflate to at most this many bytes here (the node refuses larger ones at produce time).
_MAX_INFLATED_BATCH_BYTES = 64 * 1024 * 1024

_RESETS = {"earliest": EARLIEST, "latest": LATEST, "none": None}
_ISOLATION = {
    "read_uncommitted": client_pb2.ISOLATION_LEVEL_READ_UNCOMMITTED,
    "read_committed": client_pb2.ISOLATION_LEVEL_READ_COMMITTED,
}


class _PartitionState:
    """What the consumer knows of one assigned partition. Guarded by the consumer's lock."""

    __slots__ = (
        "position",
        "fetch_offset",
        "epoch",
        "reset_to",
        "error",
        "in_flight",
        "retry_at",
        "high_watermark",
    )

    def __init__(self) -> None:
        self.position: int | None = None  # next offset poll returns
        self.fetch_offset: int | None = None  # next offset to fetch (ahead of position by what is queued)
        self.epoch = 0  # bumped by every seek/reset: fetched data of an older epoch is dropped
        self.reset_to: int | None = None  # EARLIEST/LATEST when a reset is pending
        self.error: HeadwaterError | None = None  # raised by the next poll
        self.in_flight = False
        self.retry_at = 0.0
        self.high_watermark = -1


class _Chunk:
    """The batches of one partition from one fetch, handed from the fetcher to poll.

    ``poll`` decodes them one batch at a time into ``records`` (dropping those below ``min_offset``:
    a batch may start before the fetch offset) and hands those out from ``index`` on.
    """

    __slots__ = ("tp", "epoch", "batches", "next_batch", "min_offset", "records", "index", "size_bytes")

    def __init__(
        self,
        tp: TopicPartition,
        epoch: int,
        batches: list[records_pb2.RecordBatch],
        min_offset: int,
        size_bytes: int,
    ) -> None:
        self.tp = tp
        self.epoch = epoch
        self.batches = batches
        self.next_batch = 0
        self.min_offset = min_offset
        self.records: list[ConsumerRecord] = []
        self.index = 0
        self.size_bytes = size_bytes

    def fill(self) -> bool:
        """Decode the next batch when every decoded record is handed out; False when none is left.

        Raises ``CorruptMessageError`` for a batch this client cannot read (and stays on it).
        """
        while self.index >= len(self.records):
            if self.next_batch >= len(self.batches):
                return False
            batch = self.batches[self.next_batch]
            try:
                records = _consumer_records(batch, self.tp)
            except Exception as exc:  # a batch this client cannot read stops here, loudly
                raise CorruptMessageError(
                    f"cannot decode the batch at offset {batch.base_offset} of "
                    f"{self.tp.topic}-{self.tp.partition}: {exc}; seek past it to go on"
                ) from exc
            self.next_batch += 1
            if batch.base_offset < self.min_offset:
                low = self.min_offset
                records = [r for r in records if r.offset >= low]
            self.records = records
            self.index = 0
        return True


# _consumer_records makes ConsumerRecords as plain tuples, in this field order.
assert ConsumerRecord._fields == ("topic", "partition", "offset", "key", "value", "headers", "timestamp_ms")


def _consumer_records(batch: records_pb2.RecordBatch, tp: TopicPartition) -> list[ConsumerRecord]:
    """A batch's records as ConsumerRecords, in one pass over the decoded payload.

    ``record_tuples`` and a second pass cost a tenth more per record, on the consumer's hot path.
    """
    payload = records_pb2.Records.FromString(
        decompress(batch.compression, batch.records, _MAX_INFLATED_BATCH_BYTES)
    )
    topic, partition = tp
    base = batch.base_offset
    # In a LOG_APPEND_TIME batch every record reads the leader's append time (records.proto).
    log_append_time = batch.timestamp_type == LOG_APPEND_TIME
    first_ts = batch.max_timestamp_ms if log_append_time else batch.first_timestamp_ms
    make = tuple.__new__
    return [
        make(
            ConsumerRecord,
            (
                topic,
                partition,
                base + r.offset_delta,
                r.key if r.HasField("key") else None,
                r.value if r.HasField("value") else None,
                tuple((h.key, h.value if h.HasField("value") else None) for h in hs)
                if (hs := r.headers)
                else (),
                first_ts if log_append_time else first_ts + r.timestamp_delta_ms,
            ),
        )
        for r in payload.records
    ]


class Consumer:
    """Reads assigned partitions from their positions, prefetching in the background.

    ``auto_offset_reset`` decides where a partition without a position, or whose position fell out
    of the log, starts: "earliest", "latest" (Kafka's default) or "none" (``poll`` then raises
    ``NoOffsetForPartitionError`` or ``OffsetOutOfRangeError`` until ``seek`` is called).
    Consumer groups (``subscribe``) come later; for now, ``assign`` partitions explicitly.
    """

    def __init__(
        self,
        bootstrap: str | Iterable[str],
        *,
        auto_offset_reset: str = "latest",
        fetch_max_bytes: int = 50 * 1024 * 1024,
        # 2 MiB answers kept a consumer faster than 8 MiB ones (230 against 212 MiB/s, median of five
        # runs on one partition): the node reads the next while poll decodes, on warm memory.
        max_partition_fetch_bytes: int = 2 * 1024 * 1024,
        fetch_min_bytes: int = 1,
        fetch_max_wait_ms: int = 500,
        max_poll_records: int = 2000,
        max_prefetch_bytes: int = 64 * 1024 * 1024,
        isolation_level: str = "read_uncommitted",
        request_timeout_ms: int = 30_000,
        retry_backoff_ms: int = 100,
        consumer_timeout_ms: int | None = None,
    ) -> None:
        if auto_offset_reset not in _RESETS:
            raise ValueError(
                f"auto_offset_reset must be 'earliest', 'latest' or 'none', got {auto_offset_reset!r}"
            )
        if isolation_level not in _ISOLATION:
            raise ValueError(f"isolation_level must be one of {sorted(_ISOLATION)}, got {isolation_level!r}")
        require_positive(
            fetch_max_bytes=fetch_max_bytes,
            max_partition_fetch_bytes=max_partition_fetch_bytes,
            max_poll_records=max_poll_records,
            max_prefetch_bytes=max_prefetch_bytes,
            request_timeout_ms=request_timeout_ms,
        )
        self._reset_default = _RESETS[auto_offset_reset]
        self._fetch_max_bytes = fetch_max_bytes
        self._partition_max_bytes = max_partition_fetch_bytes
        self._fetch_min_bytes = fetch_min_bytes
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._max_poll_records = max_poll_records
        self._max_prefetch_bytes = max_prefetch_bytes
        self._isolation = _ISOLATION[isolation_level]
        self._request_timeout_s = request_timeout_ms / 1000
        self._backoff_s = retry_backoff_ms / 1000
        self._consumer_timeout_s = None if consumer_timeout_ms is None else consumer_timeout_ms / 1000
        self._cluster = Cluster(bootstrap, request_timeout_s=self._request_timeout_s)

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # wakes the fetcher
        self._arrived = threading.Condition(self._lock)  # wakes poll
        self._states: dict[TopicPartition, _PartitionState] = {}
        self._chunks: deque[_Chunk] = deque()
        self._queued_bytes = 0
        self._node_busy: set[int] = set()
        self._calls: set[Any] = set()
        self._completed: deque[tuple[int, list[tuple[TopicPartition, int, int]], Any]] = deque()
        self._closed = False
        self._fetcher = threading.Thread(
            target=self._run_fetcher, name="headwater-consumer-fetcher", daemon=True
        )
        self._fetcher.start()

    # ------------------------------------------------------------------ assignment and positions

    def assign(self, partitions: Iterable[TopicPartition | tuple[str, int]]) -> None:
        """Replace the assignment. Partitions kept keep their positions; new ones start unpositioned."""
        tps = [TopicPartition(*tp) for tp in partitions]
        self._check_open()
        missing = [tp.topic for tp in tps if tp.topic not in self._cluster.topics]
        if missing:
            self._cluster.refresh(set(self._cluster.topics) | set(missing))
        for tp in tps:
            meta = self._cluster.topics.get(tp.topic)
            if meta is None:
                raise UnknownTopicOrPartitionError(f"topic {tp.topic!r} does not exist")
            if not 0 <= tp.partition < len(meta.partitions):
                raise UnknownTopicOrPartitionError(f"partition {tp.partition} of {tp.topic!r} does not exist")
        with self._lock:
            self._states = {tp: self._states.get(tp) or _PartitionState() for tp in tps}
            self._drop_chunks(lambda c: c.tp not in self._states)
            self._changed.notify()

    def assignment(self) -> set[TopicPartition]:
        return set(self._states)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` on the next poll."""
        if offset < 0:
            raise ValueError(f"offset must not be negative, got {offset}")
        with self._lock:
            st = self._state(tp)
            self._reposition(st, offset)
            self._drop_chunks(lambda c: c.tp == tp)
            self._changed.notify()

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        """Read from the log start (evaluated lazily, on the next poll or position). No args: all."""
        self._seek_to(partitions, EARLIEST)

    def seek_to_end(self, *partitions: TopicPartition) -> None:
        """Read only records written from now on (evaluated lazily). No args: all assigned."""
        self._seek_to(partitions, LATEST)

    def position(self, tp: TopicPartition, timeout_s: float | None = None) -> int:
        """The offset of the next record ``poll`` will return for ``tp``; resolves a pending reset."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self._request_timeout_s)
        while True:
            with self._lock:
                st = self._state(tp)
                if st.error is not None:
                    err, st.error = st.error, None
                    raise err
                if st.position is not None and st.reset_to is None:
                    return st.position
                epoch, target = st.epoch, st.reset_to if st.reset_to is not None else self._reset_default
            if target is None:
                raise NoOffsetForPartitionError(f"{tp.topic}-{tp.partition} has no position; seek first")
            offset = self._list_offsets({tp: target}, deadline)[tp][0]
            with self._lock:
                if st.epoch == epoch and tp in self._states:
                    self._reposition(st, offset)
                    self._changed.notify()

    def beginning_offsets(
        self, partitions: Iterable[TopicPartition], timeout_s: float | None = None
    ) -> dict[TopicPartition, int]:
        """The log start offset of each partition."""
        return {
            tp: o
            for tp, (o, _) in self._list_offsets(
                dict.fromkeys(partitions, EARLIEST), self._deadline(timeout_s)
            ).items()
        }

    def end_offsets(
        self, partitions: Iterable[TopicPartition], timeout_s: float | None = None
    ) -> dict[TopicPartition, int]:
        """The offset the next record of each partition will get (its high watermark)."""
        return {
            tp: o
            for tp, (o, _) in self._list_offsets(
                dict.fromkeys(partitions, LATEST), self._deadline(timeout_s)
            ).items()
        }

    def offsets_for_times(
        self, timestamps: Mapping[TopicPartition, int], timeout_s: float | None = None
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        """For each partition, the first offset whose timestamp is at or after the given one (ms), or
        None when every record is older."""
        for tp, ts in timestamps.items():
            if ts < 0:
                raise ValueError(f"timestamp for {tp} must not be negative, got {ts}")
        found = self._list_offsets(dict(timestamps), self._deadline(timeout_s))
        return {tp: (OffsetAndTimestamp(o, ts) if o >= 0 else None) for tp, (o, ts) in found.items()}

    # ------------------------------------------------------------------ poll

    def poll(self, timeout_s: float = 0.0, max_records: int | None = None) -> list[ConsumerRecord]:
        """Return the records ready now, waiting up to ``timeout_s`` for the first of them.

        Raises the error a partition ran into (``OffsetOutOfRangeError`` with
        ``auto_offset_reset="none"``, a non-retriable fetch error) once, then goes on.
        """
        limit = max_records or self._max_poll_records
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._lock:
            while True:
                self._check_open()
                for st in self._states.values():
                    if st.error is not None:
                        err, st.error = st.error, None
                        raise err
                out = self._take(limit)
                if out:
                    self._changed.notify()
                    return out
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return out
                self._arrived.wait(remaining)

    def __iter__(self) -> Iterator[ConsumerRecord]:
        """Records forever; ends when the consumer is closed, or after ``consumer_timeout_ms`` without one."""
        idle_since = time.monotonic()
        while not self._closed:
            try:
                records = self.poll(0.2)
            except ClientClosedError:
                return
            if records:
                yield from records
                idle_since = time.monotonic()
            elif (
                self._consumer_timeout_s is not None
                and time.monotonic() - idle_since >= self._consumer_timeout_s
            ):
                return

    def close(self) -> None:
        """Stop the fetcher and close the connections. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            calls = list(self._calls)
            self._changed.notify_all()
            self._arrived.notify_all()
        for call in calls:
            call.cancel()
        self._fetcher.join()
        self._cluster.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers (lock held where noted)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("the consumer is closed")

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (timeout_s if timeout_s is not None else self._request_timeout_s)

    def _state(self, tp: TopicPartition) -> _PartitionState:
        """Lock held."""
        st = self._states.get(TopicPartition(*tp))
        if st is None:
            raise ValueError(f"{tp} is not assigned to this consumer")
        return st

    def _reposition(self, st: _PartitionState, offset: int) -> None:
        """Lock held."""
        st.position = st.fetch_offset = offset
        st.epoch += 1
        st.reset_to = None
        st.error = None
        st.retry_at = 0.0

    def _seek_to(self, partitions: tuple[TopicPartition, ...], target: int) -> None:
        with self._lock:
            tps = [TopicPartition(*tp) for tp in partitions] if partitions else list(self._states)
            for tp in tps:
                st = self._state(tp)
                st.reset_to = target
                st.epoch += 1
                st.error = None
            self._drop_chunks(lambda c: c.tp in tps)
            self._changed.notify()

    def _drop_chunks(self, doomed: Any) -> None:
        """Lock held."""
        keep: deque[_Chunk] = deque()
        for c in self._chunks:
            if doomed(c):
                self._queued_bytes -= c.size_bytes
            else:
                keep.append(c)
        self._chunks = keep

    def _take(self, limit: int) -> list[ConsumerRecord]:
        """Lock held: up to ``limit`` queued records for current positions, advancing positions.

        A batch that cannot be decoded ends its partition's run here: the records before it are
        returned, the next ``poll`` raises its error, and fetching starts again at it.
        """
        out: list[ConsumerRecord] = []
        while self._chunks and len(out) < limit:
            chunk = self._chunks[0]
            st = self._states.get(chunk.tp)
            if st is None or st.epoch != chunk.epoch or st.position is None:
                self._chunks.popleft()
                self._queued_bytes -= chunk.size_bytes
                continue
            try:
                more = chunk.fill()
            except CorruptMessageError as exc:
                st.error = exc
                # Drop what was fetched past the bad batch; fetching resumes at it after the error.
                st.fetch_offset = st.position
                st.epoch += 1
                self._drop_chunks(lambda c, bad=chunk.tp: c.tp == bad)
                self._changed.notify()
                break
            if not more:
                self._chunks.popleft()
                self._queued_bytes -= chunk.size_bytes
                continue
            want = limit - len(out)
            records = chunk.records
            start = chunk.index
            end = min(len(records), start + want)
            if start == 0 and end == len(records):
                out.extend(records)
            else:
                out.extend(records[start:end])
            chunk.index = end
            st.position = records[end - 1].offset + 1
        return out

    def _list_offsets(
        self, targets: Mapping[TopicPartition, int], deadline: float
    ) -> dict[TopicPartition, tuple[int, int]]:
        """ListOffsets for each partition (timestamp or EARLIEST/LATEST) at its leader, retrying
        retriable errors until ``deadline``. Returns tp -> (offset, timestamp_ms)."""
        pending = {TopicPartition(*tp): ts for tp, ts in targets.items()}
        out: dict[TopicPartition, tuple[int, int]] = {}
        last: HeadwaterError | None = None
        while pending:
            self._check_open()
            by_node: dict[int, list[TopicPartition]] = {}
            for tp in pending:
                node = self._cluster.leader(tp.topic, tp.partition)
                if node is None:
                    last = UnknownTopicOrPartitionError(f"no leader known for {tp.topic}-{tp.partition}")
                    self._cluster.request_refresh()
                    continue
                by_node.setdefault(node, []).append(tp)
            for node, tps in by_node.items():
                request = client_pb2.ListOffsetsRequest(isolation_level=self._isolation)
                per_topic: dict[str, client_pb2.ListOffsetsTopic] = {}
                for tp in tps:
                    t = per_topic.get(tp.topic) or per_topic.setdefault(
                        tp.topic, request.topics.add(topic=tp.topic)
                    )
                    t.partitions.add(
                        partition=tp.partition,
                        timestamp_ms=pending[tp],
                        current_leader_epoch=self._cluster.leader_epoch(tp.topic, tp.partition),
                    )
                try:
                    timeout = max(min(self._request_timeout_s, deadline - time.monotonic()), 0.001)
                    response = self._cluster.stub_for_node(node).ListOffsets(request, timeout=timeout)
                except grpc.RpcError as exc:
                    last = error_for_rpc(exc, f"ListOffsets to node {node}")
                    if not last.retriable:
                        raise last from None
                    self._cluster.request_refresh()
                    continue
                except HeadwaterError as exc:
                    last = exc
                    self._cluster.request_refresh()
                    continue
                for t in response.topics:
                    for p in t.partitions:
                        tp = TopicPartition(t.topic, p.partition)
                        if tp not in pending:
                            continue
                        if p.error_code == errors_pb2.ERROR_CODE_NONE:
                            out[tp] = (p.offset, p.timestamp_ms)
                            del pending[tp]
                            continue
                        last = error_for_code(p.error_code, p.error_message or f"{tp.topic}-{tp.partition}")
                        if not last.retriable:
                            raise last
                        if p.error_code in STALE_METADATA_CODES:
                            self._cluster.request_refresh()
            if not pending:
                break
            if time.monotonic() + self._backoff_s >= deadline:
                raise HeadwaterTimeoutError(
                    f"ListOffsets for {sorted(pending)} did not complete in time: {last}"
                )
            time.sleep(self._backoff_s)
            if self._cluster.refresh_requested:
                try:
                    self._cluster.refresh({tp.topic for tp in pending} | set(self._cluster.topics))
                except HeadwaterError as exc:
                    last = exc
        return out

    # ------------------------------------------------------------------ the fetcher thread

    def _run_fetcher(self) -> None:
        while True:
            try:
                if not self._fetch_step():
                    return
            except Exception:  # never die silently: poll would wait forever
                _log.exception("consumer fetcher step failed; continuing")
                time.sleep(self._backoff_s)

    def _fetch_step(self) -> bool:
        """Handle finished fetches, resolve resets, refresh metadata, start fetches. False when closed."""
        with self._lock:
            while True:
                if self._closed:
                    return False
                now = time.monotonic()
                completed = list(self._completed)
                self._completed.clear()
                resets = {
                    tp: (st.epoch, st.reset_to if st.reset_to is not None else self._reset_default)
                    for tp, st in self._states.items()
                    if (st.position is None or st.reset_to is not None)
                    and st.error is None
                    and st.retry_at <= now
                }
                no_offset = [tp for tp, (_, target) in resets.items() if target is None]
                for tp in no_offset:
                    del resets[tp]
                    self._states[tp].error = NoOffsetForPartitionError(
                        f"{tp.topic}-{tp.partition} has no position and auto_offset_reset='none'; seek first"
                    )
                    self._arrived.notify_all()
                plan = self._plan_fetches(now) if self._queued_bytes < self._max_prefetch_bytes else {}
                want_metadata = (
                    self._cluster.refresh_requested and now - self._cluster.last_refresh_s >= self._backoff_s
                )
                if completed or resets or plan or want_metadata:
                    break
                wake = [st.retry_at for st in self._states.values() if st.retry_at > now]
                self._changed.wait(min(wake) - now if wake else self._backoff_s * 5)
            topics = set(self._cluster.topics) | {tp.topic for tp in self._states}
        for node, tps, call in completed:
            self._handle_fetch(node, tps, call)
        if want_metadata:
            try:
                self._cluster.refresh(topics)
            except HeadwaterError as exc:
                _log.warning("metadata refresh failed: %s", exc)
                self._cluster.last_refresh_s = time.monotonic()
        if resets:
            self._resolve_resets(resets)
        for node, parts in plan.items():
            self._start_fetch(node, parts)
        return True

    def _plan_fetches(self, now: float) -> dict[int, list[tuple[TopicPartition, int, int]]]:
        """Lock held: per idle leader node, the (tp, fetch_offset, epoch) of partitions to fetch."""
        plan: dict[int, list[tuple[TopicPartition, int, int]]] = {}
        for tp, st in self._states.items():
            if st.in_flight or st.fetch_offset is None or st.reset_to is not None or st.error is not None:
                continue
            if st.retry_at > now:
                continue
            node = self._cluster.leader(tp.topic, tp.partition)
            if node is None:
                self._cluster.request_refresh()
                continue
            if node in self._node_busy:
                continue
            plan.setdefault(node, []).append((tp, st.fetch_offset, st.epoch))
        for node, parts in plan.items():
            self._node_busy.add(node)
            for tp, _, _ in parts:
                self._states[tp].in_flight = True
        return plan

    def _start_fetch(self, node: int, parts: list[tuple[TopicPartition, int, int]]) -> None:
        request = client_pb2.FetchRequest(
            replica_id=-1,
            replica_epoch=-1,
            max_wait_ms=self._fetch_max_wait_ms,
            min_bytes=self._fetch_min_bytes,
            max_bytes=self._fetch_max_bytes,
            isolation_level=self._isolation,
        )
        per_topic: dict[str, client_pb2.FetchTopic] = {}
        for tp, offset, _ in parts:
            t = per_topic.get(tp.topic) or per_topic.setdefault(tp.topic, request.topics.add(topic=tp.topic))
            t.partitions.add(
                partition=tp.partition,
                fetch_offset=offset,
                current_leader_epoch=self._cluster.leader_epoch(tp.topic, tp.partition),
                last_fetched_epoch=-1,
                log_start_offset=-1,
                partition_max_bytes=self._partition_max_bytes,
            )
        timeout = self._request_timeout_s + self._fetch_max_wait_ms / 1000
        try:
            call = self._cluster.stub_for_node(node).Fetch.future(request, timeout=timeout)
        except HeadwaterError as exc:
            self._finish_fetch(node, parts, exc)
            return
        with self._lock:
            self._calls.add(call)

        def done(c: Any) -> None:
            with self._lock:
                self._calls.discard(c)
                self._completed.append((node, parts, c))
                self._changed.notify()

        call.add_done_callback(done)

    def _handle_fetch(self, node: int, parts: list[tuple[TopicPartition, int, int]], call: Any) -> None:
        """Decode a finished fetch outside the lock, then queue its records under it."""
        try:
            response = call.result()
        except grpc.FutureCancelledError:
            self._finish_fetch(node, parts, ClientClosedError("the consumer was closed"))
            return
        except grpc.RpcError as exc:
            self._finish_fetch(node, parts, error_for_rpc(exc, f"Fetch from node {node}"))
            return
        asked = {tp: (offset, epoch) for tp, offset, epoch in parts}
        # (partition, seek epoch, its answer, fetch offset, batches at or past it, next offset, bytes)
        results: list[tuple[TopicPartition, int, Any, int, list[records_pb2.RecordBatch], int, int]] = []
        for t in response.topics:
            for p in t.partitions:
                tp = TopicPartition(t.topic, p.partition)
                if tp not in asked:
                    continue
                offset, epoch = asked[tp]
                batches: list[records_pb2.RecordBatch] = []
                next_offset = offset
                size = 0
                if p.error_code == errors_pb2.ERROR_CODE_NONE:
                    # Only the headers are read here; poll decodes the records (see _Chunk).
                    for batch in p.batches:
                        last = batch.base_offset + batch.last_offset_delta
                        if last < offset:
                            continue
                        batches.append(batch)
                        size += batch.ByteSize()
                        next_offset = max(next_offset, last + 1)
                results.append((tp, epoch, p, offset, batches, next_offset, size))
        with self._lock:
            self._node_busy.discard(node)
            answered = set()
            refresh = False
            for tp, epoch, p, offset, batches, next_offset, size in results:
                answered.add(tp)
                st = self._states.get(tp)
                if st is None:
                    continue
                st.in_flight = False
                if st.epoch != epoch:
                    continue  # sought elsewhere while this fetch was out
                if p.error_code == errors_pb2.ERROR_CODE_NONE:
                    st.high_watermark = p.high_watermark
                    if batches:
                        self._chunks.append(_Chunk(tp, epoch, batches, offset, size))
                        self._queued_bytes += size
                    st.fetch_offset = next_offset
                elif p.error_code == errors_pb2.ERROR_CODE_OFFSET_OUT_OF_RANGE:
                    if self._reset_default is None:
                        st.error = OffsetOutOfRangeError(
                            f"offset {st.fetch_offset} is out of range for {tp.topic}-{tp.partition} "
                            f"(log start {p.log_start_offset}, high watermark {p.high_watermark}) "
                            "and auto_offset_reset='none'; seek to a valid offset"
                        )
                    else:
                        st.reset_to = self._reset_default
                        st.epoch += 1
                else:
                    err = error_for_code(p.error_code, p.error_message or f"{tp.topic}-{tp.partition}")
                    if err.retriable:
                        refresh |= p.error_code in STALE_METADATA_CODES
                        st.retry_at = time.monotonic() + self._backoff_s
                    else:
                        st.error = err
            for tp, _, _ in parts:
                st = self._states.get(tp)
                if tp not in answered and st is not None:
                    st.in_flight = False
            if refresh:
                self._cluster.request_refresh()
            self._arrived.notify_all()

    def _finish_fetch(
        self, node: int, parts: list[tuple[TopicPartition, int, int]], error: HeadwaterError
    ) -> None:
        """The whole fetch failed: back off these partitions (or record a final error)."""
        with self._lock:
            self._node_busy.discard(node)
            for tp, _, epoch in parts:
                st = self._states.get(tp)
                if st is None:
                    continue
                st.in_flight = False
                if st.epoch != epoch or isinstance(error, ClientClosedError):
                    continue
                if error.retriable:
                    st.retry_at = time.monotonic() + self._backoff_s
                else:
                    st.error = error
            if error.retriable:
                self._cluster.request_refresh()
            self._arrived.notify_all()

    def _resolve_resets(self, resets: dict[TopicPartition, tuple[int, int | None]]) -> None:
        targets = {tp: target for tp, (_, target) in resets.items() if target is not None}
        try:
            found = self._list_offsets(targets, time.monotonic() + self._request_timeout_s)
        except HeadwaterError as exc:
            with self._lock:
                for tp, (epoch, _) in resets.items():
                    st = self._states.get(tp)
                    if st is not None and st.epoch == epoch:
                        if exc.retriable:
                            st.retry_at = time.monotonic() + self._backoff_s
                        elif not isinstance(exc, ClientClosedError):
                            st.error = exc
                self._arrived.notify_all()
            return
        with self._lock:
            for tp, (offset, _) in found.items():
                st = self._states.get(tp)
                if st is not None and st.epoch == resets[tp][0]:
                    self._reposition(st, offset)
            self._changed.notify()
