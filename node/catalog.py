"""The node's view of the topics in its metadata image (``raft.metadata.ClusterMetadata``).

The metadata quorum owns topics: names, ids, replica assignments and configs live in its log and
reach every node as a metadata image. ``TopicCatalog`` reads one image by topic name, in the shapes
the broker serves; it never changes a topic itself (that is a command to the active controller).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from headwater.raft.commands import NO_LEADER
from headwater.raft.metadata import (
    MAX_TOPIC_NAME_LENGTH,
    ClusterMetadata,
    NodeRecord,
    TopicRecord,
    topic_name_problem,
)
from headwater.v1 import client_pb2
from headwater.v1 import errors_pb2 as E

__all__ = [
    "TopicInfo",
    "TopicCatalog",
    "validate_topic_name",
    "InvalidTopicName",
    "MAX_TOPIC_NAME_LENGTH",
    "node_infos",
    "add_topic_metadata",
]


def node_infos(image: ClusterMetadata) -> list[client_pb2.NodeInfo]:
    """The registered nodes of an image, by id, as Metadata and DescribeCluster answer them."""
    return [_node_info(n) for n in sorted(image.nodes.values(), key=lambda n: n.node_id)]


def add_topic_metadata(
    resp: client_pb2.MetadataResponse, image: ClusterMetadata, names: Iterable[str]
) -> None:
    """The topics' part of a Metadata answer from an image: ids, then per partition its leader,
    epochs, replicas, ISR and offline replicas (LEADER_NOT_AVAILABLE without a leader)."""
    for name in names:
        t = resp.topics.add(name=name)
        record = image.topic(name)
        if record is None:
            t.error_code = E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
            t.error_message = f"topic {name!r} does not exist"
            continue
        t.topic_id = record.topic_id
        for index, rec in enumerate(record.partitions):
            pm = t.partitions.add(
                partition=index,
                leader_id=rec.leader,
                leader_epoch=rec.leader_epoch,
                partition_epoch=rec.partition_epoch,
                replicas=rec.replicas,
                isr=rec.isr,
                offline_replicas=[r for r in rec.replicas if not image.is_unfenced(r)],
            )
            if rec.leader == NO_LEADER:
                pm.error_code = E.ERROR_CODE_LEADER_NOT_AVAILABLE


def _node_info(n: NodeRecord) -> client_pb2.NodeInfo:
    return client_pb2.NodeInfo(
        node_id=n.node_id, host=n.host, port=n.port, rack=n.rack, fenced=n.fenced, broker_epoch=n.broker_epoch
    )


class InvalidTopicName(ValueError):
    """A topic name breaks Kafka's rules."""


def validate_topic_name(name: str) -> None:
    """Kafka's rules, as the metadata state machine applies them (``raft.metadata.topic_name_problem``)."""
    problem = topic_name_problem(name)
    if problem:
        raise InvalidTopicName(problem)


@dataclass(frozen=True)
class TopicInfo:
    name: str
    topic_id: bytes
    partition_count: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def of(record: TopicRecord) -> TopicInfo:
        return TopicInfo(
            name=record.name,
            topic_id=record.topic_id,
            partition_count=len(record.partitions),
            replication_factor=len(record.partitions[0].replicas) if record.partitions else 0,
            configs=dict(record.configs),
        )


class TopicCatalog:
    """Topics by name in one metadata image; replaced whole when the image moves."""

    def __init__(self, image: ClusterMetadata, cluster_id: str) -> None:
        self.image = image
        self.cluster_id = cluster_id
        self._infos: dict[str, TopicInfo] = {}

    def __len__(self) -> int:
        return len(self.image.topic_ids)

    def __iter__(self) -> Iterator[TopicInfo]:
        for name in sorted(self.image.topic_ids):
            info = self.get(name)
            assert info is not None
            yield info

    def get(self, name: str) -> TopicInfo | None:
        info = self._infos.get(name)
        if info is None:
            record = self.image.topic(name)
            if record is None:
                return None
            info = self._infos[name] = TopicInfo.of(record)
        return info

    def record(self, name: str) -> TopicRecord | None:
        return self.image.topic(name)
