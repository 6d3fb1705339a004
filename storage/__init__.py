"""headwater.storage: one node's partition logs in RocksDB.

``LogStore`` is the node's database; ``LogStore.open_partition`` gives a ``PartitionLog`` (append as a
leader or a follower, read, truncate, retention, leader-epoch cache, high-watermark checkpoint,
timestamp lookups); ``LogStore.sync_wal`` syncs many appends at once. Errors are rooted at
``StorageError`` (see ``headwater.storage.errors``).
"""

from headwater.storage.errors import (
    CorruptRecordError,
    InvalidAppendError,
    LogWriteError,
    OffsetOutOfRangeError,
    StorageError,
)
from headwater.storage.log import UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET, AppendResult, PartitionLog
from headwater.storage.store import LogStore

__all__ = [
    "LogStore",
    "PartitionLog",
    "AppendResult",
    "UNDEFINED_EPOCH",
    "UNDEFINED_EPOCH_OFFSET",
    "StorageError",
    "CorruptRecordError",
    "OffsetOutOfRangeError",
    "InvalidAppendError",
    "LogWriteError",
]
