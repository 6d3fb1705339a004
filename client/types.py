"""The small immutable values the client hands out and takes in.

Values made once per record (``RecordMetadata``, ``ConsumerRecord``) and used as dictionary keys
(``TopicPartition``) are named tuples: as immutable as a frozen dataclass, and several times cheaper
to build, which matters at a few hundred thousand records a second. The rest are frozen dataclasses.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "Header",
    "TopicPartition",
    "RecordMetadata",
    "ConsumerRecord",
    "OffsetAndTimestamp",
    "NewTopic",
    "PartitionInfo",
    "TopicDescription",
    "ConfigEntry",
]

#: One record header: a string key and optional bytes.
Header = tuple[str, bytes | None]


class TopicPartition(NamedTuple):
    """One partition of one topic."""

    topic: str
    partition: int


class RecordMetadata(NamedTuple):
    """Where an acknowledged record landed. ``offset`` is -1 when the producer used ``acks=0``."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


class ConsumerRecord(NamedTuple):
    """One record as a consumer reads it. A ``None`` value is a tombstone."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]
    timestamp_ms: int


class OffsetAndTimestamp(NamedTuple):
    """The answer of ``Consumer.offsets_for_times``: the first offset at or after a timestamp."""

    offset: int
    timestamp_ms: int


@dataclass(frozen=True)
class NewTopic:
    """A topic to create. -1 for ``partitions`` or ``replication_factor`` means the node's default."""

    name: str
    partitions: int = 1
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)
    #: Optional manual placement: partition -> replicas in preference order.
    replica_assignments: dict[int, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class PartitionInfo:
    """One partition as the cluster metadata describes it. ``leader`` is -1 when offline."""

    partition: int
    leader: int
    leader_epoch: int
    partition_epoch: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]
    offline_replicas: tuple[int, ...]


@dataclass(frozen=True)
class TopicDescription:
    """A topic with its partitions, ordered by partition index."""

    name: str
    topic_id: uuid.UUID | None
    is_internal: bool
    partitions: tuple[PartitionInfo, ...]


@dataclass(frozen=True)
class ConfigEntry:
    """One config of a resource. ``source`` is "topic", "node", "default" or "unknown"."""

    name: str
    value: str
    source: str
    read_only: bool = False
    sensitive: bool = False
    documentation: str = ""
