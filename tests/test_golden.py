"""The golden vectors (proto/testdata/golden.json) hold: the committed file is what the generator
makes, the reference codec agrees with every byte of it, a real node accepts every batch and serves
it back, and the partitioner vectors are Kafka's.

Clients in other languages check themselves against the same file (proto/testdata/README.md).
"""

from __future__ import annotations

import importlib.util
import json
import zlib
from collections.abc import Iterator
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType
from typing import Any

import crc32c
import grpc
import pytest
from conftest import NodeProcess

from headwater.client.partitioner import murmur2, partition_for_key
from headwater.node.produce_checks import ProduceRules, check_batch
from headwater.v1 import batch as codec
from headwater.v1 import client_pb2 as pb
from headwater.v1 import client_pb2_grpc, records_pb2
from headwater.v1 import errors_pb2 as E

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "proto" / "testdata" / "golden.json"
DOC: dict[str, Any] = json.loads(GOLDEN.read_text(encoding="utf-8"))
BATCHES: list[dict[str, Any]] = DOC["batches"]


def _generator() -> ModuleType:
    path = ROOT / "scripts" / "gen-golden"
    loader = SourceFileLoader("gen_golden", str(path))
    spec = importlib.util.spec_from_loader("gen_golden", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _unhex(s: str | None) -> bytes | None:
    return None if s is None else bytes.fromhex(s)


def _expected_records(g: dict[str, Any], base_offset: int = 0) -> list[codec.DecodedRecord]:
    return [
        codec.DecodedRecord(
            offset=base_offset + r["offset_delta"],
            timestamp_ms=g["first_timestamp_ms"] + r["timestamp_delta_ms"],
            key=_unhex(r["key"]),
            value=_unhex(r["value"]),
            headers=tuple((h["key"], _unhex(h["value"])) for h in r["headers"]),
        )
        for r in g["decoded"]
    ]


# ------------------------------------------------------------------ the file


def test_committed_file_is_what_the_generator_makes() -> None:
    assert GOLDEN.read_text(encoding="utf-8") == _generator().render(), "stale: run scripts/gen-golden"


def test_the_file_holds_the_batches_clients_are_told_about() -> None:
    names = {g["name"] for g in BATCHES}
    assert {"plain", "headers", "null-key-and-tombstone", "gzip", "zstd", "lz4", "idempotent"} <= names
    compressions = {g["compression"] for g in BATCHES}
    assert compressions == set(records_pb2.CompressionType.keys())
    plain = next(g for g in BATCHES if g["name"] == "plain")
    for name in ("gzip", "zstd", "lz4", "idempotent"):
        g = next(g for g in BATCHES if g["name"] == name)
        assert g["records_uncompressed"] == plain["records_uncompressed"], name
    nulls = next(g for g in BATCHES if g["name"] == "null-key-and-tombstone")["decoded"]
    assert [r["key"] for r in nulls][:2] == [None, ""] and any(r["value"] is None for r in nulls)
    headers = next(g for g in BATCHES if g["name"] == "headers")["decoded"]
    assert any(h["value"] is None for r in headers for h in r["headers"])


def test_crc32c_check_value_is_castagnolis() -> None:
    check = DOC["crc32c_check"]
    data = bytes.fromhex(check["input"])
    assert data == b"123456789"
    assert check["crc"] == crc32c.crc32c(data) == 0xE3069283
    assert zlib.crc32(data) == 0xCBF43926 != check["crc"]  # CRC32 (IEEE) is not the batch's CRC


# ------------------------------------------------------------------ the codec against every batch


@pytest.mark.parametrize("g", BATCHES, ids=[g["name"] for g in BATCHES])
def test_batch_header_and_crc_agree_with_the_codec(g: dict[str, Any]) -> None:
    raw = bytes.fromhex(g["batch"])
    b = records_pb2.RecordBatch.FromString(raw)
    # As a producer sends it: the leader's fields are left unset.
    assert (b.base_offset, b.partition_leader_epoch, b.timestamp_type) == (0, 0, codec.CREATE_TIME)
    assert records_pb2.CompressionType.Name(b.compression) == g["compression"]
    for field in (
        "first_timestamp_ms",
        "max_timestamp_ms",
        "last_offset_delta",
        "record_count",
        "producer_id",
        "producer_epoch",
        "base_sequence",
        "crc",
    ):
        assert getattr(b, field) == g[field], field
    assert b.records == bytes.fromhex(g["records"])
    header = codec.crc_header(b)
    assert len(header) == 44 and header == bytes.fromhex(g["crc_header"])
    assert crc32c.crc32c(header + b.records) == g["crc"] == codec.batch_crc(b)
    assert codec.crc_is_valid(b)
    assert g["last_offset_delta"] == g["record_count"] - 1 == len(g["decoded"]) - 1


@pytest.mark.parametrize("g", BATCHES, ids=[g["name"] for g in BATCHES])
def test_batch_decodes_to_its_records(g: dict[str, Any]) -> None:
    b = records_pb2.RecordBatch.FromString(bytes.fromhex(g["batch"]))
    uncompressed = bytes.fromhex(g["records_uncompressed"])
    assert codec.decompress(b.compression, b.records) == uncompressed
    assert codec.decode_records(b) == _expected_records(g)
    deltas = [r["timestamp_delta_ms"] for r in g["decoded"]]
    assert g["max_timestamp_ms"] == g["first_timestamp_ms"] + max(deltas)
    assert [r["offset_delta"] for r in g["decoded"]] == list(range(g["record_count"]))
    # The node's checks of a produced batch pass (records.proto's rules).
    rules = ProduceRules(max_message_bytes=1 << 20, max_decompressed_bytes=1 << 20)
    assert check_batch(b, rules, now_ms=g["max_timestamp_ms"]) == (E.ERROR_CODE_NONE, "")


@pytest.mark.parametrize("g", BATCHES, ids=[g["name"] for g in BATCHES])
def test_any_protobuf_serializer_gives_the_same_bytes(g: dict[str, Any]) -> None:
    """The bytes are protobuf's canonical serialization, so a client building the same messages with
    its own protobuf library gets them byte for byte (the compressed payloads aside)."""
    payload = records_pb2.Records()
    for r in g["decoded"]:
        rec = payload.records.add(offset_delta=r["offset_delta"], timestamp_delta_ms=r["timestamp_delta_ms"])
        if r["key"] is not None:
            rec.key = bytes.fromhex(r["key"])
        if r["value"] is not None:
            rec.value = bytes.fromhex(r["value"])
        for h in r["headers"]:
            hdr = rec.headers.add(key=h["key"])
            if h["value"] is not None:
                hdr.value = bytes.fromhex(h["value"])
    assert payload.SerializeToString() == bytes.fromhex(g["records_uncompressed"])
    batch = records_pb2.RecordBatch(
        last_offset_delta=g["last_offset_delta"],
        first_timestamp_ms=g["first_timestamp_ms"],
        max_timestamp_ms=g["max_timestamp_ms"],
        producer_id=g["producer_id"],
        producer_epoch=g["producer_epoch"],
        base_sequence=g["base_sequence"],
        compression=records_pb2.CompressionType.Value(g["compression"]),
        record_count=g["record_count"],
        crc=g["crc"],
        records=bytes.fromhex(g["records"]),
    )
    assert batch.SerializeToString() == bytes.fromhex(g["batch"])


@pytest.mark.parametrize("g", BATCHES, ids=[g["name"] for g in BATCHES])
def test_the_codec_builds_the_batch(g: dict[str, Any]) -> None:
    """Built from its records, a batch is the golden one: byte for byte without compression; with
    compression, a payload that inflates to the same records (compressors may differ in bytes)."""
    compression = records_pb2.CompressionType.Value(g["compression"])
    records = [(r.key, r.value, r.headers, r.timestamp_ms) for r in _expected_records(g)]
    built = codec.build_batch(
        records,
        compression,
        producer_id=g["producer_id"],
        producer_epoch=g["producer_epoch"],
        base_sequence=g["base_sequence"],
    )
    uncompressed = bytes.fromhex(g["records_uncompressed"])
    assert codec.decompress(compression, built.records) == uncompressed
    assert codec.crc_is_valid(built)
    if compression == records_pb2.COMPRESSION_TYPE_NONE:
        assert built.SerializeToString() == bytes.fromhex(g["batch"]) and built.crc == g["crc"]


# ------------------------------------------------------------------ a real node


@pytest.fixture
def stub(node: NodeProcess) -> Iterator[client_pb2_grpc.HeadwaterServiceStub]:
    with grpc.insecure_channel(node.bootstrap) as ch:
        yield client_pb2_grpc.HeadwaterServiceStub(ch)


def test_a_node_accepts_every_golden_batch_and_serves_it_back(
    stub: client_pb2_grpc.HeadwaterServiceStub,
) -> None:
    """Each batch, sent as its golden bytes to a partition of its own, is stored as sent (the leader
    changes no byte the CRC covers) and reads back as its records, through Fetch and Subscribe."""
    created = stub.CreateTopics(
        pb.CreateTopicsRequest(
            topics=[
                pb.CreatableTopic(
                    name="golden",
                    num_partitions=len(BATCHES),
                    replication_factor=1,
                    # The golden timestamps are from 2023: keep them from time-based retention.
                    configs={"retention_ms": "-1"},
                )
            ]
        ),
        timeout=10,
    )
    assert created.topics[0].error_code == E.ERROR_CODE_NONE, created
    produced = stub.Produce(
        pb.ProduceRequest(
            acks=-1,
            timeout_ms=10_000,
            topics=[
                pb.ProduceTopicData(
                    topic="golden",
                    partitions=[
                        pb.ProducePartitionData(
                            partition=i,
                            batches=[records_pb2.RecordBatch.FromString(bytes.fromhex(g["batch"]))],
                        )
                        for i, g in enumerate(BATCHES)
                    ],
                )
            ],
        ),
        timeout=15,
    )
    answers = {p.partition: p for p in produced.topics[0].partitions}
    for i, g in enumerate(BATCHES):
        assert (answers[i].error_code, answers[i].error_message, answers[i].base_offset) == (
            E.ERROR_CODE_NONE,
            "",
            0,
        ), g["name"]
    fetched = stub.Fetch(
        pb.FetchRequest(
            replica_id=-1,
            max_wait_ms=0,
            max_bytes=1 << 20,
            topics=[
                pb.FetchTopic(
                    topic="golden",
                    partitions=[
                        pb.FetchPartition(partition=i, fetch_offset=0, current_leader_epoch=-1)
                        for i in range(len(BATCHES))
                    ],
                )
            ],
        ),
        timeout=15,
    )
    served = {p.partition: p for p in fetched.topics[0].partitions}
    for i, g in enumerate(BATCHES):
        p = served[i]
        assert p.error_code == E.ERROR_CODE_NONE and p.high_watermark == g["record_count"], g["name"]
        [stored] = p.batches
        assert stored.records == bytes.fromhex(g["records"]) and stored.crc == g["crc"], g["name"]
        assert codec.crc_header(stored) == bytes.fromhex(g["crc_header"]), g["name"]
        assert codec.decode_records(stored) == _expected_records(g), g["name"]

        stream = stub.Subscribe(
            pb.SubscribeRequest(topic="golden", partition=i, offset=0, decode=True), timeout=10
        )
        got: list[codec.DecodedRecord] = []
        for msg in stream:
            assert msg.error_code == E.ERROR_CODE_NONE, (g["name"], msg.error_message)
            got += [
                codec.DecodedRecord(
                    offset=r.offset,
                    timestamp_ms=r.timestamp_ms,
                    key=r.key if r.HasField("key") else None,
                    value=r.value if r.HasField("value") else None,
                    headers=tuple((h.key, h.value if h.HasField("value") else None) for h in r.headers),
                )
                for r in msg.records
            ]
            if len(got) >= g["record_count"]:
                break
        stream.cancel()
        assert got == _expected_records(g), g["name"]


# ------------------------------------------------------------------ the partitioner

# Kafka's own expectations of Utils.murmur2, from apache/kafka
# clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java, testMurmur2.
KAFKA_UTILS_TEST_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


# librdkafka's expectations of its Java-compatible murmur2 (src/rdmurmur2.c, unittest_murmur2, the
# table named java_murmur2_results), as unsigned 32-bit values: every tail length, 0 to 3 bytes.
LIBRDKAFKA_JAVA_MURMUR2 = {
    b"kafka": 0xD067CF64,
    b"giberish123456789": 0x8F552B0C,
    b"1234": 0x9FC97B14,
    b"234": 0xE7C009CA,
    b"34": 0x873930DA,
    b"4": 0x5A4B5CA1,
    b"PreAmbleWillBeRemoved,ThePrePartThatIs": 0x78424F1C,
    b"reAmbleWillBeRemoved,ThePrePartThatIs": 0x4A62B377,
    b"eAmbleWillBeRemoved,ThePrePartThatIs": 0xE0E4E09E,
    b"AmbleWillBeRemoved,ThePrePartThatIs": 0x62B8B43F,
    b"": 0x106E08D9,
}


@pytest.mark.parametrize("v", DOC["partitioner"], ids=[v["key"] or "empty" for v in DOC["partitioner"]])
def test_partitioner_vector_matches_the_client(v: dict[str, Any]) -> None:
    key = bytes.fromhex(v["key"])
    assert murmur2(key) == v["murmur2"]
    assert -(1 << 31) <= v["murmur2"] < 1 << 31
    assert v["partitions"] == {n: partition_for_key(key, int(n)) for n in v["partitions"]}
    for n, p in v["partitions"].items():
        assert p == (v["murmur2"] & 0x7FFFFFFF) % int(n)


def test_partitioner_vectors_agree_with_kafkas_own_tests() -> None:
    by_key = {bytes.fromhex(v["key"]): v["murmur2"] for v in DOC["partitioner"]}
    shared = KAFKA_UTILS_TEST_MURMUR2.keys() & by_key.keys()
    assert shared == {b"21", b"foobar", b"abc"}
    for key, expected in KAFKA_UTILS_TEST_MURMUR2.items():
        assert murmur2(key) == expected, key
        if key in by_key:
            assert by_key[key] == expected, key
    for key, unsigned in LIBRDKAFKA_JAVA_MURMUR2.items():
        assert murmur2(key) & 0xFFFFFFFF == unsigned, key
    assert by_key[b""] & 0xFFFFFFFF == LIBRDKAFKA_JAVA_MURMUR2[b""]
    assert set(DOC["partitioner"][0]["partitions"]) == {"1", "2", "3", "6", "12", "100"}
    tails = {len(bytes.fromhex(v["key"])) % 4 for v in DOC["partitioner"] if v["key"]}
    assert tails == {0, 1, 2, 3}
