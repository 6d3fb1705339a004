"""Client pieces that need no server: the partitioner, the error tree, the accumulator, record futures."""

from __future__ import annotations

import random
import threading
from concurrent.futures import FIRST_COMPLETED, wait

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headwater import (
    ERROR_BY_CODE,
    RETRIABLE_CODES,
    BufferFullError,
    HeadwaterError,
    HeadwaterTimeoutError,
    NotLeaderOrFollowerError,
    OffsetOutOfRangeError,
    RecordMetadata,
    RecordTooLargeError,
    RequestTimedOutError,
    UnknownTopicOrPartitionError,
    error_for_code,
    murmur2,
    partition_for_key,
)
from headwater.client._accumulator import RecordAccumulator, RecordFuture, record_size
from headwater.client._cluster import parse_bootstrap
from headwater.client.partitioner import StickyPartitioner
from headwater.client.producer import parse_acks
from headwater.v1 import errors_pb2

# ---------------------------------------------------------------- partitioner

# Kafka's UtilsTest.testMurmur2 vectors, plus the empty array.
KAFKA_MURMUR2 = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
    (b"", 275646681),
]


@pytest.mark.parametrize(("data", "expected"), KAFKA_MURMUR2)
def test_murmur2_matches_kafka(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


def test_keyed_partition_is_kafkas_positive_hash_modulo() -> None:
    assert partition_for_key(b"foobar", 50) == (-790332482 & 0x7FFFFFFF) % 50 == 16
    assert partition_for_key(b"21", 7) == (-973932308 & 0x7FFFFFFF) % 7
    assert all(0 <= partition_for_key(str(i).encode(), 3) < 3 for i in range(200))
    with pytest.raises(ValueError):
        partition_for_key(b"k", 0)


def test_sticky_partitioner_stays_until_the_batch_is_done_then_moves() -> None:
    sticky = StickyPartitioner(random.Random(7))
    first = sticky.partition("t", 4)
    assert {sticky.partition("t", 4) for _ in range(50)} == {first}
    sticky.on_batch_done("t", (first + 1) % 4)  # another partition's batch: no move
    assert sticky.partition("t", 4) == first
    sticky.on_batch_done("t", first)
    second = sticky.partition("t", 4)
    assert second != first
    assert {sticky.partition("t", 4) for _ in range(50)} == {second}


def test_sticky_partitioner_prefers_partitions_with_a_leader() -> None:
    sticky = StickyPartitioner(random.Random(1))
    available = (2, 5)
    seen = set()
    for _ in range(20):
        p = sticky.partition("t", 8, available)
        seen.add(p)
        sticky.on_batch_done("t", p)
    assert seen == {2, 5}


# ---------------------------------------------------------------- errors


def test_every_error_code_maps_to_its_own_class() -> None:
    for name, code in errors_pb2.ErrorCode.items():
        if code == errors_pb2.ERROR_CODE_NONE:
            continue
        err = error_for_code(code, "boom")
        assert isinstance(err, HeadwaterError)
        assert err.code == code, name
        assert type(err) is ERROR_BY_CODE[code]
        assert err.retriable == (code in RETRIABLE_CODES)
        assert "boom" in str(err) and name.removeprefix("ERROR_CODE_") in str(err)


def test_retriable_flags_follow_kafka() -> None:
    for code in (
        "NOT_LEADER_OR_FOLLOWER",
        "UNKNOWN_TOPIC_OR_PARTITION",
        "LEADER_NOT_AVAILABLE",
        "NOT_ENOUGH_REPLICAS",
        "REQUEST_TIMED_OUT",
        "NODE_NOT_AVAILABLE",
        "FENCED_LEADER_EPOCH",
    ):
        assert errors_pb2.ErrorCode.Value(f"ERROR_CODE_{code}") in RETRIABLE_CODES, code
    for code in (
        "OFFSET_OUT_OF_RANGE",
        "RECORD_TOO_LARGE",
        "INVALID_TOPIC",
        "TOPIC_ALREADY_EXISTS",
        "INVALID_CONFIG",
        "CORRUPT_MESSAGE",
        "INVALID_PARTITIONS",
    ):
        assert errors_pb2.ErrorCode.Value(f"ERROR_CODE_{code}") not in RETRIABLE_CODES, code
    assert isinstance(error_for_code(7), NotLeaderOrFollowerError)
    assert isinstance(error_for_code(2), OffsetOutOfRangeError)
    unknown = error_for_code(999, "?")
    assert unknown.code == 999 and not unknown.retriable


def test_timeout_errors_share_a_base() -> None:
    assert issubclass(RequestTimedOutError, HeadwaterTimeoutError)
    assert issubclass(BufferFullError, HeadwaterTimeoutError)
    err = HeadwaterError("x", code=4, retriable=True)
    assert err.code == 4 and err.retriable and err.code_name == "UNKNOWN_TOPIC_OR_PARTITION"
    assert UnknownTopicOrPartitionError.retriable and not RecordTooLargeError.retriable


# ---------------------------------------------------------------- small parsers


def test_parse_bootstrap_and_acks() -> None:
    assert parse_bootstrap(" a:1, b:2 ,") == ["a:1", "b:2"]
    assert parse_bootstrap(["h:9192"]) == ["h:9192"]
    for bad in ("", "host", "host:", ":1", "h:0", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_bootstrap(bad)
    assert [parse_acks(a) for a in ("all", -1, "-1", 1, "1", 0, "0")] == [-1, -1, -1, 1, 1, 0, 0]
    with pytest.raises(ValueError):
        parse_acks(2)


# ---------------------------------------------------------------- accumulator


def _acc(batch: int = 1000, linger: int = 5, memory: int = 10_000) -> RecordAccumulator:
    return RecordAccumulator(
        batch_size_bytes=batch, linger_ms=linger, buffer_memory_bytes=memory, rng=random.Random(0)
    )


def _rec(n: int = 100) -> tuple[bytes | None, bytes | None, None, int]:
    return (None, b"x" * (n - 24), None, 1000)


def test_a_batch_closes_when_full_and_a_record_that_does_not_fit_opens_a_new_one() -> None:
    acc = _acc(batch=250)
    assert record_size(None, b"x" * 76, None) == 100
    _, changed = acc.append("t", 0, _rec(), 100, now_ms=0)
    assert changed  # a new batch
    _, changed = acc.append("t", 0, _rec(), 100, now_ms=0)
    assert not changed and not acc.ready
    acc.append("t", 0, _rec(), 100, now_ms=0)  # 300 > 250: the first batch closes with two records
    assert [len(b.records) for b in acc.ready] == [2]
    assert len(acc.open[("t", 0)].records) == 1
    acc.append("t", 0, _rec(200), 200, now_ms=0)  # 100 + 200 > 250: closes; 200 < 250 stays open
    acc.append("t", 0, _rec(250), 250, now_ms=0)  # exactly full: closes at once
    assert [len(b.records) for b in acc.ready] == [2, 1, 1, 1]
    assert not acc.open
    assert acc.buffer_used_bytes == 100 * 3 + 200 + 250


def test_drain_waits_for_linger_unless_full_or_flushing() -> None:
    acc = _acc(linger=5)
    acc.append("t", 0, _rec(), 100, now_ms=100)

    assert _drain(acc, 104) == {}
    assert acc.next_deadline_ms() == 105
    assert _drain(acc, 105) == {1: [(0, 1)]}
    acc.in_flight.clear()
    acc.append("t", 0, _rec(), 100, now_ms=200)
    assert _drain(acc, 200, flush=True) == {1: [(0, 1)]}
    assert not acc.open and not acc.ready and len(acc.incomplete) == 2


def _drain(
    acc: RecordAccumulator,
    now: int,
    leaders: dict[int, int | None] | None = None,
    room: bool = True,
    max_request_bytes: int = 10**6,
    flush: bool = False,
) -> dict[int, list[tuple[int, int]]]:
    """node -> [(partition, records)] of one drain."""
    d = acc.drain(
        now,
        flush=flush,
        leader_of=lambda t, p: (leaders or {}).get(p, 1),
        node_has_room=lambda n: room,
        max_request_bytes=max_request_bytes,
    )
    return {n: [(b.partition, len(b.records)) for b in bs] for n, bs in d.by_node.items()}


def test_drain_groups_by_leader_and_pipelines_a_partition_only_to_the_node_it_is_in_flight_to() -> None:
    acc = _acc(batch=100)
    for p in (0, 0, 0, 1, 2):
        acc.append("t", p, _rec(), 100, now_ms=0)  # each record fills its batch
    first = acc.drain(
        0,
        flush=False,
        leader_of=lambda t, p: {0: 1, 1: 2, 2: None}[p],
        node_has_room=lambda n: n != 2,
        max_request_bytes=250,
    )
    # node 1 gets partition 0's batches up to the request cap; node 2 has no slot; 2 has no leader
    assert {n: [b.partition for b in bs] for n, bs in first.by_node.items()} == {1: [0, 0]}
    assert first.leader_missing
    assert [b.partition for b in acc.ready] == [0, 1, 2]
    # A second request of partition 0 may follow the first one on node 1's ordered stream.
    second = acc.drain(
        0, flush=False, leader_of=lambda t, p: 1, node_has_room=lambda n: True, max_request_bytes=150
    )
    assert [b.partition for b in second.by_node[1]] == [0]
    assert acc.in_flight[("t", 0)] == (1, 2)
    # Its leader moves while both are in flight: nothing of it goes to the new leader until both
    # requests are over, or a retry of theirs could land behind a newer batch.
    acc.append("t", 0, _rec(), 100, now_ms=0)
    assert _drain(acc, 0, {0: 4, 2: 3}) == {1: [(1, 1)], 3: [(2, 1)]}
    acc.unmute(first.by_node[1])
    assert _drain(acc, 0, {0: 4}) == {}
    acc.unmute(second.by_node[1])
    assert _drain(acc, 0, {0: 4}) == {4: [(0, 1)]}


def test_a_retried_batch_goes_before_newer_batches_of_its_partition() -> None:
    acc = _acc(batch=100)
    for _ in range(3):
        acc.append("t", 0, _rec(), 100, now_ms=0)
    ready = list(acc.ready)
    d = acc.drain(
        0, flush=False, leader_of=lambda t, p: 1, node_has_room=lambda n: True, max_request_bytes=150
    )
    assert d.by_node[1] == [ready[0]]
    acc.unmute(d.by_node[1])
    acc.reenqueue(d.by_node[1], retry_at_ms=50)
    assert _drain(acc, 10) == {}  # backing off, and nothing newer may overtake it
    d = acc.drain(
        50, flush=False, leader_of=lambda t, p: 1, node_has_room=lambda n: True, max_request_bytes=10**6
    )
    assert d.by_node[1] == ready


def test_retries_answered_out_of_order_go_back_in_creation_order() -> None:
    """With requests pipelined, a later request's batch can come back for a retry before an earlier
    one's (refused behind it in the same stream): each goes back to its place all the same."""
    acc = _acc(batch=100)
    for p in (0, 1, 0, 1):
        acc.append("t", p, _rec(), 100, now_ms=0)
    for _ in range(2):
        acc.append("t", 0, _rec(50), 50, now_ms=0)
    made = list(acc.ready)
    one = acc.drain(
        0, flush=False, leader_of=lambda t, p: 1, node_has_room=lambda n: True, max_request_bytes=250
    )
    two = acc.drain(
        0, flush=False, leader_of=lambda t, p: 1, node_has_room=lambda n: True, max_request_bytes=250
    )
    assert one.by_node[1] == made[:2] and two.by_node[1] == made[2:4]
    acc.unmute(two.by_node[1])
    acc.reenqueue(two.by_node[1], retry_at_ms=0)  # the second request's answer came first
    acc.unmute(one.by_node[1])
    acc.reenqueue(one.by_node[1], retry_at_ms=0)
    assert list(acc.ready) == made
    halves = acc.split(made[4])  # halves keep their place too, ahead of anything newer
    acc.ready.remove(made[4])
    acc.reenqueue(halves, retry_at_ms=0)
    assert list(acc.ready) == [*made[:4], *halves]


def test_request_bytes_cap_leaves_the_rest_for_the_next_request() -> None:
    acc = _acc(batch=100, memory=10**6)
    for p in range(5):
        acc.append("t", p, _rec(), 100, now_ms=0)
    assert _drain(acc, 0, max_request_bytes=250) == {1: [(0, 1), (1, 1)]}
    assert len(acc.ready) == 3
    assert _drain(acc, 0, room=False) == {}


def test_buffer_memory_is_charged_on_append_and_returned_on_release() -> None:
    acc = _acc(batch=100, memory=300)
    for _ in range(3):
        acc.append("t", 0, _rec(), 100, now_ms=0)
    assert not acc.has_room(1)
    batch = acc.ready[0]
    acc.release(batch)
    acc.release(batch)  # twice is harmless
    assert acc.buffer_used_bytes == 200 and acc.has_room(100) and not acc.has_room(101)


def test_batches_past_the_delivery_timeout_expire() -> None:
    acc = _acc(batch=100)
    acc.append("t", 0, _rec(), 100, now_ms=0)
    acc.append("t", 1, _rec(50), 50, now_ms=500)
    assert acc.expired(999, 1000) == []
    gone = acc.expired(1000, 1000)
    assert [b.partition for b in gone] == [0]
    assert [b.partition for b in acc.expired(1500, 1000)] == [1]
    assert not acc.ready and not acc.open


def test_keyless_records_stick_to_a_partition_until_its_batch_closes() -> None:
    acc = _acc(batch=300, memory=10**6)
    used = []
    for _ in range(9):
        p = acc.sticky.partition("t", 6)
        used.append(p)
        acc.append("t", p, _rec(), 100, now_ms=0)
    # three records fill a batch; the fourth goes elsewhere
    assert used[0] == used[1] == used[2] and used[3] != used[2]
    assert len(set(used)) >= 2


# ---------------------------------------------------------------- record futures


def test_record_futures_share_the_batch_condition_and_complete_together() -> None:
    acc = _acc()
    futures = [acc.append("t", 3, (None, b"v", None, 1000 + i), 25, now_ms=0)[0] for i in range(3)]
    batch = acc.open[("t", 3)]
    assert all(f._condition is batch.condition for f in futures)
    assert not futures[0].cancel() and not futures[0].done()
    called: list[RecordMetadata] = []
    futures[1].add_done_callback(lambda f: called.append(f.result()))
    results: list[RecordMetadata] = []
    waiter = threading.Thread(target=lambda: results.append(futures[2].result(timeout=5)))
    waiter.start()
    done, _ = wait(futures, timeout=0.05, return_when=FIRST_COMPLETED)
    assert not done
    batch.complete(base_offset=40)
    waiter.join(5)
    assert [f.result(0) for f in futures] == [RecordMetadata("t", 3, 40 + i, 1000 + i) for i in range(3)]
    assert results == [RecordMetadata("t", 3, 42, 1002)]
    assert called == [RecordMetadata("t", 3, 41, 1001)]
    assert wait(futures, timeout=0).not_done == set()


def test_a_failed_batch_fails_every_record_future() -> None:
    acc = _acc()
    f1, _ = acc.append("t", 0, _rec(), 100, now_ms=0)
    f2, _ = acc.append("t", 0, _rec(), 100, now_ms=0)
    acc.open[("t", 0)].fail(RecordTooLargeError("too big"))
    for f in (f1, f2):
        with pytest.raises(RecordTooLargeError):
            f.result(0)
    assert isinstance(f1.exception(0), RecordTooLargeError)
    with pytest.raises(TimeoutError):
        RecordFuture(threading.Condition()).result(timeout=0.01)


def test_acks_zero_completes_with_offset_minus_one() -> None:
    acc = _acc()
    f, _ = acc.append("t", 0, (None, b"v", None, 77), 25, now_ms=0)
    acc.open[("t", 0)].complete(-1)
    assert f.result(0) == RecordMetadata("t", 0, -1, 77)


def test_split_halves_a_batch_keeping_order_futures_and_buffer_bytes() -> None:
    acc = _acc(batch=10_000)
    futures = [acc.append("t", 0, _rec(100 + i), 100 + i, now_ms=0)[0] for i in range(5)]
    (batch,) = acc.open.values()
    used = acc.buffer_used_bytes
    first, second = acc.split(batch)
    assert [len(first.records), len(second.records)] == [2, 3]
    assert first.futures + second.futures == futures
    assert first.records + second.records == batch.records
    assert first.size_bytes + second.size_bytes == batch.size_bytes
    assert acc.buffer_used_bytes == used and acc.incomplete == {first, second}
    acc.release(batch)  # the retired original gives nothing back
    assert acc.buffer_used_bytes == used
    first.complete(10)
    second.complete(12)
    assert [f.result(timeout=0).offset for f in futures] == [10, 11, 12, 13, 14]
    acc.release(first)
    acc.release(second)
    assert acc.buffer_used_bytes == 0 and not acc.pending


@settings(max_examples=150)
@given(
    st.sampled_from([-1, 0, 1]),
    st.integers(min_value=0, max_value=2**31 - 1),
    st.lists(
        st.tuples(
            st.text(max_size=12),
            st.lists(
                st.tuples(
                    st.integers(min_value=0, max_value=2**31 - 1),
                    st.lists(st.binary(min_size=1, max_size=3) | st.binary(max_size=70_000), max_size=3),
                ),
                max_size=3,
            ),
        ),
        max_size=3,
    ),
)
def test_the_produce_stream_request_is_written_as_protobuf_would(
    acks: int, timeout_ms: int, topics: list[tuple[str, list[tuple[int, list[bytes]]]]]
) -> None:
    """The producer writes its requests straight to the wire (``_wire.py``): the same bytes as the
    message built field by field, whatever the batches hold, so that a node parses them as sent."""
    from headwater.client._wire import produce_stream_request
    from headwater.v1 import client_pb2, records_pb2
    from headwater.v1.batch import encode_batch_parts

    def batch(payload: bytes) -> tuple[bytes, bytes]:
        return encode_batch_parts([(None, payload, None, 1)])

    reference = client_pb2.ProduceStreamRequest()
    reference.request.acks, reference.request.timeout_ms = acks, timeout_ms
    wire_topics = []
    for topic, partitions in topics:
        t = reference.request.topics.add(topic=topic)
        wire_partitions = []
        for partition, payloads in partitions:
            p = t.partitions.add(partition=partition)
            encoded = [batch(v) for v in payloads]
            for head, records in encoded:
                p.batches.append(records_pb2.RecordBatch.FromString(head + records))
            wire_partitions.append((partition, encoded))
        wire_topics.append((topic, wire_partitions))
    assert produce_stream_request(acks, timeout_ms, wire_topics) == reference.SerializeToString()
