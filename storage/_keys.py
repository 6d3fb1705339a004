"""Key layout of the node's RocksDB database (private to ``headwater.storage``).

All integers are fixed-width big-endian, so RocksDB's bytewise order is numeric order and a partition's
keys are one contiguous range. ``pk`` is the 20-byte partition key: 16-byte topic_id + uint32 partition.

column family ``default`` (batches)::

    pk + u64 base_offset                      -> the serialized RecordBatch, exactly as stored

column family ``meta``::

    b"p" + pk + b"s"                          -> partition state: log_start, log_end, size_bytes
    b"p" + pk + b"h"                          -> high-watermark checkpoint
    b"p" + pk + b"e" + u32 epoch              -> start offset of that leader epoch (KIP-101 cache)
    b"b" + pk + u64 base_offset               -> batch index: size, last_offset_delta, max_timestamp
    b"c" + key                                -> the node's catalog namespace (put_meta & co.)

column family ``timeindex``::

    pk + u64 (max_timestamp_ms + 2**63)       -> u64 base_offset of the batch that raised the maximum

The batch index lets retention and truncation account sizes and timestamps without reading batches.
"""

from __future__ import annotations

import struct

TOPIC_ID_LEN = 16
PK_LEN = TOPIC_ID_LEN + 4
MAX_PARTITION = (1 << 31) - 1

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
STATE = struct.Struct(">qqq")  # log_start_offset, log_end_offset, size_bytes
BATCH_INDEX = struct.Struct(">Iiq")  # size_bytes, last_offset_delta, max_timestamp_ms
_TS_BIAS = 1 << 63

META_PARTITION = b"p"
META_BATCH = b"b"
META_CATALOG = b"c"
_STATE_TAG = b"s"
_HW_TAG = b"h"
_EPOCH_TAG = b"e"


def partition_key(topic_id: bytes, partition: int) -> bytes:
    if len(topic_id) != TOPIC_ID_LEN:
        raise ValueError(f"topic_id must be {TOPIC_ID_LEN} bytes, got {len(topic_id)}")
    if not 0 <= partition <= MAX_PARTITION:
        raise ValueError(f"partition must be in [0, {MAX_PARTITION}], got {partition}")
    return bytes(topic_id) + _U32.pack(partition)


def split_partition_key(pk: bytes) -> tuple[bytes, int]:
    return pk[:TOPIC_ID_LEN], int(_U32.unpack_from(pk, TOPIC_ID_LEN)[0])


def next_partition_key(pk: bytes) -> bytes:
    """The first key of the partition after ``pk`` (an exclusive upper bound of pk's range)."""
    topic_id, partition = split_partition_key(pk)
    return topic_id + _U32.pack(partition + 1)  # partition <= 2**31 - 1, so this never overflows


def offset_suffix(offset: int) -> bytes:
    return _U64.pack(offset)


def offset_of(key: bytes) -> int:
    """The trailing u64 of a batch, batch-index or time-index value/key."""
    return int(_U64.unpack_from(key, len(key) - 8)[0])


def ts_suffix(timestamp_ms: int) -> bytes:
    return _U64.pack(timestamp_ms + _TS_BIAS)


def ts_of(key: bytes) -> int:
    return int(_U64.unpack_from(key, len(key) - 8)[0]) - _TS_BIAS


def state_key(pk: bytes) -> bytes:
    return META_PARTITION + pk + _STATE_TAG


def hw_key(pk: bytes) -> bytes:
    return META_PARTITION + pk + _HW_TAG


def epoch_prefix(pk: bytes) -> bytes:
    return META_PARTITION + pk + _EPOCH_TAG


def epoch_key(pk: bytes, epoch: int) -> bytes:
    return epoch_prefix(pk) + _U32.pack(epoch)


def epoch_of(key: bytes) -> int:
    return int(_U32.unpack_from(key, len(key) - 4)[0])


def is_state_key(key: bytes) -> bool:
    return len(key) == 1 + PK_LEN + 1 and key[:1] == META_PARTITION and key[-1:] == _STATE_TAG


def batch_index_key(pk: bytes, base_offset: int) -> bytes:
    return META_BATCH + pk + _U64.pack(base_offset)


def encode_i64(value: int) -> bytes:
    return _I64.pack(value)


def decode_i64(data: bytes) -> int:
    return int(_I64.unpack(data)[0])


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(data: bytes) -> int:
    return int(_U64.unpack(data)[0])
