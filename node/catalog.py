"""The node's topic catalog: names, ids, partition counts and configs, persisted in the node's store.

On one node this is the whole of the cluster metadata. The metadata quorum (``headwater.raft``)
takes this role over when a cluster has several nodes; the shapes here match its records.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

from headwater.raft.metadata import MAX_TOPIC_NAME_LENGTH, topic_name_problem

__all__ = ["TopicInfo", "TopicCatalog", "validate_topic_name", "InvalidTopicName", "MAX_TOPIC_NAME_LENGTH"]

_TOPIC_KEY = b"catalog/topic/"
_CLUSTER_ID_KEY = b"catalog/cluster_id"


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

    def encode(self) -> bytes:
        return json.dumps(
            {
                "version": 1,
                "name": self.name,
                "topic_id": self.topic_id.hex(),
                "partition_count": self.partition_count,
                "replication_factor": self.replication_factor,
                "configs": self.configs,
            },
            sort_keys=True,
        ).encode()

    @staticmethod
    def decode(raw: bytes) -> TopicInfo:
        d = json.loads(raw)
        return TopicInfo(
            name=d["name"],
            topic_id=bytes.fromhex(d["topic_id"]),
            partition_count=int(d["partition_count"]),
            replication_factor=int(d["replication_factor"]),
            configs={str(k): str(v) for k, v in d["configs"].items()},
        )


class _MetaStore(Protocol):
    def put_meta(self, key: bytes, value: bytes) -> None: ...
    def get_meta(self, key: bytes) -> bytes | None: ...
    def delete_meta(self, key: bytes) -> None: ...
    def iter_meta(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]: ...


class TopicCatalog:
    """Topics by name, loaded from and written through to the store (each change is synced first)."""

    def __init__(self, store: _MetaStore) -> None:
        self._store = store
        self._topics: dict[str, TopicInfo] = {}
        for _, raw in store.iter_meta(_TOPIC_KEY):
            info = TopicInfo.decode(raw)
            self._topics[info.name] = info
        raw_id = store.get_meta(_CLUSTER_ID_KEY)
        if raw_id is None:
            raw_id = uuid.uuid4().hex.encode()
            store.put_meta(_CLUSTER_ID_KEY, raw_id)
        self.cluster_id = raw_id.decode()

    def __len__(self) -> int:
        return len(self._topics)

    def __iter__(self) -> Iterator[TopicInfo]:
        return iter(sorted(self._topics.values(), key=lambda t: t.name))

    def get(self, name: str) -> TopicInfo | None:
        return self._topics.get(name)

    def create(
        self,
        name: str,
        partition_count: int,
        replication_factor: int,
        configs: dict[str, str],
        topic_id: bytes | None = None,
    ) -> TopicInfo:
        assert name not in self._topics
        topic_id = topic_id or uuid.uuid4().bytes
        info = TopicInfo(name, topic_id, partition_count, replication_factor, dict(configs))
        self._store.put_meta(_TOPIC_KEY + name.encode(), info.encode())  # synced before the caller answers
        self._topics[name] = info
        return info

    def delete(self, name: str) -> TopicInfo:
        info = self._topics[name]
        self._store.delete_meta(_TOPIC_KEY + name.encode())
        del self._topics[name]
        return info

    def set_configs(self, name: str, configs: dict[str, str]) -> TopicInfo:
        info = replace(self._topics[name], configs=dict(configs))
        self._store.put_meta(_TOPIC_KEY + name.encode(), info.encode())
        self._topics[name] = info
        return info
