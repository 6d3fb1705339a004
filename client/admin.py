"""The admin client: topics and their configs, and the cluster operations of the metadata quorum.

Topic calls are one synchronous request to a node that answers. Per-topic errors come back as
exceptions from ``errors``; calls that act on several topics raise the first error by default, or
return it per topic with ``raise_on_error=False``.

Cluster calls speak ``ControllerService``, which every node serves on its client port.
``describe_cluster`` takes the answer of any voter (each answers from its own applied metadata).
``elect_leaders`` must reach the active controller: a voter that is not it answers NOT_CONTROLLER with
a hint naming it, which the client follows, at most ``_MAX_CONTROLLER_HOPS`` hints in a row; when the
hints run out (an election under way) it backs off and tries every known node again, until the
request timeout.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Protocol, TypeVar

import grpc

from headwater.client._checks import require_positive
from headwater.client._cluster import CHANNEL_OPTIONS, Cluster, partition_fields, sorted_partitions
from headwater.client.errors import (
    ClientClosedError,
    HeadwaterError,
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    NodeNotAvailableError,
    RequestTimedOutError,
    UnknownTopicOrPartitionError,
    error_for_code,
    error_for_rpc,
)
from headwater.client.types import (
    ClusterDescription,
    ConfigEntry,
    ElectionResult,
    NewTopic,
    NodeDescription,
    PartitionInfo,
    PartitionReplicas,
    ReplicaLag,
    TopicDescription,
    TopicPartition,
)
from headwater.v1 import client_pb2, controller_pb2, controller_pb2_grpc, errors_pb2

__all__ = ["Admin"]

# Hints followed in a row before the client backs off: a hint names the controller a voter last heard
# of, which can be stale for a moment around an election, so two voters may point at each other.
_MAX_CONTROLLER_HOPS = 3
# Backoff between rounds over the known nodes while no voter names a reachable active controller.
_CONTROLLER_BACKOFF_MIN_S = 0.05
_CONTROLLER_BACKOFF_MAX_S = 1.0

_SOURCES = {
    client_pb2.CONFIG_SOURCE_TOPIC: "topic",
    client_pb2.CONFIG_SOURCE_NODE: "node",
    client_pb2.CONFIG_SOURCE_DEFAULT: "default",
}


def _topic_id(raw: bytes) -> uuid.UUID | None:
    return uuid.UUID(bytes=raw) if len(raw) == 16 else None


class _ControllerAnswer(Protocol):
    """What every ControllerService response carries besides its own fields."""

    @property
    def error_code(self) -> int: ...

    @property
    def error_message(self) -> str: ...

    @property
    def controller(self) -> controller_pb2.ControllerHint: ...


A = TypeVar("A", bound=_ControllerAnswer)
_ControllerCall = Callable[[controller_pb2_grpc.ControllerServiceStub, float], A]


def _controller_rpc_error(exc: grpc.RpcError, what: str) -> HeadwaterError:
    """A gRPC failure of a ControllerService call; a node without that service is "not available"."""
    if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
        return NodeNotAvailableError(f"{what} failed: the node does not serve the controller API")
    return error_for_rpc(exc, what)


def _zero_count_error(t: NewTopic) -> HeadwaterError | None:
    """The error for a topic asking for 0 partitions or 0 replicas, refused here: on the wire 0 is
    what proto3 sends for a field left out, and the node reads it as its default (client.proto)."""
    if t.partitions == 0 and not t.replica_assignments:
        return InvalidPartitionsError(f"topic {t.name!r}: 0 partitions; -1 asks for the node's default")
    if t.replication_factor == 0 and not t.replica_assignments:
        return InvalidReplicationFactorError(
            f"topic {t.name!r}: replication factor 0; -1 asks for the node's default"
        )
    return None


class Admin:
    """Manages topics, their configs and partition leadership, and describes the cluster.

    Thread safe; close it (or use ``with``) when done. ``request_timeout_ms`` bounds each call,
    including the retries of a call to the active controller.
    """

    def __init__(self, bootstrap: str | Iterable[str], *, request_timeout_ms: int = 30_000) -> None:
        require_positive(request_timeout_ms=request_timeout_ms)
        self._timeout_ms = request_timeout_ms
        self._timeout_s = request_timeout_ms / 1000
        self._cluster = Cluster(bootstrap, request_timeout_s=self._timeout_s)
        # ControllerService stubs by address, on channels of their own; guarded by _lock.
        self._lock = threading.Lock()
        self._controller_channels: dict[str, grpc.Channel] = {}
        self._controller_stubs: dict[str, controller_pb2_grpc.ControllerServiceStub] = {}
        self._closed = threading.Event()
        # Where the active controller answered last; a plain reference, read and replaced whole.
        self._controller_address: str | None = None

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
        out: dict[str, uuid.UUID | None | HeadwaterError] = {}
        for t in new_topics:
            refused = _zero_count_error(t)
            if refused is not None:
                out[t.name] = refused
                continue
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
        if not request.topics:
            return self._maybe_raise(out, raise_on_error)
        response = self._cluster.call_any(
            "CreateTopics", lambda stub: stub.CreateTopics(request, timeout=self._timeout_s)
        )
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

    # ------------------------------------------------------------------ cluster

    def describe_cluster(self) -> ClusterDescription:
        """The registered nodes (fenced or not), the active controller, and the Raft state of the
        voter that answered: any voter answers, from its own applied metadata.

        ``cluster_id`` comes with the voter's answer; from a voter that does not send it, it comes
        from a Metadata request to any node, and is None when none answers that.
        """
        answer: controller_pb2.DescribeClusterResponse = self._call_controller(
            "DescribeCluster",
            lambda stub, timeout_s: stub.DescribeCluster(
                controller_pb2.DescribeClusterRequest(), timeout=timeout_s
            ),
            active_only=False,
        )
        cluster_id: str | None = answer.cluster_id or None
        if cluster_id is None:
            try:
                cluster_id = self._metadata([]).cluster_id or None
            except HeadwaterError:
                cluster_id = None
        nodes = tuple(
            NodeDescription(n.node_id, n.host, n.port, n.rack, n.fenced, n.broker_epoch)
            for n in sorted(answer.nodes, key=lambda n: n.node_id)
        )
        return ClusterDescription(
            cluster_id=cluster_id,
            controller_id=answer.controller_id,
            nodes=nodes,
            answered_by=answer.answered_by,
            raft_term=answer.raft_term,
            commit_index=answer.commit_index,
            metadata_offset=answer.metadata_offset,
            voters=dict(sorted(answer.voters.items())),
        )

    def describe_replicas(self, topics: Iterable[str] | None = None) -> list[PartitionReplicas]:
        """Each partition's replicas as its leader sees them: log end offset, lag, ISR membership.

        Every unfenced node of the metadata is asked for the partitions it leads; a node that does
        not answer leaves its partitions out (an offline partition has no leader to ask). Sorted by topic and
        partition. ``topics``: only these (None: every topic).
        """
        wanted = list(topics or [])
        nodes = self._metadata(wanted).nodes
        request = client_pb2.DescribeReplicasRequest(topics=wanted)
        out: dict[tuple[str, int], PartitionReplicas] = {}
        for node in sorted(nodes, key=lambda n: n.node_id):
            if node.fenced:  # leads nothing, and may not answer
                continue
            try:
                stub = self._cluster.stub_for_address(f"{node.host}:{node.port}")
                answer = stub.DescribeReplicas(request, timeout=self._timeout_s)
            except grpc.RpcError:
                continue
            for p in answer.partitions:
                replicas = tuple(
                    ReplicaLag(r.node_id, r.log_end_offset, r.lag_records, r.caught_up_ms_ago, r.in_isr)
                    for r in p.replicas
                )
                found = PartitionReplicas(
                    p.topic,
                    p.partition,
                    p.leader_id,
                    p.leader_epoch,
                    p.high_watermark,
                    p.log_start_offset,
                    p.log_end_offset,
                    replicas,
                )
                # Two nodes may both still think they lead right after a change: the newer epoch wins.
                known = out.get((p.topic, p.partition))
                if known is None or known.leader_epoch < found.leader_epoch:
                    out[(p.topic, p.partition)] = found
        return [out[k] for k in sorted(out)]

    def elect_leaders(
        self,
        partitions: Iterable[tuple[str, int]] | None = None,
        *,
        preferred: bool = False,
        raise_on_error: bool = True,
    ) -> dict[tuple[str, int], ElectionResult]:
        """Elect partition leaders through the active controller; returns (topic, partition) -> result.

        ``preferred``: move leadership to each partition's first replica, when that replica is in the
        ISR and unfenced (Kafka's preferred election). Otherwise: give each partition without a
        leader the first unfenced ISR member. ``partitions`` None means every partition that needs
        such an election, as the controller sees them. A partition that already has the wanted
        leader comes back without an error.

        With ``raise_on_error`` (the default) the first partition's error is raised, after the
        controller has handled the others. A topic that does not exist is
        ``UnknownTopicOrPartitionError``.
        """
        request = controller_pb2.ElectLeadersRequest(preferred=preferred)
        out: dict[tuple[str, int], ElectionResult] = {}
        wanted: list[TopicPartition] = []
        names: dict[bytes, str] = {}
        if partitions is not None:
            wanted = list(dict.fromkeys(TopicPartition(t, p) for t, p in partitions))
            if not wanted:
                return {}
            ids, errors = self._topic_ids(sorted({tp.topic for tp in wanted}))
            names = {tid: name for name, tid in ids.items()}
            for tp in wanted:
                tid = ids.get(tp.topic)
                if tid is None:
                    missing = errors.get(tp.topic) or UnknownTopicOrPartitionError(
                        f"topic {tp.topic!r} does not exist"
                    )
                    out[tp] = ElectionResult(tp.topic, tp.partition, -1, -1, missing)
                else:
                    request.partitions.add(topic_id=tid, partition=tp.partition)
            # Never send an empty list: the controller reads it as "every partition".
            if not request.partitions:
                return self._raise_election_error(out, raise_on_error)
        answer: controller_pb2.ElectLeadersResponse = self._call_controller(
            "ElectLeaders",
            lambda stub, timeout_s: stub.ElectLeaders(request, timeout=timeout_s),
            active_only=True,
        )
        if partitions is None:
            # The controller chose the partitions: name them from metadata read after its answer.
            ids, _ = self._topic_ids([])
            names = {tid: name for name, tid in ids.items()}
        for r in answer.results:
            name = names.get(r.topic_id)
            if name is None:
                continue  # a topic the answering node does not know: deleted since, or not there yet
            error: HeadwaterError | None = (
                error_for_code(r.error_code, r.error_message or f"partition {name}-{r.partition}")
                if r.error_code != errors_pb2.ERROR_CODE_NONE
                else None
            )
            tp = TopicPartition(name, r.partition)
            out[tp] = ElectionResult(name, r.partition, r.leader_id, r.leader_epoch, error)
        if wanted:
            out = {tp: out[tp] for tp in wanted if tp in out}
        else:
            out = dict(sorted(out.items()))
        return self._raise_election_error(out, raise_on_error)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close every channel; calls under way end with ``ClientClosedError`` or a gRPC failure."""
        with self._lock:
            self._closed.set()
            channels = list(self._controller_channels.values())
            self._controller_channels.clear()
            self._controller_stubs.clear()
        for channel in channels:
            channel.close()
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

    def _topic_ids(self, names: list[str]) -> tuple[dict[str, bytes], dict[str, HeadwaterError]]:
        """Topic name -> id (``names`` empty: every topic), and the error of each topic without one."""
        response = self._metadata(names)
        ids: dict[str, bytes] = {}
        errors: dict[str, HeadwaterError] = {}
        for t in response.topics:
            if t.error_code != errors_pb2.ERROR_CODE_NONE:
                errors[t.name] = error_for_code(t.error_code, t.error_message or f"topic {t.name!r}")
            elif len(t.topic_id) == 16:
                ids[t.name] = t.topic_id
        return ids, errors

    def _controller_stub(self, address: str) -> controller_pb2_grpc.ControllerServiceStub:
        with self._lock:
            if self._closed.is_set():
                raise ClientClosedError("the admin client is closed")
            stub = self._controller_stubs.get(address)
            if stub is None:
                channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._controller_channels[address] = channel
                stub = controller_pb2_grpc.ControllerServiceStub(channel)  # type: ignore[no-untyped-call]
                self._controller_stubs[address] = stub
            return stub

    def _call_controller(self, what: str, call: _ControllerCall[A], *, active_only: bool) -> A:
        """Run ``call`` (given a stub and the time left) until a node answers without an error.

        ``active_only``: the call needs the active controller, so the last one that answered is tried
        first. A NOT_CONTROLLER answer is followed to the controller its hint names (at most
        ``_MAX_CONTROLLER_HOPS`` in a row, never back to a node that refused in this round); an
        unreachable node, or one without the controller API, is skipped. After a round that found no
        controller the client backs off (doubling, up to ``_CONTROLLER_BACKOFF_MAX_S``, and never
        more than half the time left) and starts over, until the request timeout; then the last
        refusal is raised. Any other error is raised at once.
        """
        deadline = time.monotonic() + self._timeout_s
        backoff_s = _CONTROLLER_BACKOFF_MIN_S
        last: HeadwaterError | None = None
        while True:
            cached = self._controller_address if active_only else None
            pending = list(dict.fromkeys([*([cached] if cached else []), *self._cluster.addresses()]))
            tried: set[str] = set()
            hops = 0
            while pending:
                address = pending.pop(0)
                if address in tried:
                    continue
                tried.add(address)
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    break
                try:
                    answer = call(self._controller_stub(address), remaining_s)
                except grpc.RpcError as exc:
                    last = _controller_rpc_error(exc, f"{what} to {address}")
                    if not isinstance(last, NodeNotAvailableError):
                        raise last from None
                    self._forget_controller(address)
                    continue
                if answer.error_code == errors_pb2.ERROR_CODE_NONE:
                    if active_only:
                        self._controller_address = address
                    return answer
                last = error_for_code(answer.error_code, answer.error_message or f"{what} to {address}")
                if answer.error_code != errors_pb2.ERROR_CODE_NOT_CONTROLLER:
                    raise last
                self._forget_controller(address)
                target = answer.controller.controller_address
                if target and target not in tried and hops < _MAX_CONTROLLER_HOPS:
                    hops += 1
                    pending.insert(0, target)
            remaining_s = deadline - time.monotonic()
            if remaining_s < _CONTROLLER_BACKOFF_MIN_S:
                if last is not None:
                    raise last
                raise RequestTimedOutError(f"{what}: no node answered within {self._timeout_ms} ms")
            # At most half of what is left, so a last round still runs before the deadline.
            if self._closed.wait(min(backoff_s, remaining_s / 2)):
                raise ClientClosedError("the admin client is closed")
            backoff_s = min(backoff_s * 2, _CONTROLLER_BACKOFF_MAX_S)

    def _forget_controller(self, address: str) -> None:
        if self._controller_address == address:
            self._controller_address = None

    @staticmethod
    def _raise_election_error(
        out: dict[tuple[str, int], ElectionResult], raise_on_error: bool
    ) -> dict[tuple[str, int], ElectionResult]:
        if raise_on_error:
            for result in out.values():
                if result.error is not None:
                    raise result.error
        return out

    @staticmethod
    def _maybe_raise(out: dict, raise_on_error: bool) -> dict:  # type: ignore[type-arg]
        if raise_on_error:
            for value in out.values():
                if isinstance(value, HeadwaterError):
                    raise value
        return out
