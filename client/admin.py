"""The admin client: create, delete, list and describe topics; read and change their configs.

Each call is one synchronous request to a node that answers (any node for now; the active controller
once the metadata quorum lands). Per-topic errors come back as exceptions from ``errors``; calls that
act on several topics raise the first error by default, or return it per topic with
``raise_on_error=False``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from types import TracebackType

from headwater.client._checks import require_positive
from headwater.client._cluster import Cluster, partition_fields, sorted_partitions
from headwater.client.errors import HeadwaterError, UnknownTopicOrPartitionError, error_for_code
from headwater.client.types import ConfigEntry, NewTopic, PartitionInfo, TopicDescription
from headwater.v1 import client_pb2, errors_pb2

__all__ = ["Admin"]

_SOURCES = {
    client_pb2.CONFIG_SOURCE_TOPIC: "topic",
    client_pb2.CONFIG_SOURCE_NODE: "node",
    client_pb2.CONFIG_SOURCE_DEFAULT: "default",
}


def _topic_id(raw: bytes) -> uuid.UUID | None:
    return uuid.UUID(bytes=raw) if len(raw) == 16 else None


class Admin:
    """Manages topics and their configs. Thread safe; close it (or use ``with``) when done."""

    def __init__(self, bootstrap: str | Iterable[str], *, request_timeout_ms: int = 30_000) -> None:
        require_positive(request_timeout_ms=request_timeout_ms)
        self._timeout_ms = request_timeout_ms
        self._timeout_s = request_timeout_ms / 1000
        self._cluster = Cluster(bootstrap, request_timeout_s=self._timeout_s)

    def create_topics(
        self,
        new_topics: Iterable[NewTopic],
        *,
        validate_only: bool = False,
        raise_on_error: bool = True,
    ) -> dict[str, uuid.UUID | None | HeadwaterError]:
        """Create topics; returns name -> topic id (None with ``validate_only``) or the topic's error.

        With ``raise_on_error`` (the default) the first per-topic error is raised instead, after the
        node has handled every topic of the request (so the others may have been created).
        """
        request = client_pb2.CreateTopicsRequest(timeout_ms=self._timeout_ms, validate_only=validate_only)
        for t in new_topics:
            request.topics.add(
                name=t.name,
                num_partitions=t.partitions,
                replication_factor=t.replication_factor,
                configs={k: str(v) for k, v in t.config.items()},
                assignments=[
                    client_pb2.ReplicaAssignment(partition=p, replicas=r)
                    for p, r in sorted(t.replica_assignments.items())
                ],
            )
        response = self._cluster.call_any(
            "CreateTopics", lambda stub: stub.CreateTopics(request, timeout=self._timeout_s)
        )
        out: dict[str, uuid.UUID | None | HeadwaterError] = {}
        for r in response.topics:
            if r.error_code != errors_pb2.ERROR_CODE_NONE:
                out[r.name] = error_for_code(r.error_code, r.error_message or f"topic {r.name!r}")
            else:
                out[r.name] = _topic_id(r.topic_id)
        return self._maybe_raise(out, raise_on_error)

    def delete_topics(
        self, names: Iterable[str], *, raise_on_error: bool = True
    ) -> dict[str, HeadwaterError | None]:
        """Delete topics; returns name -> None (deleted) or the topic's error (see ``create_topics``)."""
        request = client_pb2.DeleteTopicsRequest(names=list(names), timeout_ms=self._timeout_ms)
        response = self._cluster.call_any(
            "DeleteTopics", lambda stub: stub.DeleteTopics(request, timeout=self._timeout_s)
        )
        out: dict[str, HeadwaterError | None] = {}
        for r in response.topics:
            out[r.name] = (
                error_for_code(r.error_code, r.error_message or f"topic {r.name!r}")
                if r.error_code != errors_pb2.ERROR_CODE_NONE
                else None
            )
        return self._maybe_raise(out, raise_on_error)

    def list_topics(self, *, include_internal: bool = False) -> list[str]:
        """Topic names, sorted."""
        response = self._metadata([])
        return sorted(t.name for t in response.topics if include_internal or not t.is_internal)

    def describe_topics(self, names: Iterable[str] | None = None) -> list[TopicDescription]:
        """Topics with their partitions (leader, epochs, replicas, ISR); None: every topic.

        Raises the error of the first named topic that cannot be described (e.g. it does not exist).
        """
        wanted = list(names) if names is not None else []
        response = self._metadata(wanted)
        out = []
        for t in response.topics:
            if t.error_code != errors_pb2.ERROR_CODE_NONE:
                raise error_for_code(t.error_code, t.error_message or f"topic {t.name!r}")
            parts = tuple(PartitionInfo(p.partition, *partition_fields(p)) for p in sorted_partitions(t))
            out.append(TopicDescription(t.name, _topic_id(t.topic_id), t.is_internal, parts))
        missing = set(wanted) - {d.name for d in out}
        if missing:
            raise UnknownTopicOrPartitionError(f"topic {sorted(missing)[0]!r} does not exist")
        if wanted:
            order = {n: i for i, n in enumerate(wanted)}
            out.sort(key=lambda d: order[d.name])
        else:
            out.sort(key=lambda d: d.name)
        return out

    def describe_configs(self, topic: str, names: Iterable[str] | None = None) -> dict[str, ConfigEntry]:
        """The topic's configs (``names``: only these), each with its value and where it comes from."""
        request = client_pb2.DescribeConfigsRequest(
            resources=[
                client_pb2.ConfigResource(
                    resource_type=client_pb2.RESOURCE_TYPE_TOPIC,
                    resource_name=topic,
                    config_names=list(names or []),
                )
            ]
        )
        response = self._cluster.call_any(
            "DescribeConfigs", lambda stub: stub.DescribeConfigs(request, timeout=self._timeout_s)
        )
        for r in response.results:
            if r.error_code != errors_pb2.ERROR_CODE_NONE:
                raise error_for_code(r.error_code, r.error_message or f"topic {topic!r}")
            return {
                e.name: ConfigEntry(
                    e.name,
                    e.value,
                    _SOURCES.get(e.source, "unknown"),
                    e.read_only,
                    e.sensitive,
                    e.documentation,
                )
                for e in r.entries
            }
        raise UnknownTopicOrPartitionError(f"no config result for topic {topic!r}")

    def alter_configs(
        self, topic: str, configs: Mapping[str, str | int | None], *, validate_only: bool = False
    ) -> None:
        """Set configs of a topic (a value) or delete them back to the default (None); incremental."""
        request = client_pb2.AlterConfigsRequest(validate_only=validate_only)
        resource = request.resources.add(resource_type=client_pb2.RESOURCE_TYPE_TOPIC, resource_name=topic)
        for name, value in configs.items():
            if value is None:
                resource.configs.add(name=name, op=client_pb2.ALTER_CONFIG_OP_DELETE)
            else:
                resource.configs.add(name=name, op=client_pb2.ALTER_CONFIG_OP_SET, value=str(value))
        response = self._cluster.call_any(
            "AlterConfigs", lambda stub: stub.AlterConfigs(request, timeout=self._timeout_s)
        )
        for r in response.results:
            if r.error_code != errors_pb2.ERROR_CODE_NONE:
                raise error_for_code(r.error_code, r.error_message or f"topic {topic!r}")

    def close(self) -> None:
        self._cluster.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _metadata(self, names: list[str]) -> client_pb2.MetadataResponse:
        response: client_pb2.MetadataResponse = self._cluster.call_any(
            "Metadata",
            lambda stub: stub.Metadata(client_pb2.MetadataRequest(topics=names), timeout=self._timeout_s),
        )
        return response

    @staticmethod
    def _maybe_raise(out: dict, raise_on_error: bool) -> dict:  # type: ignore[type-arg]
        if raise_on_error:
            for value in out.values():
                if isinstance(value, HeadwaterError):
                    raise value
        return out
