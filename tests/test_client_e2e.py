"""The client against a real node process: produce, consume, replay, admin and its errors."""

from __future__ import annotations

import time
import uuid

import pytest

from headwater import (
    Admin,
    Consumer,
    InvalidPartitionsError,
    InvalidTopicError,
    NewTopic,
    OffsetOutOfRangeError,
    Producer,
    TopicAlreadyExistsError,
    TopicPartition,
    UnknownTopicOrPartitionError,
    partition_for_key,
)


def consume(consumer: Consumer, n: int, timeout_s: float = 20.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out.extend(consumer.poll(0.2))
    return out


def create(bootstrap: str, partitions: int = 1, **config: str) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    with Admin(bootstrap) as admin:
        admin.create_topics([NewTopic(name, partitions=partitions, config=config)])
    return name


def test_keyed_records_are_read_back_in_order_on_kafkas_partitions(node) -> None:
    topic = create(node.bootstrap, partitions=3)
    sent = [(f"key-{i % 7}".encode(), f"value-{i}".encode()) for i in range(3000)]
    with Producer(node.bootstrap, linger_ms=2) as producer:
        futures = [
            producer.send(topic, v, key=k, headers=[("i", str(i).encode())]) for i, (k, v) in enumerate(sent)
        ]
        producer.flush(30)
        metas = [f.result(0) for f in futures]
    assert [m.partition for m in metas] == [partition_for_key(k, 3) for k, _ in sent]
    with Consumer(node.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition(topic, p) for p in range(3)])
        records = consume(consumer, len(sent))
    assert len(records) == len(sent)
    for p in range(3):
        got = [(r.key, r.value) for r in records if r.partition == p]
        assert got == [kv for kv, m in zip(sent, metas, strict=True) if m.partition == p]  # send order
        assert [r.offset for r in records if r.partition == p] == list(range(len(got)))
    first = next(r for r in records if r.value == b"value-0")
    assert first.headers == (("i", b"0"),) and first.timestamp_ms == metas[0].timestamp_ms


def test_replay_from_an_offset_and_from_a_timestamp(node) -> None:
    topic = create(node.bootstrap)
    tp = TopicPartition(topic, 0)
    base_ts = 1_700_000_000_000
    with Producer(node.bootstrap, linger_ms=0, batch_size_bytes=2048) as producer:
        for i in range(100):
            producer.send(topic, f"{i}".encode(), timestamp_ms=base_ts + i * 1000)
        producer.flush(30)
    with Consumer(node.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([tp])
        assert consumer.beginning_offsets([tp]) == {tp: 0}
        assert consumer.end_offsets([tp]) == {tp: 100}
        consumer.seek(tp, 42)
        assert [int(r.value) for r in consume(consumer, 58)] == list(range(42, 100))
        found = consumer.offsets_for_times({tp: base_ts + 63_500})[tp]
        assert found is not None and (found.offset, found.timestamp_ms) == (64, base_ts + 64_000)
        assert consumer.offsets_for_times({tp: base_ts + 10**9}) == {tp: None}
        consumer.seek(tp, found.offset)
        assert [int(r.value) for r in consume(consumer, 36)] == list(range(64, 100))


@pytest.mark.parametrize("compression", ["none", "gzip", "lz4", "zstd"])
def test_every_compression_round_trips(node, compression: str) -> None:
    topic = create(node.bootstrap)
    values = [f"{compression}-{i}-".encode() * 20 for i in range(500)]
    with Producer(node.bootstrap, compression=compression, acks=1) as producer:
        for v in values:
            producer.send(topic, v)
    with Consumer(node.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition(topic, 0)])
        assert [r.value for r in consume(consumer, len(values))] == values


def test_out_of_range_position_follows_auto_offset_reset(node) -> None:
    topic = create(node.bootstrap)
    tp = TopicPartition(topic, 0)
    with Producer(node.bootstrap) as producer:
        for i in range(10):
            producer.send(topic, f"{i}".encode())
    with Consumer(node.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 500)
        assert [r.offset for r in consume(consumer, 10)] == list(range(10))
    with Consumer(node.bootstrap, auto_offset_reset="none") as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 500)
        with pytest.raises(OffsetOutOfRangeError):
            consume(consumer, 1, timeout_s=10)


def test_admin_round_trip_and_bad_input(node) -> None:
    with Admin(node.bootstrap) as admin:
        ids = admin.create_topics([NewTopic("orders", partitions=4)])
        assert isinstance(ids["orders"], uuid.UUID)
        assert "orders" in admin.list_topics()
        (desc,) = admin.describe_topics(["orders"])
        assert desc.topic_id == ids["orders"] and [p.partition for p in desc.partitions] == [0, 1, 2, 3]
        assert all(p.leader >= 0 for p in desc.partitions)
        with pytest.raises(TopicAlreadyExistsError):
            admin.create_topics([NewTopic("orders")])
        with pytest.raises(InvalidTopicError):
            admin.create_topics([NewTopic("bad/name")])
        with pytest.raises(InvalidPartitionsError):
            admin.create_topics([NewTopic("zero", partitions=0)])
        admin.alter_configs("orders", {"retention_ms": 60_000})
        assert admin.describe_configs("orders")["retention_ms"].value == "60000"
        admin.delete_topics(["orders"])
        assert "orders" not in admin.list_topics()
        with pytest.raises(UnknownTopicOrPartitionError):
            admin.describe_topics(["orders"])


def test_a_batch_above_the_topics_limit_is_split_and_every_record_lands(node) -> None:  # type: ignore[no-untyped-def]
    """Records that fit a topic's max_message_bytes must land even when the producer batched them
    past it: the node refuses the batch with RECORD_TOO_LARGE and the producer halves it."""
    from headwater import Admin, Consumer, NewTopic, Producer, TopicPartition

    with Admin(bootstrap=node.bootstrap) as admin:
        admin.create_topics([NewTopic("small-batches", partitions=1, config={"max_message_bytes": "20000"})])
    with Producer(bootstrap=node.bootstrap, linger_ms=200, batch_size_bytes=256 * 1024) as producer:
        futures = [producer.send("small-batches", f"{i:04d}".encode() * 250) for i in range(100)]
        producer.flush()
        offsets = [f.result(timeout=30).offset for f in futures]
    assert offsets == list(range(100))
    with Consumer(bootstrap=node.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition("small-batches", 0)])
        got: list[bytes] = []
        for _ in range(50):
            got += [r.value for r in consumer.poll(0.5)]
            if len(got) >= 100:
                break
    assert got == [f"{i:04d}".encode() * 250 for i in range(100)]


def test_a_small_batch_refused_beside_an_oversized_one_is_resent(node) -> None:  # type: ignore[no-untyped-def]
    """A partition's batches are appended all or none: when one is too large, the node names it and
    the others (one record each here, so nothing to split) are resent, not failed."""
    from headwater import Admin, NewTopic, Producer

    with Admin(bootstrap=node.bootstrap) as admin:
        admin.create_topics([NewTopic("mixed", partitions=1, config={"max_message_bytes": "3000"})])
    with Producer(bootstrap=node.bootstrap, linger_ms=100, batch_size_bytes=4000) as producer:
        futures = [producer.send("mixed", b"v" * 100) for _ in range(65)]
        producer.flush()
        offsets = sorted(f.result(timeout=30).offset for f in futures)
    assert offsets == list(range(65))


def test_every_future_completes_when_close_races_send(node) -> None:  # type: ignore[no-untyped-def]
    import concurrent.futures
    import threading
    import time

    from headwater import Admin, ClientClosedError, NewTopic, Producer

    with Admin(bootstrap=node.bootstrap) as admin:
        admin.create_topics([NewTopic("racing", partitions=2)])
    for _ in range(5):
        producer = Producer(bootstrap=node.bootstrap, linger_ms=1)
        producer.send("racing", b"warm").result(timeout=10)
        futures: list[concurrent.futures.Future] = []  # type: ignore[type-arg]
        stop = threading.Event()

        def hammer(producer: Producer, futures: list, stop: threading.Event) -> None:  # type: ignore[type-arg]
            while not stop.is_set():
                try:
                    futures.append(producer.send("racing", b"x"))
                except ClientClosedError:
                    return

        threads = [threading.Thread(target=hammer, args=(producer, futures, stop)) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        producer.close(timeout_s=10)
        stop.set()
        for t in threads:
            t.join()
        _, pending = concurrent.futures.wait(futures, timeout=10)
        assert not pending, f"{len(pending)} futures never completed"


def test_the_producer_stamps_records_it_is_given_no_time_for(node) -> None:  # type: ignore[no-untyped-def]
    """A record sent without a timestamp carries the producer's clock, never 0 (which a CreateTime
    topic refuses); one sent with 0 fails with InvalidTimestampError and is not retried."""
    from headwater.client.errors import InvalidTimestampError

    topic = create(node.bootstrap)
    before = int(time.time() * 1000)
    with Producer(node.bootstrap, linger_ms=0) as producer:
        meta = producer.send(topic, b"now").result(10)
        after = int(time.time() * 1000)
        assert before <= meta.timestamp_ms <= after
        with pytest.raises(InvalidTimestampError, match="record timestamp 0"):
            producer.send(topic, b"epoch", timestamp_ms=0).result(10)
    with Consumer(node.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition(topic, 0)])
        (got,) = consume(consumer, 1)
        assert (got.value, got.timestamp_ms) == (b"now", meta.timestamp_ms)


def test_a_log_append_time_topic_reads_back_the_time_the_producer_was_told(node) -> None:  # type: ignore[no-untyped-def]
    topic = create(node.bootstrap, message_timestamp_type="LogAppendTime")
    with Producer(node.bootstrap, linger_ms=5) as producer:
        futures = [producer.send(topic, b"%d" % i, timestamp_ms=1 + i) for i in range(5)]
        producer.flush(10)
        metas = [f.result(0) for f in futures]
    assert all(m.timestamp_ms > 1_000_000 for m in metas)  # the node's clock, not the ones sent
    with Consumer(node.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition(topic, 0)])
        records = consume(consumer, 5)
    assert [(r.offset, r.timestamp_ms) for r in records] == [(m.offset, m.timestamp_ms) for m in metas]


def test_the_admin_refuses_zero_partitions_or_replicas_itself(node) -> None:  # type: ignore[no-untyped-def]
    """0 on the wire means the node's default (client.proto), so the client must not send a 0 it
    was given: it refuses it, and the other topics of the call go on."""
    from headwater.client.errors import InvalidReplicationFactorError

    name = f"t-{uuid.uuid4().hex[:8]}"
    with Admin(node.bootstrap) as admin:
        results = admin.create_topics(
            [NewTopic("zero-p", partitions=0), NewTopic("zero-rf", replication_factor=0), NewTopic(name)],
            raise_on_error=False,
        )
        assert isinstance(results["zero-p"], InvalidPartitionsError)
        assert isinstance(results["zero-rf"], InvalidReplicationFactorError)
        assert isinstance(results[name], uuid.UUID)
        assert "zero-p" not in admin.list_topics() and "zero-rf" not in admin.list_topics()
