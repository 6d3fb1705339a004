"""Producer, Consumer and Admin against an in-process fake node: retries, resets, error mapping."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from test_client_fakenode import FakeNode, fake_node_fixture  # noqa: F401 - provides `fake_node`

from headwater import (
    Admin,
    BufferFullError,
    ClientClosedError,
    Consumer,
    HeadwaterTimeoutError,
    InvalidConfigError,
    InvalidPartitionsError,
    InvalidRequestError,
    NewTopic,
    NodeNotAvailableError,
    NoOffsetForPartitionError,
    OffsetAndTimestamp,
    OffsetOutOfRangeError,
    Producer,
    RecordMetadata,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    TopicPartition,
    UnknownTopicOrPartitionError,
    partition_for_key,
)
from headwater.v1 import errors_pb2
from headwater.v1.batch import decode_records


@pytest.fixture(autouse=True)
def no_client_threads_left() -> Iterator[None]:
    """Every test closes what it opens: no producer sender or consumer fetcher survives it."""
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        alive = [t.name for t in threading.enumerate() if t.name.startswith("headwater-")]
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"client threads left behind: {alive}")


def bootstrap(node: FakeNode) -> str:
    return f"127.0.0.1:{node.port}"


def consume(consumer: Consumer, n: int, timeout_s: float = 10.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out.extend(consumer.poll(0.2))
    return out


# ---------------------------------------------------------------- producer


def test_keyed_records_land_on_kafkas_partition_and_read_back_in_order(fake_node: FakeNode) -> None:
    fake_node.add_topic("orders", partitions=3)
    with Producer(bootstrap(fake_node), linger_ms=1) as producer:
        futures = [
            producer.send(
                "orders", f"v{i}".encode(), key=f"k{i % 5}".encode(), headers=[("h", b"x"), ("n", None)]
            )
            for i in range(50)
        ]
        producer.flush(10)
        metas = [f.result(0) for f in futures]
    for i, m in enumerate(metas):
        assert m.partition == partition_for_key(f"k{i % 5}".encode(), 3)
    per_partition: dict[int, list[int]] = {}
    for m in metas:
        per_partition.setdefault(m.partition, []).append(m.offset)
    for offsets in per_partition.values():
        assert offsets == list(range(len(offsets)))  # dense, in send order

    with Consumer(bootstrap(fake_node), auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition("orders", p) for p in range(3)])
        records = consume(consumer, 50)
    assert len(records) == 50
    by_value = {r.value: r for r in records}
    for i, m in enumerate(metas):
        r = by_value[f"v{i}".encode()]
        assert (r.topic, r.partition, r.offset, r.key) == (
            "orders",
            m.partition,
            m.offset,
            f"k{i % 5}".encode(),
        )
        assert r.headers == (("h", b"x"), ("n", None))
        assert r.timestamp_ms == m.timestamp_ms
    for p in range(3):
        offsets = [r.offset for r in records if r.partition == p]
        assert offsets == sorted(offsets)


def test_null_and_empty_keys_and_values_read_back_as_sent(fake_node: FakeNode) -> None:
    """A null key is not an empty key, and a tombstone (null value) is not an empty value."""
    fake_node.add_topic("t")
    sent = [(None, b"v"), (b"", b"v"), (b"k", None), (b"k", b""), (None, None), (b"", b"")]
    with Producer(bootstrap(fake_node), linger_ms=0) as producer:
        for key, value in sent:
            producer.send("t", value, key=key, partition=0)
        producer.flush(10)
    with Consumer(bootstrap(fake_node), auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition("t", 0)])
        records = consume(consumer, len(sent))
    assert [(r.key, r.value, r.headers) for r in records] == [(k, v, ()) for k, v in sent]


def test_a_retriable_error_is_retried_after_a_metadata_refresh(fake_node: FakeNode) -> None:
    fake_node.add_topic("t")
    fake_node.produce_errors.extend([errors_pb2.ERROR_CODE_NOT_LEADER_OR_FOLLOWER] * 2)
    with Producer(bootstrap(fake_node), retry_backoff_ms=10) as producer:
        futures = [producer.send("t", b"a"), producer.send("t", b"b")]
        producer.flush(10)
        assert [f.result(0).offset for f in futures] == [0, 1]
    assert fake_node.calls["Produce"] == 3
    assert fake_node.calls["Metadata"] >= 2  # the first send's lookup, then a refresh per NOT_LEADER
    assert len(fake_node.topics["t"].partitions[0].batches) == 1  # sent once it was accepted


def test_pipelined_requests_of_one_partition_keep_their_order_across_a_refusal(fake_node: FakeNode) -> None:
    """Several requests of one partition in flight on the node's stream; the first is refused (a
    retriable error) and the node refuses the ones behind it: every record still lands once, in send
    order, and the next requests go on a new stream."""
    fake_node.add_topic("t")
    fake_node.produce_gate.clear()  # the node holds the first request while the others queue up
    producer = Producer(
        bootstrap(fake_node), linger_ms=0, batch_size_bytes=50, max_request_size=100, retry_backoff_ms=10
    )
    try:
        values = [b"v%02d" % i + b"." * 30 for i in range(8)]  # each fills a batch of its own
        futures = [producer.send("t", v) for v in values]
        time.sleep(0.5)
        fake_node.produce_errors.append(errors_pb2.ERROR_CODE_NOT_LEADER_OR_FOLLOWER)
        fake_node.produce_gate.set()
        producer.flush(10)
        assert [f.result(0).offset for f in futures] == list(range(8))
    finally:
        fake_node.produce_gate.set()
        producer.close()
    stored = [r.value for b in fake_node.topics["t"].partitions[0].batches for r in decode_records(b)]
    assert stored == values
    # 8 accepted, the refused one, and at least one refused behind it: requests were in flight together.
    assert fake_node.calls["Produce"] >= 10
    assert fake_node.streams >= 2


def test_a_request_unanswered_within_the_request_timeout_is_resent_on_a_new_stream(
    fake_node: FakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    """A node that does not answer must not hold a producer forever: after request_timeout_ms its
    stream is cancelled and the request goes again (delivery is at least once, as with Kafka)."""
    fake_node.add_topic("t")
    fake_node.produce_gate.clear()
    producer = Producer(bootstrap(fake_node), linger_ms=0, request_timeout_ms=300, retry_backoff_ms=10)
    try:
        future = producer.send("t", b"late")
        deadline = time.monotonic() + 5
        while fake_node.streams < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake_node.streams >= 2  # the first stream was given up and a second one opened
        fake_node.produce_gate.set()
        assert future.result(10).offset >= 0
    finally:
        fake_node.produce_gate.set()
        producer.close()
    assert "within request_timeout_ms=300" in caplog.text
    stored = [r.value for b in fake_node.topics["t"].partitions[0].batches for r in decode_records(b)]
    assert set(stored) == {b"late"}


def test_a_stream_the_node_cancels_is_retried_not_failed(fake_node: FakeNode) -> None:
    """A node going away cancels its streams (gRPC CANCELLED): that is not the records' fault, so
    they are resent, not failed as if the producer had been closed."""
    fake_node.add_topic("t")
    with Producer(bootstrap(fake_node), linger_ms=0, retry_backoff_ms=10) as producer:
        assert producer.partitions_for("t") == [0]  # metadata first: the node refuses everything below
        fake_node.abort_with = grpc.StatusCode.CANCELLED
        future = producer.send("t", b"x")
        deadline = time.monotonic() + 5
        while fake_node.calls.get("Produce", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake_node.calls.get("Produce", 0) >= 2  # refused, and tried again
        fake_node.abort_with = None
        assert future.result(10).offset == 0


def test_a_non_retriable_error_fails_the_futures_without_a_retry(fake_node: FakeNode) -> None:
    fake_node.add_topic("t")
    fake_node.produce_errors.append(errors_pb2.ERROR_CODE_RECORD_TOO_LARGE)
    with Producer(bootstrap(fake_node)) as producer:
        future = producer.send("t", b"x")
        with pytest.raises(RecordTooLargeError):
            future.result(10)
        assert producer.send("t", b"y").result(10).offset == 0
    assert fake_node.calls["Produce"] == 2


def test_retries_stop_at_the_delivery_timeout(fake_node: FakeNode) -> None:
    fake_node.add_topic("t")
    fake_node.produce_errors.extend([errors_pb2.ERROR_CODE_NOT_ENOUGH_REPLICAS] * 1000)
    with Producer(
        bootstrap(fake_node),
        retry_backoff_ms=20,
        retry_backoff_max_ms=40,
        delivery_timeout_ms=400,
        request_timeout_ms=200,
    ) as producer:
        started = time.monotonic()
        future = producer.send("t", b"x")
        with pytest.raises(HeadwaterTimeoutError, match="NOT_ENOUGH_REPLICAS"):
            future.result(10)
        assert time.monotonic() - started < 3
    assert fake_node.calls["Produce"] >= 3


def test_a_record_above_max_request_size_fails_its_future(fake_node: FakeNode) -> None:
    fake_node.add_topic("t")
    with Producer(bootstrap(fake_node), max_request_size=1000) as producer:
        with pytest.raises(RecordTooLargeError):
            producer.send("t", b"x" * 2000).result(5)
        assert producer.send("t", b"x" * 100).result(5).offset == 0


def test_acks_zero_completes_with_offset_minus_one(fake_node: FakeNode) -> None:
    fake_node.add_topic("t")
    with Producer(bootstrap(fake_node), acks=0) as producer:
        assert producer.send("t", b"x", timestamp_ms=5).result(5) == RecordMetadata("t", 0, -1, 5)


def test_send_raises_buffer_full_when_not_blocking(fake_node: FakeNode) -> None:
    fake_node.add_topic("t")
    fake_node.produce_gate.clear()  # the node stops answering
    producer = Producer(
        bootstrap(fake_node),
        buffer_memory_bytes=10_000,
        batch_size_bytes=1000,
        block_on_buffer_full=False,
        linger_ms=0,
    )
    try:
        futures = []
        with pytest.raises(BufferFullError):
            for _ in range(100):
                futures.append(producer.send("t", b"x" * 976))
        assert 5 <= len(futures) <= 10
        fake_node.produce_gate.set()
        producer.flush(10)
        assert sorted(f.result(0).offset for f in futures) == list(range(len(futures)))
        producer.send("t", b"x").result(5)  # room again
    finally:
        fake_node.produce_gate.set()
        producer.close()


def test_send_blocks_up_to_max_block_ms_for_buffer_memory(fake_node: FakeNode) -> None:
    fake_node.add_topic("t")
    fake_node.produce_gate.clear()
    producer = Producer(
        bootstrap(fake_node), buffer_memory_bytes=2000, batch_size_bytes=1000, max_block_ms=200, linger_ms=0
    )
    try:
        producer.send("t", b"x" * 976)
        producer.send("t", b"x" * 976)
        started = time.monotonic()
        with pytest.raises(BufferFullError):
            producer.send("t", b"x" * 976)
        assert 0.15 <= time.monotonic() - started < 2
    finally:
        fake_node.produce_gate.set()
        producer.close()


def test_sending_to_a_missing_topic_raises_after_max_block_ms(fake_node: FakeNode) -> None:
    with Producer(bootstrap(fake_node), max_block_ms=150, retry_backoff_ms=20) as producer:
        with pytest.raises(UnknownTopicOrPartitionError, match="nope"):
            producer.send("nope", b"x")
        with pytest.raises(UnknownTopicOrPartitionError):
            fake_node.add_topic("one")
            producer.send("one", b"x", partition=3).result(5)


def test_close_sends_what_is_queued_and_refuses_new_records(fake_node: FakeNode) -> None:
    fake_node.add_topic("t", partitions=4)
    producer = Producer(bootstrap(fake_node), linger_ms=10_000)
    futures = [producer.send("t", b"x") for _ in range(100)]
    producer.close(10)
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(ClientClosedError):
        producer.send("t", b"x")


def test_close_with_a_timeout_fails_what_could_not_be_sent(fake_node: FakeNode) -> None:
    fake_node.add_topic("t")
    fake_node.produce_gate.clear()
    producer = Producer(bootstrap(fake_node), linger_ms=0)
    future = producer.send("t", b"x")
    producer.close(0.2)
    assert isinstance(future.exception(5), ClientClosedError)


@pytest.mark.parametrize("compression", ["none", "gzip", "lz4", "zstd"])
def test_compressed_batches_read_back(fake_node: FakeNode, compression: str) -> None:
    fake_node.add_topic("t")
    with Producer(bootstrap(fake_node), compression=compression) as producer:
        for i in range(200):
            producer.send("t", f"value-{i}".encode() * 10, key=None if i % 2 else b"k")
        producer.flush(10)
    assert fake_node.topics["t"].partitions[0].batches[0].compression == [
        "none",
        "gzip",
        "lz4",
        "zstd",
    ].index(compression)
    with Consumer(bootstrap(fake_node), auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition("t", 0)])
        records = consume(consumer, 200)
    assert [r.value for r in records] == [f"value-{i}".encode() * 10 for i in range(200)]
    assert [r.key for r in records[:2]] == [b"k", None]


# ---------------------------------------------------------------- consumer


def _fill(node: FakeNode, topic: str, n: int, partitions: int = 1, ts0: int = 1_000_000) -> None:
    node.add_topic(topic, partitions)
    with Producer(f"127.0.0.1:{node.port}", linger_ms=0, batch_size_bytes=200) as producer:
        for i in range(n):
            producer.send(topic, f"{i}".encode(), partition=0, timestamp_ms=ts0 + i * 10)
        producer.flush(10)


def test_out_of_range_resets_to_earliest(fake_node: FakeNode) -> None:
    _fill(fake_node, "t", 20)
    tp = TopicPartition("t", 0)
    with Consumer(bootstrap(fake_node), auto_offset_reset="earliest") as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 1000)
        records = consume(consumer, 20)
        assert [r.offset for r in records] == list(range(20))
        assert consumer.position(tp) == 20


def test_out_of_range_resets_to_latest(fake_node: FakeNode) -> None:
    _fill(fake_node, "t", 20)
    tp = TopicPartition("t", 0)
    with (
        Consumer(bootstrap(fake_node), auto_offset_reset="latest") as consumer,
        Producer(bootstrap(fake_node)) as producer,
    ):
        consumer.assign([tp])
        consumer.seek(tp, 1000)
        deadline = time.monotonic() + 5
        while consumer.position(tp) != 20 and time.monotonic() < deadline:
            consumer.poll(0.05)
        assert consumer.position(tp) == 20
        producer.send("t", b"new").result(5)
        records = consume(consumer, 1)
        assert [(r.offset, r.value) for r in records] == [(20, b"new")]


def test_out_of_range_with_reset_none_raises_from_poll(fake_node: FakeNode) -> None:
    _fill(fake_node, "t", 5)
    tp = TopicPartition("t", 0)
    with Consumer(bootstrap(fake_node), auto_offset_reset="none") as consumer:
        consumer.assign([tp])
        with pytest.raises(NoOffsetForPartitionError):
            consume(consumer, 1, timeout_s=5)
        consumer.seek(tp, 99)
        with pytest.raises(OffsetOutOfRangeError):
            consume(consumer, 1, timeout_s=5)
        consumer.seek(tp, 3)
        assert [r.offset for r in consume(consumer, 2)] == [3, 4]


def test_seek_inside_a_batch_skips_the_records_before_it(fake_node: FakeNode) -> None:
    _fill(fake_node, "t", 30)  # batches of a few records each
    tp = TopicPartition("t", 0)
    with Consumer(bootstrap(fake_node)) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 7)
        records = consume(consumer, 23)
        assert [r.offset for r in records] == list(range(7, 30))
        consumer.seek(tp, 2)
        assert consume(consumer, 1)[0].offset == 2


def test_offsets_for_times_and_beginning_and_end(fake_node: FakeNode) -> None:
    _fill(fake_node, "t", 10, ts0=1_000_000)
    tp = TopicPartition("t", 0)
    with Consumer(bootstrap(fake_node)) as consumer:
        consumer.assign([tp])
        assert consumer.beginning_offsets([tp]) == {tp: 0}
        assert consumer.end_offsets([tp]) == {tp: 10}
        assert consumer.offsets_for_times({tp: 1_000_045}) == {tp: OffsetAndTimestamp(5, 1_000_050)}
        assert consumer.offsets_for_times({tp: 9_999_999}) == {tp: None}
        consumer.seek_to_end(tp)
        assert consumer.position(tp) == 10
        consumer.seek_to_beginning()
        assert consumer.position(tp) == 0
        assert len(consume(consumer, 10)) == 10


def test_max_poll_records_bounds_each_poll(fake_node: FakeNode) -> None:
    _fill(fake_node, "t", 30)
    with Consumer(bootstrap(fake_node), auto_offset_reset="earliest", max_poll_records=7) as consumer:
        consumer.assign([TopicPartition("t", 0)])
        sizes = []
        got = 0
        while got < 30:
            batch = consumer.poll(2)
            assert batch
            sizes.append(len(batch))
            got += len(batch)
        assert max(sizes) <= 7 and got == 30


def test_iteration_stops_after_consumer_timeout(fake_node: FakeNode) -> None:
    _fill(fake_node, "t", 5)
    with Consumer(bootstrap(fake_node), auto_offset_reset="earliest", consumer_timeout_ms=300) as consumer:
        consumer.assign([TopicPartition("t", 0)])
        assert [r.offset for r in consumer] == list(range(5))


def test_assigning_an_unknown_partition_raises(fake_node: FakeNode) -> None:
    fake_node.add_topic("t")
    with Consumer(bootstrap(fake_node)) as consumer:
        with pytest.raises(UnknownTopicOrPartitionError):
            consumer.assign([TopicPartition("t", 1)])
        with pytest.raises(UnknownTopicOrPartitionError):
            consumer.assign([TopicPartition("missing", 0)])
        with pytest.raises(ValueError):
            consumer.position(TopicPartition("t", 0))


# ---------------------------------------------------------------- admin


def test_admin_creates_lists_describes_and_deletes(fake_node: FakeNode) -> None:
    with Admin(bootstrap(fake_node)) as admin:
        created = admin.create_topics(
            [NewTopic("a", partitions=3), NewTopic("b", config={"retention_ms": "1000"})]
        )
        assert set(created) == {"a", "b"} and all(v is not None for v in created.values())
        assert admin.list_topics() == ["a", "b"]
        (desc,) = admin.describe_topics(["a"])
        assert desc.name == "a" and desc.topic_id == created["a"]
        assert [p.partition for p in desc.partitions] == [0, 1, 2]
        assert all(p.leader == 1 and p.isr == (1,) for p in desc.partitions)
        with pytest.raises(TopicAlreadyExistsError):
            admin.create_topics([NewTopic("a")])
        results = admin.create_topics(
            [NewTopic("a"), NewTopic("c", partitions=0), NewTopic("d")], raise_on_error=False
        )
        assert isinstance(results["a"], TopicAlreadyExistsError)
        assert isinstance(results["c"], InvalidPartitionsError)
        assert results["d"] is not None and not isinstance(results["d"], Exception)
        with pytest.raises(UnknownTopicOrPartitionError):
            admin.describe_topics(["zzz"])
        assert admin.delete_topics(["d"]) == {"d": None}
        with pytest.raises(UnknownTopicOrPartitionError):
            admin.delete_topics(["d"])


def test_admin_configs(fake_node: FakeNode) -> None:
    fake_node.add_topic("t")
    with Admin(bootstrap(fake_node)) as admin:
        assert admin.describe_configs("t")["retention_ms"].source == "default"
        admin.alter_configs("t", {"retention_ms": 5000})
        entry = admin.describe_configs("t")["retention_ms"]
        assert (entry.value, entry.source) == ("5000", "topic")
        admin.alter_configs("t", {"retention_ms": None})
        assert admin.describe_configs("t")["retention_ms"].source == "default"
        with pytest.raises(InvalidConfigError):
            admin.alter_configs("t", {"bogus": 1})
        with pytest.raises(UnknownTopicOrPartitionError):
            admin.describe_configs("missing")


def test_grpc_invalid_argument_becomes_a_non_retriable_invalid_request(fake_node: FakeNode) -> None:
    fake_node.abort_with = grpc.StatusCode.INVALID_ARGUMENT
    with Admin(bootstrap(fake_node)) as admin:
        with pytest.raises(InvalidRequestError) as info:
            admin.list_topics()
    assert not info.value.retriable and "refused by the fake node" in str(info.value)


def test_an_unreachable_node_is_a_retriable_node_not_available() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with Admin(f"127.0.0.1:{port}", request_timeout_ms=2000) as admin:
            with pytest.raises(NodeNotAvailableError) as info:
                admin.list_topics()
    assert info.value.retriable


def test_an_undecodable_batch_is_reported_and_other_partitions_keep_flowing(fake_node: FakeNode) -> None:
    """A node that serves a batch this client cannot read must not stall the consumer: poll raises
    CorruptMessageError for that partition, and the other partitions of the node are still fetched."""
    from headwater import CorruptMessageError
    from headwater.v1 import batch as codec

    fake_node.add_topic("mixed", partitions=2)
    bad = codec.build_batch([(None, b"x", None, 1)], codec.COMPRESSION_BY_NAME["zstd"])
    bad.records = b"not a zstd frame"
    good = codec.build_batch([(None, b"fine", None, 1)])
    with fake_node.lock:
        parts = fake_node.topics["mixed"].partitions
        parts[0].batches.append(bad)
        parts[0].log_end_offset = 1
        parts[1].batches.append(good)
        parts[1].log_end_offset = 1
    with Consumer(bootstrap(fake_node), auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition("mixed", 0), TopicPartition("mixed", 1)])
        values: list[bytes] = []
        raised = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (raised is None or not values):
            try:
                values += [r.value for r in consumer.poll(0.2)]
            except CorruptMessageError as e:
                raised = e
        assert raised is not None and "mixed-0" in str(raised)
        assert values == [b"fine"]
