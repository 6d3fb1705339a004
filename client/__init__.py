"""The Headwater client: Producer, Consumer and Admin over gRPC (imports only ``headwater.v1``)."""

from headwater.client.admin import Admin
from headwater.client.consumer import Consumer
from headwater.client.errors import *  # noqa: F403 - the error tree is part of the public surface
from headwater.client.errors import __all__ as _errors_all
from headwater.client.partitioner import murmur2, partition_for_key
from headwater.client.producer import Producer
from headwater.client.types import (
    ClusterDescription,
    ConfigEntry,
    ConsumerRecord,
    ElectionResult,
    NewTopic,
    NodeDescription,
    OffsetAndTimestamp,
    PartitionInfo,
    PartitionReplicas,
    RecordMetadata,
    ReplicaLag,
    TopicDescription,
    TopicPartition,
)

__all__ = [
    "Producer",
    "Consumer",
    "Admin",
    "NewTopic",
    "TopicPartition",
    "RecordMetadata",
    "ConsumerRecord",
    "OffsetAndTimestamp",
    "TopicDescription",
    "PartitionInfo",
    "PartitionReplicas",
    "ReplicaLag",
    "ConfigEntry",
    "ClusterDescription",
    "NodeDescription",
    "ElectionResult",
    "murmur2",
    "partition_for_key",
    *_errors_all,
]
