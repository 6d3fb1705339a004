"""The small immutable values the client hands out and takes in.

Values made once per record (``RecordMetadata``, ``ConsumerRecord``) and used as dictionary keys
(``TopicPartition``) are named tuples: as immutable as a frozen dataclass, and several times cheaper
to build, which matters at a few hundred thousand records a second. The rest are frozen dataclasses.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

from headwater.client.errors import HeadwaterError

__all__ = [
    "Header",
    "TopicPartition",
    "RecordMetadata",
    "ConsumerRecord",
    "OffsetAndTimestamp",
    "NewTopic",
    "PartitionInfo",
    "TopicDescription",
    "ReplicaLag",
    "PartitionReplicas",
    "ConfigEntry",
    "NodeDescription",
    "ClusterDescription",
    "ElectionResult",
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
    """A topic to create. -1 for ``partitions`` or ``replication_factor`` means the node's default;
    0 is refused (InvalidPartitionsError, InvalidReplicationFactorError)."""

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

    @property
    def offline(self) -> bool:
        """No replica leads it: it takes neither produce nor fetch until a leader is elected."""
        return self.leader == -1


@dataclass(frozen=True)
class TopicDescription:
    """A topic with its partitions, ordered by partition index."""

    name: str
    topic_id: uuid.UUID | None
    is_internal: bool
    partitions: tuple[PartitionInfo, ...]


@dataclass(frozen=True)
class ReplicaLag:
    """One replica of a partition as its leader sees it (``Admin.describe_replicas``).

    ``log_end_offset`` is -1 until a follower's first fetch in the current leadership;
    ``caught_up_ms_ago`` is 0 for a replica at the leader's log end."""

    node_id: int
    log_end_offset: int
    lag_records: int
    caught_up_ms_ago: int
    in_isr: bool


@dataclass(frozen=True)
class PartitionReplicas:
    """A partition's leader offsets and each replica's progress, the leader first."""

    topic: str
    partition: int
    leader: int
    leader_epoch: int
    high_watermark: int
    log_start_offset: int
    log_end_offset: int
    replicas: tuple[ReplicaLag, ...]


@dataclass(frozen=True)
class ConfigEntry:
    """One config of a resource. ``source`` is "topic", "node", "default" or "unknown"."""

    name: str
    value: str
    source: str
    read_only: bool = False
    sensitive: bool = False
    documentation: str = ""


@dataclass(frozen=True)
class NodeDescription:
    """A registered node as the metadata quorum knows it. A fenced node leads no partition and is in
    no ISR it could drop out of; ``broker_epoch`` changes each time the node process (re)registers."""

    node_id: int
    host: str
    port: int
    rack: str
    fenced: bool
    broker_epoch: int

    @property
    def address(self) -> str:
        """The node's client (gRPC) endpoint, ``host:port``."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ClusterDescription:
    """The cluster as one voter of the metadata quorum sees it (``answered_by``), from its applied
    metadata. ``controller_id`` is -1 while no active controller is known. ``commit_index`` is the Raft
    commit index, which counts entries that are not metadata commands, so it is not an offset.
    ``cluster_id`` comes from the voter's answer (or, from a voter that does not send it, a Metadata
    request); it is None when neither gave one."""

    cluster_id: str | None
    controller_id: int
    nodes: tuple[NodeDescription, ...]
    answered_by: int
    raft_term: int
    commit_index: int
    metadata_offset: int
    #: Voter node id -> its Raft ``host:port``.
    voters: dict[int, str]

    @property
    def controller(self) -> NodeDescription | None:
        """The active controller's node entry, when it is known and registered as a node."""
        return next((n for n in self.nodes if n.node_id == self.controller_id), None)


@dataclass(frozen=True)
class ElectionResult:
    """One partition's outcome of ``Admin.elect_leaders``: its leader now, or why it has none.

    ``leader_id`` and ``leader_epoch`` are -1 when ``error`` is set. A partition that already had the
    leader the election asked for comes back without an error and with its current leader.
    """

    topic: str
    partition: int
    leader_id: int
    leader_epoch: int
    error: HeadwaterError | None = None
