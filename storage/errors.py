"""The errors of the storage layer.

The tree, all rooted at ``StorageError``::

    StorageError                 (STORAGE_ERROR)  base; also "the store is closed"
    ├── CorruptRecordError       (CORRUPT_MESSAGE) a batch failed its CRC or header checks; nothing stored
    ├── OffsetOutOfRangeError    (OFFSET_OUT_OF_RANGE) an offset outside [log_start_offset, log_end_offset]
    ├── InvalidAppendError       (INVALID_REQUEST) an append that would break the log's order: a leader
    │                            epoch older than the latest, or stamped batches (the follower's copy)
    │                            with a gap or an overlap, with the log end or between them
    └── LogWriteError            (STORAGE_ERROR) RocksDB refused a write (e.g. the disk is full); the
                                 partition's state is as it was before the call and the log stays
                                 readable; ``LogStore.recover()`` (also tried before the next write)
                                 reopens the database once space returns

Each carries the proto ``error_code`` the node puts in its per-partition reply and whether retrying the
same request can help (``retriable``).
"""

from __future__ import annotations

from headwater.v1 import errors_pb2

__all__ = [
    "StorageError",
    "CorruptRecordError",
    "OffsetOutOfRangeError",
    "InvalidAppendError",
    "LogWriteError",
]


class StorageError(Exception):
    """Base of every error raised by ``headwater.storage``."""

    error_code: int = errors_pb2.ERROR_CODE_STORAGE_ERROR
    retriable: bool = False


class CorruptRecordError(StorageError):
    """A batch failed its CRC or header checks and was not stored."""

    error_code = errors_pb2.ERROR_CODE_CORRUPT_MESSAGE


class OffsetOutOfRangeError(StorageError):
    """An offset lies outside ``[log_start_offset, log_end_offset]``."""

    error_code = errors_pb2.ERROR_CODE_OFFSET_OUT_OF_RANGE


class InvalidAppendError(StorageError):
    """An append would break the log's order (stale leader epoch, or a gap/overlap in offsets)."""

    error_code = errors_pb2.ERROR_CODE_INVALID_REQUEST


class LogWriteError(StorageError):
    """RocksDB refused a write (disk full, I/O error); nothing of the call was applied in memory."""

    retriable = True
