"""A real node process spoken to over raw gRPC: the contract, bad input, durability, shutdown.

These tests use only the generated stubs and the batch codec, as a client in another language would.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import NodeProcess, fill_disk, mounted_tmpfs
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from headwater.v1 import batch as codec
from headwater.v1 import client_pb2 as pb
from headwater.v1 import client_pb2_grpc, records_pb2
from headwater.v1 import errors_pb2 as E

ALL = -1


@pytest.fixture
def stub(node: NodeProcess) -> Iterator[client_pb2_grpc.HeadwaterServiceStub]:
    with grpc.insecure_channel(node.bootstrap, options=[("grpc.max_send_message_length", 256 << 20)]) as ch:
        yield client_pb2_grpc.HeadwaterServiceStub(ch)


def create(
    stub: client_pb2_grpc.HeadwaterServiceStub, name: str, partitions: int = 1, **configs: str
) -> pb.CreatableTopicResult:
    resp = stub.CreateTopics(
        pb.CreateTopicsRequest(
            topics=[
                pb.CreatableTopic(name=name, num_partitions=partitions, replication_factor=1, configs=configs)
            ]
        ),
        timeout=10,
    )
    return resp.topics[0]


def produce(
    stub: client_pb2_grpc.HeadwaterServiceStub,
    topic: str,
    values: list[bytes],
    partition: int = 0,
    acks: int = ALL,
    ts: int | None = None,
    batch: pb.RecordBatch | None = None,
) -> pb.ProducePartitionResponse:
    now = int(time.time() * 1000) if ts is None else ts
    b = batch or codec.build_batch([(None, v, None, now) for v in values])
    req = pb.ProduceRequest(
        acks=acks,
        timeout_ms=10_000,
        topics=[
            pb.ProduceTopicData(
                topic=topic, partitions=[pb.ProducePartitionData(partition=partition, batches=[b])]
            )
        ],
    )
    return stub.Produce(req, timeout=10).topics[0].partitions[0]


def fetch(
    stub: client_pb2_grpc.HeadwaterServiceStub,
    topic: str,
    offset: int,
    partition: int = 0,
    max_wait_ms: int = 0,
    min_bytes: int = 0,
) -> pb.FetchPartitionResponse:
    req = pb.FetchRequest(
        replica_id=-1,
        max_wait_ms=max_wait_ms,
        min_bytes=min_bytes,
        max_bytes=1 << 20,
        topics=[
            pb.FetchTopic(
                topic=topic,
                partitions=[
                    pb.FetchPartition(
                        partition=partition,
                        fetch_offset=offset,
                        current_leader_epoch=-1,
                        partition_max_bytes=1 << 20,
                    )
                ],
            )
        ],
    )
    return stub.Fetch(req, timeout=30).topics[0].partitions[0]


def values_of(p: pb.FetchPartitionResponse, from_offset: int = 0) -> list[bytes]:
    return [
        r.value
        for b in p.batches
        for r in codec.decode_records(b)
        if r.offset >= from_offset and r.value is not None
    ]


# ------------------------------------------------------------------ the contract


def test_produce_then_fetch_returns_records_in_offset_order(
    stub: client_pb2_grpc.HeadwaterServiceStub,
) -> None:
    assert create(stub, "orders").error_code == E.ERROR_CODE_NONE
    first = produce(stub, "orders", [b"a", b"b", b"c"])
    second = produce(stub, "orders", [b"d"])
    assert (first.error_code, first.base_offset) == (E.ERROR_CODE_NONE, 0)
    assert (second.error_code, second.base_offset) == (E.ERROR_CODE_NONE, 3)
    got = fetch(stub, "orders", 0)
    assert got.error_code == E.ERROR_CODE_NONE
    assert got.high_watermark == 4 and got.log_start_offset == 0
    assert values_of(got) == [b"a", b"b", b"c", b"d"]
    assert values_of(fetch(stub, "orders", 1), from_offset=1) == [b"b", b"c", b"d"]


def test_stored_batch_keeps_the_producers_record_bytes(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    create(stub, "raw")
    sent = codec.build_batch(
        [(b"k", b"v" * 100, [("h", b"1")], 1_700_000_000_000)], codec.COMPRESSION_BY_NAME["zstd"]
    )
    produce(stub, "raw", [], batch=sent)
    got = fetch(stub, "raw", 0).batches[0]
    assert got.records == sent.records and got.crc == sent.crc
    assert codec.crc_is_valid(got)
    assert (got.base_offset, got.partition_leader_epoch) == (0, 0)


def test_fsync_flush_policy_topic_appends_and_reads_back(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    assert create(stub, "synced", flush_policy="fsync").error_code == E.ERROR_CODE_NONE
    offsets = [produce(stub, "synced", [f"s{i}".encode()]).base_offset for i in range(5)]
    assert offsets == [0, 1, 2, 3, 4]
    assert values_of(fetch(stub, "synced", 0)) == [f"s{i}".encode() for i in range(5)]


def test_long_poll_fetch_wakes_when_data_arrives(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    create(stub, "poll")
    req = pb.FetchRequest(
        replica_id=-1,
        max_wait_ms=10_000,
        min_bytes=1,
        max_bytes=1 << 20,
        topics=[
            pb.FetchTopic(
                topic="poll",
                partitions=[pb.FetchPartition(partition=0, fetch_offset=0, current_leader_epoch=-1)],
            )
        ],
    )
    started = time.monotonic()
    pending = stub.Fetch.future(req, timeout=30)
    time.sleep(0.3)
    assert not pending.done()
    produce(stub, "poll", [b"wake"])
    got = pending.result().topics[0].partitions[0]
    assert values_of(got) == [b"wake"]
    assert time.monotonic() - started < 5


def test_long_poll_fetch_returns_empty_after_max_wait(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    create(stub, "idle")
    started = time.monotonic()
    got = fetch(stub, "idle", 0, max_wait_ms=300, min_bytes=1)
    assert got.error_code == E.ERROR_CODE_NONE and not got.batches
    assert time.monotonic() - started >= 0.25


def test_list_offsets_earliest_latest_and_by_timestamp(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    create(stub, "times")
    for i, ts in enumerate([1000, 2000, 3000]):
        produce(stub, "times", [f"v{i}".encode()], ts=ts)

    def lookup(ts: int) -> tuple[int, int]:
        r = stub.ListOffsets(
            pb.ListOffsetsRequest(
                topics=[
                    pb.ListOffsetsTopic(
                        topic="times",
                        partitions=[
                            pb.ListOffsetsPartition(partition=0, timestamp_ms=ts, current_leader_epoch=-1)
                        ],
                    )
                ]
            ),
            timeout=5,
        )
        p = r.topics[0].partitions[0]
        assert p.error_code == E.ERROR_CODE_NONE
        return p.offset, p.timestamp_ms

    assert lookup(-2)[0] == 0
    assert lookup(-1)[0] == 3
    assert lookup(1500) == (1, 2000)
    assert lookup(2000) == (1, 2000)
    assert lookup(0) == (0, 1000)
    assert lookup(9999)[0] == -1


def test_metadata_describes_topics_and_the_node(
    stub: client_pb2_grpc.HeadwaterServiceStub, node: NodeProcess
) -> None:
    created = create(stub, "meta", partitions=3)
    md = stub.Metadata(pb.MetadataRequest(), timeout=5)
    assert [n.port for n in md.nodes] == [node.port]
    (t,) = [t for t in md.topics if t.name == "meta"]
    assert t.topic_id == created.topic_id and len(t.topic_id) == 16
    assert [p.partition for p in t.partitions] == [0, 1, 2]
    assert all(p.leader_id == md.nodes[0].node_id and list(p.isr) == [p.leader_id] for p in t.partitions)


def test_subscribe_streams_decoded_records_from_an_offset(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    create(stub, "tail")
    produce(stub, "tail", [b"0", b"1", b"2"])
    stream = stub.Subscribe(pb.SubscribeRequest(topic="tail", partition=0, offset=1, decode=True), timeout=10)
    got: list[tuple[int, bytes]] = []
    for msg in stream:
        assert msg.error_code == E.ERROR_CODE_NONE
        got += [(r.offset, r.value) for r in msg.records]
        if len(got) == 2:
            produce(stub, "tail", [b"3"])
        if len(got) == 3:
            break
    stream.cancel()
    assert got == [(1, b"1"), (2, b"2"), (3, b"3")]


def test_subscribe_streams_the_stored_batches_as_fetch_serves_them(
    stub: client_pb2_grpc.HeadwaterServiceStub,
) -> None:
    create(stub, "raw")
    for i in range(3):
        produce(stub, "raw", [b"v%d-%d" % (i, j) for j in range(i + 1)])
    fetched = stub.Fetch(
        pb.FetchRequest(
            max_wait_ms=0,
            topics=[
                pb.FetchTopic(
                    topic="raw",
                    partitions=[pb.FetchPartition(partition=0, fetch_offset=0, current_leader_epoch=-1)],
                )
            ],
        ),
        timeout=10,
    )
    want = list(fetched.topics[0].partitions[0].batches)
    assert len(want) == 3
    stream = stub.Subscribe(pb.SubscribeRequest(topic="raw", partition=0, offset=-2), timeout=10)
    got: list[object] = []
    for msg in stream:
        assert msg.error_code == E.ERROR_CODE_NONE and msg.high_watermark == 6 and not msg.records
        got += msg.batches
        if len(got) >= 3:
            break
    stream.cancel()
    assert got == want
    assert [r.value for b in got for r in codec.decode_records(b)] == [
        b"v0-0",
        b"v1-0",
        b"v1-1",
        b"v2-0",
        b"v2-1",
        b"v2-2",
    ]


def test_health_and_reflection_are_served(node: NodeProcess) -> None:
    with grpc.insecure_channel(node.bootstrap) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="headwater.v1.HeadwaterService"), timeout=5
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert "headwater.v1.HeadwaterService" in names


def test_configs_describe_alter_and_validate(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    create(stub, "conf", retention_ms="60000")
    topic = pb.ConfigResource(resource_type=pb.RESOURCE_TYPE_TOPIC, resource_name="conf")
    entries = {
        e.name: e
        for e in stub.DescribeConfigs(pb.DescribeConfigsRequest(resources=[topic])).results[0].entries
    }
    assert (
        entries["retention_ms"].value == "60000" and entries["retention_ms"].source == pb.CONFIG_SOURCE_TOPIC
    )
    assert entries["retention_bytes"].source == pb.CONFIG_SOURCE_NODE

    def alter(*ops: pb.AlterableConfig) -> pb.AlterConfigsResult:
        return stub.AlterConfigs(
            pb.AlterConfigsRequest(
                resources=[
                    pb.AlterConfigsResource(
                        resource_type=pb.RESOURCE_TYPE_TOPIC, resource_name="conf", configs=list(ops)
                    )
                ]
            )
        ).results[0]

    assert alter(pb.AlterableConfig(name="retention.bytes", value="1000")).error_code == E.ERROR_CODE_NONE
    bad = alter(pb.AlterableConfig(name="retention_ms", value="soon"))
    assert bad.error_code == E.ERROR_CODE_INVALID_CONFIG and "retention_ms" in bad.error_message
    assert (
        alter(pb.AlterableConfig(name="no_such_thing", value="1")).error_code == E.ERROR_CODE_INVALID_CONFIG
    )
    assert (
        alter(pb.AlterableConfig(name="retention_ms", op=pb.ALTER_CONFIG_OP_DELETE)).error_code
        == E.ERROR_CODE_NONE
    )
    entries = {
        e.name: e
        for e in stub.DescribeConfigs(pb.DescribeConfigsRequest(resources=[topic])).results[0].entries
    }
    assert entries["retention_bytes"].value == "1000"
    assert entries["retention_ms"].source == pb.CONFIG_SOURCE_NODE


# ------------------------------------------------------------------ retention


def test_retention_by_time_removes_old_batches_after_a_config_change(node_factory: object) -> None:
    n: NodeProcess = node_factory(extra_args=["--retention-check-interval-ms", "200"])  # type: ignore[operator]
    with grpc.insecure_channel(n.bootstrap) as ch:
        s = client_pb2_grpc.HeadwaterServiceStub(ch)
        create(s, "old")
        now = int(time.time() * 1000)
        produce(s, "old", [b"ancient"], ts=now - 3_600_000)
        produce(s, "old", [b"fresh"], ts=now)
        time.sleep(0.6)
        assert fetch(s, "old", 0).log_start_offset == 0  # default retention keeps both
        s.AlterConfigs(
            pb.AlterConfigsRequest(
                resources=[
                    pb.AlterConfigsResource(
                        resource_type=pb.RESOURCE_TYPE_TOPIC,
                        resource_name="old",
                        configs=[pb.AlterableConfig(name="retention_ms", value="60000")],
                    )
                ]
            )
        )
        deadline = time.monotonic() + 10
        while fetch(s, "old", 1).log_start_offset != 1:
            assert time.monotonic() < deadline, "retention did not remove the old batch"
            time.sleep(0.1)
        assert fetch(s, "old", 0).error_code == E.ERROR_CODE_OFFSET_OUT_OF_RANGE
        assert values_of(fetch(s, "old", 1)) == [b"fresh"]


# ------------------------------------------------------------------ durability and shutdown


def test_acked_writes_survive_kill_9(node_factory: object) -> None:
    n: NodeProcess = node_factory()  # type: ignore[operator]
    with grpc.insecure_channel(n.bootstrap) as ch:
        s = client_pb2_grpc.HeadwaterServiceStub(ch)
        create(s, "durable", partitions=2)
        acked = []
        for i in range(200):
            r = produce(s, "durable", [f"r{i}".encode()], partition=i % 2)
            assert r.error_code == E.ERROR_CODE_NONE
            acked.append((i % 2, r.base_offset, f"r{i}".encode()))
    n.kill9()
    n.start()
    with grpc.insecure_channel(n.bootstrap) as ch:
        s = client_pb2_grpc.HeadwaterServiceStub(ch)
        stored = {p: values_of(fetch(s, "durable", 0, partition=p)) for p in (0, 1)}
        for p, offset, value in acked:
            assert stored[p][offset] == value
        assert produce(s, "durable", [b"after"]).base_offset == 100


def test_sigterm_shuts_down_cleanly_and_data_stays(node_factory: object) -> None:
    n: NodeProcess = node_factory()  # type: ignore[operator]
    with grpc.insecure_channel(n.bootstrap) as ch:
        s = client_pb2_grpc.HeadwaterServiceStub(ch)
        create(s, "graceful")
        produce(s, "graceful", [b"x"])
        # A parked long poll must not hold the shutdown for its whole max_wait.
        parked = s.Fetch.future(
            pb.FetchRequest(
                replica_id=-1,
                max_wait_ms=30_000,
                min_bytes=1,
                topics=[
                    pb.FetchTopic(
                        topic="graceful",
                        partitions=[pb.FetchPartition(partition=0, fetch_offset=1, current_leader_epoch=-1)],
                    )
                ],
            ),
            timeout=60,
        )
        # Nor may a producer's idle ProduceStream hold it for the whole grace period (10 s).
        quiet = threading.Event()

        def one_then_quiet() -> Iterator[pb.ProduceStreamRequest]:
            yield _stream_request("graceful", (0, codec.build_batch([(None, b"y", None, 1)])))
            quiet.wait(30)

        answers = s.ProduceStream(one_then_quiet(), timeout=60)
        assert next(answers).response.topics[0].partitions[0].base_offset == 1
        time.sleep(0.2)
        started = time.monotonic()
        try:
            assert n.stop() == 0
            assert time.monotonic() - started < 8
            assert list(answers) == []  # the node ended the stream
        finally:
            quiet.set()
        # Answered, not failed: empty, or refused because the controlled shutdown moved the
        # leadership away first (a retriable error that sends a consumer to the new leader).
        assert parked.result().topics[0].partitions[0].error_code in (
            E.ERROR_CODE_NONE,
            E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER,
        )
    assert "stopped" in n.log()
    n.start()
    with grpc.insecure_channel(n.bootstrap) as ch:
        assert values_of(fetch(client_pb2_grpc.HeadwaterServiceStub(ch), "graceful", 0)) == [b"x", b"y"]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "a" * 250, "has space", "slash/name", "ünïcode", "semi;colon", "newline\n", "\nlead"],
)
def test_invalid_topic_names_are_refused(stub: client_pb2_grpc.HeadwaterServiceStub, name: str) -> None:
    r = create(stub, name)
    assert r.error_code == E.ERROR_CODE_INVALID_TOPIC, (name, r)
    assert r.error_message


def test_longest_legal_topic_name_is_accepted(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    assert create(stub, "a." + "b_-" * 82 + "c").error_code == E.ERROR_CODE_NONE  # 249 characters


@pytest.mark.parametrize("partitions", [-2, -5, 10_001])
def test_bad_partition_counts_are_refused(
    stub: client_pb2_grpc.HeadwaterServiceStub, partitions: int
) -> None:
    r = create(stub, "counted", partitions=partitions)
    assert r.error_code == E.ERROR_CODE_INVALID_PARTITIONS, r
    assert (
        stub.Metadata(pb.MetadataRequest(topics=["counted"])).topics[0].error_code
        == E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
    )


def test_duplicate_topic_and_bad_replication_factor(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    assert create(stub, "twice").error_code == E.ERROR_CODE_NONE
    assert create(stub, "twice").error_code == E.ERROR_CODE_TOPIC_ALREADY_EXISTS
    r = stub.CreateTopics(
        pb.CreateTopicsRequest(topics=[pb.CreatableTopic(name="rf", num_partitions=1, replication_factor=3)])
    )
    assert r.topics[0].error_code == E.ERROR_CODE_INVALID_REPLICATION_FACTOR
    bad_cfg = create(stub, "cfg", retention_ms="-7")
    assert bad_cfg.error_code == E.ERROR_CODE_INVALID_CONFIG
    compact = create(stub, "cfg", cleanup_policy="compact")  # compaction is not built yet
    assert compact.error_code == E.ERROR_CODE_INVALID_CONFIG and "cleanup_policy" in compact.error_message


def test_unknown_topic_or_partition_everywhere(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    assert produce(stub, "nope", [b"x"]).error_code == E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
    assert fetch(stub, "nope", 0).error_code == E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
    create(stub, "one", partitions=1)
    assert produce(stub, "one", [b"x"], partition=1).error_code == E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
    assert produce(stub, "one", [b"x"], partition=-1).error_code == E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
    d = stub.DeleteTopics(pb.DeleteTopicsRequest(names=["nope"])).topics[0]
    assert d.error_code == E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION


def test_delete_topic_then_recreate_starts_empty(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    create(stub, "gone")
    produce(stub, "gone", [b"x", b"y"])
    assert stub.DeleteTopics(pb.DeleteTopicsRequest(names=["gone"])).topics[0].error_code == E.ERROR_CODE_NONE
    assert stub.DeleteTopics(pb.DeleteTopicsRequest(names=["gone"])).topics[0].error_code == (
        E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
    )
    create(stub, "gone")
    assert fetch(stub, "gone", 0).high_watermark == 0
    assert produce(stub, "gone", [b"z"]).base_offset == 0


def test_record_above_max_message_bytes_is_refused_and_nothing_stored(
    stub: client_pb2_grpc.HeadwaterServiceStub,
) -> None:
    create(stub, "big", max_message_bytes="10000")
    r = produce(stub, "big", [b"x" * 20_000])
    assert r.error_code == E.ERROR_CODE_RECORD_TOO_LARGE and "max_message_bytes" in r.error_message
    assert r.HasField("error_batch_index") and r.error_batch_index == 0
    mixed = pb.ProduceRequest(
        acks=ALL,
        topics=[
            pb.ProduceTopicData(
                topic="big",
                partitions=[
                    pb.ProducePartitionData(
                        partition=0,
                        batches=[
                            codec.build_batch([(None, b"ok", None, 1)]),
                            codec.build_batch([(None, b"x" * 20_000, None, 1)]),
                        ],
                    )
                ],
            )
        ],
    )
    r = stub.Produce(mixed, timeout=10).topics[0].partitions[0]
    assert (r.error_code, r.error_batch_index) == (E.ERROR_CODE_RECORD_TOO_LARGE, 1)  # all or none
    assert fetch(stub, "big", 0).high_watermark == 0
    ok = produce(stub, "big", [b"x" * 100])
    assert ok.error_code == E.ERROR_CODE_NONE and not ok.HasField("error_batch_index")


def test_corrupt_batch_is_refused_and_nothing_stored(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    create(stub, "crc")
    b = codec.build_batch([(None, b"payload", None, 1)])
    b.records = b.records[:-1] + bytes([b.records[-1] ^ 0xFF])
    assert produce(stub, "crc", [], batch=b).error_code == E.ERROR_CODE_CORRUPT_MESSAGE
    lying = codec.build_batch([(None, b"a", None, 1), (None, b"b", None, 1)])
    lying.record_count = 5
    assert produce(stub, "crc", [], batch=lying).error_code == E.ERROR_CODE_CORRUPT_MESSAGE
    assert fetch(stub, "crc", 0).high_watermark == 0


def _stream_request(topic: str, *parts: tuple[int, pb.RecordBatch]) -> pb.ProduceStreamRequest:
    req = pb.ProduceStreamRequest()
    req.request.acks, req.request.timeout_ms = 1, 10_000
    t = req.request.topics.add(topic=topic)
    for partition, b in parts:
        t.partitions.add(partition=partition, batches=[b])
    return req


def test_produce_stream_appends_in_order_and_refuses_a_refused_partitions_later_batches(
    stub: client_pb2_grpc.HeadwaterServiceStub,
) -> None:
    """A stream's requests are appended in the order sent; once a partition's batch is refused, its
    later batches in the same stream are refused too (OUT_OF_ORDER_SEQUENCE) and nothing of them is
    stored, so a retry can never land behind them. Other partitions, and a new stream, go on."""
    create(stub, "ordered", partitions=2)

    def good(v: bytes) -> pb.RecordBatch:
        return codec.build_batch([(None, v, None, 1)])

    bad = good(b"bad")
    bad.records = bad.records[:-1] + bytes([bad.records[-1] ^ 0xFF])
    answers = list(
        stub.ProduceStream(
            iter(
                [
                    _stream_request("ordered", (0, good(b"a0")), (1, good(b"b0"))),
                    _stream_request("ordered", (0, good(b"a1"))),
                    _stream_request("ordered", (0, bad), (1, good(b"b1"))),
                    _stream_request("ordered", (0, good(b"a2")), (1, good(b"b2"))),
                ]
            ),
            timeout=10,
        )
    )
    codes = [[p.error_code for p in a.response.topics[0].partitions] for a in answers]
    assert codes == [
        [E.ERROR_CODE_NONE, E.ERROR_CODE_NONE],
        [E.ERROR_CODE_NONE],
        [E.ERROR_CODE_CORRUPT_MESSAGE, E.ERROR_CODE_NONE],
        [E.ERROR_CODE_OUT_OF_ORDER_SEQUENCE, E.ERROR_CODE_NONE],
    ]
    assert [a.response.topics[0].partitions[0].base_offset for a in answers[:2]] == [0, 1]
    assert "refused in this stream" in answers[3].response.topics[0].partitions[0].error_message
    assert values_of(fetch(stub, "ordered", 0, partition=0)) == [b"a0", b"a1"]
    assert values_of(fetch(stub, "ordered", 0, partition=1)) == [b"b0", b"b1", b"b2"]
    # The resend, on a new stream, lands right after what was stored.
    again = list(stub.ProduceStream(iter([_stream_request("ordered", (0, good(b"a2")))]), timeout=10))
    assert again[0].response.topics[0].partitions[0].base_offset == 2
    assert values_of(fetch(stub, "ordered", 0, partition=0)) == [b"a0", b"a1", b"a2"]


def test_a_malformed_message_ends_a_produce_stream_with_invalid_argument(
    node: NodeProcess, stub: client_pb2_grpc.HeadwaterServiceStub
) -> None:
    create(stub, "stream-garbage")
    ok = _stream_request("stream-garbage", (0, codec.build_batch([(None, b"kept", None, 1)])))
    with grpc.insecure_channel(node.bootstrap) as ch:
        method = "/headwater.v1.HeadwaterService/ProduceStream"
        raw = ch.stream_stream(method, request_serializer=None, response_deserializer=None)
        answers = raw(iter([ok.SerializeToString(), b"\xff\xff\xff\xff\x0f garbage"]), timeout=5)
        first = pb.ProduceStreamResponse.FromString(next(answers))
        assert first.response.topics[0].partitions[0].error_code == E.ERROR_CODE_NONE
        with pytest.raises(grpc.RpcError) as err:
            next(answers)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed" in (err.value.details() or "")
    assert values_of(fetch(stub, "stream-garbage", 0)) == [b"kept"]
    assert produce(stub, "stream-garbage", [b"after"]).error_code == E.ERROR_CODE_NONE


def _recrc(b: pb.RecordBatch) -> pb.RecordBatch:
    b.crc = codec.batch_crc(b)  # a producer that lies consistently: the CRC matches its lie
    return b


def test_batches_whose_records_disagree_with_the_header_are_refused(
    stub: client_pb2_grpc.HeadwaterServiceStub,
) -> None:
    import zstandard

    create(stub, "lies")
    garbage = codec.build_batch([(None, b"x", None, 1)])
    garbage.records = b"\xff\x01\x02\x03"
    undercount = codec.build_batch([(None, b"a", None, 1), (None, b"b", None, 1), (None, b"c", None, 1)])
    undercount.record_count, undercount.last_offset_delta = 1, 0
    unknown_codec = codec.build_batch([(None, b"x", None, 1)])
    unknown_codec.compression = 9  # type: ignore[assignment]
    wrong_max_ts = codec.build_batch([(None, b"x", None, 1), (None, b"y", None, 5)])
    wrong_max_ts.max_timestamp_ms = 99
    bomb = codec.build_batch([(None, b"x", None, 1)], codec.COMPRESSION_BY_NAME["zstd"])
    bomb.records = zstandard.ZstdCompressor().compress(b"\0" * (200 << 20))  # 200 MiB of zeros, a few KiB
    for name, b in [
        ("garbage", garbage),
        ("undercount", undercount),
        ("codec", unknown_codec),
        ("max_ts", wrong_max_ts),
        ("bomb", bomb),
    ]:
        r = produce(stub, "lies", [], batch=_recrc(b))
        assert r.error_code == E.ERROR_CODE_CORRUPT_MESSAGE, (name, r)
        assert "nothing was stored" in r.error_message
    assert fetch(stub, "lies", 0).high_watermark == 0
    assert produce(stub, "lies", [b"honest"]).base_offset == 0


def test_concurrent_multi_batch_requests_get_their_own_offsets_on_fsync_topics(
    stub: client_pb2_grpc.HeadwaterServiceStub,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    create(stub, "fsync-race", flush_policy="fsync")

    def send(i: int) -> tuple[int, list[bytes]]:
        values = [f"{i}-{j}".encode() for j in range(6)]
        batches = [codec.build_batch([(None, v, None, 1) for v in values[k : k + 2]]) for k in (0, 2, 4)]
        req = pb.ProduceRequest(
            acks=ALL,
            topics=[
                pb.ProduceTopicData(
                    topic="fsync-race", partitions=[pb.ProducePartitionData(partition=0, batches=batches)]
                )
            ],
        )
        r = stub.Produce(req, timeout=30).topics[0].partitions[0]
        assert r.error_code == E.ERROR_CODE_NONE
        return r.base_offset, values

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(40)))
    stored: list[bytes] = []
    while len(stored) < 240:
        stored += values_of(fetch(stub, "fsync-race", len(stored)), from_offset=len(stored))
    for base, values in answers:
        assert stored[base : base + 6] == values


def test_a_fetch_answer_stays_within_its_byte_budget_after_the_first_batch(
    stub: client_pb2_grpc.HeadwaterServiceStub,
) -> None:
    create(stub, "budget", partitions=2)
    for p in (0, 1):
        produce(stub, "budget", [os.urandom(80_000)], partition=p)
    req = pb.FetchRequest(
        replica_id=-1,
        max_bytes=100_000,
        topics=[
            pb.FetchTopic(
                topic="budget",
                partitions=[
                    pb.FetchPartition(
                        partition=p, fetch_offset=0, current_leader_epoch=-1, partition_max_bytes=1 << 20
                    )
                    for p in (0, 1)
                ],
            )
        ],
    )
    first, second = stub.Fetch(req, timeout=10).topics[0].partitions
    assert len(first.batches) == 1  # the first batch always comes, even above the budget
    assert len(second.batches) == 0 and second.error_code == E.ERROR_CODE_NONE
    assert second.high_watermark == 1  # the client sees there is more and asks again


def test_topic_max_message_bytes_must_fit_a_grpc_message(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    r = create(stub, "huge-limit", max_message_bytes=str(100 << 20))
    assert r.error_code == E.ERROR_CODE_INVALID_CONFIG and "max_request_bytes" in r.error_message


def test_invalid_acks_is_refused(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    create(stub, "acks")
    assert produce(stub, "acks", [b"x"], acks=2).error_code == E.ERROR_CODE_INVALID_REQUIRED_ACKS
    assert fetch(stub, "acks", 0).high_watermark == 0


# ------------------------------------------------------------------ fields left out (proto3 sends 0)


def _bare_batch(*values: bytes) -> records_pb2.RecordBatch:
    """A batch as a quick client in another language builds it: records, count, delta and CRC, and
    nothing else. Its timestamps, producer id, epoch and sequence are left out, so they travel as 0."""
    payload = records_pb2.Records(
        records=[records_pb2.Record(offset_delta=i, value=v) for i, v in enumerate(values)]
    ).SerializeToString()
    b = records_pb2.RecordBatch(record_count=len(values), last_offset_delta=len(values) - 1, records=payload)
    b.crc = codec.batch_crc(b)
    return b


def _grpcurl_fetch(stub: client_pb2_grpc.HeadwaterServiceStub, topic: str) -> pb.FetchPartitionResponse:
    """A fetch with every field it can do without left out: no replica_id, no current_leader_epoch."""
    req = pb.FetchRequest(topics=[pb.FetchTopic(topic=topic, partitions=[pb.FetchPartition()])])
    assert not req.HasField("replica_id") and not req.topics[0].partitions[0].HasField("current_leader_epoch")
    return stub.Fetch(req, timeout=10).topics[0].partitions[0]


def test_a_batch_without_timestamps_is_refused_never_acknowledged_and_never_stored(
    stub: client_pb2_grpc.HeadwaterServiceStub,
) -> None:
    create(stub, "untimed")
    r = produce(stub, "untimed", [], batch=_bare_batch(b"a", b"b"))
    assert r.error_code == E.ERROR_CODE_INVALID_TIMESTAMP, r
    assert "record timestamp 0" in r.error_message and "CreateTime" in r.error_message
    assert r.error_batch_index == 0 and r.base_offset == -1
    got = _grpcurl_fetch(stub, "untimed")
    assert (got.error_code, got.high_watermark, len(got.batches)) == (E.ERROR_CODE_NONE, 0, 0)
    # The same batch with its create time set is taken, and a fetch that leaves its fields out reads it.
    timed = _bare_batch(b"a", b"b")
    timed.first_timestamp_ms = timed.max_timestamp_ms = int(time.time() * 1000)
    timed.crc = codec.batch_crc(timed)
    assert produce(stub, "untimed", [], batch=timed).error_code == E.ERROR_CODE_NONE
    assert values_of(_grpcurl_fetch(stub, "untimed")) == [b"a", b"b"]


def test_timestamp_bounds_are_topic_configs_shown_by_describe_and_alterable(
    stub: client_pb2_grpc.HeadwaterServiceStub,
) -> None:
    assert create(stub, "bounded", **{"message.timestamp.before.max.ms": "60000"}).error_code == (
        E.ERROR_CODE_NONE
    )
    topic = pb.ConfigResource(resource_type=pb.RESOURCE_TYPE_TOPIC, resource_name="bounded")

    def entries() -> dict[str, pb.ConfigEntry]:
        result = stub.DescribeConfigs(pb.DescribeConfigsRequest(resources=[topic]), timeout=5).results[0]
        return {e.name: e for e in result.entries}

    def alter(name: str, value: str) -> pb.AlterConfigsResult:
        return stub.AlterConfigs(
            pb.AlterConfigsRequest(
                resources=[
                    pb.AlterConfigsResource(
                        resource_type=pb.RESOURCE_TYPE_TOPIC,
                        resource_name="bounded",
                        configs=[pb.AlterableConfig(name=name, value=value)],
                    )
                ]
            ),
            timeout=10,
        ).results[0]

    shown = {name: (e.value, e.source) for name, e in entries().items()}
    assert shown["message_timestamp_before_max_ms"] == ("60000", pb.CONFIG_SOURCE_TOPIC)
    assert shown["message_timestamp_after_max_ms"] == ("3600000", pb.CONFIG_SOURCE_NODE)
    assert shown["message_timestamp_type"] == ("CreateTime", pb.CONFIG_SOURCE_NODE)
    now = int(time.time() * 1000)
    old = produce(stub, "bounded", [b"old"], ts=now - 3_600_000)
    assert old.error_code == E.ERROR_CODE_INVALID_TIMESTAMP
    assert "message_timestamp_before_max_ms=60000" in old.error_message
    future = produce(stub, "bounded", [b"future"], ts=now + 2 * 3_600_000)
    assert future.error_code == E.ERROR_CODE_INVALID_TIMESTAMP
    assert "message_timestamp_after_max_ms=3600000" in future.error_message
    assert fetch(stub, "bounded", 0).high_watermark == 0
    bad = alter("message_timestamp_after_max_ms", "-2")
    assert (
        bad.error_code == E.ERROR_CODE_INVALID_CONFIG
        and "message_timestamp_after_max_ms" in bad.error_message
    )
    assert alter("message_timestamp_after_max_ms", "-1").error_code == E.ERROR_CODE_NONE
    assert entries()["message_timestamp_after_max_ms"].value == "-1"
    assert produce(stub, "bounded", [b"future"], ts=now + 2 * 3_600_000).error_code == E.ERROR_CODE_NONE
    assert produce(stub, "bounded", [b"zero"], ts=0).error_code == E.ERROR_CODE_INVALID_TIMESTAMP  # always


def test_a_log_append_time_topic_stamps_batches_and_reads_return_the_stamp(
    stub: client_pb2_grpc.HeadwaterServiceStub,
) -> None:
    create(stub, "stamped", message_timestamp_type="LogAppendTime")
    before = int(time.time() * 1000)
    sent = codec.build_batch([(None, b"a", None, 5), (None, b"b", None, 9)])
    r = produce(stub, "stamped", [], batch=sent)
    after = int(time.time() * 1000)
    assert r.error_code == E.ERROR_CODE_NONE and before <= r.log_append_time_ms <= after
    unset = produce(stub, "stamped", [], batch=_bare_batch(b"c"))  # the producer's clock is not asked
    assert unset.error_code == E.ERROR_CODE_NONE
    b0, b1 = fetch(stub, "stamped", 0).batches
    assert b0.timestamp_type == records_pb2.TIMESTAMP_TYPE_LOG_APPEND_TIME and codec.crc_is_valid(b0)
    assert [x.timestamp_ms for x in codec.decode_records(b0)] == [r.log_append_time_ms] * 2
    assert [x.timestamp_ms for x in codec.decode_records(b1)] == [unset.log_append_time_ms]
    stream = stub.Subscribe(pb.SubscribeRequest(topic="stamped", offset=-2, decode=True), timeout=10)
    first = next(iter(stream))
    stream.cancel()
    assert [x.timestamp_ms for x in first.records][:2] == [r.log_append_time_ms] * 2


def test_create_topics_with_counts_left_out_gets_the_node_defaults(node_factory: object) -> None:
    n: NodeProcess = node_factory(  # type: ignore[operator]
        extra_args=["--default-num-partitions", "3", "--log-message-timestamp-after-max-ms", "1000"]
    )
    with grpc.insecure_channel(n.bootstrap) as ch:
        s = client_pb2_grpc.HeadwaterServiceStub(ch)
        left_out = pb.CreatableTopic(name="plain")
        assert (left_out.num_partitions, left_out.replication_factor) == (0, 0)
        minus_one = pb.CreatableTopic(name="minus-one", num_partitions=-1, replication_factor=-1)
        resp = s.CreateTopics(pb.CreateTopicsRequest(topics=[left_out, minus_one]), timeout=10)
        for t in resp.topics:
            assert (t.error_code, t.num_partitions, t.replication_factor) == (E.ERROR_CODE_NONE, 3, 1), t
        md = s.Metadata(pb.MetadataRequest(topics=["plain"]), timeout=5)
        assert len(md.topics[0].partitions) == 3
        # The node's timestamp default reaches its topics.
        described = s.DescribeConfigs(
            pb.DescribeConfigsRequest(
                resources=[
                    pb.ConfigResource(
                        resource_type=pb.RESOURCE_TYPE_TOPIC,
                        resource_name="plain",
                        config_names=["message.timestamp.after.max.ms"],
                    )
                ]
            ),
            timeout=5,
        ).results[0]
        assert [(e.name, e.value, e.source) for e in described.entries] == [
            ("message_timestamp_after_max_ms", "1000", pb.CONFIG_SOURCE_NODE)
        ]
        r = produce(s, "plain", [b"soon"], ts=int(time.time() * 1000) + 60_000)
        assert r.error_code == E.ERROR_CODE_INVALID_TIMESTAMP and "=1000" in r.error_message


def test_a_config_resource_without_its_type_is_refused_saying_so(
    stub: client_pb2_grpc.HeadwaterServiceStub,
) -> None:
    create(stub, "typed")
    described = stub.DescribeConfigs(
        pb.DescribeConfigsRequest(resources=[pb.ConfigResource(resource_name="typed")]), timeout=5
    ).results[0]
    assert described.error_code == E.ERROR_CODE_INVALID_REQUEST and "resource_type" in described.error_message
    altered = stub.AlterConfigs(
        pb.AlterConfigsRequest(
            resources=[
                pb.AlterConfigsResource(
                    resource_name="typed", configs=[pb.AlterableConfig(name="retention_ms", value="1")]
                )
            ]
        ),
        timeout=10,
    ).results[0]
    assert altered.error_code == E.ERROR_CODE_INVALID_REQUEST and "resource_type" in altered.error_message


def test_producer_id_0_means_none_and_below_minus_1_is_refused(
    stub: client_pb2_grpc.HeadwaterServiceStub,
) -> None:
    create(stub, "pids")
    now = int(time.time() * 1000)
    zero = codec.build_batch([(None, b"z", None, now)], producer_id=0, producer_epoch=0, base_sequence=0)
    assert produce(stub, "pids", [], batch=zero).error_code == E.ERROR_CODE_NONE
    bad = codec.build_batch([(None, b"x", None, now)], producer_id=-2)
    r = produce(stub, "pids", [], batch=bad)
    assert r.error_code == E.ERROR_CODE_INVALID_REQUEST and "producer_id is -2" in r.error_message
    half = codec.build_batch([(None, b"x", None, now)], producer_id=0, base_sequence=3)
    assert produce(stub, "pids", [], batch=half).error_code == E.ERROR_CODE_INVALID_REQUEST
    assert fetch(stub, "pids", 0).high_watermark == 1


def test_fetch_offset_out_of_range(stub: client_pb2_grpc.HeadwaterServiceStub) -> None:
    create(stub, "range")
    produce(stub, "range", [b"x"])
    assert fetch(stub, "range", 1).error_code == E.ERROR_CODE_NONE  # the log end: nothing yet
    assert fetch(stub, "range", 2).error_code == E.ERROR_CODE_OFFSET_OUT_OF_RANGE
    assert fetch(stub, "range", -1).error_code == E.ERROR_CODE_OFFSET_OUT_OF_RANGE


def test_request_above_the_grpc_limit_is_refused_whole(node_factory: object) -> None:
    n: NodeProcess = node_factory(  # type: ignore[operator]
        extra_args=["--max-request-bytes", str(2 << 20), "--fetch-max-bytes", str(512 << 10)]
    )
    with grpc.insecure_channel(n.bootstrap, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        s = client_pb2_grpc.HeadwaterServiceStub(ch)
        create(s, "huge")
        batches = [codec.build_batch([(None, os.urandom(512 << 10), None, 1)]) for _ in range(8)]
        req = pb.ProduceRequest(
            acks=ALL,
            topics=[
                pb.ProduceTopicData(
                    topic="huge", partitions=[pb.ProducePartitionData(partition=0, batches=batches)]
                )
            ],
        )
        with pytest.raises(grpc.RpcError) as err:
            s.Produce(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert fetch(s, "huge", 0).high_watermark == 0
        assert produce(s, "huge", [b"small"]).error_code == E.ERROR_CODE_NONE


def test_garbage_on_the_port_does_not_hurt_the_node(
    node: NodeProcess, stub: client_pb2_grpc.HeadwaterServiceStub
) -> None:
    create(stub, "sturdy")
    produce(stub, "sturdy", [b"before"])
    rng = __import__("random").Random(7)
    for i in range(20):
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
            junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4096)))
            if i % 4 == 0:
                junk = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + junk  # a valid preface, then nonsense frames
            try:
                sock.sendall(junk)
                sock.recv(1024)
            except OSError:
                pass
    assert node.alive()
    assert produce(stub, "sturdy", [b"after"]).base_offset == 1
    assert values_of(fetch(stub, "sturdy", 0)) == [b"before", b"after"]


def test_undecodable_request_body_gets_a_clear_status(
    node: NodeProcess, stub: client_pb2_grpc.HeadwaterServiceStub
) -> None:
    with grpc.insecure_channel(node.bootstrap) as ch:
        raw = ch.unary_unary(
            "/headwater.v1.HeadwaterService/Produce", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff\x0f garbage", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed" in (err.value.details() or "")
    create(stub, "after-garbage")
    assert produce(stub, "after-garbage", [b"ok"]).error_code == E.ERROR_CODE_NONE


# ------------------------------------------------------------------ a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs."""
    with mounted_tmpfs(tmp_path / "small", "48m") as mountpoint:
        yield mountpoint


def test_full_disk_fails_writes_clearly_keeps_the_log_and_recovers(
    node_factory: object, small_disk: Path
) -> None:
    n: NodeProcess = node_factory(data_dir=small_disk / "data")  # type: ignore[operator]
    filler = small_disk / "filler"
    with grpc.insecure_channel(n.bootstrap) as ch:
        s = client_pb2_grpc.HeadwaterServiceStub(ch)
        create(s, "disk")
        assert produce(s, "disk", [b"kept"]).error_code == E.ERROR_CODE_NONE
        fill_disk(filler)  # to the brim
        errors = set()
        for _ in range(20):
            r = produce(s, "disk", [os.urandom(200_000)])
            errors.add(r.error_code)
            if r.error_code == E.ERROR_CODE_STORAGE_ERROR:
                assert "write" in r.error_message
                break
        assert E.ERROR_CODE_STORAGE_ERROR in errors, errors
        assert n.alive()
        readable = fetch(s, "disk", 0)
        assert readable.error_code == E.ERROR_CODE_NONE and values_of(readable)[0] == b"kept"
        hw_when_full = readable.high_watermark
        filler.unlink()
        deadline = time.monotonic() + 15
        while True:
            r = produce(s, "disk", [b"resumed"])
            if r.error_code == E.ERROR_CODE_NONE:
                break
            assert r.error_code == E.ERROR_CODE_STORAGE_ERROR
            assert time.monotonic() < deadline, "writes did not resume after space returned"
            time.sleep(0.2)
        assert r.base_offset == hw_when_full
        assert values_of(fetch(s, "disk", 0))[-1] == b"resumed"


def test_topic_creation_on_a_full_disk_creates_nothing_and_metadata_stays_whole(
    node_factory: object, small_disk: Path
) -> None:
    n: NodeProcess = node_factory(data_dir=small_disk / "data")  # type: ignore[operator]
    with grpc.insecure_channel(n.bootstrap) as ch:
        s = client_pb2_grpc.HeadwaterServiceStub(ch)
        assert create(s, "before").error_code == E.ERROR_CODE_NONE
        fill_disk(small_disk / "filler")
        r = create(s, "wide", partitions=2000)
        assert r.error_code == E.ERROR_CODE_STORAGE_ERROR, r
        md = s.Metadata(pb.MetadataRequest(), timeout=5)
        assert [t.name for t in md.topics] == ["before"]
        (small_disk / "filler").unlink()
        deadline = time.monotonic() + 15
        while (r := create(s, "wide", partitions=2000)).error_code != E.ERROR_CODE_NONE:
            assert r.error_code == E.ERROR_CODE_STORAGE_ERROR and time.monotonic() < deadline, r
            time.sleep(0.2)
        md = s.Metadata(pb.MetadataRequest(topics=["wide"]), timeout=5)
        assert len(md.topics[0].partitions) == 2000
        assert produce(s, "wide", [b"x"], partition=1999).error_code == E.ERROR_CODE_NONE
