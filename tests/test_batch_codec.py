"""The batch codec: the hand-written wire encoder matches protobuf byte for byte; CRC and round trips."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from headwater.v1 import batch as codec
from headwater.v1 import records_pb2

header = st.tuples(st.text(max_size=8), st.none() | st.binary(max_size=8))
record = st.tuples(
    st.none() | st.binary(max_size=40),
    st.none() | st.binary(max_size=300),
    st.none() | st.lists(header, max_size=3),
    st.integers(min_value=-(2**40), max_value=2**40),
)


def reference_encoding(records: list, first_ts: int) -> bytes:  # type: ignore[type-arg]
    payload = records_pb2.Records()
    for i, (key, value, headers, ts) in enumerate(records):
        r = payload.records.add(offset_delta=i, timestamp_delta_ms=ts - first_ts)
        if key is not None:
            r.key = key
        if value is not None:
            r.value = value
        for hk, hv in headers or ():
            h = r.headers.add(key=hk)
            if hv is not None:
                h.value = hv
    return payload.SerializeToString()


@settings(max_examples=300)
@given(st.lists(record, min_size=1, max_size=20))
def test_encoder_matches_protobuf_byte_for_byte(records: list) -> None:  # type: ignore[type-arg]
    first_ts = records[0][3]
    assert codec.encode_records(records, first_ts) == reference_encoding(records, first_ts)


@settings(max_examples=100)
@given(st.lists(record, min_size=1, max_size=20), st.sampled_from(sorted(codec.COMPRESSION_BY_NAME.values())))
def test_batches_round_trip_with_every_compression(records: list, compression: int) -> None:  # type: ignore[type-arg]
    batch = codec.build_batch(records, compression)
    assert codec.crc_is_valid(batch)
    assert batch.record_count == len(records) and batch.last_offset_delta == len(records) - 1
    assert batch.max_timestamp_ms == max(r[3] for r in records)
    batch.base_offset = 1000
    decoded = codec.decode_records(batch)
    assert [(d.offset, d.key, d.value, d.timestamp_ms) for d in decoded] == [
        (1000 + i, k, v, ts) for i, (k, v, _, ts) in enumerate(records)
    ]
    assert [list(d.headers) for d in decoded] == [list(h or []) for _, _, h, _ in records]


def test_a_flipped_bit_breaks_the_crc() -> None:
    batch = codec.build_batch([(b"k", b"value", None, 5)])
    for i in range(len(batch.records)):
        damaged = records_pb2.RecordBatch()
        damaged.CopyFrom(batch)
        raw = bytearray(batch.records)
        raw[i] ^= 0x01
        damaged.records = bytes(raw)
        assert not codec.crc_is_valid(damaged)
    batch.record_count = 2
    assert not codec.crc_is_valid(batch)


@settings(max_examples=100)
@given(
    st.lists(record, min_size=1, max_size=20),
    st.sampled_from(sorted(codec.COMPRESSION_BY_NAME.values())),
    st.integers(min_value=-1, max_value=2**40),
)
def test_an_encoded_batch_is_the_serialized_message_byte_for_byte(
    records: list,  # type: ignore[type-arg]
    compression: int,
    producer_id: int,
) -> None:
    """The producer's wire bytes (header serialized alone, records field appended) are exactly what
    protobuf makes of the same message."""
    first_ts = records[0][3]
    reference = records_pb2.RecordBatch(
        last_offset_delta=len(records) - 1,
        first_timestamp_ms=first_ts,
        max_timestamp_ms=max(r[3] for r in records),
        producer_id=producer_id,
        producer_epoch=-1,
        base_sequence=-1,
        compression=compression,  # type: ignore[arg-type]
        record_count=len(records),
        records=codec.compress(compression, reference_encoding(records, first_ts)),
    )
    reference.crc = codec.batch_crc(reference)
    encoded = b"".join(codec.encode_batch_parts(records, compression, producer_id=producer_id))
    assert encoded == reference.SerializeToString()
