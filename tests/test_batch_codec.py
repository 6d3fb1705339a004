"""The batch codec: the hand-written wire encoder matches protobuf byte for byte; CRC and round trips."""

from __future__ import annotations

import gzip
import os
import zlib

import lz4.frame
import pytest
import zstandard
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


def test_a_producers_payload_may_use_any_level_and_option_of_its_format() -> None:
    """records.proto: one zstd frame, LZ4 frame or gzip member, at any level, with any of the
    format's options; the frame's length is read from its headers, whatever they hold."""
    data = b"headwater " * 5000 + os.urandom(200_000) + b"\0" * 100_000  # raw, compressed and RLE blocks
    zstd_frames = [
        zstandard.ZstdCompressor(level=level, write_checksum=checksum, write_content_size=size).compress(data)
        for level in (-5, 1, 3, 19)
        for checksum in (False, True)
        for size in (False, True)
    ]
    streamed = zstandard.ZstdCompressor().compressobj()
    zstd_frames.append(streamed.compress(data) + streamed.flush())
    for frame in zstd_frames:
        assert codec._zstd_frame_size(frame) == len(frame)
        assert codec.decompress(records_pb2.COMPRESSION_TYPE_ZSTD, frame, whole=True) == data
    lz4_frames = [
        lz4.frame.compress(data, compression_level=level, **options)  # type: ignore[arg-type]
        for level in (0, 9, 16)
        for options in (
            {},
            {"block_size": lz4.frame.BLOCKSIZE_MAX4MB, "content_checksum": True, "block_checksum": True},
            {"store_size": False, "block_linked": False},
        )
    ]
    for frame in lz4_frames:
        assert codec.decompress(records_pb2.COMPRESSION_TYPE_LZ4, frame, whole=True) == data
    gzip_members = [gzip.compress(data, compresslevel=9, mtime=7)]
    for level in (0, 1, 9):
        c = zlib.compressobj(level, zlib.DEFLATED, 31)
        gzip_members.append(c.compress(data) + c.flush())
    for member in gzip_members:
        assert codec.decompress(records_pb2.COMPRESSION_TYPE_GZIP, member, whole=True) == data


def test_a_producers_payload_is_exactly_one_frame() -> None:
    """Decoders elsewhere read on across concatenated frames and gzip members, this one stops after
    the first: a producer's payload holding more, or less, than one whole frame is refused."""
    data = b"records " * 100
    for compression in (
        records_pb2.COMPRESSION_TYPE_GZIP,
        records_pb2.COMPRESSION_TYPE_LZ4,
        records_pb2.COMPRESSION_TYPE_ZSTD,
    ):
        frame = codec.compress(compression, data)
        assert codec.decompress(compression, frame + frame) == data  # a reader stops after the first
        for bad in (frame + frame, frame + b"\0", frame[:-1]):
            with pytest.raises((codec.FramingError, zstandard.ZstdError)):
                codec.decompress(compression, bad, whole=True)
