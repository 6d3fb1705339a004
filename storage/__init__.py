"""headwater.storage: one node's partition logs in RocksDB.

``LogStore`` is the node's database; ``LogStore.open_partition`` gives a ``PartitionLog`` (append, read,
truncate, retention, leader-epoch cache, timestamp lookups). Errors are rooted at ``StorageError``
(see ``headwater.storage.errors``).
"""

from headwater.storage.errors import (
    CorruptRecordError,
    InvalidAppendError,
    LogWriteError,
    OffsetOutOfRangeError,
    StorageError,
)
from headwater.storage.log import AppendResult, PartitionLog
from headwater.storage.store import LogStore

__all__ = [
    "LogStore",
    "PartitionLog",
    "AppendResult",
    "StorageError",
    "CorruptRecordError",
    "OffsetOutOfRangeError",
    "InvalidAppendError",
    "LogWriteError",
]
