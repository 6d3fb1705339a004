"""The producer: ``send`` appends to per-partition batches; a sender thread ships them to leaders.

``send`` does the least it can per record (partition choice, one lock, a tuple and a future) and
returns. The sender thread wakes when a batch fills, a linger runs out, a flush starts or a retry is
due; it encodes each batch once (``headwater.v1.batch.encode_batch_parts``, ahead of time while the
batch waits), groups batches by leader node, and writes one request per node, straight to the wire
(``_wire.py``), on that node's ``ProduceStream`` (``_stream.py``), up to
``max_in_flight_requests_per_node`` unanswered at a time.
The stream's reader thread completes the record futures or queues retries as the answers come.

The stream is what keeps a partition's records in send order with several requests in flight: the
node appends a stream's requests in the order they were written, and once it refuses a partition's
batches it refuses that partition's later ones in the stream too, so a retry never lands behind a
newer batch. The producer then ends that stream and resends, in order, on a new one.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Container, Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from types import TracebackType
from typing import Any

from headwater.client._accumulator import ProducerBatch, RecordAccumulator, RecordTuple
from headwater.client._checks import require_not_negative, require_positive
from headwater.client._cluster import STALE_METADATA_CODES, Cluster, TopicMeta
from headwater.client._stream import Pending, ProduceStream
from headwater.client._wire import produce_stream_request
from headwater.client.errors import (
    BufferFullError,
    ClientClosedError,
    HeadwaterError,
    HeadwaterTimeoutError,
    NodeNotAvailableError,
    RecordTooLargeError,
    UnknownServerError,
    UnknownTopicOrPartitionError,
    error_for_code,
)
from headwater.client.partitioner import partition_for_key
from headwater.client.types import Header, RecordMetadata
from headwater.v1 import client_pb2, errors_pb2
from headwater.v1.batch import COMPRESSION_BY_NAME, encode_batch_parts

__all__ = ["Producer", "parse_acks"]

_log = logging.getLogger("headwater.client.producer")

_EXPIRY_CHECK_INTERVAL_MS = 20

_ACKS = {"all": -1, "-1": -1, -1: -1, "1": 1, 1: 1, "0": 0, 0: 0}


def parse_acks(acks: str | int) -> int:
    """``"all"``/-1, 1 or 0 (strings or ints) -> the wire value -1, 1 or 0."""
    try:
        return _ACKS[acks]
    except (KeyError, TypeError):
        raise ValueError(f"acks must be 'all', -1, 1 or 0, got {acks!r}") from None


def _as_bytes(data: Any, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"{what} must be bytes, str or None, got {type(data).__name__}")


def _as_headers(headers: Iterable[tuple[str, Any]] | Mapping[str, Any]) -> list[Header]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), None if v is None else _as_bytes(v, "header value")) for k, v in items]


def _retry_or_fail(
    b: ProducerBatch, final: HeadwaterError | None, retry: list[ProducerBatch], failed: list[ProducerBatch]
) -> None:
    """File a refused batch: retried when ``final`` is None, else failed with it."""
    if final is None:
        retry.append(b)
    else:
        b.last_error = final
        failed.append(b)


def _failed(error: BaseException) -> Future[RecordMetadata]:
    f: Future[RecordMetadata] = Future()
    f.set_exception(error)
    return f


class Producer:
    """Sends records to topics; every ``send`` returns a Future of its ``RecordMetadata``.

    Keyed records go to Kafka's murmur2 partition of the key; keyless ones are sticky (KIP-480).
    ``acks``: "all" (-1) waits for every in-sync replica, 1 for the leader's append, 0 for nothing
    (futures then complete with offset -1 once the request is sent). Retriable errors are retried
    with exponential backoff until ``delivery_timeout_ms`` after the record's batch was opened.
    At most ``buffer_memory_bytes`` of records wait in memory; beyond that ``send`` blocks for up to
    ``max_block_ms`` (or at once, with ``block_on_buffer_full=False``) and raises ``BufferFullError``.

    ``max_block_ms`` (default 60 s, Kafka's ``max.block.ms``) also bounds how long ``send`` and
    ``partitions_for`` wait for a topic's metadata. A topic that does not exist is retriable, as in
    Kafka: it may be being created, or its metadata may not have reached the node asked yet. So the
    first ``send`` to a missing topic blocks for ``max_block_ms`` and then raises
    ``UnknownTopicOrPartitionError``. To fail at once, check first (``Admin.describe_topics``, as the
    ``headwater`` command does) or pass a smaller ``max_block_ms``.
    """

    def __init__(
        self,
        bootstrap: str | Iterable[str],
        *,
        acks: str | int = "all",
        linger_ms: int = 5,
        batch_size_bytes: int = 256 * 1024,
        compression: str = "none",
        buffer_memory_bytes: int = 64 * 1024 * 1024,
        block_on_buffer_full: bool = True,
        max_block_ms: int = 60_000,
        request_timeout_ms: int = 30_000,
        delivery_timeout_ms: int = 120_000,
        retries: int = 2**31 - 1,
        retry_backoff_ms: int = 100,
        retry_backoff_max_ms: int = 1_000,
        max_in_flight_requests_per_node: int = 5,
        max_request_size: int = 1024 * 1024,
        metadata_max_age_ms: int = 300_000,
        rng: random.Random | None = None,
    ) -> None:
        if compression not in COMPRESSION_BY_NAME:
            raise ValueError(f"compression must be one of {sorted(COMPRESSION_BY_NAME)}, got {compression!r}")
        require_positive(
            batch_size_bytes=batch_size_bytes,
            buffer_memory_bytes=buffer_memory_bytes,
            request_timeout_ms=request_timeout_ms,
            delivery_timeout_ms=delivery_timeout_ms,
            max_in_flight_requests_per_node=max_in_flight_requests_per_node,
            max_request_size=max_request_size,
        )
        require_not_negative(
            linger_ms=linger_ms, max_block_ms=max_block_ms, retries=retries, retry_backoff_ms=retry_backoff_ms
        )
        self.acks = parse_acks(acks)
        self._compression = COMPRESSION_BY_NAME[compression]
        self._block = block_on_buffer_full
        self._max_block_s = max_block_ms / 1000
        self._request_timeout_ms = request_timeout_ms
        self._delivery_timeout_ms = delivery_timeout_ms
        self._next_expiry_check_ms = 0
        self._retries = retries
        self._retry_backoff_ms = retry_backoff_ms
        self._retry_backoff_max_ms = max(retry_backoff_max_ms, retry_backoff_ms)
        self._max_in_flight = max_in_flight_requests_per_node
        self._max_request_size = max_request_size
        self._metadata_max_age_s = metadata_max_age_ms / 1000

        self._cluster = Cluster(bootstrap, request_timeout_s=request_timeout_ms / 1000)
        self._acc = RecordAccumulator(
            batch_size_bytes=batch_size_bytes,
            linger_ms=linger_ms,
            buffer_memory_bytes=buffer_memory_bytes,
            rng=rng,
        )
        # One lock guards the accumulator, the in-flight counts and the flags below.
        self._lock = threading.Lock()
        self._wake_sender = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._in_flight: dict[int, int] = {}
        self._topics: set[str] = set()
        self._flushing = 0
        self._closing = False
        self._force_close = False
        self._closed = False
        # One ProduceStream per node, made on first use; only the sender thread adds or ends them.
        self._streams: dict[int, ProduceStream] = {}
        self._sender = threading.Thread(
            target=self._run_sender, name="headwater-producer-sender", daemon=True
        )
        self._sender.start()

    # ------------------------------------------------------------------ public API

    def send(
        self,
        topic: str,
        value: bytes | str | None = None,
        key: bytes | str | None = None,
        headers: Iterable[tuple[str, Any]] | Mapping[str, Any] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> Future[RecordMetadata]:
        """Queue one record; the Future resolves to where it landed, or to the error that stopped it.

        Raises (rather than failing the Future) when the producer is closed, when the topic does not
        appear in the metadata within ``max_block_ms``, and with ``BufferFullError``.
        """
        if self._closed:
            raise ClientClosedError("cannot send: the producer is closed")
        if value is not None and type(value) is not bytes:
            value = _as_bytes(value, "value")
        if key is not None and type(key) is not bytes:
            key = _as_bytes(key, "key")
        hdrs = _as_headers(headers) if headers else None
        if timestamp_ms is None:
            timestamp_ms = time.time_ns() // 1_000_000
        size = 24 + (len(value) if value is not None else 0) + (len(key) if key is not None else 0)
        if hdrs:
            size += sum(len(k) + (len(v) if v is not None else 0) + 4 for k, v in hdrs)
        if size > self._max_request_size or size > self._acc.buffer_memory_bytes:
            return _failed(
                RecordTooLargeError(
                    f"record of {size} bytes exceeds max_request_size={self._max_request_size} "
                    f"or buffer_memory_bytes={self._acc.buffer_memory_bytes}"
                )
            )
        meta = self._cluster.topics.get(topic)
        if meta is None:
            meta = self._wait_for_topic(topic)
        n = len(meta.partitions)
        if partition is not None:
            if not 0 <= partition < n:
                return _failed(
                    UnknownTopicOrPartitionError(
                        f"partition {partition} of {topic!r} does not exist ({n} partitions)"
                    )
                )
        elif key is not None:
            partition = partition_for_key(key, n)
        record: RecordTuple = (key, value, hdrs, timestamp_ms)
        with self._lock:
            if self._closed:  # checked again under the lock: close() may have run since the first check
                raise ClientClosedError("cannot send: the producer is closed")
            if partition is None:
                partition = self._acc.sticky.partition(topic, n, meta.available)
            if not self._acc.has_room(size):
                self._wait_for_room(size)
            future: Future[RecordMetadata]
            future, changed = self._acc.append(topic, partition, record, size, int(time.monotonic() * 1000))
            if changed:
                self._wake_sender.notify()
        return future

    def flush(self, timeout_s: float | None = None) -> None:
        """Send everything queued now, ignoring linger, and wait until each of those records completes.

        Raises ``HeadwaterTimeoutError`` if they have not all completed within ``timeout_s``.
        Failed records do not make ``flush`` raise: their futures hold the errors.
        """
        with self._lock:
            waiting = [b.futures[-1] for b in self._acc.incomplete if b.futures]
            self._flushing += 1
            self._wake_sender.notify()
        try:
            _, not_done = wait_futures(waiting, timeout=timeout_s)
            if not_done:
                raise HeadwaterTimeoutError(
                    f"flush: {len(not_done)} batches still incomplete after {timeout_s} s"
                )
        finally:
            with self._lock:
                self._flushing -= 1

    def close(self, timeout_s: float | None = None) -> None:
        """Send what is queued, wait up to ``timeout_s`` (None: no limit), then stop.

        Records still unsent when the time is up fail with ``ClientClosedError``.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing = True
            self._wake_sender.notify()
            self._room.notify_all()
        self._sender.join(timeout_s)
        if self._sender.is_alive():
            with self._lock:
                self._force_close = True
                self._wake_sender.notify()
            self._cluster.close()  # cancels in-flight calls; their batches fail
            self._sender.join()
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.end()
        for stream in streams:
            stream.join(self._request_timeout_ms / 1000)
        self._cluster.close()  # breaks any stream still open: its requests fail

    def partitions_for(self, topic: str) -> list[int]:
        """The partition numbers of a topic (waits for its metadata up to ``max_block_ms``)."""
        meta = self._cluster.topics.get(topic) or self._wait_for_topic(topic)
        return [p.partition for p in meta.partitions]

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ send path helpers

    def _wait_for_topic(self, topic: str) -> TopicMeta:
        """Block until the topic's metadata is known, up to max_block_ms."""
        if not topic:
            raise ValueError("topic must be a non-empty string")
        deadline = time.monotonic() + self._max_block_s
        last: HeadwaterError | None = None
        with self._lock:
            self._topics.add(topic)
            topics = sorted(self._topics)
        while True:
            try:
                response = self._cluster.refresh(topics)
                meta = self._cluster.topics.get(topic)
                if meta is not None and meta.partitions:
                    return meta
                last = self._cluster.topic_error(response, topic) or UnknownTopicOrPartitionError(
                    f"topic {topic!r} has no partitions"
                )
                if not last.retriable:
                    raise last
            except NodeNotAvailableError as exc:
                last = exc
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                break
            time.sleep(min(self._retry_backoff_ms / 1000, remaining))
        waited = f"after max_block_ms={int(self._max_block_s * 1000)}"
        if isinstance(last, UnknownTopicOrPartitionError):
            raise UnknownTopicOrPartitionError(f"topic {topic!r} does not exist ({waited})")
        raise HeadwaterTimeoutError(f"metadata for topic {topic!r} not available {waited}: {last}")

    def _wait_for_room(self, size: int) -> None:
        """Called with the lock held: wait for ``size`` bytes of buffer memory or raise."""
        if not self._block:
            raise BufferFullError(
                f"buffer_memory_bytes={self._acc.buffer_memory_bytes} is full and block_on_buffer_full=False"
            )
        deadline = time.monotonic() + self._max_block_s
        while not self._acc.has_room(size):
            if self._closed:
                raise ClientClosedError("the producer was closed while send waited for buffer memory")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BufferFullError(
                    f"no room for {size} bytes in buffer_memory_bytes={self._acc.buffer_memory_bytes} "
                    f"within max_block_ms={int(self._max_block_s * 1000)}"
                )
            self._room.wait(remaining)

    # ------------------------------------------------------------------ the sender thread

    def _run_sender(self) -> None:
        while True:
            try:
                if not self._sender_step():
                    return
            except Exception:  # the sender must not die silently: every future would hang
                _log.exception("producer sender step failed; continuing")
                time.sleep(self._retry_backoff_ms / 1000)

    def _sender_step(self) -> bool:
        """One round: wait for work, then expire, refresh metadata and send. False when done."""
        backoff_s = self._retry_backoff_ms / 1000
        request_timeout_s = self._request_timeout_ms / 1000
        unbuilt: ProducerBatch | None = None
        to_end: list[ProduceStream] = []
        overdue: list[ProduceStream] = []
        requests: list[tuple[int, ProduceStream | None, Pending | HeadwaterError]] = []
        with self._lock:
            while True:
                to_end, overdue, oldest_sent_at = self._tend_streams(time.monotonic() - request_timeout_s)
                if self._force_close:
                    doomed = self._acc.take_all()
                    for b in doomed:
                        self._acc.release(b)
                    break
                now_ms = int(time.monotonic() * 1000)
                doomed = []
                if now_ms >= self._next_expiry_check_ms:
                    # Scanning every waiting batch on every round cost 5% of the producer's time under
                    # load; a few tens of milliseconds of lateness on a timeout of minutes is nothing.
                    self._next_expiry_check_ms = now_ms + _EXPIRY_CHECK_INTERVAL_MS
                    doomed = self._acc.expired(now_ms, self._delivery_timeout_ms)
                for b in doomed:
                    self._acc.release(b)
                drained = self._acc.drain(
                    now_ms,
                    flush=self._flushing > 0 or self._closing,
                    leader_of=self._cluster.leader,
                    node_has_room=self._node_has_room,
                    max_request_bytes=self._max_request_size,
                )
                for node, batches in drained.by_node.items():
                    self._in_flight[node] = self._in_flight.get(node, 0) + 1
                    for b in batches:
                        b.attempts += 1
                    requests.append(self._register(node, batches))
                since_refresh = time.monotonic() - self._cluster.last_refresh_s
                want_metadata = (
                    drained.leader_missing or self._cluster.refresh_requested
                ) and since_refresh >= backoff_s
                if self._acc.incomplete and since_refresh >= self._metadata_max_age_s:
                    want_metadata = True
                if doomed or drained.by_node or want_metadata or to_end or overdue:
                    break
                # Nothing can go yet: build a closed batch now, while its partition's request is in
                # flight, so the next request is ready the moment the answer comes back.
                unbuilt = self._acc.next_unbuilt()
                if unbuilt is not None:
                    break
                if self._closing and not self._acc.pending:
                    return False
                deadline = self._acc.next_deadline_ms()
                timeout = None if deadline is None else (deadline - now_ms) / 1000
                if oldest_sent_at is not None:  # an unanswered request's timeout
                    due = oldest_sent_at + request_timeout_s - time.monotonic()
                    timeout = due if timeout is None else min(timeout, due)
                if timeout is None and self._acc.pending:
                    timeout = backoff_s
                if timeout is not None and timeout <= 0:
                    # Something is due but cannot go (no leader, no in-flight slot): a response or a
                    # metadata refresh will change that; look again after a backoff at the latest.
                    timeout = backoff_s
                self._wake_sender.wait(timeout)
            topics = sorted(self._topics)

        for b in doomed:
            if self._force_close:
                b.fail(ClientClosedError("the producer was closed before the record was sent"))
            else:
                b.fail(
                    HeadwaterTimeoutError(
                        f"expired: {len(b.records)} records for {b.topic}-{b.partition} not acknowledged "
                        f"within "
                        f"delivery_timeout_ms={self._delivery_timeout_ms}"
                        + (f"; last error: {b.last_error}" if b.last_error else "")
                    )
                )
        for stream in to_end:
            stream.end()
        for stream in overdue:
            _log.warning(
                "no answer from node %d within request_timeout_ms=%d: resending its requests",
                stream.node,
                self._request_timeout_ms,
            )
            stream.cancel(timed_out=True)
        if self._force_close:
            return False
        if unbuilt is not None:
            # Only this thread builds batches, and a closed batch's records no longer change.
            unbuilt.built = encode_batch_parts(unbuilt.records, self._compression)
            return True
        if want_metadata:
            try:
                self._cluster.refresh(topics)
            except HeadwaterError as exc:
                _log.warning("metadata refresh failed: %s", exc)
                self._cluster.last_refresh_s = time.monotonic()
        for node, maybe_stream, entry in requests:
            if isinstance(entry, HeadwaterError):
                self._on_request_error(node, drained.by_node[node], entry)
            else:
                assert maybe_stream is not None
                self._send_to_node(maybe_stream, entry)
        return True

    def _node_has_room(self, node: int) -> bool:
        stream = self._streams.get(node)
        if stream is None:
            # A new stream starts only once every request of the last one is settled (its retries
            # queued), or a newer batch could overtake one of them.
            return self._in_flight.get(node, 0) == 0
        return not stream.retiring and self._in_flight.get(node, 0) < self._max_in_flight

    def _tend_streams(
        self, overdue_before: float
    ) -> tuple[list[ProduceStream], list[ProduceStream], float | None]:
        """Lock held: drop the streams that are over, returning those to end; find the overdue ones;
        and when the oldest request still unanswered on a stream was registered."""
        to_end: list[ProduceStream] = []
        overdue: list[ProduceStream] = []
        oldest: float | None = None
        for node, stream in list(self._streams.items()):
            if stream.ended or (stream.retiring and not stream.pending):
                del self._streams[node]
                if not stream.ended:
                    to_end.append(stream)
                continue
            sent_at = stream.oldest_sent_at()
            if sent_at is None:
                continue
            oldest = sent_at if oldest is None else min(oldest, sent_at)
            if sent_at <= overdue_before and not stream.cancelled:
                stream.retiring = stream.cancelled = True  # its requests come back as timed out
                overdue.append(stream)
        return to_end, overdue, oldest

    def _register(
        self, node: int, batches: list[ProducerBatch]
    ) -> tuple[int, ProduceStream | None, Pending | HeadwaterError]:
        """Lock held: reserve the next answer of ``node``'s stream (made if needed) for ``batches``."""
        stream = self._streams.get(node)
        if stream is None:
            try:
                open_call = self._cluster.produce_stream_for_node(node)
            except HeadwaterError as exc:
                return node, None, exc
            stream = self._streams[node] = ProduceStream(
                node, open_call, self._lock, self._on_answer, self._on_stream_failure
            )
        return node, stream, stream.register(batches)

    def _send_to_node(self, stream: ProduceStream, entry: Pending) -> None:
        """Build the entry's batches (once) into one request and write it; called without the lock.

        The request is written even when every batch proved too large (then empty): the stream's
        answers are matched to its requests by order.
        """
        by_topic: dict[str, dict[int, list[tuple[bytes, bytes]]]] = {}
        sendable: list[ProducerBatch] = []
        too_large: list[ProducerBatch] = []
        for b in entry.batches:
            if b.built is None:
                b.built = encode_batch_parts(b.records, self._compression)
            if len(b.built[0]) + len(b.built[1]) > self._max_request_size:
                too_large.append(b)
                continue
            by_topic.setdefault(b.topic, {}).setdefault(b.partition, []).append(b.built)
            sendable.append(b)
        request = produce_stream_request(
            self.acks, self._request_timeout_ms, ((t, parts.items()) for t, parts in by_topic.items())
        )
        with self._lock:
            if entry.taken:  # the stream failed first: its failure path owns these batches now
                return
            entry.sendable = sendable
        for b in too_large:
            b.fail(
                RecordTooLargeError(
                    f"batch of {sum(map(len, b.built or ()))} bytes for {b.topic}-{b.partition} "
                    f"exceeds max_request_size={self._max_request_size}"
                )
            )
        if too_large:
            with self._lock:
                self._release(too_large)
        if self.acks == 0:
            for b in sendable:
                b.complete(-1)
        stream.write(request)

    def _on_stream_failure(
        self, stream: ProduceStream, entries: list[Pending], error: HeadwaterError
    ) -> None:
        """The stream broke or ended with these requests unanswered: retry or fail their batches."""
        for entry in entries:
            self._on_request_error(stream.node, entry.carried, error, sent=entry.batches, stream=stream)

    def _on_answer(self, stream: ProduceStream, entry: Pending, response: client_pb2.ProduceResponse) -> None:
        """Runs on the stream's reader thread: the outcome of one request."""
        node = stream.node
        batches = entry.carried
        try:
            by_tp = {(t.topic, p.partition): p for t in response.topics for p in t.partitions}
            done: list[ProducerBatch] = []
            placed: list[tuple[ProducerBatch, int, int]] = []
            retry: list[ProducerBatch] = []
            failed: list[ProducerBatch] = []
            refresh = False
            next_offset: dict[tuple[str, int], int] = {}
            too_large: set[int] = set()
            index_in_partition: dict[tuple[str, int], int] = {}
            for b in batches:
                tp = (b.topic, b.partition)
                p = by_tp.get(tp)
                index = index_in_partition[tp] = index_in_partition.get(tp, -1) + 1
                if self.acks == 0:
                    done.append(b)
                elif p is None:
                    b.last_error = UnknownServerError(f"the node's response names no {b.topic}-{b.partition}")
                    failed.append(b)
                elif p.error_code == errors_pb2.ERROR_CODE_NONE:
                    # Batches of one partition were appended in request order, offsets follow on.
                    base = next_offset.get(tp, p.base_offset)
                    placed.append((b, base, p.log_append_time_ms))
                    next_offset[tp] = base + len(b.records)
                    done.append(b)
                elif p.HasField("error_batch_index") and p.error_batch_index != index:
                    # Another batch of this partition was refused, and this one only with it.
                    b.last_error = error_for_code(p.error_code, p.error_message)
                    retry.append(b)
                elif p.error_code == errors_pb2.ERROR_CODE_OUT_OF_ORDER_SEQUENCE:
                    # Refused only because an earlier batch of its partition was, in this stream:
                    # it goes again behind that one, whatever its own error count.
                    b.last_error = error_for_code(p.error_code, p.error_message)
                    _retry_or_fail(b, self._expired_error(b), retry, failed)
                elif p.error_code == errors_pb2.ERROR_CODE_RECORD_TOO_LARGE and len(b.records) > 1:
                    # The batch is too large, not its records: halve it and send the halves.
                    b.last_error = error_for_code(p.error_code, p.error_message)
                    too_large.add(id(b))
                    retry.append(b)
                else:
                    b.last_error = error_for_code(p.error_code, p.error_message or f"{b.topic}-{b.partition}")
                    refresh |= p.error_code in STALE_METADATA_CODES
                    _retry_or_fail(b, self._final_error(b), retry, failed)
            if refresh:
                self._cluster.request_refresh()

            def settle() -> None:
                for b, base, append_time_ms in placed:
                    b.complete(base, append_time_ms)
                for b in failed:
                    assert b.last_error is not None
                    b.fail(b.last_error)

            self._finish_request(
                node,
                entry.batches,
                done + failed,
                retry,
                too_large,
                settle=settle,
                refused_on=stream if retry or failed else None,
            )
        except Exception:
            _log.exception("handling a Produce response failed")
            self._on_request_error(
                node,
                batches,
                UnknownServerError("could not handle the Produce response"),
                sent=entry.batches,
                stream=stream,
            )

    def _on_request_error(
        self,
        node: int,
        batches: list[ProducerBatch],
        error: HeadwaterError,
        *,
        sent: list[ProducerBatch] | None = None,
        stream: ProduceStream | None = None,
    ) -> None:
        """The whole request failed: retry every batch that may be retried, fail the rest.

        ``sent``: the batches the request was drained with, when more than ``batches``; ``stream``:
        the stream it went on, if it went.
        """
        retry: list[ProducerBatch] = []
        failed: list[ProducerBatch] = []
        if isinstance(error, NodeNotAvailableError):
            self._cluster.request_refresh()
        for b in batches:
            b.last_error = error
            _retry_or_fail(b, error if self.acks == 0 else self._final_error(b), retry, failed)
        for b in failed:
            assert b.last_error is not None
            b.fail(b.last_error)  # with acks=0, only the records never written: the rest are done
        self._finish_request(node, batches if sent is None else sent, failed, retry, refused_on=stream)

    def _final_error(self, b: ProducerBatch) -> HeadwaterError | None:
        """None when the batch's last error may be retried; else the error to fail its records with."""
        err = b.last_error
        assert err is not None
        if not err.retriable or b.attempts > self._retries:
            return err
        return self._expired_error(b)

    def _expired_error(self, b: ProducerBatch) -> HeadwaterError | None:
        """The error to fail a batch with when it may not wait for another try (closed, or out of time)."""
        err = b.last_error
        if self._force_close:
            return ClientClosedError(f"the producer was closed; last error: {err}")
        if int(time.monotonic() * 1000) + self._backoff_ms(b) >= b.created_ms + self._delivery_timeout_ms:
            return HeadwaterTimeoutError(
                f"{len(b.records)} records for {b.topic}-{b.partition} not acknowledged within "
                f"delivery_timeout_ms={self._delivery_timeout_ms}; last error: {err}"
            )
        return None

    def _backoff_ms(self, b: ProducerBatch) -> int:
        """Exponential backoff (KIP-580) with 20% jitter, capped at retry_backoff_max_ms."""
        base = min(self._retry_backoff_ms * (2 ** max(b.attempts - 1, 0)), self._retry_backoff_max_ms)
        return int(base * random.uniform(0.8, 1.2))

    def _finish_request(
        self,
        node: int,
        sent: list[ProducerBatch],
        finished: list[ProducerBatch],
        retry: list[ProducerBatch],
        split: Container[int] = (),
        *,
        settle: Callable[[], None] | None = None,
        refused_on: ProduceStream | None = None,
    ) -> None:
        """A request is over: free its in-flight slot, partitions and buffer bytes, queue its retries
        (the batches in ``split``, by id, halved first). ``refused_on``: the stream of a request that
        something in failed, which then takes no new requests (see ``ProduceStream.retiring``).

        ``settle`` completes the finished batches' futures. It runs after the partitions are unmuted
        and the sender woken, so the next request is on its way while the futures complete (and their
        callbacks run); the buffer bytes come back after it, so ``flush`` never sees a batch gone
        whose futures are not done yet.
        """
        now_ms = int(time.monotonic() * 1000)
        with self._lock:
            self._in_flight[node] = self._in_flight.get(node, 1) - 1
            self._acc.unmute(sent)
            if refused_on is not None:
                refused_on.retiring = True
            if split:
                retry = [h for b in retry for h in (self._acc.split(b) if id(b) in split else (b,))]
            if retry:
                _log.debug("retrying %d batches after %s", len(retry), retry[0].last_error)
                self._acc.reenqueue(retry, now_ms + max(self._backoff_ms(b) for b in retry))
            self._wake_sender.notify()
            if settle is None:
                self._release(finished)
                return
        settle()
        with self._lock:
            self._release(finished)

    def _release(self, finished: list[ProducerBatch]) -> None:
        """Called with the lock held: give finished batches' bytes back and wake blocked senders."""
        for b in finished:
            self._acc.release(b)
        if finished:
            self._room.notify_all()
