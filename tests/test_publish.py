"""Publish (plain records through any node) and the decoded Fetch (served by any node).

The planning (which record goes where, which are refused alone, how batches are cut) is checked as
the pure function it is; the rest against a real three-node cluster: every node accepts a Publish,
keys land where the clients' partitioner puts them, offsets answered are where the records are,
PublishStream answers in order, a leader killed mid-way is ridden over, and a decoded Fetch sent to
any one node reads every partition.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Cluster, eventually, free_port

from headwater import Admin, NewTopic
from headwater.node.publish import plan
from headwater.v1 import batch as batch_codec
from headwater.v1 import client_pb2 as pb
from headwater.v1 import client_pb2_grpc, errors_pb2, records_pb2
from headwater.v1.partitioner import partition_for_key

E = errors_pb2
TOPIC = "published"
PARTITIONS = 6


def _rec(key: bytes | None = None, value: bytes | None = b"v", **fields: object) -> pb.PublishRecord:
    r = pb.PublishRecord(**fields)  # type: ignore[arg-type]
    if key is not None:
        r.key = key
    if value is not None:
        r.value = value
    return r


# ------------------------------------------------------------------ the plan (pure)


def test_keyed_records_go_where_the_partitioner_puts_them_in_request_order() -> None:
    records = [_rec(f"user-{i % 7}".encode(), f"{i}".encode()) for i in range(50)]
    p = plan(records, 6, 0, max_batch_bytes=1 << 20, max_batch_records=1000)
    assert not p.refused
    assert p.partitions == [partition_for_key(r.key, 6) for r in records]
    for partition, batches in p.batches.items():
        members = [i for b in batches for i in b]
        assert members == sorted(members)  # request order within the partition
        assert {p.partitions[i] for i in members} == {partition}
    assert sorted(i for bs in p.batches.values() for b in bs for i in b) == list(range(50))


def test_a_named_partition_wins_over_the_key_and_a_missing_one_is_refused_alone() -> None:
    records = [_rec(b"k", partition=4), _rec(b"k", partition=6), _rec(b"k")]
    p = plan(records, 6, 0, max_batch_bytes=1 << 20, max_batch_records=1000)
    assert p.partitions[0] == 4
    assert p.refused[1][0] == E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
    assert "0..5" in p.refused[1][1]
    assert p.partitions[2] == partition_for_key(b"k", 6)
    assert 1 not in [i for bs in p.batches.values() for b in bs for i in b]


def test_keyless_records_share_the_one_partition_given() -> None:
    records = [_rec(None, b"a"), _rec(None, b"b"), _rec(b"", b"empty key is a key")]
    p = plan(records, 12, 5, max_batch_bytes=1 << 20, max_batch_records=1000)
    assert p.partitions[:2] == [5, 5]
    assert p.partitions[2] == partition_for_key(b"", 12)


def test_batches_are_cut_by_size_and_count_and_an_oversized_record_is_refused_alone() -> None:
    records = [_rec(b"k", b"x" * 300, partition=0) for _ in range(10)]
    records.insert(3, _rec(b"k", b"y" * 5000, partition=0))
    p = plan(records, 1, 0, max_batch_bytes=1200, max_batch_records=1000)
    assert list(p.refused) == [3]
    assert p.refused[3][0] == E.ERROR_CODE_RECORD_TOO_LARGE
    assert "max_message_bytes=1200" in p.refused[3][1]
    batches = p.batches[0]
    assert [i for b in batches for i in b] == [i for i in range(11) if i != 3]
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    for b in batches:  # the estimate bounds the real batch
        built = batch_codec.build_batch([(r.key, r.value, [], 1) for r in (records[i] for i in b)])
        assert built.ByteSize() <= 1200
    by_count = plan(records, 1, 0, max_batch_bytes=1 << 20, max_batch_records=4)
    assert [len(b) for b in by_count.batches[0]] == [4, 4, 3]


def test_a_record_whose_timestamp_the_topic_refuses_is_refused_alone() -> None:
    records = [_rec(b"a", timestamp_ms=5), _rec(b"b", timestamp_ms=0)]

    def problem(ts: int) -> str:
        return "too old" if ts == 5 else ""

    p = plan(records, 3, 0, max_batch_bytes=1 << 20, max_batch_records=1000, timestamp_problem_of=problem)
    assert p.refused == {0: (E.ERROR_CODE_INVALID_TIMESTAMP, "too old")}
    assert [i for bs in p.batches.values() for b in bs for i in b] == [1]


# ------------------------------------------------------------------ against a cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("publish")), 3)
    for n in c.nodes.values():
        n.extra_args = [
            *n.extra_args,
            "--replica-lag-time-max-ms", "1500",
            "--min-insync-replicas", "2",
            "--metrics-port", str(free_port()),
        ]  # fmt: skip
    try:
        c.start()
        with Admin(c.bootstrap) as admin:
            admin.create_topics([NewTopic(TOPIC, partitions=PARTITIONS, replication_factor=3)])
        eventually(lambda: _all_led(c, TOPIC), 30, "every partition with a leader on every node")
        yield c
    finally:
        c.stop()


def _all_led(c: Cluster, topic: str) -> bool:
    for i, n in c.nodes.items():
        if not n.alive():
            continue
        try:
            md = c.metadata(i, [topic])
        except grpc.RpcError:
            return False
        t = [t for t in md.topics if t.name == topic]
        if not t or len(t[0].partitions) == 0 or any(p.leader_id < 0 for p in t[0].partitions):
            return False
    return True


def _stub(c: Cluster, node_id: int) -> tuple[grpc.Channel, client_pb2_grpc.HeadwaterServiceStub]:
    ch = grpc.insecure_channel(c.nodes[node_id].bootstrap)
    return ch, client_pb2_grpc.HeadwaterServiceStub(ch)  # type: ignore[no-untyped-call]


def _read_all(
    c: Cluster, node_id: int, topic: str, partitions: int, want: int, timeout_s: float = 20
) -> dict[int, list[pb.ConsumerRecord]]:
    """Every record of the topic, by decoded Fetches sent to one node only."""
    got: dict[int, list[pb.ConsumerRecord]] = {p: [] for p in range(partitions)}
    ch, stub = _stub(c, node_id)
    deadline = time.monotonic() + timeout_s
    with ch:
        while sum(map(len, got.values())) < want:
            assert time.monotonic() < deadline, f"read {sum(map(len, got.values()))} of {want} records"
            req = pb.FetchRequest(max_wait_ms=200, decode=True)
            t = req.topics.add(topic=topic)
            for p in range(partitions):
                t.partitions.add(partition=p, fetch_offset=got[p][-1].offset + 1 if got[p] else 0)
            resp = stub.Fetch(req, timeout=10)
            for tr in resp.topics:
                for pr in tr.partitions:
                    if pr.error_code == E.ERROR_CODE_NONE:
                        assert not pr.batches, "a decoded fetch answers records, not batches"
                        got[pr.partition].extend(pr.records)
    return got


def test_any_node_takes_a_publish_and_every_record_is_where_its_answer_says(cluster: Cluster) -> None:
    sent: dict[tuple[int, int], pb.PublishRecord] = {}
    for node_id in cluster.nodes:
        ch, stub = _stub(cluster, node_id)
        with ch:
            records = [
                _rec(
                    f"user-{i % 5}".encode(),
                    f"from {node_id}: {i}".encode(),
                    headers=[records_pb2.RecordHeader(key="n")],
                )
                for i in range(40)
            ]
            records.append(_rec(None, None))  # a keyless tombstone
            resp = stub.Publish(pb.PublishRequest(topic=TOPIC, records=records), timeout=30)
        assert len(resp.results) == len(records)
        last_offset: dict[bytes, int] = {}
        for r, res in zip(records, resp.results, strict=True):
            assert res.error_code == E.ERROR_CODE_NONE, res.error_message
            if r.HasField("key"):
                assert res.partition == partition_for_key(r.key, PARTITIONS)
                # one key's records keep their order
                assert res.offset > last_offset.get(r.key, -1)
                last_offset[r.key] = res.offset
            assert res.timestamp_ms > 0
            sent[(res.partition, res.offset)] = r
    got = _read_all(cluster, 2, TOPIC, PARTITIONS, len(sent))
    read = {(p, cr.offset): cr for p, crs in got.items() for cr in crs}
    assert read.keys() == sent.keys()
    for where, r in sent.items():
        cr = read[where]
        assert cr.HasField("key") == r.HasField("key") and cr.key == r.key
        assert cr.HasField("value") == r.HasField("value") and cr.value == r.value
        assert [h.key for h in cr.headers] == [h.key for h in r.headers]
        assert not any(h.HasField("value") for h in cr.headers)


def test_refusals_are_per_record_or_whole_request_and_say_why(cluster: Cluster) -> None:
    ch, stub = _stub(cluster, 3)
    with ch:
        unknown = stub.Publish(pb.PublishRequest(topic="no-such-topic", records=[_rec(b"k")]), timeout=10)
        assert [r.error_code for r in unknown.results] == [E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION]
        assert "no-such-topic" in unknown.results[0].error_message
        assert unknown.results[0].offset == -1

        bad_acks = stub.Publish(pb.PublishRequest(topic=TOPIC, records=[_rec(b"k")], acks=2), timeout=10)
        assert bad_acks.results[0].error_code == E.ERROR_CODE_INVALID_REQUIRED_ACKS

        mixed = stub.Publish(
            pb.PublishRequest(
                topic=TOPIC,
                records=[_rec(b"a"), _rec(b"b", partition=PARTITIONS), _rec(b"c", timestamp_ms=-5)],
                acks=1,
            ),
            timeout=10,
        )
        codes = [r.error_code for r in mixed.results]
        assert codes == [
            E.ERROR_CODE_NONE,
            E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION,
            E.ERROR_CODE_INVALID_TIMESTAMP,
        ]
        assert mixed.results[0].offset >= 0 and mixed.results[1].offset == -1

        raw = ch.unary_unary("/headwater.v1.HeadwaterService/Publish")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff", timeout=10)  # not a PublishRequest
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed" in (err.value.details() or "")


def test_publish_stream_answers_each_request_in_the_order_sent(cluster: Cluster) -> None:
    requests = [
        pb.PublishStreamRequest(
            request=pb.PublishRequest(topic=TOPIC, records=[_rec(b"stream-key", f"s{i}".encode())])
        )
        for i in range(30)
    ]
    ch, stub = _stub(cluster, 1)
    with ch:
        answers = list(stub.PublishStream(iter(requests), timeout=60))
    assert len(answers) == 30
    offsets = []
    for a in answers:
        (res,) = a.response.results
        assert res.error_code == E.ERROR_CODE_NONE, res.error_message
        assert res.partition == partition_for_key(b"stream-key", PARTITIONS)
        offsets.append(res.offset)
    assert len(set(offsets)) == 30
    partition = partition_for_key(b"stream-key", PARTITIONS)
    ch, stub = _stub(cluster, 3)
    with ch:
        req = pb.FetchRequest(decode=True, max_bytes=1 << 20)
        req.topics.add(topic=TOPIC).partitions.add(partition=partition, fetch_offset=min(offsets))
        values = {}
        while len(values) < 30:
            resp = stub.Fetch(req, timeout=10)
            pr = resp.topics[0].partitions[0]
            assert pr.error_code == E.ERROR_CODE_NONE, pr.error_message
            for cr in pr.records:
                if cr.key == b"stream-key":
                    values[cr.offset] = cr.value
            req.topics[0].partitions[0].fetch_offset = pr.records[-1].offset + 1
    assert [values[o] for o in offsets] == [f"s{i}".encode() for i in range(30)]


def test_a_publish_rides_over_its_leaders_death(cluster: Cluster) -> None:
    key = b"survivor"
    partition = partition_for_key(key, PARTITIONS)
    md = cluster.metadata(1, [TOPIC])
    leader = next(p.leader_id for p in md.topics[0].partitions if p.partition == partition)
    other = next(i for i in cluster.nodes if i != leader)
    victim = cluster.nodes[leader]
    assert victim.proc is not None
    victim.proc.kill()
    victim.proc.wait()
    try:
        ch, stub = _stub(cluster, other)
        with ch:
            resp = stub.Publish(
                pb.PublishRequest(topic=TOPIC, records=[_rec(key, b"after the kill")], timeout_ms=25000),
                timeout=30,
            )
        (res,) = resp.results
        assert res.error_code == E.ERROR_CODE_NONE, res.error_message
        assert res.partition == partition
        ch, stub = _stub(cluster, other)
        with ch:
            req = pb.FetchRequest(decode=True)
            req.topics.add(topic=TOPIC).partitions.add(partition=partition, fetch_offset=res.offset)
            pr = stub.Fetch(req, timeout=10).topics[0].partitions[0]
        assert pr.error_code == E.ERROR_CODE_NONE, pr.error_message
        assert pr.records[0].offset == res.offset and pr.records[0].value == b"after the kill"
    finally:
        victim.launch()
        victim.wait_serving(30)


def test_a_large_request_is_encoded_off_the_loop_and_stored_whole(cluster: Cluster) -> None:
    # More records than _BUILD_ON_LOOP_RECORDS: the batches are built on a worker thread.
    records = [_rec(None, f"bulk-{i}".encode()) for i in range(3000)]
    ch, stub = _stub(cluster, 2)
    with ch:
        resp = stub.Publish(pb.PublishRequest(topic=TOPIC, records=records, compression=3), timeout=30)
    assert all(r.error_code == E.ERROR_CODE_NONE for r in resp.results)
    (partition,) = {r.partition for r in resp.results}  # keyless: one partition per request
    offsets = [r.offset for r in resp.results]
    assert offsets == list(range(offsets[0], offsets[0] + 3000))
    ch, stub = _stub(cluster, 3)
    values: dict[int, bytes] = {}
    with ch:
        req = pb.FetchRequest(decode=True)
        req.topics.add(topic=TOPIC).partitions.add(partition=partition, fetch_offset=offsets[0])
        while len(values) < 3000:
            pr = stub.Fetch(req, timeout=10).topics[0].partitions[0]
            assert pr.error_code == E.ERROR_CODE_NONE, pr.error_message
            values.update((cr.offset, cr.value) for cr in pr.records if cr.offset <= offsets[-1])
            req.topics[0].partitions[0].fetch_offset = pr.records[-1].offset + 1
    assert [values[o] for o in offsets] == [f"bulk-{i}".encode() for i in range(3000)]
