"""Connections and the metadata cache shared by Producer, Consumer and Admin.

One gRPC channel per node address, reused for every call to that node. The metadata cache maps
topic -> partitions (leader node id and epoch) and node id -> address; it is refreshed on demand and
whenever a request comes back with a sign that it is stale (NOT_LEADER_OR_FOLLOWER,
UNKNOWN_TOPIC_OR_PARTITION, LEADER_NOT_AVAILABLE, a node that cannot be reached).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from headwater.client.errors import (
    ClientClosedError,
    HeadwaterError,
    NodeNotAvailableError,
    error_for_code,
    error_for_rpc,
)
from headwater.v1 import client_pb2, client_pb2_grpc, errors_pb2

__all__ = ["Cluster", "PartitionMeta", "TopicMeta", "parse_bootstrap", "CHANNEL_OPTIONS"]

_MAX_MESSAGE_BYTES = 128 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Above the node's 64 MiB request bound, so the node, not the client library, says what is too big.
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    # Detects a dead peer under an idle long poll. Not below 5 minutes: a gRPC server with default
    # settings answers more frequent pings with GOAWAY (too_many_pings).
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.enable_retries", 0),
]

# Codes that mean "the cached leader is wrong or unknown": refresh metadata before retrying.
STALE_METADATA_CODES = frozenset(
    {
        errors_pb2.ERROR_CODE_NOT_LEADER_OR_FOLLOWER,
        errors_pb2.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION,
        errors_pb2.ERROR_CODE_LEADER_NOT_AVAILABLE,
        errors_pb2.ERROR_CODE_FENCED_LEADER_EPOCH,
        errors_pb2.ERROR_CODE_UNKNOWN_LEADER_EPOCH,
        errors_pb2.ERROR_CODE_NODE_NOT_AVAILABLE,
        errors_pb2.ERROR_CODE_REPLICA_NOT_AVAILABLE,
        errors_pb2.ERROR_CODE_UNKNOWN_TOPIC_ID,
    }
)

T = TypeVar("T")


def parse_bootstrap(bootstrap: str | Iterable[str]) -> list[str]:
    """``"host:port,host:port"`` (or a list of them) -> ``["host:port", ...]``; raises ValueError."""
    parts = bootstrap.split(",") if isinstance(bootstrap, str) else list(bootstrap)
    out = []
    for raw in parts:
        addr = raw.strip()
        if not addr:
            continue
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bootstrap address {addr!r} is not host:port")
        out.append(addr)
    if not out:
        raise ValueError("bootstrap names no address; expected 'host:port[,host:port...]'")
    return out


@dataclass(frozen=True, slots=True)
class PartitionMeta:
    partition: int
    error_code: int
    leader_id: int
    leader_epoch: int
    partition_epoch: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]
    offline_replicas: tuple[int, ...]


def sorted_partitions(topic: client_pb2.TopicMetadata) -> list[client_pb2.PartitionMetadata]:
    return sorted(topic.partitions, key=lambda p: p.partition)


def partition_fields(
    p: client_pb2.PartitionMetadata,
) -> tuple[int, int, int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """leader_id, leader_epoch, partition_epoch, replicas, isr, offline_replicas of a partition."""
    return (
        p.leader_id,
        p.leader_epoch,
        p.partition_epoch,
        tuple(p.replicas),
        tuple(p.isr),
        tuple(p.offline_replicas),
    )


@dataclass(frozen=True, slots=True)
class TopicMeta:
    name: str
    topic_id: bytes
    is_internal: bool
    partitions: tuple[PartitionMeta, ...]
    #: Partitions with a leader, for the sticky partitioner.
    available: tuple[int, ...]


class Cluster:
    """Channels to the nodes and the cached cluster metadata. Thread safe."""

    def __init__(self, bootstrap: str | Iterable[str], *, request_timeout_s: float = 30.0) -> None:
        self.bootstrap = parse_bootstrap(bootstrap)
        self.request_timeout_s = request_timeout_s
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, client_pb2_grpc.HeadwaterServiceStub] = {}
        # Replaced whole, never mutated in place: readers need no lock.
        self.topics: dict[str, TopicMeta] = {}
        self.nodes: dict[int, str] = {}
        self.controller_id = -1
        self.cluster_id = ""
        self._next_address = 0
        self._closed = False
        self.refresh_requested = False
        self.last_refresh_s = 0.0

    # ------------------------------------------------------------------ connections

    def stub_for_address(self, address: str) -> client_pb2_grpc.HeadwaterServiceStub:
        stub = self._stubs.get(address)
        if stub is not None:
            return stub
        with self._lock:
            if self._closed:
                raise ClientClosedError("the client is closed")
            stub = self._stubs.get(address)
            if stub is None:
                channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._channels[address] = channel
                stub = self._stubs[address] = client_pb2_grpc.HeadwaterServiceStub(channel)  # type: ignore[no-untyped-call]
            return stub

    def produce_stream_for_node(self, node_id: int) -> Callable[[Iterator[bytes]], Iterator[Any]]:
        """``ProduceStream`` on a node's channel, taking requests already serialized (``_wire.py``)."""
        address = self._address_of(node_id)
        self.stub_for_address(address)  # opens the channel, or raises like any call would
        channel = self._channels.get(address)
        if channel is None:
            raise ClientClosedError("the client is closed")
        call: Callable[[Iterator[bytes]], Iterator[Any]] = channel.stream_stream(
            "/headwater.v1.HeadwaterService/ProduceStream",
            request_serializer=None,
            response_deserializer=client_pb2.ProduceStreamResponse.FromString,
        )
        return call

    def stub_for_node(self, node_id: int) -> client_pb2_grpc.HeadwaterServiceStub:
        return self.stub_for_address(self._address_of(node_id))

    def _address_of(self, node_id: int) -> str:
        address = self.nodes.get(node_id)
        if address is None:
            raise NodeNotAvailableError(f"node {node_id} is not in the cluster metadata")
        return address

    def addresses(self) -> list[str]:
        """Every address worth trying, rotating so that load and failures spread over them."""
        known = list(dict.fromkeys([*self.bootstrap, *self.nodes.values()]))
        start = self._next_address % len(known)
        self._next_address += 1
        return known[start:] + known[:start]

    def call_any(self, what: str, call: Callable[[client_pb2_grpc.HeadwaterServiceStub], T]) -> T:
        """Run ``call`` against the first node that answers; gRPC failures become HeadwaterErrors."""
        last: HeadwaterError | None = None
        for address in self.addresses():
            try:
                return call(self.stub_for_address(address))
            except grpc.RpcError as exc:
                last = error_for_rpc(exc, f"{what} to {address}")
                if not isinstance(last, NodeNotAvailableError):
                    raise last from None
        assert last is not None
        raise last

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels = list(self._channels.values())
            self._channels.clear()
            self._stubs.clear()
        for channel in channels:
            channel.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ metadata

    def refresh(self, topics: Iterable[str] | None = None) -> client_pb2.MetadataResponse:
        """Fetch metadata (``None``: every topic) and merge it into the cache."""
        names = sorted(set(topics)) if topics is not None else []
        response: client_pb2.MetadataResponse = self.call_any(
            "Metadata",
            lambda stub: stub.Metadata(
                client_pb2.MetadataRequest(topics=names), timeout=self.request_timeout_s
            ),
        )
        self.apply(response, replace_all=topics is None)
        return response

    def apply(self, response: client_pb2.MetadataResponse, *, replace_all: bool) -> None:
        nodes = {n.node_id: f"{n.host}:{n.port}" for n in response.nodes if not n.fenced}
        topics = {} if replace_all else dict(self.topics)
        for t in response.topics:
            if t.error_code != errors_pb2.ERROR_CODE_NONE:
                topics.pop(t.name, None)
                continue
            parts = tuple(
                PartitionMeta(p.partition, p.error_code, *partition_fields(p)) for p in sorted_partitions(t)
            )
            available = tuple(p.partition for p in parts if p.leader_id >= 0 and p.leader_id in nodes)
            topics[t.name] = TopicMeta(t.name, t.topic_id, t.is_internal, parts, available)
        self.nodes = nodes
        self.topics = topics
        self.controller_id = response.controller_id
        self.cluster_id = response.cluster_id
        self.refresh_requested = False
        self.last_refresh_s = time.monotonic()

    def topic_error(self, response: client_pb2.MetadataResponse, topic: str) -> HeadwaterError | None:
        for t in response.topics:
            if t.name == topic and t.error_code != errors_pb2.ERROR_CODE_NONE:
                return error_for_code(t.error_code, t.error_message or f"topic {topic!r}")
        return None

    def leader(self, topic: str, partition: int) -> int | None:
        """The cached leader's node id, or None when unknown (then ask for a refresh)."""
        meta = self.topics.get(topic)
        if meta is None or partition >= len(meta.partitions):
            return None
        p = meta.partitions[partition]
        if p.leader_id < 0 or p.leader_id not in self.nodes:
            return None
        return p.leader_id

    def leader_epoch(self, topic: str, partition: int) -> int:
        meta = self.topics.get(topic)
        if meta is None or partition >= len(meta.partitions):
            return -1
        return meta.partitions[partition].leader_epoch

    def request_refresh(self) -> None:
        self.refresh_requested = True
