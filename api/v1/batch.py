"""The reference codec of the record batch format defined in ``records.proto``.

This is the one hand-written module of ``headwater.v1``: it is part of the contract, shared by the
client (which builds batches) and the node's storage (which checks and stamps them), so both sides
compute the CRC and the compression frames the same way. Any other language implements the same few
rules, written in ``records.proto``.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import crc32c as _crc32c
import lz4.frame as _lz4
import zstandard as _zstd

from headwater.v1 import records_pb2

__all__ = [
    "NO_PRODUCER_ID",
    "RecordBatch",
    "DecodedRecord",
    "UnknownCompressionError",
    "batch_crc",
    "crc_header",
    "build_batch",
    "encode_batch_parts",
    "compress",
    "decompress",
    "decode_records",
    "record_tuples",
    "encode_records",
    "encode_varint",
    "stored_batches_size",
    "add_stored_batches",
    "crc_is_valid",
    "crc_problem",
    "records_problem",
    "check_records",
    "RecordsCheck",
    "has_producer_id",
    "CREATE_TIME",
    "LOG_APPEND_TIME",
    "InflateLimitError",
    "FramingError",
    "COMPRESSION_BY_NAME",
]

RecordBatch = records_pb2.RecordBatch
NO_PRODUCER_ID = -1
CREATE_TIME = records_pb2.TIMESTAMP_TYPE_CREATE_TIME
LOG_APPEND_TIME = records_pb2.TIMESTAMP_TYPE_LOG_APPEND_TIME


def has_producer_id(producer_id: int) -> bool:
    """Whether a batch's ``producer_id`` names a producer: ids are allocated from 1, and 0 (proto3's
    default) and -1 both mean none (records.proto)."""
    return producer_id > 0


# The fields covered by the CRC, in order: see records.proto.
_CRC_HEADER = struct.Struct(">iqqqiiii")

COMPRESSION_BY_NAME: dict[str, int] = {
    "none": records_pb2.COMPRESSION_TYPE_NONE,
    "gzip": records_pb2.COMPRESSION_TYPE_GZIP,
    "lz4": records_pb2.COMPRESSION_TYPE_LZ4,
    "zstd": records_pb2.COMPRESSION_TYPE_ZSTD,
}

_local = threading.local()


class UnknownCompressionError(ValueError):
    """A batch names a compression type this codec does not know."""


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    """One record of a batch with its absolute offset and timestamp."""

    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


def batch_crc(batch: records_pb2.RecordBatch, records: bytes | None = None) -> int:
    """CRC32C over the producer-set header fields and the records bytes (see records.proto).

    ``records``: the batch's records bytes when the caller holds them already (reading the field
    copies it: a quarter of a megabyte for a full batch).
    """
    header = crc_header(batch)
    return _crc32c.crc32c(batch.records if records is None else records, _crc32c.crc32c(header))


def crc_header(batch: records_pb2.RecordBatch) -> bytes:
    """The 44 big-endian header bytes the CRC covers before the records (records.proto).

    Raises ``struct.error`` when a field is out of its fixed-width range.
    """
    return _CRC_HEADER.pack(
        batch.last_offset_delta,
        batch.first_timestamp_ms,
        batch.max_timestamp_ms,
        batch.producer_id,
        batch.producer_epoch,
        batch.base_sequence,
        batch.compression,
        batch.record_count,
    )


def crc_is_valid(batch: records_pb2.RecordBatch, records: bytes | None = None) -> bool:
    try:
        return batch_crc(batch, records) == batch.crc
    except struct.error:  # a header field out of its fixed-width range cannot have a valid CRC
        return False


def crc_problem(batch: records_pb2.RecordBatch, records: bytes | None = None) -> str:
    """Why a batch's ``crc`` is wrong, naming the value it should have, or "" when it is right."""
    try:
        expected = batch_crc(batch, records)
    except struct.error as e:  # a header field out of its fixed-width range
        return f"crc cannot be computed: a header field is out of range ({e})"
    if expected == batch.crc:
        return ""
    return (
        f"crc is 0x{batch.crc:08x}, expected 0x{expected:08x} (CRC32C over the 44-byte header and the "
        "records bytes as sent; see records.proto)"
    )


def _zstd_compressor() -> _zstd.ZstdCompressor:
    c = getattr(_local, "zstd_c", None)
    if c is None:
        c = _local.zstd_c = _zstd.ZstdCompressor(level=3)
    return c


def _zstd_decompressor() -> _zstd.ZstdDecompressor:
    d = getattr(_local, "zstd_d", None)
    if d is None:
        d = _local.zstd_d = _zstd.ZstdDecompressor()
    return d


def compress(compression: int, data: bytes) -> bytes:
    if compression == records_pb2.COMPRESSION_TYPE_NONE:
        return data
    if compression == records_pb2.COMPRESSION_TYPE_ZSTD:
        return _zstd_compressor().compress(data)
    if compression == records_pb2.COMPRESSION_TYPE_LZ4:
        return bytes(_lz4.compress(data))
    if compression == records_pb2.COMPRESSION_TYPE_GZIP:
        c = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip member
        return c.compress(data) + c.flush()
    raise UnknownCompressionError(f"unknown compression type {compression}")


class InflateLimitError(ValueError):
    """A records payload would inflate past the caller's bound (a compression bomb)."""


class FramingError(ValueError):
    """A records payload is not exactly one whole frame (or gzip member) of its compression."""


def decompress(compression: int, data: bytes, max_size: int = 1 << 30, *, whole: bool = False) -> bytes:
    """Inflate a records payload, never holding more than ``max_size + 1`` inflated bytes.

    Raises ``InflateLimitError`` past the bound, ``UnknownCompressionError`` for an unknown codec,
    and the codec's own error for a damaged frame. With ``whole`` (a producer's batch), also
    ``FramingError`` unless the payload is one complete frame with nothing after it: decoders in
    other languages read on across concatenated frames or gzip members, where this one stops after
    the first, so a payload that holds more than one would decode differently elsewhere.
    """
    if compression == records_pb2.COMPRESSION_TYPE_NONE:
        return data
    if compression == records_pb2.COMPRESSION_TYPE_ZSTD:
        # The frame header's content size is checked first: with it present, zstandard would inflate
        # the whole frame whatever max_output_size says.
        declared = _zstd.frame_content_size(data)
        if declared > max_size:
            raise InflateLimitError(f"records payload declares {declared} bytes, above {max_size}")
        out = bytes(_zstd_decompressor().decompress(data, max_output_size=max_size + 1))
        ended, after = True, (len(data) - _zstd_frame_size(data)) if whole else 0
    elif compression == records_pb2.COMPRESSION_TYPE_LZ4:
        lz = _lz4.LZ4FrameDecompressor()
        out = bytes(lz.decompress(data, max_length=max_size + 1))
        ended, after = lz.eof, len(lz.unused_data or b"")
    elif compression == records_pb2.COMPRESSION_TYPE_GZIP:
        d = zlib.decompressobj(31)
        out = d.decompress(data, max_size + 1)
        ended, after = d.eof, len(d.unused_data)
    else:
        raise UnknownCompressionError(f"unknown compression type {compression}")
    if len(out) > max_size:
        raise InflateLimitError(f"records payload inflates past {max_size} bytes")
    if whole:
        unit = "gzip member" if compression == records_pb2.COMPRESSION_TYPE_GZIP else "frame"
        if not ended:
            raise FramingError(f"the {unit} is cut off before its end")
        if after:
            raise FramingError(f"{after} byte{'s' if after > 1 else ''} follow the first {unit}")
    return out


_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_DICT_ID_BYTES = (0, 1, 2, 4)
_ZSTD_CONTENT_SIZE_BYTES = (0, 2, 4, 8)


def _zstd_frame_size(data: bytes) -> int:
    """The length of the zstd frame at the start of ``data`` (RFC 8878, 3.1.1), read from its
    header and block headers without inflating anything; raises ``FramingError`` when ``data`` does
    not start with a whole zstd frame."""
    end = len(data)
    if end < 5 or int.from_bytes(data[:4], "little") != _ZSTD_MAGIC:
        raise FramingError("the payload does not start with a zstd frame")
    descriptor = data[4]
    single_segment = descriptor >> 5 & 1
    content_size_bytes = _ZSTD_CONTENT_SIZE_BYTES[descriptor >> 6] or single_segment
    pos = 5 + (not single_segment) + _ZSTD_DICT_ID_BYTES[descriptor & 3] + content_size_bytes
    while True:
        if pos + 3 > end:
            raise FramingError("the frame is cut off before its end")
        header = int.from_bytes(data[pos : pos + 3], "little")
        kind, size = header >> 1 & 3, header >> 3
        if kind == 3:
            raise FramingError("the frame holds a block of the reserved type")
        pos += 3 + (1 if kind == 1 else size)  # an RLE block holds one byte
        if header & 1:  # the last block
            break
    pos += 4 if descriptor & 4 else 0  # the content checksum
    if pos > end:
        raise FramingError("the frame is cut off before its end")
    return pos


def records_problem(batch: records_pb2.RecordBatch, max_size: int, records: bytes | None = None) -> str:
    """Why a batch's records disagree with its header, or "" when they agree (see ``check_records``)."""
    return check_records(batch, max_size, records).problem


class RecordsCheck(NamedTuple):
    """What ``check_records`` found: why the records disagree with their header ("" when they
    agree), the bytes the payload inflated to (0 when it could not be inflated, ``max_size + 1``
    when it inflates past ``max_size``), and the smallest create time among the records (the
    header's ``first_timestamp_ms`` when they could not be read)."""

    problem: str
    inflated: int
    min_timestamp_ms: int


def check_records(
    batch: records_pb2.RecordBatch, max_size: int, records: bytes | None = None
) -> RecordsCheck:
    """Check a producer's batch's records against its header (``RecordsCheck``).

    Checks what a node must before storing a batch it will never re-encode: the payload inflates
    within ``max_size``, parses, holds ``record_count`` records with offset deltas 0..n-1, and its
    largest timestamp is the header's ``max_timestamp_ms``. The smallest timestamp comes from the
    same pass, for the timestamp bounds (records.proto). ``records`` as for ``batch_crc``. The cost
    is linear in the inflated bytes and the record count: bound both before calling it.
    """
    data = batch.records if records is None else records
    first = batch.first_timestamp_ms
    compression = batch.compression
    try:
        inflated = decompress(compression, data, max_size, whole=True)
    except InflateLimitError as e:
        return RecordsCheck(
            f"records payload is too large: {e}; expected at most {max_size} bytes inflated "
            "(max_decompressed_bytes)",
            max_size + 1,
            first,
        )
    except UnknownCompressionError:
        return RecordsCheck(f"compression is {compression}, expected {_COMPRESSION_CHOICES}", 0, first)
    except Exception as e:  # damaged frame
        return RecordsCheck(
            f"records payload cannot be inflated: {e}; expected {_FRAMING.get(compression, 'a frame')} "
            "(records.proto)",
            0,
            first,
        )
    # Count the records before parsing them: a small payload can hold millions of empty records,
    # and parsing those costs far more than their bytes suggest.
    held = _count_records(inflated, batch.record_count)
    if held < 0:
        return RecordsCheck(_NOT_RECORDS, len(inflated), first)
    if held != batch.record_count:
        held_ = f"more than {batch.record_count}" if held > batch.record_count else str(held)
        return RecordsCheck(
            f"record_count is {batch.record_count}, expected {held_}, the number of records in the payload",
            len(inflated),
            first,
        )
    try:
        payload = records_pb2.Records.FromString(inflated)
    except Exception as e:  # not a Records message
        return RecordsCheck(f"{_NOT_RECORDS}: {e}", len(inflated), first)
    records_ = payload.records
    if len(records_) != batch.record_count:
        return RecordsCheck(
            f"record_count is {batch.record_count}, expected {len(records_)}, the number of records in "
            "the payload",
            len(inflated),
            first,
        )
    max_delta = min_delta = None
    for i, r in enumerate(records_):
        if r.offset_delta != i:
            return RecordsCheck(
                f"record {i}: offset_delta is {r.offset_delta}, expected {i} (offset deltas run "
                "0..record_count-1 in order)",
                len(inflated),
                first,
            )
        d = r.timestamp_delta_ms
        if max_delta is None or d > max_delta:
            max_delta = d
        if min_delta is None or d < min_delta:
            min_delta = d
    assert max_delta is not None and min_delta is not None
    if first + max_delta != batch.max_timestamp_ms:
        return RecordsCheck(
            f"max_timestamp_ms is {batch.max_timestamp_ms}, expected {first + max_delta} (the largest "
            "record timestamp: first_timestamp_ms + the largest timestamp_delta_ms)",
            len(inflated),
            first,
        )
    return RecordsCheck("", len(inflated), first + min_delta)


_COMPRESSION_CHOICES = (
    "0 (COMPRESSION_TYPE_NONE), 1 (COMPRESSION_TYPE_GZIP), 2 (COMPRESSION_TYPE_LZ4) "
    "or 3 (COMPRESSION_TYPE_ZSTD)"
)
_FRAMING = {
    records_pb2.COMPRESSION_TYPE_GZIP: "one gzip member (RFC 1952) for COMPRESSION_TYPE_GZIP",
    records_pb2.COMPRESSION_TYPE_LZ4: (
        "one LZ4 frame (the frame format, not raw LZ4 blocks) for COMPRESSION_TYPE_LZ4"
    ),
    records_pb2.COMPRESSION_TYPE_ZSTD: "one zstd frame for COMPRESSION_TYPE_ZSTD",
}
_NOT_RECORDS = (
    "records payload does not parse as records.proto's Records message, expected the serialized "
    "Records message (compressed as compression says)"
)


def _count_records(data: bytes, limit: int) -> int:
    """The ``records`` entries (field 1) of a serialized ``Records`` message, counting no further
    than ``limit + 1``; -1 when the bytes are not a well-formed message. Skips each entry whole."""
    view = memoryview(data)
    end = len(view)
    pos = count = 0
    while pos < end:
        tag, pos = _read_varint(view, pos)
        wire = tag & 7
        if tag < 0 or pos < 0:
            return -1
        if wire == 2:
            length, pos = _read_varint(view, pos)
            if length < 0 or pos < 0 or pos + length > end:
                return -1
            pos += length
            if tag >> 3 == 1:
                count += 1
                if count > limit:
                    return count
        elif wire == 0:
            _, pos = _read_varint(view, pos)
            if pos < 0:
                return -1
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > end:
                return -1
        else:
            return -1
    return count


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    """A varint at ``pos`` and the position after it; (-1, -1) when it is cut off or too long."""
    result = shift = 0
    end = len(view)
    while pos < end and shift < 64:
        b = view[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    return -1, -1


Header = tuple[str, bytes | None]


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int32/int64 negatives are ten-byte varints on the wire
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL_VARINTS = [_varint(n) for n in range(1 << 14)]


def encode_varint(n: int) -> bytes:
    """A protobuf varint (negative ints as their 64-bit two's complement, as int32/int64 fields)."""
    return _SMALL_VARINTS[n] if 0 <= n < 16384 else _varint(n)


def stored_batches_size(tag: bytes, batches: Sequence[bytes]) -> int:
    """Wire bytes of ``batches`` as entries of a repeated message field with ``tag``
    (``add_stored_batches``): what a message that holds them counts for its length prefix."""
    return sum(len(tag) + len(encode_varint(len(b))) + len(b) for b in batches)


def add_stored_batches(out: list[bytes], tag: bytes, batches: Sequence[bytes]) -> None:
    """Append ``batches`` to the pieces of a serialized message as entries of the repeated message
    field with ``tag`` (a repeated field is its entries one after another), so stored batches go out
    as they are: never parsed or re-serialized, copied once by the final join."""
    for b in batches:
        out += (tag, encode_varint(len(b)), b)


def encode_records(
    records: Sequence[tuple[bytes | None, bytes | None, Iterable[Header] | None, int]], first_ts: int
) -> bytes:
    """The serialized ``Records`` message of these records, written straight to the proto wire format.

    The bytes are exactly what ``records_pb2.Records(...).SerializeToString()`` gives (fields in
    number order, zero scalars omitted, presence kept for ``optional``); a test holds the two equal.
    Writing them directly skips one protobuf object per record, a third of a producer's batch cost.
    """
    parts: list[bytes] = []
    out = parts.append
    for i, (key, value, headers, ts) in enumerate(records):
        body: list[bytes] = []
        put = body.append
        if i:
            put(b"\x08")
            put(encode_varint(i))
        delta = ts - first_ts
        if delta:
            put(b"\x10")
            put(encode_varint(delta))
        if key is not None:
            put(b"\x1a")
            put(encode_varint(len(key)))
            put(key)
        if value is not None:
            put(b"\x22")
            put(encode_varint(len(value)))
            put(value)
        if headers:
            for hk, hv in headers:
                hkey = hk.encode()
                h = (b"\x0a" + encode_varint(len(hkey)) + hkey) if hkey else b""
                if hv is not None:
                    h += b"\x12" + encode_varint(len(hv)) + hv
                put(b"\x2a")
                put(encode_varint(len(h)))
                put(h)
        encoded = b"".join(body)
        out(b"\x0a")
        out(encode_varint(len(encoded)))
        out(encoded)
    return b"".join(parts)


def build_batch(
    records: Sequence[tuple[bytes | None, bytes | None, Iterable[Header] | None, int]],
    compression: int = records_pb2.COMPRESSION_TYPE_NONE,
    *,
    producer_id: int = NO_PRODUCER_ID,
    producer_epoch: int = -1,
    base_sequence: int = -1,
) -> records_pb2.RecordBatch:
    """Build a batch from ``(key, value, headers, timestamp_ms)`` tuples; base_offset is left 0."""
    parts = encode_batch_parts(
        records,
        compression,
        producer_id=producer_id,
        producer_epoch=producer_epoch,
        base_sequence=base_sequence,
    )
    batch: records_pb2.RecordBatch = records_pb2.RecordBatch.FromString(b"".join(parts))
    return batch


# RecordBatch.records: field 12, length-delimited. The last field a producer sets (timestamp_type, 13,
# is the leader's and stays CREATE_TIME, so unset), so header + records is the whole message.
_RECORDS_TAG = b"\x62"


def encode_batch_parts(
    records: Sequence[tuple[bytes | None, bytes | None, Iterable[Header] | None, int]],
    compression: int = records_pb2.COMPRESSION_TYPE_NONE,
    *,
    producer_id: int = NO_PRODUCER_ID,
    producer_epoch: int = -1,
    base_sequence: int = -1,
) -> tuple[bytes, bytes]:
    """A serialized RecordBatch of ``(key, value, headers, timestamp_ms)`` tuples (base_offset 0), in
    two pieces to be sent one after the other: the header (with the records field's tag and length)
    and the records payload.

    The header is serialized alone and the records field put after it: it has the largest field
    number, so the bytes are what serializing the whole message gives (a test holds them equal). A
    producer sends the pieces as they are, which saves copying every payload into and out of a
    message, and into a joined batch.
    """
    if not records:
        raise ValueError("a batch holds at least one record")
    first_ts = records[0][3]
    payload = compress(compression, encode_records(records, first_ts))
    header = records_pb2.RecordBatch(
        last_offset_delta=len(records) - 1,
        first_timestamp_ms=first_ts,
        max_timestamp_ms=max(r[3] for r in records),
        producer_id=producer_id,
        producer_epoch=producer_epoch,
        base_sequence=base_sequence,
        compression=compression,  # type: ignore[arg-type]
        record_count=len(records),
    )
    header.crc = batch_crc(header, payload)
    return header.SerializeToString() + _RECORDS_TAG + encode_varint(len(payload)), payload


RecordFields = tuple[int, int, "bytes | None", "bytes | None", tuple[Header, ...]]


def record_tuples(batch: records_pb2.RecordBatch, max_size: int = 1 << 30) -> list[RecordFields]:
    """The records of a batch as ``(offset, timestamp_ms, key, value, headers)`` tuples.

    The fast path for consumers: one plain tuple per record, no intermediate objects. A record's
    timestamp is ``first_timestamp_ms`` plus its delta, except in a LOG_APPEND_TIME batch, where every
    record reads ``max_timestamp_ms``, the leader's append time (records.proto, as in Kafka).
    """
    payload = records_pb2.Records.FromString(decompress(batch.compression, batch.records, max_size))
    base = batch.base_offset
    log_append_time = batch.timestamp_type == LOG_APPEND_TIME
    first_ts = batch.max_timestamp_ms if log_append_time else batch.first_timestamp_ms
    out: list[RecordFields] = []
    append = out.append
    for r in payload.records:
        hs = r.headers
        append(
            (
                base + r.offset_delta,
                first_ts if log_append_time else first_ts + r.timestamp_delta_ms,
                r.key if r.HasField("key") else None,
                r.value if r.HasField("value") else None,
                tuple((h.key, h.value if h.HasField("value") else None) for h in hs) if hs else (),
            )
        )
    return out


def decode_records(batch: records_pb2.RecordBatch, max_size: int = 1 << 30) -> list[DecodedRecord]:
    """The records of a batch, with absolute offsets and timestamps."""
    return [DecodedRecord(*fields) for fields in record_tuples(batch, max_size)]
