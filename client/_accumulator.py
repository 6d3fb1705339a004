"""The producer's pure core: per-partition batches, readiness, the memory bound, record futures.

No threads, sockets or clocks in here: the producer holds one lock around every call and passes the
time in. That keeps ``send`` to one lock acquisition per record and lets the tests drive batching,
lingering, retry ordering, expiry and the buffer bound by hand.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures._base import FINISHED, PENDING
from operator import attrgetter
from threading import Condition
from typing import Any

from headwater.client.errors import HeadwaterError
from headwater.client.partitioner import StickyPartitioner
from headwater.client.types import Header, RecordMetadata

__all__ = ["RecordFuture", "ProducerBatch", "RecordAccumulator", "Drained", "record_size"]

#: What one record costs in the buffer beyond its key, value and headers (varints, tags, offsets).
RECORD_OVERHEAD_BYTES = 24

RecordTuple = tuple[bytes | None, bytes | None, list[Header] | None, int]


def record_size(key: bytes | None, value: bytes | None, headers: list[Header] | None) -> int:
    """The bytes a record is charged against ``batch_size_bytes`` and ``buffer_memory_bytes``."""
    size = RECORD_OVERHEAD_BYTES
    if key is not None:
        size += len(key)
    if value is not None:
        size += len(value)
    if headers:
        for hk, hv in headers:
            size += len(hk) + (len(hv) if hv is not None else 0) + 4
    return size


class RecordFuture(Future[RecordMetadata]):
    """A ``concurrent.futures.Future`` of one record's ``RecordMetadata``.

    A stock Future builds its own ``threading.Condition``, which costs more than the rest of
    ``Producer.send`` together; a record future shares its batch's condition instead. Every future
    of a batch is completed at once under that condition (``complete_all``), so a waiter woken by a
    sibling always finds its own future done. A record handed to the producer cannot be cancelled.
    """

    def __init__(self, condition: Condition) -> None:  # Future.__init__ is bypassed on purpose
        self._condition = condition
        self._state = PENDING
        self._result = None
        self._exception = None
        # Made on first use: most record futures never get a waiter or a callback, and two fewer
        # container objects per record is a third less work for the garbage collector.
        self._waiter_list: list[Any] | None = None
        self._callback_list: list[Any] | None = None

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        if self._waiter_list is None:
            self._waiter_list = []
        return self._waiter_list

    @property
    def _done_callbacks(self) -> list[Any]:
        if self._callback_list is None:
            self._callback_list = []
        return self._callback_list

    def cancel(self) -> bool:
        return False

    @staticmethod
    def complete_all(
        condition: Condition,
        futures: list[RecordFuture],
        results: Iterator[RecordMetadata] | None,
        error: BaseException | None = None,
    ) -> None:
        """Complete every future of a batch with ``results`` (one each) or ``error``, then run callbacks."""
        with condition:
            for f in futures:
                if f._state == FINISHED:
                    continue
                if error is None:
                    assert results is not None
                    f._result = next(results)
                    f._state = FINISHED
                    if f._waiter_list:
                        for w in f._waiter_list:
                            w.add_result(f)
                else:
                    f._exception = error
                    f._state = FINISHED
                    if f._waiter_list:
                        for w in f._waiter_list:
                            w.add_exception(f)
            condition.notify_all()
        for f in futures:
            if f._callback_list:
                f._invoke_callbacks()  # type: ignore[attr-defined]


class ProducerBatch:
    """The records bound for one partition that travel together; encoded into a RecordBatch once."""

    __slots__ = (
        "topic",
        "partition",
        "records",
        "futures",
        "size_bytes",
        "created_ms",
        "condition",
        "attempts",
        "retry_at_ms",
        "built",
        "last_error",
        "done",
        "seq",
    )

    def __init__(self, topic: str, partition: int, created_ms: int, seq: tuple[int, ...] = (0,)) -> None:
        self.topic = topic
        self.partition = partition
        self.records: list[RecordTuple] = []
        self.futures: list[RecordFuture] = []
        self.size_bytes = 0
        self.created_ms = created_ms
        self.condition = Condition()
        self.attempts = 0
        self.retry_at_ms = 0
        # The serialized RecordBatch in its two pieces, made once (encode_batch_parts).
        self.built: tuple[bytes, bytes] | None = None
        self.last_error: HeadwaterError | None = None
        self.done = False
        # Creation order: a partition's batches reach the node in this order, retries included.
        self.seq = seq

    def __repr__(self) -> str:
        where = f"{self.topic}-{self.partition}"
        return f"ProducerBatch({where}, records={len(self.records)}, attempts={self.attempts})"

    def complete(self, base_offset: int, log_append_time_ms: int = -1) -> None:
        """Resolve every record future: offsets are ``base_offset + index`` (-1 for acks=0)."""
        topic, partition = self.topic, self.partition
        if base_offset < 0:
            results = (RecordMetadata(topic, partition, -1, r[3]) for r in self.records)
        elif log_append_time_ms > 0:  # proto3 leaves 0 when a node omits it; -1 means create time
            results = (
                RecordMetadata(topic, partition, base_offset + i, log_append_time_ms)
                for i in range(len(self.records))
            )
        else:
            results = (
                RecordMetadata(topic, partition, base_offset + i, r[3]) for i, r in enumerate(self.records)
            )
        RecordFuture.complete_all(self.condition, self.futures, results)

    def fail(self, error: BaseException) -> None:
        RecordFuture.complete_all(self.condition, self.futures, None, error)


class Drained:
    """What ``RecordAccumulator.drain`` hands the sender: batches per leader node, and whether a leader
    was missing (so metadata should be refreshed)."""

    __slots__ = ("by_node", "leader_missing")

    def __init__(self) -> None:
        self.by_node: dict[int, list[ProducerBatch]] = {}
        self.leader_missing = False


class RecordAccumulator:
    """Open batches per partition, closed batches awaiting send, and the buffer-memory account.

    Invariants: a partition has at most one open batch; ``ready`` holds each partition's closed
    batches in creation order (``seq``), retries put back in their place, so batches of one
    partition reach the node in the order they were made; a partition's requests in flight all go
    to one node, over one ordered stream (see ``drain``); ``buffer_used_bytes`` is the sum of
    ``size_bytes`` over ``incomplete``.
    """

    def __init__(
        self,
        *,
        batch_size_bytes: int,
        linger_ms: int,
        buffer_memory_bytes: int,
        rng: random.Random | None = None,
    ) -> None:
        self.batch_size_bytes = batch_size_bytes
        self.linger_ms = linger_ms
        self.buffer_memory_bytes = buffer_memory_bytes
        self.buffer_used_bytes = 0
        self.open: dict[tuple[str, int], ProducerBatch] = {}
        self.ready: deque[ProducerBatch] = deque()
        self.incomplete: set[ProducerBatch] = set()
        # Partitions with requests in flight: (node, how many requests) (see drain).
        self.in_flight: dict[tuple[str, int], tuple[int, int]] = {}
        self.sticky = StickyPartitioner(rng)
        self._next_seq = 0

    # ------------------------------------------------------------------ the send path

    def has_room(self, size: int) -> bool:
        return self.buffer_used_bytes + size <= self.buffer_memory_bytes

    def append(
        self, topic: str, partition: int, record: RecordTuple, size: int, now_ms: int
    ) -> tuple[RecordFuture, bool]:
        """Add a record; returns its future and whether a batch was opened or closed (wake the sender)."""
        key = (topic, partition)
        batch = self.open.get(key)
        changed = False
        if batch is not None and batch.size_bytes + size > self.batch_size_bytes:
            self._close(batch)
            batch = None
        if batch is None:
            self._next_seq += 1
            batch = self.open[key] = ProducerBatch(topic, partition, now_ms, (self._next_seq,))
            self.incomplete.add(batch)
            changed = True
        batch.records.append(record)
        batch.size_bytes += size
        self.buffer_used_bytes += size
        future = RecordFuture(batch.condition)
        batch.futures.append(future)
        if batch.size_bytes >= self.batch_size_bytes:
            self._close(batch)
            changed = True
        return future, changed

    def _close(self, batch: ProducerBatch) -> None:
        del self.open[(batch.topic, batch.partition)]
        self.ready.append(batch)
        self.sticky.on_batch_done(batch.topic, batch.partition)

    # ------------------------------------------------------------------ the sender

    def drain(
        self,
        now_ms: int,
        *,
        flush: bool,
        leader_of: Callable[[str, int], int | None],
        node_has_room: Callable[[int], bool],
        max_request_bytes: int,
    ) -> Drained:
        """Take the batches that can go now: per leader node, one request of at most ``max_request_bytes``.

        A batch can go when it is closed, its linger has run out, or a flush is under way; its retry
        backoff has passed; its leader is known; its node has an in-flight slot for one more request;
        and its partition has no request in flight to another node. A partition whose oldest batch
        cannot go sends nothing newer either. A node's requests travel one ordered stream, so several
        of one partition may be in flight to its leader at once; but a partition whose leader moved
        waits until its requests to the old leader are answered, or a retry could land after newer
        batches sent to the new one. ``unmute`` ends a request.
        """
        out = Drained()
        blocked: set[tuple[str, int]] = set()
        request_bytes: dict[int, int] = {}

        def take(batch: ProducerBatch) -> bool:
            tp = (batch.topic, batch.partition)
            if tp in blocked:
                return False
            if batch.retry_at_ms > now_ms:
                blocked.add(tp)
                return False
            node = leader_of(batch.topic, batch.partition)
            if node is None:
                out.leader_missing = True
                blocked.add(tp)
                return False
            flying = self.in_flight.get(tp)
            if flying is not None and flying[0] != node:
                blocked.add(tp)
                return False
            used = request_bytes.get(node)
            if used is None:
                if not node_has_room(node):
                    blocked.add(tp)
                    return False
                used = 0
            elif used + batch.size_bytes > max_request_bytes:
                blocked.add(tp)
                return False
            request_bytes[node] = used + batch.size_bytes
            out.by_node.setdefault(node, []).append(batch)
            return True

        if self.ready:
            keep: deque[ProducerBatch] = deque()
            for batch in self.ready:
                if not take(batch):
                    keep.append(batch)
            self.ready = keep
        if self.open:
            deadline = now_ms - self.linger_ms
            for key, batch in list(self.open.items()):
                if (flush or batch.created_ms <= deadline) and take(batch):
                    del self.open[key]
                    self.sticky.on_batch_done(batch.topic, batch.partition)
        for node, batches in out.by_node.items():
            for tp in {(b.topic, b.partition) for b in batches}:
                self.in_flight[tp] = (node, self.in_flight.get(tp, (node, 0))[1] + 1)
        return out

    def next_unbuilt(self) -> ProducerBatch | None:
        """The oldest closed batch not built into a RecordBatch yet (the sender builds it ahead)."""
        for batch in self.ready:
            if batch.built is None:
                return batch
        return None

    def unmute(self, batches: Iterable[ProducerBatch]) -> None:
        """The request carrying these batches (as ``drain`` gave them) is over."""
        for tp in {(b.topic, b.partition) for b in batches}:
            flying = self.in_flight.get(tp)
            if flying is None:
                continue
            if flying[1] <= 1:
                del self.in_flight[tp]
            else:
                self.in_flight[tp] = (flying[0], flying[1] - 1)

    def next_deadline_ms(self) -> int | None:
        """The earliest time something may become sendable by itself (linger or backoff ending)."""
        deadline: int | None = None
        for batch in self.open.values():
            t = batch.created_ms + self.linger_ms
            if deadline is None or t < deadline:
                deadline = t
        for batch in self.ready:
            t = batch.retry_at_ms
            if deadline is None or t < deadline:
                deadline = t
        return deadline

    def reenqueue(self, batches: list[ProducerBatch], retry_at_ms: int) -> None:
        """Put batches back for a retry, each in its place: after its partition's older batches (some
        may have come back first, from a later answer) and before the newer ones."""
        for batch in batches:
            batch.retry_at_ms = retry_at_ms
        self.ready = deque(sorted([*self.ready, *batches], key=attrgetter("seq")))

    def expired(self, now_ms: int, delivery_timeout_ms: int) -> list[ProducerBatch]:
        """Remove and return the waiting batches older than ``delivery_timeout_ms`` (in-flight ones stay)."""
        limit = now_ms - delivery_timeout_ms
        out = [b for b in self.ready if b.created_ms <= limit]
        if out:
            gone = set(map(id, out))
            self.ready = deque(b for b in self.ready if id(b) not in gone)
        for key, batch in list(self.open.items()):
            if batch.created_ms <= limit:
                del self.open[key]
                out.append(batch)
        return out

    def split(self, batch: ProducerBatch) -> list[ProducerBatch]:
        """Halve a batch the node refused as too large (Kafka splits on MESSAGE_TOO_LARGE too).

        The halves keep the records' futures, their order and their buffer bytes; the original is
        retired without giving bytes back, so ``buffer_used_bytes`` stays exact.
        """
        assert len(batch.records) > 1 and not batch.done and batch in self.incomplete
        mid = len(batch.records) // 2
        halves: list[ProducerBatch] = []
        for records, futures in (
            (batch.records[:mid], batch.futures[:mid]),
            (batch.records[mid:], batch.futures[mid:]),
        ):
            half = ProducerBatch(batch.topic, batch.partition, batch.created_ms, (*batch.seq, len(halves)))
            half.records, half.futures = records, futures
            half.condition = batch.condition  # the futures wait on their first batch's condition
            half.size_bytes = sum(record_size(k, v, h) for k, v, h, _ in records)
            half.attempts, half.last_error = batch.attempts, batch.last_error
            halves.append(half)
        halves[1].size_bytes = batch.size_bytes - halves[0].size_bytes
        batch.done = True
        self.incomplete.discard(batch)
        self.incomplete.update(halves)
        return halves

    def take_all(self) -> list[ProducerBatch]:
        """Remove and return every batch not yet sent (on a forced close)."""
        out = [*self.ready, *self.open.values()]
        self.ready.clear()
        self.open.clear()
        return out

    def release(self, batch: ProducerBatch) -> None:
        """Forget a finished batch and give its bytes back to the buffer."""
        if not batch.done:
            batch.done = True
            self.incomplete.discard(batch)
            self.buffer_used_bytes -= batch.size_bytes
            assert self.buffer_used_bytes >= 0

    @property
    def pending(self) -> bool:
        """Whether any batch is open, waiting or in flight."""
        return bool(self.incomplete)
