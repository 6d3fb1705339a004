"""``ClusterMetadata``: the pure, deterministic state machine of the metadata quorum.

It holds the cluster's nodes, topics and partitions (replicas, ISR, leader, epochs), topic configs
and the producer-id counter, and changes only through ``apply(command)``. Applying a command never
reads a clock, draws a random number or does I/O, so every voter that applies the same log holds the
same state (``to_snapshot()`` bytes are equal). Time-based decisions, such as a lease running out,
are the active controller's; it commits them as commands.

Rules, after Kafka's KRaft controller (KIP-500, KIP-631, KIP-841):

- ``metadata_offset`` is the offset of the last applied command; the first command has offset 0.
  Every command advances it by one, rejected ones too: a rejected command is still an entry of the
  Raft log, and keeping offset == log position lets brokers follow the metadata by offset and lets a
  snapshot say exactly which entry it includes.
- ``broker_epoch`` is the offset of the node's ``RegisterNode`` (as in KRaft), so a restarted node
  (new ``incarnation_id``) gets a larger one and requests carrying the old one are refused with
  ``STALE_BROKER_EPOCH``. Re-registering the same incarnation is idempotent. A node registers fenced.
- ``leader_epoch`` bumps on every leader change; ``partition_epoch`` on every partition change.
- Fencing a node takes it out of every ISR that has other members (KIP-841 keeps the last member, so
  the partition remembers who had the data) and moves its leaderships to the first unfenced ISR
  member in replica order; with none the partition goes offline (leader -1), unless the topic sets
  ``unclean_leader_election_enable``. A fenced node never leads. An ISR with more than one member
  holds only unfenced nodes.
- A rejected command changes nothing but ``metadata_offset``; its ``Result`` says why.
- A topic change forwarded from another node (``CreateTopic``, ``DeleteTopic``, ``AlterConfigs``
  with a ``request_id``) is remembered with its answer, per topic, for the last
  ``MAX_RECENT_REQUESTS`` of them (oldest forgotten first). A command that carries a remembered
  ``(request_id, name)`` changes nothing and gets the first answer: the forwarding node may resend
  a request whose answer it lost (a timeout, a controller change), and every voter that applied the
  first one answers the resend the same way, whichever of them is the controller by then
  (KIP-590's forwarding, made safe to retry like an idempotent producer's batch).
- An ``AlterPartition`` with a ``request_id`` is remembered the same way, per partition (the key's
  subject is ``partition_subject(topic_id, partition)``, which no topic name can equal), answer and
  partition state included, in the same bounded memory. A copy that arrives later gets the first
  answer before any epoch is compared and changes nothing, even when the epochs would allow it now:
  a partition leader drops a change the controller refused (as Kafka does), and that is safe only if
  no copy of the refused request is applied after the refusal, whichever voter is the controller.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from headwater.config import TOPIC_CONFIGS, ConfigError, normalize_config_name, validate_topic_configs
from headwater.v1 import errors_pb2

from .commands import (
    NO_LEADER,
    AllocateProducerIds,
    AlterConfigs,
    AlterPartition,
    Command,
    CreateTopic,
    DeleteTopic,
    ElectLeader,
    FenceNode,
    RegisterNode,
    UnfenceNode,
    malformed_reason,
)

__all__ = [
    "ClusterMetadata",
    "Result",
    "NodeRecord",
    "PartitionRecord",
    "TopicRecord",
    "SnapshotError",
    "SNAPSHOT_VERSION",
    "MAX_PRODUCER_ID_BLOCK",
    "FIRST_PRODUCER_ID",
    "place_replicas",
    "choose_leader",
    "topic_name_problem",
    "MAX_TOPIC_NAME_LENGTH",
    "RequestAnswer",
    "MAX_RECENT_REQUESTS",
    "MAX_REQUEST_ID_LENGTH",
    "partition_subject",
]

E = errors_pb2
SNAPSHOT_VERSION = 1
# Largest producer-id block one command may take (Kafka hands out 1000 at a time).
MAX_PRODUCER_ID_BLOCK = 1_000_000
# Producer ids are allocated from 1: 0 is what a producer that never set one sends (proto3's default),
# and it means "no producer id", as -1 does (records.proto).
FIRST_PRODUCER_ID = 1
_MAX_PRODUCER_ID = 2**63 - 1
_TOPIC_ID_LENGTH = 16
MAX_TOPIC_NAME_LENGTH = 249
_LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]+")
_UNCLEAN = "unclean_leader_election_enable"
# Forwarded topic changes remembered with their answers (one entry per topic of a request). Part of
# the replicated state, so a constant, the same on every voter, not a node setting. A forwarding
# node resends within its request's timeout, long before this many later topic changes.
MAX_RECENT_REQUESTS = 4096
# Longest request id: the forwarding node's id and a UUID fit with room to spare.
MAX_REQUEST_ID_LENGTH = 64


class SnapshotError(ValueError):
    """Snapshot bytes that are not a snapshot this version can read."""


@dataclass(frozen=True, slots=True)
class Result:
    """What applying one command did. ``ok`` False means nothing changed; ``error_code`` says why."""

    ok: bool
    error_code: int
    message: str
    # Offset of the command in the metadata log.
    metadata_offset: int
    # RegisterNode: the node's broker epoch.
    broker_epoch: int = -1
    # AlterPartition and ElectLeader: the partition as it now is.
    leader_id: int = NO_LEADER
    leader_epoch: int = -1
    partition_epoch: int = -1
    isr: tuple[int, ...] = ()
    # AllocateProducerIds: ids [producer_id_start, producer_id_start + producer_id_count).
    producer_id_start: int = -1
    producer_id_count: int = 0


@dataclass(frozen=True, slots=True)
class RequestAnswer:
    """The first answer to one topic of a forwarded request, or to one partition of an
    ``AlterPartition`` (see the module docstring)."""

    error_code: int
    message: str
    # CreateTopic and DeleteTopic: the topic's id (a DeleteTopic's answer needs it once it is gone).
    topic_id: bytes
    # Offset of the command that gave this answer.
    metadata_offset: int
    # AlterPartition: the partition as that command left it (the defaults when it was refused).
    leader_id: int = NO_LEADER
    leader_epoch: int = -1
    partition_epoch: int = -1
    isr: tuple[int, ...] = ()

    @property
    def has_partition(self) -> bool:
        """Whether the partition fields differ from their defaults (they then go in the snapshot)."""
        return (self.leader_id, self.leader_epoch, self.partition_epoch, self.isr) != (NO_LEADER, -1, -1, ())

    def result(self, metadata_offset: int) -> Result:
        """This answer again, as the ``Result`` of a later command at ``metadata_offset``."""
        return Result(
            self.error_code == E.ERROR_CODE_NONE,
            self.error_code,
            self.message,
            metadata_offset,
            leader_id=self.leader_id,
            leader_epoch=self.leader_epoch,
            partition_epoch=self.partition_epoch,
            isr=self.isr,
        )


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: int
    incarnation_id: bytes
    host: str
    port: int
    rack: str
    # Offset of the RegisterNode that gave this incarnation its place; grows on every registration.
    broker_epoch: int
    fenced: bool


@dataclass(frozen=True, slots=True)
class PartitionRecord:
    # Ordered; the first is the preferred leader.
    replicas: tuple[int, ...]
    # In replica order; never empty; a subset of replicas.
    isr: tuple[int, ...]
    # In isr and unfenced, or NO_LEADER.
    leader: int
    leader_epoch: int
    partition_epoch: int


@dataclass(frozen=True, slots=True)
class TopicRecord:
    name: str
    topic_id: bytes
    partitions: tuple[PartitionRecord, ...]
    # Sorted by name, names normalised.
    configs: tuple[tuple[str, str], ...]

    def config(self, name: str) -> str | None:
        for k, v in self.configs:
            if k == name:
                return v
        return None

    def unclean_allowed(self) -> bool:
        return self.config(_UNCLEAN) == "true"


# ------------------------------------------------------------------ pure helpers for the controller


def choose_leader(
    replicas: Sequence[int],
    isr: Sequence[int],
    unfenced: Iterable[int] | Mapping[int, Any],
    unclean_allowed: bool,
) -> tuple[int, tuple[int, ...]]:
    """The leader to elect and the ISR that goes with it: ``(NO_LEADER, isr)`` when there is none.

    The first unfenced ISR member in replica order (so the preferred replica wins when eligible).
    Failing that, and only when unclean election is allowed, the first unfenced replica, with an ISR
    of just itself (records only it had may be lost, as in Kafka).
    """
    live = set(unfenced)
    in_isr = set(isr)
    for r in replicas:
        if r in in_isr and r in live:
            return r, tuple(isr)
    if unclean_allowed:
        for r in replicas:
            if r in live:
                return r, (r,)
    return NO_LEADER, tuple(isr)


def _replica_index(first: int, shift: int, j: int, n: int) -> int:
    return (first + 1 + (shift + j) % (n - 1)) % n


def place_replicas(
    partitions: int,
    replication_factor: int,
    nodes: Sequence[tuple[int, str]],
    start_index: int,
) -> tuple[tuple[int, ...], ...]:
    """Kafka's replica placement (``AdminUtils.assignReplicasToBrokers``), with the randomness passed in.

    Leaders go round robin over the nodes from ``start_index`` (so they are balanced); followers
    are shifted so that a node's partitions spread their replicas over many others. When any node
    has a rack, the nodes are ordered to alternate racks and each partition's replicas land on as
    many racks as possible. The controller passes a random ``start_index`` to spread topics.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    if replication_factor < 1:
        raise ValueError(f"replication factor must be >= 1, got {replication_factor}")
    ids = [n for n, _ in nodes]
    if len(set(ids)) != len(ids):
        raise ValueError("node ids are not unique")
    if replication_factor > len(nodes):
        raise ValueError(f"replication factor {replication_factor} is larger than the {len(nodes)} nodes")
    rack_of = dict(nodes)
    racks = sorted(set(rack_of.values()))
    if any(rack_of.values()):
        # Kafka's getRackAlternatedBrokerList: one node of each rack in turn.
        by_rack = {r: sorted(n for n, nr in rack_of.items() if nr == r) for r in racks}
        arranged: list[int] = []
        for i in range(max(len(v) for v in by_rack.values())):
            arranged.extend(by_rack[r][i] for r in racks if i < len(by_rack[r]))
    else:
        arranged = sorted(ids)
        racks = [""]
    n = len(arranged)
    start = start_index % n
    shift = start
    out: list[tuple[int, ...]] = []
    for p in range(partitions):
        if p > 0 and p % n == 0:
            shift += 1
        first = (p + start) % n
        chosen = [arranged[first]]
        used_racks = {rack_of[arranged[first]]}
        k = 0
        while len(chosen) < replication_factor:
            candidate = arranged[_replica_index(first, shift * len(racks), k, n)]
            k += 1
            rack_free = rack_of[candidate] not in used_racks or len(used_racks) == len(racks)
            if rack_free and candidate not in chosen:
                chosen.append(candidate)
                used_racks.add(rack_of[candidate])
            if k > 2 * n * n:  # every node was offered many times; take the first unused ones
                chosen.extend(c for c in arranged if c not in chosen)
                chosen = chosen[:replication_factor]
        out.append(tuple(chosen))
    return tuple(out)


def partition_subject(topic_id: bytes, partition: int) -> str:
    """What an ``AlterPartition``'s answer is remembered under, beside its request id. The ``/``
    is never in a topic name, so it never meets a forwarded topic change's answer."""
    return f"{topic_id.hex()}/{partition}"


def topic_name_problem(name: str) -> str:
    """Why a topic name breaks Kafka's rules (``[a-zA-Z0-9._-]``, 1 to 249 characters, not ``.`` or
    ``..``), or "" when it is legal. The one copy of the rules: the node checks names with it too."""
    if not name or name in (".", ".."):
        return f"topic name {name!r} is not allowed"
    if len(name) > MAX_TOPIC_NAME_LENGTH:
        return f"topic name is {len(name)} characters; the limit is {MAX_TOPIC_NAME_LENGTH}"
    if not _LEGAL_TOPIC.fullmatch(name):
        return f"topic name {name!r} has characters outside [a-zA-Z0-9._-]"
    return ""


# ------------------------------------------------------------------ the state machine


class ClusterMetadata:
    """The cluster's metadata, changed only by ``apply``. See the module docstring for the rules."""

    def __init__(self) -> None:
        self.metadata_offset = -1
        self.nodes: dict[int, NodeRecord] = {}
        # By topic id; the name index is derived.
        self.topics: dict[bytes, TopicRecord] = {}
        self.topic_ids: dict[str, bytes] = {}
        # The first producer id no node has been given yet.
        self.next_producer_id = FIRST_PRODUCER_ID
        # (request_id, topic name or partition_subject) -> first answer, oldest first; at most
        # MAX_RECENT_REQUESTS.
        self.recent_requests: dict[tuple[str, str], RequestAnswer] = {}

    # ---------------------------------------------------------------- reading

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterMetadata):
            return NotImplemented
        return (
            self.metadata_offset == other.metadata_offset
            and self.nodes == other.nodes
            and self.topics == other.topics
            and self.next_producer_id == other.next_producer_id
            and list(self.recent_requests.items()) == list(other.recent_requests.items())
        )

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> ClusterMetadata:
        """A copy to apply further commands to: its containers are new, its (frozen) records shared."""
        new = ClusterMetadata.__new__(ClusterMetadata)
        for name, value in vars(self).items():
            setattr(new, name, value.copy() if isinstance(value, dict | list | set) else value)
        return new

    def topic(self, name: str) -> TopicRecord | None:
        tid = self.topic_ids.get(name)
        return None if tid is None else self.topics[tid]

    def partition(self, topic_id: bytes, partition: int) -> PartitionRecord | None:
        t = self.topics.get(topic_id)
        if t is None or not 0 <= partition < len(t.partitions):
            return None
        return t.partitions[partition]

    @property
    def partition_count(self) -> int:
        """Partitions over all topics (O(topics): read once per topic creation, for its limit)."""
        return sum(len(t.partitions) for t in self.topics.values())

    def request_answer(self, request_id: str, name: str) -> RequestAnswer | None:
        """The first answer to topic ``name`` of the forwarded request ``request_id``, if remembered."""
        if not request_id:
            return None
        return self.recent_requests.get((request_id, name))

    def partition_request_answer(
        self, request_id: str, topic_id: bytes, partition: int
    ) -> RequestAnswer | None:
        """The first answer to the ``AlterPartition`` ``request_id`` of this partition, if remembered."""
        if not request_id:
            return None
        return self.recent_requests.get((request_id, partition_subject(topic_id, partition)))

    def unfenced_nodes(self) -> set[int]:
        return {n.node_id for n in self.nodes.values() if not n.fenced}

    def is_unfenced(self, node_id: int) -> bool:
        n = self.nodes.get(node_id)
        return n is not None and not n.fenced

    # ---------------------------------------------------------------- invariants

    def check_invariants(self) -> None:
        """Assert every invariant of the whole state (O(partitions); the tests call it after each apply)."""
        assert self.metadata_offset >= -1
        assert self.next_producer_id >= FIRST_PRODUCER_ID
        for node_id, n in self.nodes.items():
            assert node_id == n.node_id
            assert 0 <= n.broker_epoch <= self.metadata_offset, n
        assert len(self.topic_ids) == len(self.topics)
        assert len(self.recent_requests) <= MAX_RECENT_REQUESTS
        for tid, t in self.topics.items():
            assert t.topic_id == tid and self.topic_ids[t.name] == tid, t.name
            assert list(t.configs) == sorted(dict(t.configs).items())
            for p in t.partitions:
                self._check_partition(p)

    def _check_partition(self, p: PartitionRecord) -> None:
        assert p.replicas and len(set(p.replicas)) == len(p.replicas), p
        assert all(r in self.nodes for r in p.replicas), p
        assert p.isr, f"empty ISR: {p}"
        assert set(p.isr) <= set(p.replicas), f"ISR not within replicas: {p}"
        assert list(p.isr) == [r for r in p.replicas if r in p.isr], f"ISR not in replica order: {p}"
        if p.leader != NO_LEADER:
            assert p.leader in p.isr, f"leader not in ISR: {p}"
            assert self.is_unfenced(p.leader), f"fenced leader: {p}"
        if len(p.isr) > 1:
            assert all(self.is_unfenced(r) for r in p.isr), f"fenced node in a shared ISR: {p}"
        assert 0 <= p.leader_epoch <= p.partition_epoch, p

    # ---------------------------------------------------------------- applying

    def apply(self, cmd: Command) -> Result:
        """Apply one command of the metadata log at offset ``metadata_offset + 1``.

        Each handler validates everything first and only then changes state, so a rejected command
        changes nothing but the offset.
        """
        self.metadata_offset += 1
        offset = self.metadata_offset
        reason = malformed_reason(cmd)
        if reason:
            return self._reject(E.ERROR_CODE_INVALID_REQUEST, reason)
        if isinstance(cmd, RegisterNode):
            return self._register_node(cmd, offset)
        if isinstance(cmd, FenceNode):
            return self._fence_node(cmd)
        if isinstance(cmd, UnfenceNode):
            return self._unfence_node(cmd)
        if isinstance(cmd, CreateTopic | DeleteTopic | AlterConfigs | AlterPartition) and cmd.request_id:
            return self._once(cmd)
        if isinstance(cmd, CreateTopic):
            return self._create_topic(cmd)
        if isinstance(cmd, DeleteTopic):
            return self._delete_topic(cmd)
        if isinstance(cmd, AlterPartition):
            return self._alter_partition(cmd)
        if isinstance(cmd, ElectLeader):
            return self._elect_leader(cmd)
        if isinstance(cmd, AlterConfigs):
            return self._alter_configs(cmd)
        if isinstance(cmd, AllocateProducerIds):
            return self._allocate_producer_ids(cmd)
        raise AssertionError(f"unhandled command {cmd!r}")  # malformed_reason knows every type

    def _once(self, cmd: CreateTopic | DeleteTopic | AlterConfigs | AlterPartition) -> Result:
        """A command with a request id: the first answer again for a resend, checked before
        anything else (an AlterPartition's epochs included), else apply and remember the answer
        (see the module docstring)."""
        if len(cmd.request_id) > MAX_REQUEST_ID_LENGTH:
            return self._reject(
                E.ERROR_CODE_INVALID_REQUEST, f"request id is longer than {MAX_REQUEST_ID_LENGTH} characters"
            )
        if isinstance(cmd, AlterPartition):
            key = (cmd.request_id, partition_subject(cmd.topic_id, cmd.partition))
        else:
            key = (cmd.request_id, cmd.name)
        first = self.recent_requests.get(key)
        if first is not None:
            return first.result(self.metadata_offset)
        if isinstance(cmd, AlterPartition):
            result = self._alter_partition(cmd)
            answer = RequestAnswer(
                result.error_code,
                result.message,
                b"",
                result.metadata_offset,
                result.leader_id,
                result.leader_epoch,
                result.partition_epoch,
                result.isr,
            )
        else:
            if isinstance(cmd, CreateTopic):
                result, topic_id = self._create_topic(cmd), cmd.topic_id
            elif isinstance(cmd, DeleteTopic):
                result, topic_id = self._delete_topic(cmd), cmd.topic_id
            else:
                result, topic_id = self._alter_configs(cmd), b""
            answer = RequestAnswer(result.error_code, result.message, topic_id, result.metadata_offset)
        self.recent_requests[key] = answer
        while len(self.recent_requests) > MAX_RECENT_REQUESTS:
            del self.recent_requests[next(iter(self.recent_requests))]
        return result

    def _reject(self, code: int, message: str) -> Result:
        return Result(False, code, message, self.metadata_offset)

    def _ok(self, message: str = "", **data: Any) -> Result:
        return Result(True, E.ERROR_CODE_NONE, message, self.metadata_offset, **data)

    def _partition_result(self, p: PartitionRecord, message: str = "") -> Result:
        return self._ok(
            message,
            leader_id=p.leader,
            leader_epoch=p.leader_epoch,
            partition_epoch=p.partition_epoch,
            isr=p.isr,
        )

    def _check_broker_epoch(self, node_id: int, broker_epoch: int) -> Result | None:
        n = self.nodes.get(node_id)
        if n is None:
            return self._reject(E.ERROR_CODE_NODE_NOT_AVAILABLE, f"node {node_id} is not registered")
        if n.broker_epoch != broker_epoch:
            return self._reject(
                E.ERROR_CODE_STALE_BROKER_EPOCH,
                f"node {node_id} has broker epoch {n.broker_epoch}, not {broker_epoch}",
            )
        return None

    def _put_partition(self, topic_id: bytes, index: int, new: PartitionRecord) -> None:
        self._put_partitions(topic_id, {index: new})

    def _put_partitions(self, topic_id: bytes, changed: Mapping[int, PartitionRecord]) -> None:
        """Replace partitions of one topic at once: one copy of its partition tuple, however many
        change (a copy per partition made fencing a node quadratic in a topic's partitions)."""
        t = self.topics[topic_id]
        parts: list[PartitionRecord] | None = None
        for index, new in changed.items():
            old = t.partitions[index]
            if new == old:
                continue
            assert new.replicas == old.replicas
            # Epochs never decrease; every change bumps partition_epoch, a leader change leader_epoch.
            assert new.partition_epoch == old.partition_epoch + 1, (old, new)
            assert new.leader_epoch == old.leader_epoch + (new.leader != old.leader), (old, new)
            if parts is None:
                parts = list(t.partitions)
            parts[index] = new
        if parts is not None:
            self.topics[topic_id] = replace(t, partitions=tuple(parts))

    def _changed(self, p: PartitionRecord, leader: int, isr: tuple[int, ...]) -> PartitionRecord:
        """``p`` with a new leader and ISR, epochs bumped as the change requires (or ``p`` unchanged)."""
        isr = tuple(r for r in p.replicas if r in isr)
        if leader == p.leader and isr == p.isr:
            return p
        return PartitionRecord(
            replicas=p.replicas,
            isr=isr,
            leader=leader,
            leader_epoch=p.leader_epoch + (leader != p.leader),
            partition_epoch=p.partition_epoch + 1,
        )

    # ---------------------------------------------------------------- nodes

    def _register_node(self, cmd: RegisterNode, offset: int) -> Result:
        if cmd.node_id < 0:
            return self._reject(E.ERROR_CODE_INVALID_REQUEST, f"node id {cmd.node_id} is negative")
        if not cmd.incarnation_id:
            return self._reject(E.ERROR_CODE_INVALID_REQUEST, "incarnation id is empty")
        if not cmd.host or not 0 < cmd.port < 65536:
            return self._reject(E.ERROR_CODE_INVALID_REQUEST, f"bad address {cmd.host!r}:{cmd.port}")
        old = self.nodes.get(cmd.node_id)
        if old is not None and old.incarnation_id == cmd.incarnation_id:
            if (old.host, old.port, old.rack) != (cmd.host, cmd.port, cmd.rack):
                return self._reject(
                    E.ERROR_CODE_INVALID_REQUEST,
                    f"node {cmd.node_id} re-registered the same incarnation with another address or rack",
                )
            return self._ok("already registered", broker_epoch=old.broker_epoch)
        # A new incarnation: the old one's leaderships and ISR places go first, as on a fence.
        if old is not None:
            self._fence(cmd.node_id)
        self.nodes[cmd.node_id] = NodeRecord(
            node_id=cmd.node_id,
            incarnation_id=cmd.incarnation_id,
            host=cmd.host,
            port=cmd.port,
            rack=cmd.rack,
            broker_epoch=offset,
            fenced=True,
        )
        return self._ok(broker_epoch=offset)

    def _fence_node(self, cmd: FenceNode) -> Result:
        bad = self._check_broker_epoch(cmd.node_id, cmd.broker_epoch)
        if bad is not None:
            return bad
        if self.nodes[cmd.node_id].fenced:
            return self._ok("already fenced")
        self._fence(cmd.node_id)
        return self._ok()

    def _fence(self, node_id: int) -> None:
        """Fence ``node_id`` and repair every partition it was in (KIP-841)."""
        self.nodes[node_id] = replace(self.nodes[node_id], fenced=True)
        live = self.unfenced_nodes()
        for tid, t in list(self.topics.items()):
            changed: dict[int, PartitionRecord] = {}
            unclean = t.unclean_allowed()
            for i, p in enumerate(t.partitions):
                if node_id not in p.isr and node_id != p.leader:
                    continue
                isr = p.isr
                if len(isr) > 1:
                    isr = tuple(r for r in isr if r != node_id)
                leader = p.leader
                if leader == node_id or leader == NO_LEADER:
                    leader, isr = choose_leader(p.replicas, isr, live, unclean)
                changed[i] = self._changed(p, leader, isr)
            if changed:
                self._put_partitions(tid, changed)

    def _unfence_node(self, cmd: UnfenceNode) -> Result:
        bad = self._check_broker_epoch(cmd.node_id, cmd.broker_epoch)
        if bad is not None:
            return bad
        if not self.nodes[cmd.node_id].fenced:
            return self._ok("already unfenced")
        self.nodes[cmd.node_id] = replace(self.nodes[cmd.node_id], fenced=False)
        # Offline partitions that can now have a leader get one (KRaft does this on unfence).
        for tid in list(self.topics):
            self._elect_offline(tid, only_with=cmd.node_id)
        return self._ok()

    def _elect_offline(self, topic_id: bytes, only_with: int = NO_LEADER) -> None:
        t = self.topics[topic_id]
        live = self.unfenced_nodes()
        changed: dict[int, PartitionRecord] = {}
        for i, p in enumerate(t.partitions):
            if p.leader != NO_LEADER or (only_with != NO_LEADER and only_with not in p.replicas):
                continue
            leader, isr = choose_leader(p.replicas, p.isr, live, t.unclean_allowed())
            if leader != NO_LEADER:
                changed[i] = self._changed(p, leader, isr)
        if changed:
            self._put_partitions(topic_id, changed)

    # ---------------------------------------------------------------- topics

    def _create_topic(self, cmd: CreateTopic) -> Result:
        problem = topic_name_problem(cmd.name)
        if problem:
            return self._reject(E.ERROR_CODE_INVALID_TOPIC, problem)
        if cmd.name in self.topic_ids:
            return self._reject(E.ERROR_CODE_TOPIC_ALREADY_EXISTS, f"topic {cmd.name!r} already exists")
        if len(cmd.topic_id) != _TOPIC_ID_LENGTH or not any(cmd.topic_id):
            return self._reject(E.ERROR_CODE_INVALID_REQUEST, "topic id must be 16 bytes, not all zero")
        if cmd.topic_id in self.topics:
            return self._reject(E.ERROR_CODE_TOPIC_ALREADY_EXISTS, "another topic has this topic id")
        if not cmd.assignments:
            return self._reject(E.ERROR_CODE_INVALID_PARTITIONS, "a topic needs at least one partition")
        rf = len(cmd.assignments[0])
        live = self.unfenced_nodes()
        for i, replicas in enumerate(cmd.assignments):
            if not replicas or len(replicas) != rf:
                return self._reject(
                    E.ERROR_CODE_INVALID_REPLICA_ASSIGNMENT,
                    f"partition {i} has {len(replicas)} replicas; every partition needs the same number >= 1",
                )
            if len(set(replicas)) != len(replicas):
                return self._reject(
                    E.ERROR_CODE_INVALID_REPLICA_ASSIGNMENT, f"partition {i} names a replica twice"
                )
            unknown = [r for r in replicas if r not in self.nodes]
            if unknown:
                return self._reject(
                    E.ERROR_CODE_INVALID_REPLICA_ASSIGNMENT,
                    f"partition {i}: nodes {unknown} are not registered",
                )
            if not any(r in live for r in replicas):
                return self._reject(
                    E.ERROR_CODE_INVALID_REPLICA_ASSIGNMENT, f"partition {i}: every replica is fenced"
                )
        names = [normalize_config_name(k) for k, _ in cmd.configs]
        if len(set(names)) != len(names):
            return self._reject(E.ERROR_CODE_INVALID_CONFIG, "a config is given twice")
        try:
            configs = validate_topic_configs(dict(cmd.configs))
        except ConfigError as e:
            return self._reject(E.ERROR_CODE_INVALID_CONFIG, str(e))
        partitions = []
        for replicas in cmd.assignments:
            isr = tuple(r for r in replicas if r in live)
            partitions.append(PartitionRecord(replicas, isr, isr[0], 0, 0))
        self.topics[cmd.topic_id] = TopicRecord(
            name=cmd.name,
            topic_id=cmd.topic_id,
            partitions=tuple(partitions),
            configs=tuple(sorted(configs.items())),
        )
        self.topic_ids[cmd.name] = cmd.topic_id
        return self._ok()

    def _delete_topic(self, cmd: DeleteTopic) -> Result:
        tid = self.topic_ids.get(cmd.name)
        if tid is None:
            return self._reject(E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION, f"no topic {cmd.name!r}")
        if tid != cmd.topic_id:
            return self._reject(
                E.ERROR_CODE_INCONSISTENT_TOPIC_ID, f"topic {cmd.name!r} has another topic id"
            )
        del self.topics[tid]
        del self.topic_ids[cmd.name]
        return self._ok()

    def _alter_configs(self, cmd: AlterConfigs) -> Result:
        tid = self.topic_ids.get(cmd.name)
        if tid is None:
            return self._reject(E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION, f"no topic {cmd.name!r}")
        set_names = [normalize_config_name(k) for k, _ in cmd.set]
        delete_names = [normalize_config_name(k) for k in cmd.delete]
        if len(set(set_names)) != len(set_names) or set(set_names) & set(delete_names):
            return self._reject(E.ERROR_CODE_INVALID_CONFIG, "a config is named twice")
        unknown = [k for k in delete_names if k not in TOPIC_CONFIGS]
        if unknown:
            return self._reject(E.ERROR_CODE_INVALID_CONFIG, f"unknown topic configs {unknown}")
        try:
            new_values = validate_topic_configs(dict(cmd.set))
        except ConfigError as e:
            return self._reject(E.ERROR_CODE_INVALID_CONFIG, str(e))
        t = self.topics[tid]
        configs = {k: v for k, v in t.configs if k not in delete_names}
        configs.update(new_values)
        self.topics[tid] = replace(t, configs=tuple(sorted(configs.items())))
        # Allowing unclean election brings offline partitions back now (as KRaft does).
        self._elect_offline(tid)
        return self._ok()

    # ---------------------------------------------------------------- partitions

    def _alter_partition(self, cmd: AlterPartition) -> Result:
        p = self.partition(cmd.topic_id, cmd.partition)
        if p is None:
            return self._reject(
                E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION, f"no partition {cmd.partition} of that topic id"
            )
        bad = self._check_broker_epoch(cmd.leader_id, cmd.broker_epoch)
        if bad is not None:
            return bad
        if cmd.leader_epoch != p.leader_epoch:
            return self._reject(
                E.ERROR_CODE_FENCED_LEADER_EPOCH,
                f"leader epoch is {p.leader_epoch}, the request has {cmd.leader_epoch}",
            )
        if cmd.leader_id != p.leader:
            return self._reject(
                E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER, f"node {cmd.leader_id} does not lead; {p.leader} does"
            )
        if cmd.partition_epoch != p.partition_epoch:
            return self._reject(
                E.ERROR_CODE_INVALID_UPDATE_VERSION,
                f"partition epoch is {p.partition_epoch}, the request has {cmd.partition_epoch}",
            )
        if len(set(cmd.new_isr)) != len(cmd.new_isr):
            return self._reject(E.ERROR_CODE_INVALID_REQUEST, "the new ISR names a replica twice")
        if p.leader not in cmd.new_isr:
            return self._reject(E.ERROR_CODE_INELIGIBLE_REPLICA, "the new ISR leaves out the leader")
        strangers = [r for r in cmd.new_isr if r not in p.replicas]
        if strangers:
            return self._reject(E.ERROR_CODE_INELIGIBLE_REPLICA, f"nodes {strangers} are not replicas")
        fenced = [r for r in cmd.new_isr if not self.is_unfenced(r)]
        if fenced:
            return self._reject(E.ERROR_CODE_INELIGIBLE_REPLICA, f"nodes {fenced} are fenced")
        new = self._changed(p, p.leader, cmd.new_isr)
        self._put_partition(cmd.topic_id, cmd.partition, new)
        return self._partition_result(new, "" if new != p else "ISR unchanged")

    def _elect_leader(self, cmd: ElectLeader) -> Result:
        p = self.partition(cmd.topic_id, cmd.partition)
        if p is None:
            return self._reject(
                E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION, f"no partition {cmd.partition} of that topic id"
            )
        if cmd.expected_leader_epoch != p.leader_epoch:
            return self._reject(
                E.ERROR_CODE_FENCED_LEADER_EPOCH,
                f"leader epoch is {p.leader_epoch}, the request expects {cmd.expected_leader_epoch}",
            )
        # An operator's explicit unclean election (Kafka's ElectionType.UNCLEAN) or the topic's config.
        unclean = cmd.allow_unclean or self.topics[cmd.topic_id].unclean_allowed()
        live = self.unfenced_nodes()
        if cmd.new_leader == NO_LEADER:
            leader, isr = choose_leader(p.replicas, p.isr, live, unclean)
            if leader == NO_LEADER:
                return self._reject(E.ERROR_CODE_LEADER_NOT_AVAILABLE, "no replica is eligible to lead")
        else:
            leader, isr = cmd.new_leader, p.isr
            if leader not in p.replicas or leader not in live:
                return self._reject(
                    E.ERROR_CODE_INELIGIBLE_REPLICA, f"node {leader} is not an unfenced replica"
                )
            if leader not in p.isr:
                # Unclean: only when no in-sync replica can lead, as in Kafka.
                if not unclean or any(r in live for r in p.isr):
                    return self._reject(
                        E.ERROR_CODE_INELIGIBLE_REPLICA, f"node {leader} is not in the ISR {list(p.isr)}"
                    )
                isr = (leader,)
        new = self._changed(p, leader, isr)
        self._put_partition(cmd.topic_id, cmd.partition, new)
        return self._partition_result(new, "" if new != p else "election not needed")

    # ---------------------------------------------------------------- producer ids

    def _allocate_producer_ids(self, cmd: AllocateProducerIds) -> Result:
        bad = self._check_broker_epoch(cmd.node_id, cmd.broker_epoch)
        if bad is not None:
            return bad
        if not 0 < cmd.block_size <= MAX_PRODUCER_ID_BLOCK:
            return self._reject(
                E.ERROR_CODE_INVALID_REQUEST, f"block size must be in 1..{MAX_PRODUCER_ID_BLOCK}"
            )
        if self.next_producer_id + cmd.block_size > _MAX_PRODUCER_ID:
            return self._reject(E.ERROR_CODE_UNKNOWN_SERVER_ERROR, "producer ids are exhausted")
        start = self.next_producer_id
        self.next_producer_id += cmd.block_size
        return self._ok(producer_id_start=start, producer_id_count=cmd.block_size)

    # ---------------------------------------------------------------- snapshots

    def to_snapshot(self) -> bytes:
        """Compact, versioned JSON of the whole state; equal states give equal bytes."""
        doc = {
            "version": SNAPSHOT_VERSION,
            "metadata_offset": self.metadata_offset,
            "next_producer_id": self.next_producer_id,
            "nodes": [
                [n.node_id, n.incarnation_id.hex(), n.host, n.port, n.rack, n.broker_epoch, n.fenced]
                for n in sorted(self.nodes.values(), key=lambda n: n.node_id)
            ],
            "topics": [
                [
                    t.name,
                    t.topic_id.hex(),
                    [list(kv) for kv in t.configs],
                    [
                        [list(p.replicas), list(p.isr), p.leader, p.leader_epoch, p.partition_epoch]
                        for p in t.partitions
                    ],
                ]
                for t in sorted(self.topics.values(), key=lambda t: t.name)
            ],
            # Oldest first: the order decides which answer is forgotten next.
            # A row has the partition fields only when they are set (AlterPartition answers), so
            # topic answers keep the form they had before partitions were remembered.
            "requests": [
                [rid, name, a.error_code, a.message, a.topic_id.hex(), a.metadata_offset]
                + ([a.leader_id, a.leader_epoch, a.partition_epoch, list(a.isr)] if a.has_partition else [])
                for (rid, name), a in self.recent_requests.items()
            ],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_snapshot(cls, raw: bytes) -> ClusterMetadata:
        """The state ``to_snapshot`` wrote; raises SnapshotError on anything else."""
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SnapshotError(f"snapshot is not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("version") != SNAPSHOT_VERSION:
            raise SnapshotError(f"snapshot version is not {SNAPSHOT_VERSION}")
        m = cls()
        try:
            m.metadata_offset = int(doc["metadata_offset"])
            # A snapshot written before ids started at 1 holds 0 when no block was handed out yet: it
            # reads as 1, the same on every voter. (An older block may hold id 0; no node gives ids to
            # clients yet, so none is in use.)
            m.next_producer_id = max(FIRST_PRODUCER_ID, int(doc["next_producer_id"]))
            for node_id, inc, host, port, rack, epoch, fenced in doc["nodes"]:
                m.nodes[int(node_id)] = NodeRecord(
                    int(node_id),
                    bytes.fromhex(inc),
                    str(host),
                    int(port),
                    str(rack),
                    int(epoch),
                    bool(fenced),
                )
            for name, tid_hex, configs, parts in doc["topics"]:
                tid = bytes.fromhex(tid_hex)
                m.topics[tid] = TopicRecord(
                    name=str(name),
                    topic_id=tid,
                    partitions=tuple(
                        PartitionRecord(
                            tuple(int(r) for r in replicas),
                            tuple(int(r) for r in isr),
                            int(leader),
                            int(le),
                            int(pe),
                        )
                        for replicas, isr, leader, le, pe in parts
                    ),
                    configs=tuple((str(k), str(v)) for k, v in configs),
                )
                m.topic_ids[str(name)] = tid
            # Absent from snapshots written before forwarded requests were remembered.
            requests = doc.get("requests", [])
            if type(requests) is not list or len(requests) > MAX_RECENT_REQUESTS:
                raise ValueError(f"remembered requests are not a list of at most {MAX_RECENT_REQUESTS}")
            for row in requests:
                if type(row) is not list or len(row) not in (6, 10):
                    raise ValueError("a remembered request is not a list of 6 or 10 fields")
                rid, name, code, message, tid_hex, offset, *partition = row
                if type(rid) is not str or type(name) is not str or type(message) is not str:
                    raise ValueError("a remembered request's id, topic or message is not a string")
                answer = RequestAnswer(int(code), message, bytes.fromhex(tid_hex), int(offset))
                if partition:
                    leader, le, pe, isr = partition
                    if type(isr) is not list:
                        raise ValueError("a remembered partition answer's ISR is not a list")
                    answer = replace(
                        answer,
                        leader_id=int(leader),
                        leader_epoch=int(le),
                        partition_epoch=int(pe),
                        isr=tuple(int(r) for r in isr),
                    )
                m.recent_requests[(rid, name)] = answer
            m.check_invariants()
        except (KeyError, TypeError, ValueError, AssertionError) as e:
            raise SnapshotError(f"snapshot is inconsistent: {e}") from None
        return m
