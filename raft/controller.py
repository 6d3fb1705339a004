"""The active controller's decisions: a pure core on top of a read-only ``ClusterMetadata`` view.

The Raft leader runs one ``ActiveController``. It holds only soft state (heartbeat leases, nodes in
controlled shutdown, recently proposed commands) and never changes the metadata itself: every
decision comes back as commands for the caller to propose through Raft, in order. The caller applies
committed commands to the view (and may report each with ``on_applied``), so the controller always
decides from committed metadata. Time comes in as ``now_ms`` arguments and randomness as an injected
``random.Random``; nothing here reads a clock, starts a thread or touches a socket.

Rules, after Kafka's QuorumController and BrokerHeartbeatManager (KIP-500, KIP-631, KIP-841):

- Leases. A heartbeat carrying the node's current ``broker_epoch`` renews its lease for
  ``session_timeout_ms``; an unknown node (``NODE_NOT_AVAILABLE``) or a stale epoch
  (``STALE_BROKER_EPOCH``) renews nothing and gets no commands. ``tick`` fences every unfenced node
  whose lease ran out (``now_ms >= deadline``). A node is never fenced by ``tick`` while its lease
  is valid: a node this controller holds no lease for (it was unfenced by a command it saw no
  heartbeat for) gets a fresh lease, not a fence.
- Unfencing. A registered, fenced node that heartbeats gets ``UnfenceNode`` (a broker only
  heartbeats once it has caught up with the metadata). ``want_fence`` asks for the opposite, as in
  Kafka: an unfenced node that sets it is fenced.
- Activation. A controller that becomes active gives every registered node a fresh lease, so a
  failover never fences the whole cluster at once (Kafka does the same). ``deactivate`` drops all
  soft state; while inactive every call answers ``NOT_CONTROLLER`` or returns no commands, so a
  controller that lost Raft leadership stops acting at once.
- Preferred-leader balancing. At most once per ``leader_balance_interval_ms`` (the first round one
  interval after activation), ``tick`` moves leadership back to each partition's first replica when
  it is in the ISR, unfenced, its lease valid and it is not shutting down (Kafka's
  ``auto.leader.rebalance.enable``, without its per-node imbalance threshold), at most
  ``max_leader_moves_per_balance`` partitions per round.
- Controlled shutdown. A node stopping cleanly asks (``on_controlled_shutdown`` or a heartbeat with
  ``controlled_shutdown``) until it is told it may stop. Each ask moves every leadership it holds to
  the first other ISR member in replica order that is unfenced, leased and not shutting down. Once
  none of its leaderships can move any more, it is fenced; partitions where it was the only live ISR
  member go offline with that fence (KIP-841 keeps it as their last ISR member), as in KRaft, which
  takes a node in controlled shutdown out of every ISR at once. While shutting down it is never
  unfenced, and balancing never moves a leadership to it. The answer that lets it stop always
  carries a ``FenceNode``, so once that commits the node is fenced and leads nothing whatever this
  controller proposed before.
- Order. The caller proposes commands in the order this controller returns them, across calls:
  several rules (the final fence of a controlled shutdown, a fence overriding an unfence) rely on a
  later decision landing later in the log.
- Topic creation. Replicas are placed over the unfenced, leased nodes that are not shutting down with
  ``place_replicas`` (rack-aware), from a random start index drawn from the injected RNG. A
  replication factor above that live count is refused with ``INVALID_REPLICATION_FACTOR``.
- Proposals in flight. A command this controller returned is not returned again for
  ``proposal_retry_ms`` unless ``on_applied`` reported it, so a slow commit does not fill the log
  with copies, yet a lost proposal is retried.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from headwater.config import ConfigError, normalize_config_name, validate_topic_configs
from headwater.v1 import errors_pb2

from .commands import (
    NO_LEADER,
    Command,
    CreateTopic,
    ElectLeader,
    FenceNode,
    RegisterNode,
    UnfenceNode,
)
from .metadata import ClusterMetadata, Result, place_replicas, topic_name_problem

__all__ = [
    "ActiveController",
    "ControllerConfig",
    "HeartbeatDecision",
    "Refusal",
    "DEFAULT_HEARTBEAT_INTERVAL_MS",
    "DEFAULT_SESSION_TIMEOUT_MS",
    "DEFAULT_LEADER_BALANCE_INTERVAL_MS",
    "DEFAULT_MAX_LEADER_MOVES_PER_BALANCE",
    "MAX_PARTITIONS_PER_TOPIC",
]

E = errors_pb2

DEFAULT_HEARTBEAT_INTERVAL_MS = 500
DEFAULT_SESSION_TIMEOUT_MS = 3_000
# Kafka checks leader imbalance every 300 s; a small cluster recovers balance sooner at no real cost.
DEFAULT_LEADER_BALANCE_INTERVAL_MS = 30_000
DEFAULT_MAX_LEADER_MOVES_PER_BALANCE = 1_000
# One CreateTopic is one log entry; placing millions of partitions would stall the controller.
MAX_PARTITIONS_PER_TOPIC = 100_000


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """The controller's timing and bounds; every value in milliseconds or a count."""

    heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS
    session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS
    leader_balance_interval_ms: int = DEFAULT_LEADER_BALANCE_INTERVAL_MS
    max_leader_moves_per_balance: int = DEFAULT_MAX_LEADER_MOVES_PER_BALANCE
    # How long a returned command is not returned again; 0 means the heartbeat interval.
    proposal_retry_ms: int = 0

    def __post_init__(self) -> None:
        if self.heartbeat_interval_ms <= 0:
            raise ValueError("heartbeat_interval_ms must be > 0")
        if self.session_timeout_ms <= self.heartbeat_interval_ms:
            raise ValueError("session_timeout_ms must be larger than heartbeat_interval_ms")
        if self.leader_balance_interval_ms <= 0:
            raise ValueError("leader_balance_interval_ms must be > 0")
        if self.max_leader_moves_per_balance < 0:
            raise ValueError("max_leader_moves_per_balance must be >= 0")
        if self.proposal_retry_ms < 0:
            raise ValueError("proposal_retry_ms must be >= 0")

    @property
    def retry_ms(self) -> int:
        return self.proposal_retry_ms or self.heartbeat_interval_ms


@dataclass(frozen=True, slots=True)
class HeartbeatDecision:
    """The answer to a heartbeat or a controlled-shutdown request.

    ``commands`` are to be proposed in order; the node is answered once they commit. With an
    ``error_code`` other than NONE there are no commands. ``shutdown_ready`` tells a node in
    controlled shutdown that it may stop once ``commands`` have committed.
    """

    error_code: int
    commands: tuple[Command, ...] = ()
    message: str = ""
    shutdown_ready: bool = False

    @property
    def ok(self) -> bool:
        return self.error_code == E.ERROR_CODE_NONE


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the controller refuses before proposing anything."""

    error_code: int
    message: str


@dataclass(frozen=True, slots=True)
class _Lease:
    broker_epoch: int
    deadline_ms: int


@dataclass(slots=True)
class _SoftState:
    """Everything an active controller knows that is not in the metadata; dropped on deactivate."""

    # By node id: the lease of the node's broker epoch it was granted for.
    leases: dict[int, _Lease] = field(default_factory=dict)
    # By node id: the broker epoch that asked to shut down.
    shutting_down: dict[int, int] = field(default_factory=dict)
    # Commands returned and not yet reported applied: when they were returned.
    proposed_ms: dict[Command, int] = field(default_factory=dict)
    next_balance_ms: int = 0


class ActiveController:
    """The Raft leader's decisions over a read-only ``ClusterMetadata``. See the module docstring."""

    def __init__(
        self,
        metadata: ClusterMetadata,
        rng: random.Random,
        *,
        heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS,
        session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS,
        leader_balance_interval_ms: int = DEFAULT_LEADER_BALANCE_INTERVAL_MS,
        max_leader_moves_per_balance: int = DEFAULT_MAX_LEADER_MOVES_PER_BALANCE,
        proposal_retry_ms: int = 0,
    ) -> None:
        # Read only: the caller applies committed commands to it; this class never does.
        self.metadata = metadata
        self.config = ControllerConfig(
            heartbeat_interval_ms=heartbeat_interval_ms,
            session_timeout_ms=session_timeout_ms,
            leader_balance_interval_ms=leader_balance_interval_ms,
            max_leader_moves_per_balance=max_leader_moves_per_balance,
            proposal_retry_ms=proposal_retry_ms,
        )
        self._rng = rng
        self._state: _SoftState | None = None

    # ---------------------------------------------------------------- role

    @property
    def active(self) -> bool:
        return self._state is not None

    def activate(self, now_ms: int) -> None:
        """Become the active controller: every registered node gets a fresh lease from ``now_ms``."""
        state = _SoftState(next_balance_ms=now_ms + self.config.leader_balance_interval_ms)
        deadline = now_ms + self.config.session_timeout_ms
        for node_id, n in self.metadata.nodes.items():
            state.leases[node_id] = _Lease(n.broker_epoch, deadline)
        self._state = state

    def deactivate(self) -> None:
        """Lost Raft leadership: drop all soft state and take no decision until activated again."""
        self._state = None

    def lease_deadline_ms(self, node_id: int) -> int | None:
        """When the lease of ``node_id``'s current broker epoch runs out, or None without one."""
        if self._state is None:
            return None
        n = self.metadata.nodes.get(node_id)
        lease = self._state.leases.get(node_id)
        if n is None or lease is None or lease.broker_epoch != n.broker_epoch:
            return None
        return lease.deadline_ms

    def shutting_down(self) -> frozenset[int]:
        """Nodes in controlled shutdown (for the current broker epoch)."""
        if self._state is None:
            return frozenset()
        return frozenset(
            node_id
            for node_id, epoch in self._state.shutting_down.items()
            if node_id in self.metadata.nodes and self.metadata.nodes[node_id].broker_epoch == epoch
        )

    # ---------------------------------------------------------------- node requests

    def on_register(
        self, node_id: int, incarnation_id: bytes, host: str, port: int, rack: str, now_ms: int
    ) -> list[Command]:
        """A node (re)starts: the ``RegisterNode`` to propose (its result carries the broker epoch).

        Registration grants no lease: the node registers fenced, and tick only fences unfenced nodes;
        its first heartbeat starts the lease and unfences it. The state machine validates the fields.
        """
        if self._state is None:
            return []
        return [RegisterNode(node_id, incarnation_id, host, port, rack)]

    def on_heartbeat(
        self,
        node_id: int,
        broker_epoch: int,
        now_ms: int,
        want_fence: bool = False,
        controlled_shutdown: bool = False,
    ) -> HeartbeatDecision:
        """A node's heartbeat: renew its lease and unfence it, fence it on request, or shut it down."""
        state = self._state
        if state is None:
            return _not_controller()
        refused = self._check_node(node_id, broker_epoch)
        if refused is not None:
            return refused
        state.leases[node_id] = _Lease(broker_epoch, now_ms + self.config.session_timeout_ms)
        if controlled_shutdown or state.shutting_down.get(node_id) == broker_epoch:
            if controlled_shutdown:
                return self._controlled_shutdown(state, node_id, broker_epoch, now_ms)
            return HeartbeatDecision(E.ERROR_CODE_NONE, message="in controlled shutdown")
        fenced = self.metadata.nodes[node_id].fenced
        out: list[Command] = []
        if want_fence and not fenced:
            self._propose(state, FenceNode(node_id, broker_epoch), now_ms, out)
        elif not want_fence and fenced:
            self._propose(state, UnfenceNode(node_id, broker_epoch), now_ms, out)
        return HeartbeatDecision(E.ERROR_CODE_NONE, tuple(out))

    def on_controlled_shutdown(self, node_id: int, broker_epoch: int, now_ms: int) -> HeartbeatDecision:
        """A node stopping cleanly: move its leaderships away, then fence it (see the module docstring)."""
        return self.on_heartbeat(node_id, broker_epoch, now_ms, controlled_shutdown=True)

    def _controlled_shutdown(
        self, state: _SoftState, node_id: int, broker_epoch: int, now_ms: int
    ) -> HeartbeatDecision:
        state.shutting_down[node_id] = broker_epoch
        eligible = self._eligible_leaders(state, now_ms)
        out: list[Command] = []
        moves = 0
        for tid, t in sorted(self.metadata.topics.items()):
            for i, p in enumerate(t.partitions):
                if p.leader != node_id:
                    continue
                target = next((r for r in p.isr if r != node_id and r in eligible), NO_LEADER)
                if target != NO_LEADER:
                    moves += 1
                    self._propose(state, ElectLeader(tid, i, target, p.leader_epoch), now_ms, out)
        if moves:
            return HeartbeatDecision(
                E.ERROR_CODE_NONE, tuple(out), message=f"moving {moves} leaderships away"
            )
        # Fence even when the view shows it fenced: an UnfenceNode this controller proposed earlier
        # may not have committed yet, and only a fence after it in the log makes "ready" true.
        self._propose(state, FenceNode(node_id, broker_epoch), now_ms, out)
        return HeartbeatDecision(E.ERROR_CODE_NONE, tuple(out), shutdown_ready=True)

    def _check_node(self, node_id: int, broker_epoch: int) -> HeartbeatDecision | None:
        n = self.metadata.nodes.get(node_id)
        if n is None:
            return HeartbeatDecision(
                E.ERROR_CODE_NODE_NOT_AVAILABLE, message=f"node {node_id} is not registered"
            )
        if n.broker_epoch != broker_epoch:
            return HeartbeatDecision(
                E.ERROR_CODE_STALE_BROKER_EPOCH,
                message=f"node {node_id} has broker epoch {n.broker_epoch}, not {broker_epoch}",
            )
        return None

    # ---------------------------------------------------------------- time

    def tick(self, now_ms: int) -> list[Command]:
        """Fence nodes whose lease ran out; now and then move leaderships back to preferred replicas."""
        state = self._state
        if state is None:
            return []
        out: list[Command] = []
        fencing: set[int] = set()
        for node_id, n in sorted(self.metadata.nodes.items()):
            if n.fenced:
                continue
            lease = state.leases.get(node_id)
            if lease is None or lease.broker_epoch != n.broker_epoch:
                # Unfenced by a command this controller saw no heartbeat for: a fair lease first.
                state.leases[node_id] = _Lease(n.broker_epoch, now_ms + self.config.session_timeout_ms)
                continue
            if now_ms >= lease.deadline_ms:
                fencing.add(node_id)
                self._propose(state, FenceNode(node_id, n.broker_epoch), now_ms, out)
        if now_ms >= state.next_balance_ms:
            state.next_balance_ms = now_ms + self.config.leader_balance_interval_ms
            self._balance_leaders(state, now_ms, fencing, out)
        # Forget proposals old enough to be retried, so the map stays small without on_applied.
        retry = self.config.retry_ms
        stale = [c for c, t in state.proposed_ms.items() if now_ms >= t + retry]
        for c in stale:
            del state.proposed_ms[c]
        return out

    def _balance_leaders(self, state: _SoftState, now_ms: int, fencing: set[int], out: list[Command]) -> None:
        eligible = self._eligible_leaders(state, now_ms) - fencing
        budget = self.config.max_leader_moves_per_balance
        for tid, t in sorted(self.metadata.topics.items()):
            for i, p in enumerate(t.partitions):
                if budget <= 0:
                    return
                preferred = p.replicas[0]
                if p.leader == preferred or preferred not in eligible or preferred not in p.isr:
                    continue
                if self._propose(state, ElectLeader(tid, i, preferred, p.leader_epoch), now_ms, out):
                    budget -= 1

    def _eligible_leaders(self, state: _SoftState, now_ms: int) -> set[int]:
        """Unfenced nodes with a valid lease that are not shutting down: fit to take a leadership."""
        out = set()
        for node_id, n in self.metadata.nodes.items():
            if n.fenced or state.shutting_down.get(node_id) == n.broker_epoch:
                continue
            lease = state.leases.get(node_id)
            if lease is not None and lease.broker_epoch == n.broker_epoch and now_ms < lease.deadline_ms:
                out.add(node_id)
        return out

    # ---------------------------------------------------------------- admin requests

    def create_topic(
        self,
        name: str,
        partitions: int,
        replication_factor: int,
        configs: Iterable[tuple[str, str]],
        topic_id: bytes,
        now_ms: int,
    ) -> CreateTopic | Refusal:
        """The ``CreateTopic`` to propose, replicas placed over live nodes, or why it is refused.

        The state machine checks again when the command applies (a topic of the same name may be
        created in between); this early check answers a bad request without a log entry.
        """
        state = self._state
        if state is None:
            return Refusal(E.ERROR_CODE_NOT_CONTROLLER, "this node is not the active controller")
        problem = topic_name_problem(name)
        if problem:
            return Refusal(E.ERROR_CODE_INVALID_TOPIC, problem)
        if name in self.metadata.topic_ids:
            return Refusal(E.ERROR_CODE_TOPIC_ALREADY_EXISTS, f"topic {name!r} already exists")
        if not 1 <= partitions <= MAX_PARTITIONS_PER_TOPIC:
            return Refusal(
                E.ERROR_CODE_INVALID_PARTITIONS, f"partitions must be in 1..{MAX_PARTITIONS_PER_TOPIC}"
            )
        pairs = tuple(configs)
        names = [normalize_config_name(k) for k, _ in pairs]
        if len(set(names)) != len(names):
            return Refusal(E.ERROR_CODE_INVALID_CONFIG, "a config is given twice")
        try:
            validate_topic_configs(dict(pairs))
        except ConfigError as e:
            return Refusal(E.ERROR_CODE_INVALID_CONFIG, str(e))
        live = sorted(
            (node_id, self.metadata.nodes[node_id].rack) for node_id in self._eligible_leaders(state, now_ms)
        )
        if not 1 <= replication_factor <= len(live):
            return Refusal(
                E.ERROR_CODE_INVALID_REPLICATION_FACTOR,
                f"replication factor {replication_factor} needs 1..{len(live)} (the live nodes)",
            )
        assignments = place_replicas(partitions, replication_factor, live, self._rng.randrange(len(live)))
        return CreateTopic(name, topic_id, assignments, pairs)

    # ---------------------------------------------------------------- results

    def on_applied(self, cmd: Command, result: Result) -> None:
        """The caller reports a command of this controller committed and applied (or rejected).

        A rejected decision is not retried as such: the next tick or request decides afresh from the
        metadata as it now is.
        """
        if self._state is not None:
            self._state.proposed_ms.pop(cmd, None)

    def _propose(self, state: _SoftState, cmd: Command, now_ms: int, out: list[Command]) -> bool:
        """Add ``cmd`` to ``out`` unless it was returned less than ``proposal_retry_ms`` ago."""
        t = state.proposed_ms.get(cmd)
        if t is not None and now_ms < t + self.config.retry_ms:
            return False
        state.proposed_ms[cmd] = now_ms
        # A fence proposed after an unfence (or the reverse) overrides it: the earlier one no longer
        # stands for the node's state once this one commits, so it must not hold back a retry.
        if isinstance(cmd, FenceNode):
            state.proposed_ms.pop(UnfenceNode(cmd.node_id, cmd.broker_epoch), None)
        elif isinstance(cmd, UnfenceNode):
            state.proposed_ms.pop(FenceNode(cmd.node_id, cmd.broker_epoch), None)
        out.append(cmd)
        return True


def _not_controller() -> HeartbeatDecision:
    return HeartbeatDecision(E.ERROR_CODE_NOT_CONTROLLER, message="this node is not the active controller")
