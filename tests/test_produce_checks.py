"""The contract's traps for callers that leave fields out (proto3 sends 0), checked without a process.

First the pure rules (``headwater.node.produce_checks``), then a ``Broker`` in the test's process with
a fixed clock: a batch that breaks a rule is refused with a message naming the rule and the value and
is never stored; LogAppendTime stamps batches and every record reads the stamp; producer ids 0 and -1
mean none; optional ``replica_id`` and ``current_leader_epoch`` tell absent from 0.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from pathlib import Path

import pytest

from headwater.config import (
    ConfigError,
    NodeConfig,
    effective_topic_config,
    load_config,
    validate_topic_configs,
)
from headwater.node.broker import Broker
from headwater.node.produce_checks import ProduceRules, check_batch, producer_id_problem, timestamp_problem
from headwater.raft.commands import CreateTopic, ElectLeader, RegisterNode, UnfenceNode
from headwater.raft.metadata import ClusterMetadata
from headwater.storage import LogStore
from headwater.v1 import batch as codec
from headwater.v1 import client_pb2 as pb
from headwater.v1 import errors_pb2 as E
from headwater.v1 import records_pb2

NOW = 1_700_000_000_000
HOUR = 3_600_000
TID = b"\x01" * 16
TID2 = b"\x02" * 16

RULES = ProduceRules(
    max_message_bytes=1 << 20,
    max_decompressed_bytes=1 << 20,
    timestamp_before_max_ms=-1,
    timestamp_after_max_ms=HOUR,
)


def batch(*timestamps: int, **producer: int) -> records_pb2.RecordBatch:
    return codec.build_batch([(None, b"v%d" % i, None, ts) for i, ts in enumerate(timestamps)], **producer)


# ------------------------------------------------------------------ timestamps, pure


def test_a_batch_whose_timestamp_was_left_unset_is_refused_under_create_time() -> None:
    unset = batch(0)  # proto3's default: what a producer that never set first_timestamp_ms sends
    code, why = check_batch(unset, RULES, NOW)
    assert code == E.ERROR_CODE_INVALID_TIMESTAMP
    assert "record timestamp 0" in why and "CreateTime" in why and "nothing was stored" in why


def test_the_smallest_record_timestamp_counts_not_just_the_first() -> None:
    # The second record lies before the first: its delta is negative and its timestamp is -1.
    b = batch(5, -1)
    problem, inflated, min_timestamp_ms = codec.check_records(b, 1 << 20)
    assert (problem, min_timestamp_ms) == ("", -1) and inflated > 0
    code, why = check_batch(b, RULES, NOW)
    assert code == E.ERROR_CODE_INVALID_TIMESTAMP and "record timestamp -1" in why


def test_create_time_bounds_refuse_past_and_future_beyond_them_and_accept_the_edges() -> None:
    rules = ProduceRules(1 << 20, 1 << 20, timestamp_before_max_ms=60_000, timestamp_after_max_ms=1_000)
    assert timestamp_problem(NOW - 60_000, NOW, NOW, rules) == ""
    assert timestamp_problem(NOW, NOW + 1_000, NOW, rules) == ""
    past = timestamp_problem(NOW - 60_001, NOW, NOW, rules)
    assert "message_timestamp_before_max_ms=60000" in past and str(NOW - 60_001) in past
    future = timestamp_problem(NOW, NOW + 1_001, NOW, rules)
    assert "message_timestamp_after_max_ms=1000" in future and str(NOW + 1_001) in future
    code, _ = check_batch(batch(NOW - 61_000, NOW), rules, NOW)
    assert code == E.ERROR_CODE_INVALID_TIMESTAMP


def test_minus_one_means_no_bound_but_never_admits_a_timestamp_at_or_below_zero() -> None:
    unbounded = ProduceRules(1 << 20, 1 << 20, timestamp_before_max_ms=-1, timestamp_after_max_ms=-1)
    assert timestamp_problem(1, 1, NOW, unbounded) == ""
    assert timestamp_problem(NOW, NOW + 100 * 365 * 24 * HOUR, NOW, unbounded) == ""
    assert "record timestamp 0" in timestamp_problem(0, 0, NOW, unbounded)
    assert "record timestamp -5" in timestamp_problem(-5, 10, NOW, unbounded)


def test_log_append_time_does_not_check_the_producers_timestamps() -> None:
    rules = ProduceRules(1 << 20, 1 << 20, log_append_time=True, timestamp_before_max_ms=1)
    assert check_batch(batch(0), rules, NOW) == (E.ERROR_CODE_NONE, "")
    assert check_batch(batch(NOW + 10 * HOUR), rules, NOW) == (E.ERROR_CODE_NONE, "")


def test_a_producer_may_not_claim_log_append_time() -> None:
    b = batch(NOW)
    b.timestamp_type = codec.LOG_APPEND_TIME
    code, why = check_batch(b, RULES, NOW)
    assert code == E.ERROR_CODE_INVALID_TIMESTAMP and "timestamp_type" in why


# ------------------------------------------------------------------ producer ids, pure


@pytest.mark.parametrize(
    ("producer_id", "epoch", "sequence"),
    [(-1, -1, -1), (0, 0, 0), (0, -1, -1), (-1, 0, 0), (1, 0, 0), (7, 3, 100)],
)
def test_producer_fields_the_contract_accepts(producer_id: int, epoch: int, sequence: int) -> None:
    assert producer_id_problem(producer_id, epoch, sequence) == ""
    b = batch(NOW, producer_id=producer_id, producer_epoch=epoch, base_sequence=sequence)
    assert check_batch(b, RULES, NOW) == (E.ERROR_CODE_NONE, "")


@pytest.mark.parametrize(
    ("producer_id", "epoch", "sequence", "named"),
    [
        (-2, -1, -1, "producer_id is -2, expected >= 1 (an allocated id), or 0 or -1 for none"),
        (-(2**63), 0, 0, f"producer_id is {-(2**63)}, expected >= 1"),
        (0, 0, 5, "base_sequence is 5, expected 0 or -1 without a producer id (producer_id is 0)"),
        (-1, 2, -1, "producer_epoch is 2, expected 0 or -1 without a producer id (producer_id is -1)"),
        (7, -1, 0, "producer_epoch is -1, expected >= 0 with producer_id 7"),
        (7, 0, -1, "base_sequence is -1, expected >= 0 with producer_id 7"),
    ],
)
def test_producer_fields_the_contract_refuses(
    producer_id: int, epoch: int, sequence: int, named: str
) -> None:
    b = batch(NOW, producer_id=producer_id, producer_epoch=epoch, base_sequence=sequence)
    code, why = check_batch(b, RULES, NOW)
    assert code == E.ERROR_CODE_INVALID_REQUEST and named in why and "nothing was stored" in why


# ------------------------------------------------------------------ refusals name the rule and the values


def _recrc(b: records_pb2.RecordBatch) -> records_pb2.RecordBatch:
    b.crc = codec.batch_crc(b)  # a producer that lies consistently: the CRC matches its lie
    return b


def _with_payload(
    b: records_pb2.RecordBatch, payload: bytes, compression: int | None = None
) -> records_pb2.RecordBatch:
    if compression is not None:
        b.compression = compression  # type: ignore[assignment]
    b.records = payload
    return _recrc(b)


def _records(*offset_deltas: int) -> bytes:
    return records_pb2.Records(
        records=[records_pb2.Record(offset_delta=d, value=b"v") for d in offset_deltas]
    ).SerializeToString()


def _broken(name: str) -> tuple[records_pb2.RecordBatch, ProduceRules]:
    import zlib

    import lz4.block
    import zstandard

    b = batch(NOW, NOW + 5)
    rules = RULES
    if name == "size":
        rules = ProduceRules(max_message_bytes=10, max_decompressed_bytes=1 << 20)
    elif name == "max_batch_records":
        rules = ProduceRules(max_message_bytes=1 << 20, max_decompressed_bytes=1 << 20, max_batch_records=1)
    elif name == "record_count zero":
        b.record_count, b.last_offset_delta = 0, -1
    elif name == "last_offset_delta":
        b.last_offset_delta = 3
    elif name == "crc":
        b.crc = 0x1234ABCD
    elif name == "timestamp_type":
        b.timestamp_type = codec.LOG_APPEND_TIME
    elif name == "unknown compression":
        b = _with_payload(b, b.records, 9)
    elif name == "zstd damaged":
        b = _with_payload(b, b"\x28\xb5\x2f\xfd" + b"\x00" * 8, records_pb2.COMPRESSION_TYPE_ZSTD)
    elif name == "lz4 block, not frame":
        b = _with_payload(b, lz4.block.compress(b.records), records_pb2.COMPRESSION_TYPE_LZ4)
    elif name == "zlib, not gzip":
        b = _with_payload(b, zlib.compress(b.records), records_pb2.COMPRESSION_TYPE_GZIP)
    elif name == "two gzip members":
        member = codec.compress(records_pb2.COMPRESSION_TYPE_GZIP, b.records)
        b = _with_payload(b, member + member, records_pb2.COMPRESSION_TYPE_GZIP)
    elif name == "bytes after the zstd frame":
        frame = codec.compress(records_pb2.COMPRESSION_TYPE_ZSTD, b.records)
        b = _with_payload(b, frame + b"\x00\x00", records_pb2.COMPRESSION_TYPE_ZSTD)
    elif name == "lz4 frame cut off":
        frame = codec.compress(records_pb2.COMPRESSION_TYPE_LZ4, b.records)
        b = _with_payload(b, frame[:-2], records_pb2.COMPRESSION_TYPE_LZ4)
    elif name == "inflates too far":
        bomb = zstandard.ZstdCompressor().compress(b"\0" * (2 << 20))
        b = _with_payload(b, bomb, records_pb2.COMPRESSION_TYPE_ZSTD)
    elif name == "record_count above the payload's":
        b.record_count, b.last_offset_delta = 3, 2
        b = _recrc(b)
    elif name == "record_count below the payload's":
        b = _with_payload(b, _records(0, 1, 2))
    elif name == "not a Records message":
        b = _with_payload(b, b"\xff\xff\xff")
    elif name == "offset_delta":
        b = _with_payload(b, _records(0, 2))
    elif name == "max_timestamp_ms":
        b.max_timestamp_ms = NOW + 99
        b = _recrc(b)
    else:
        raise AssertionError(name)
    return b, rules


@pytest.mark.parametrize(
    ("name", "code", "message"),
    [
        (
            "size",
            E.ERROR_CODE_RECORD_TOO_LARGE,
            "batch is 74 bytes, expected at most max_message_bytes=10 (the serialized RecordBatch",
        ),
        (
            "max_batch_records",
            E.ERROR_CODE_RECORD_TOO_LARGE,
            "record_count is 2, expected at most max_batch_records=1",
        ),
        (
            "record_count zero",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            "record_count is 0, expected at least 1 (a batch holds at least one record)",
        ),
        (
            "last_offset_delta",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            "last_offset_delta is 3, expected 1 (record_count - 1)",
        ),
        (
            "crc",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            "crc is 0x1234abcd, expected 0x{crc:08x} (CRC32C over the 44-byte header and the records bytes "
            "as sent; see records.proto)",
        ),
        (
            "timestamp_type",
            E.ERROR_CODE_INVALID_TIMESTAMP,
            "timestamp_type is 1, expected 0 (TIMESTAMP_TYPE_CREATE_TIME): the leader sets it",
        ),
        (
            "unknown compression",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            "compression is 9, expected 0 (COMPRESSION_TYPE_NONE), 1 (COMPRESSION_TYPE_GZIP), "
            "2 (COMPRESSION_TYPE_LZ4) or 3 (COMPRESSION_TYPE_ZSTD)",
        ),
        ("zstd damaged", E.ERROR_CODE_CORRUPT_MESSAGE, "expected one zstd frame for COMPRESSION_TYPE_ZSTD"),
        (
            "lz4 block, not frame",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            "expected one LZ4 frame (the frame format, not raw LZ4 blocks) for COMPRESSION_TYPE_LZ4",
        ),
        ("zlib, not gzip", E.ERROR_CODE_CORRUPT_MESSAGE, "expected one gzip member (RFC 1952)"),
        (
            "two gzip members",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            "bytes follow the first gzip member; expected one gzip member (RFC 1952)",
        ),
        (
            "bytes after the zstd frame",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            "2 bytes follow the first frame; expected one zstd frame",
        ),
        (
            "lz4 frame cut off",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            "the frame is cut off before its end; expected one LZ4 frame",
        ),
        (
            "inflates too far",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            "expected at most 1048576 bytes inflated (max_decompressed_bytes)",
        ),
        (
            "record_count above the payload's",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            "record_count is 3, expected 2, the number of records in the payload",
        ),
        (
            "record_count below the payload's",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            "record_count is 2, expected more than 2, the number of records in the payload",
        ),
        (
            "not a Records message",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            "records payload does not parse as records.proto's Records message",
        ),
        (
            "offset_delta",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            "record 1: offset_delta is 2, expected 1 (offset deltas run 0..record_count-1 in order)",
        ),
        (
            "max_timestamp_ms",
            E.ERROR_CODE_CORRUPT_MESSAGE,
            f"max_timestamp_ms is {NOW + 99}, expected {NOW + 5} (the largest record timestamp",
        ),
    ],
)
def test_a_refusal_names_the_rule_the_value_and_the_expected_value(
    name: str, code: int, message: str
) -> None:
    b, rules = _broken(name)
    got_code, why = check_batch(b, rules, NOW)
    assert got_code == code, why
    assert message.format(crc=codec.batch_crc(b)) in why
    assert why.endswith("nothing was stored") or why.endswith("nothing was stored: split the batch")


# ------------------------------------------------------------------ configs


def test_timestamp_configs_default_from_the_node_and_validate_in_kafkas_spelling_too() -> None:
    node = NodeConfig()
    cfg = effective_topic_config({}, node)
    assert cfg["message_timestamp_type"] == "CreateTime"
    assert (cfg["message_timestamp_before_max_ms"], cfg["message_timestamp_after_max_ms"]) == (-1, HOUR)
    rules = ProduceRules.of_topic(cfg, node.max_decompressed_bytes)
    assert (rules.log_append_time, rules.timestamp_before_max_ms, rules.timestamp_after_max_ms) == (
        False,
        -1,
        HOUR,
    )
    tuned = NodeConfig(
        log_message_timestamp_type="LogAppendTime",
        log_message_timestamp_before_max_ms=5,
        log_message_timestamp_after_max_ms=6,
    )
    cfg = effective_topic_config({"message_timestamp_after_max_ms": "7"}, tuned)
    assert ProduceRules.of_topic(cfg, 1).log_append_time
    assert (cfg["message_timestamp_before_max_ms"], cfg["message_timestamp_after_max_ms"]) == (5, 7)
    assert validate_topic_configs(
        {"message.timestamp.before.max.ms": "86400000", "message.timestamp.type": "LogAppendTime"}
    ) == {"message_timestamp_before_max_ms": "86400000", "message_timestamp_type": "LogAppendTime"}
    for bad in (
        {"message_timestamp_after_max_ms": "-2"},
        {"message_timestamp_before_max_ms": "soon"},
        {"message_timestamp_type": "WallClock"},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            validate_topic_configs(bad)


def test_node_timestamp_defaults_are_validated() -> None:
    with pytest.raises(ConfigError, match="log_message_timestamp_type"):
        load_config(env={}, overrides={"log_message_timestamp_type": "Now"})
    with pytest.raises(ConfigError, match="log_message_timestamp_before_max_ms"):
        load_config(env={}, overrides={"log_message_timestamp_before_max_ms": -2})
    cfg = load_config(env={"HEADWATER_LOG_MESSAGE_TIMESTAMP_AFTER_MAX_MS": "-1"})
    assert cfg.log_message_timestamp_after_max_ms == -1


# ------------------------------------------------------------------ a broker with a fixed clock


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    store = LogStore(str(tmp_path / "log"))
    config = NodeConfig(node_id=1, data_dir=str(tmp_path), log_message_timestamp_before_max_ms=7 * 24 * HOUR)
    yield Broker(config, store, cluster_id="c", clock_ms=lambda: NOW)
    store.close()


def image(*commands: object) -> ClusterMetadata:
    md = ClusterMetadata()
    for node in (1, 2):
        assert md.apply(RegisterNode(node, bytes([node]) * 16, "127.0.0.1", 9000 + node)).ok
        assert md.apply(UnfenceNode(node, md.nodes[node].broker_epoch)).ok
    for cmd in commands:
        assert md.apply(cmd).ok, cmd  # type: ignore[arg-type]
    return md


def produce(broker: Broker, topic: str, *batches: records_pb2.RecordBatch) -> pb.ProducePartitionResponse:
    req = pb.ProduceRequest(
        acks=1,
        topics=[pb.ProduceTopicData(topic=topic, partitions=[pb.ProducePartitionData(batches=batches)])],
    )
    return asyncio.run(broker.produce(req)).topics[0].partitions[0]


def fetch_request(topic: str, partition: int = 0, **fields: int) -> pb.FetchRequest:
    """A consumer's fetch as grpcurl would send it: only what is named is set."""
    part = pb.FetchPartition(partition=partition, fetch_offset=0)
    if "current_leader_epoch" in fields:
        part.current_leader_epoch = fields.pop("current_leader_epoch")
    return pb.FetchRequest(topics=[pb.FetchTopic(topic=topic, partitions=[part])], **fields)


def fetch(broker: Broker, req: pb.FetchRequest) -> pb.FetchPartitionResponse:
    result = asyncio.run(broker.fetch(req))
    broker.read_budget.release("", result.held)  # as the service does once the answer is out
    return result.to_message().topics[0].partitions[0]


def test_a_refused_batch_is_never_stored_and_the_answer_names_it(broker: Broker) -> None:
    broker.apply_image(image(CreateTopic("t", TID, ((1,),))), caught_up=True)
    r = produce(broker, "t", batch(NOW), batch(0))
    assert r.error_code == E.ERROR_CODE_INVALID_TIMESTAMP and r.error_batch_index == 1
    assert r.error_message.startswith("batch 1: record timestamp 0 is not a time, expected > 0")
    r = produce(broker, "t")
    assert r.error_code == E.ERROR_CODE_INVALID_REQUEST
    assert r.error_message == "batches is empty, expected at least one RecordBatch for this partition"
    # Beyond the node's before-bound (7 days here), and beyond the default after-bound (1 hour).
    r = produce(broker, "t", batch(NOW - 8 * 24 * HOUR))
    assert r.error_code == E.ERROR_CODE_INVALID_TIMESTAMP
    assert "message_timestamp_before_max_ms=604800000" in r.error_message
    r = produce(broker, "t", batch(NOW + HOUR + 1))
    assert "message_timestamp_after_max_ms=3600000" in r.error_message
    r = produce(broker, "t", batch(NOW, producer_id=-2))
    assert r.error_code == E.ERROR_CODE_INVALID_REQUEST and "producer_id is -2" in r.error_message
    assert broker.partitions[("t", 0)].log.log_end_offset == 0
    ok = produce(broker, "t", batch(NOW - HOUR, NOW + HOUR), batch(NOW, producer_id=0, base_sequence=0))
    assert (ok.error_code, ok.base_offset, ok.log_append_time_ms) == (E.ERROR_CODE_NONE, 0, -1)
    assert ok.HasField("error_batch_index") is False
    assert broker.partitions[("t", 0)].log.log_end_offset == 3


def test_log_append_time_stamps_the_batch_and_every_record_reads_the_stamp(broker: Broker) -> None:
    topic = CreateTopic("lat", TID, ((1,),), (("message_timestamp_type", "LogAppendTime"),))
    broker.apply_image(image(topic), caught_up=True)
    sent = batch(0, 3, 1)  # unset and odd timestamps do not matter: the leader's clock replaces them
    r = produce(broker, "lat", sent)
    assert (r.error_code, r.log_append_time_ms) == (E.ERROR_CODE_NONE, NOW)
    (stored,) = fetch(broker, fetch_request("lat")).batches
    assert stored.timestamp_type == records_pb2.TIMESTAMP_TYPE_LOG_APPEND_TIME
    assert (stored.first_timestamp_ms, stored.max_timestamp_ms) == (NOW, NOW)
    assert codec.crc_is_valid(stored) and stored.records == sent.records
    assert [x.timestamp_ms for x in codec.decode_records(stored)] == [NOW, NOW, NOW]
    found = broker.list_offsets(
        pb.ListOffsetsRequest(
            topics=[pb.ListOffsetsTopic(topic="lat", partitions=[pb.ListOffsetsPartition(timestamp_ms=NOW)])]
        )
    )
    assert (found.topics[0].partitions[0].offset, found.topics[0].partitions[0].timestamp_ms) == (0, NOW)


def test_a_client_fetch_never_reads_past_the_high_watermark_whatever_replica_id_says(
    broker: Broker,
) -> None:
    broker.apply_image(image(CreateTopic("t", TID, ((1,),))), caught_up=True)
    assert produce(broker, "t", batch(NOW), batch(NOW)).error_code == E.ERROR_CODE_NONE
    # Pretend the second batch is not committed yet: no client reads past the high watermark.
    p = broker.partitions[("t", 0)]
    p.advance_high_watermark(1)
    assert p.high_watermark == 1
    consumer = fetch(broker, fetch_request("t"))
    assert consumer.high_watermark == 1 and [b.base_offset for b in consumer.batches] == [0]
    assert [b.base_offset for b in fetch(broker, fetch_request("t", replica_id=-1)).batches] == [0]
    # A caller claiming to be replica 0 or 1 is still a client: replicas copy through their own service.
    for replica in (0, 1):
        claimed = fetch(broker, fetch_request("t", replica_id=replica))
        assert [b.base_offset for b in claimed.batches] == [0]


def test_an_absent_current_leader_epoch_skips_the_check_while_0_is_checked(broker: Broker) -> None:
    md = image(CreateTopic("t", TID, ((2, 1),)), CreateTopic("u", TID2, ((1,),)))
    moved = copy.deepcopy(md)
    assert moved.apply(ElectLeader(TID, 0, 1, 0)).ok  # node 1 leads t-0 in leader epoch 1
    broker.apply_image(moved, caught_up=True)
    assert broker.partitions[("t", 0)].leader_epoch == 1
    assert fetch(broker, fetch_request("t")).error_code == E.ERROR_CODE_NONE
    assert fetch(broker, fetch_request("t", current_leader_epoch=-1)).error_code == E.ERROR_CODE_NONE
    assert fetch(broker, fetch_request("t", current_leader_epoch=1)).error_code == E.ERROR_CODE_NONE
    stale = fetch(broker, fetch_request("t", current_leader_epoch=0))
    assert stale.error_code == E.ERROR_CODE_FENCED_LEADER_EPOCH

    def list_offsets(part: pb.ListOffsetsPartition) -> int:
        req = pb.ListOffsetsRequest(topics=[pb.ListOffsetsTopic(topic="t", partitions=[part])])
        return broker.list_offsets(req).topics[0].partitions[0].error_code

    assert list_offsets(pb.ListOffsetsPartition(timestamp_ms=-1)) == E.ERROR_CODE_NONE
    assert list_offsets(pb.ListOffsetsPartition(timestamp_ms=-1, current_leader_epoch=0)) == (
        E.ERROR_CODE_FENCED_LEADER_EPOCH
    )
