"""The active controller's decisions: unit tests of each rule on a fake clock, and a seeded simulation.

The simulation drives an ``ActiveController`` and a ``ClusterMetadata`` together the way the Raft
binding will: the controller's commands queue up as proposals and are applied in order a little
later (so some are stale by then and refused), nodes register, heartbeat, go silent, pause, restart
and shut down cleanly, partition leaders shrink and grow their ISR, and now and then the controller
fails over to a fresh instance (losing a suffix of its uncommitted proposals). After every step the
state machine's invariants hold, epochs only grow, no node was fenced by a tick while its lease was
valid, and every node silent for longer than ``session_timeout_ms`` is fenced. A failure names its
seed.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import pytest

from headwater.raft.commands import (
    NO_LEADER,
    AlterPartition,
    Command,
    CreateTopic,
    ElectLeader,
    FenceNode,
    RegisterNode,
    UnfenceNode,
)
from headwater.raft.controller import ActiveController, HeartbeatDecision, Refusal
from headwater.raft.metadata import ClusterMetadata, Result
from headwater.v1 import errors_pb2 as E

SESSION_MS = 3_000
HEARTBEAT_MS = 500
BALANCE_MS = 5_000


# ---------------------------------------------------------------------- unit tests


class Cluster:
    """A metadata view and its controller; ``commit`` applies commands as Raft would, in order."""

    def __init__(self, racks: dict[int, str] | None = None) -> None:
        self.m = ClusterMetadata()
        self.c = ActiveController(
            self.m,
            random.Random(7),
            heartbeat_interval_ms=HEARTBEAT_MS,
            session_timeout_ms=SESSION_MS,
            leader_balance_interval_ms=BALANCE_MS,
        )
        self.epochs: dict[int, int] = {}
        self.racks = racks or {}

    def commit(self, cmds: list[Command] | tuple[Command, ...]) -> list[Result]:
        results = []
        for cmd in cmds:
            r = self.m.apply(cmd)
            self.c.on_applied(cmd, r)
            self.m.check_invariants()
            results.append(r)
        return results

    def start(self, node_id: int, now_ms: int = 0) -> int:
        """Register ``node_id`` with a new incarnation and unfence it with one heartbeat."""
        cmds = self.c.on_register(
            node_id, random.randbytes(16), f"10.0.0.{node_id}", 9092, self.racks.get(node_id, ""), now_ms
        )
        (r,) = self.commit(cmds)
        assert r.ok
        self.epochs[node_id] = r.broker_epoch
        d = self.c.on_heartbeat(node_id, r.broker_epoch, now_ms)
        assert d.ok and d.commands == (UnfenceNode(node_id, r.broker_epoch),)
        self.commit(d.commands)
        return r.broker_epoch

    def heartbeat(self, node_id: int, now_ms: int, **flags: bool) -> HeartbeatDecision:
        d = self.c.on_heartbeat(node_id, self.epochs[node_id], now_ms, **flags)
        self.commit(d.commands)
        return d

    def topic(self, name: str, assignments: tuple[tuple[int, ...], ...]) -> bytes:
        tid = random.randbytes(16)
        (r,) = self.commit([CreateTopic(name, tid, assignments)])
        assert r.ok, r
        return tid


def started(*node_ids: int) -> Cluster:
    cl = Cluster()
    cl.c.activate(0)
    for n in node_ids:
        cl.start(n)
    return cl


def test_an_inactive_controller_takes_no_decision() -> None:
    cl = Cluster()
    assert cl.c.on_register(1, b"i", "h", 1, "", 0) == []
    assert cl.c.tick(10_000) == []
    assert cl.c.on_heartbeat(1, 0, 0).error_code == E.ERROR_CODE_NOT_CONTROLLER
    assert cl.c.on_controlled_shutdown(1, 0, 0).error_code == E.ERROR_CODE_NOT_CONTROLLER
    refusal = cl.c.create_topic("t", 1, 1, (), b"\x01" * 16, 0)
    assert isinstance(refusal, Refusal) and refusal.error_code == E.ERROR_CODE_NOT_CONTROLLER


def test_a_controller_that_lost_leadership_stops_at_once() -> None:
    cl = started(1, 2)
    cl.c.deactivate()
    assert not cl.c.active
    # Node 2 is long silent, yet nothing is fenced, and node 1's heartbeat is sent elsewhere.
    assert cl.c.tick(60_000) == []
    d = cl.c.on_heartbeat(1, cl.epochs[1], 60_000)
    assert d.error_code == E.ERROR_CODE_NOT_CONTROLLER and d.commands == ()
    assert cl.c.lease_deadline_ms(1) is None
    assert cl.c.on_register(3, b"i", "h", 1, "", 60_000) == []


def test_heartbeat_from_unknown_node_is_refused_without_commands() -> None:
    cl = started(1)
    d = cl.c.on_heartbeat(9, 0, 100)
    assert d.error_code == E.ERROR_CODE_NODE_NOT_AVAILABLE and d.commands == () and not d.ok


def test_heartbeat_with_stale_broker_epoch_is_refused_and_renews_nothing() -> None:
    cl = started(1)
    old = cl.epochs[1]
    cl.start(1, now_ms=1_000)  # restart: a new incarnation, a new broker epoch
    assert cl.epochs[1] > old
    d = cl.c.on_heartbeat(1, old, 3_500)
    assert d.error_code == E.ERROR_CODE_STALE_BROKER_EPOCH and d.commands == ()
    assert cl.c.lease_deadline_ms(1) == 1_000 + SESSION_MS
    assert cl.c.tick(4_000) == [FenceNode(1, cl.epochs[1])]


def test_registration_proposes_register_node_and_the_node_starts_fenced() -> None:
    cl = started()
    cmds = cl.c.on_register(4, b"inc-1", "10.0.0.4", 9092, "a", 0)
    assert cmds == [RegisterNode(4, b"inc-1", "10.0.0.4", 9092, "a")]
    (r,) = cl.commit(cmds)
    assert cl.m.nodes[4].fenced and r.broker_epoch == r.metadata_offset
    # A fenced node holds no lease to run out: ticks do nothing to it.
    assert cl.c.tick(100_000) == []


def test_a_fenced_node_that_heartbeats_is_unfenced_and_an_unfenced_one_just_renews() -> None:
    cl = started()
    (r,) = cl.commit(cl.c.on_register(1, b"x", "h", 1, "", 0))
    d = cl.c.on_heartbeat(1, r.broker_epoch, 200)
    assert d.ok and d.commands == (UnfenceNode(1, r.broker_epoch),)
    cl.commit(d.commands)
    assert not cl.m.nodes[1].fenced
    d = cl.c.on_heartbeat(1, r.broker_epoch, 700)
    assert d.ok and d.commands == ()
    assert cl.c.lease_deadline_ms(1) == 700 + SESSION_MS


def test_want_fence_fences_an_unfenced_node_and_keeps_a_fenced_one_fenced() -> None:
    cl = started(1)
    d = cl.heartbeat(1, 100, want_fence=True)
    assert d.commands == (FenceNode(1, cl.epochs[1]),) and cl.m.nodes[1].fenced
    assert cl.heartbeat(1, 600, want_fence=True).commands == ()
    assert cl.m.nodes[1].fenced
    assert cl.heartbeat(1, 1_100).commands == (UnfenceNode(1, cl.epochs[1]),)


def test_a_lease_runs_out_session_timeout_after_the_last_heartbeat() -> None:
    cl = started(1, 2)
    cl.heartbeat(1, 1_000)
    cl.heartbeat(2, 2_000)
    assert cl.c.tick(1_000 + SESSION_MS - 1) == []
    assert cl.c.tick(1_000 + SESSION_MS) == [FenceNode(1, cl.epochs[1])]
    cl.commit([FenceNode(1, cl.epochs[1])])
    assert cl.c.tick(2_000 + SESSION_MS - 1) == []
    assert cl.c.tick(2_000 + SESSION_MS) == [FenceNode(2, cl.epochs[2])]


def test_fencing_a_leader_moves_its_partitions_to_the_next_isr_member() -> None:
    cl = started(1, 2, 3)
    tid = cl.topic("t", ((1, 2, 3),))
    for t in range(500, 4_000, 500):
        cl.heartbeat(2, t)
        cl.heartbeat(3, t)
    cl.commit(cl.c.tick(4_000))
    p = cl.m.partition(tid, 0)
    assert p is not None and cl.m.nodes[1].fenced and p.leader == 2 and p.isr == (2, 3)


def test_a_new_controller_gives_every_node_a_fresh_lease() -> None:
    cl = started(1, 2, 3)
    cl.c.deactivate()
    fresh = ActiveController(cl.m, random.Random(1), session_timeout_ms=SESSION_MS)
    fresh.activate(100_000)  # nobody heartbeated to it yet, and the last heartbeats are long gone
    assert fresh.tick(100_000) == []
    assert fresh.tick(100_000 + SESSION_MS - 1) == []
    fresh.on_heartbeat(2, cl.epochs[2], 101_000)
    assert fresh.tick(100_000 + SESSION_MS) == [FenceNode(1, cl.epochs[1]), FenceNode(3, cl.epochs[3])]


def test_a_node_unfenced_behind_the_controllers_back_gets_a_lease_not_a_fence() -> None:
    cl = started()
    (r,) = cl.commit(cl.c.on_register(1, b"x", "h", 1, "", 0))
    cl.commit([UnfenceNode(1, r.broker_epoch)])  # committed from a previous controller's term
    assert cl.c.tick(50_000) == []
    assert cl.c.lease_deadline_ms(1) == 50_000 + SESSION_MS
    assert cl.c.tick(50_000 + SESSION_MS) == [FenceNode(1, r.broker_epoch)]


def test_a_command_in_flight_is_not_returned_again_until_applied_or_retry_time() -> None:
    cl = started(1)
    fence = FenceNode(1, cl.epochs[1])
    assert cl.c.tick(SESSION_MS) == [fence]
    assert cl.c.tick(SESSION_MS + HEARTBEAT_MS - 1) == []  # still committing
    assert cl.c.tick(SESSION_MS + HEARTBEAT_MS) == [fence]  # lost? propose again
    cl.c.on_applied(fence, Result(False, E.ERROR_CODE_UNKNOWN_SERVER_ERROR, "", 0))
    assert cl.c.tick(SESSION_MS + HEARTBEAT_MS + 1) == [fence]  # reported: decide afresh


def test_preferred_leader_balancing_moves_leadership_back_at_most_once_per_interval() -> None:
    cl = started(1, 2, 3)
    tid = cl.topic("t", ((1, 2, 3), (2, 3, 1)))
    cl.commit([ElectLeader(tid, 0, 2, 0), ElectLeader(tid, 1, 3, 0)])
    for t in range(500, 12_000, 500):
        for n in (1, 2, 3):
            cl.heartbeat(n, t)
        cmds = cl.c.tick(t)
        if t < BALANCE_MS:
            assert cmds == [], t
        elif t == BALANCE_MS:
            assert cmds == [ElectLeader(tid, 0, 1, 1), ElectLeader(tid, 1, 2, 1)]
            cl.commit(cmds)
            cl.commit([ElectLeader(tid, 0, 3, 2)])  # an operator moves it away again
        elif t < 2 * BALANCE_MS:
            assert cmds == [], t  # rate-limited
        elif t == 2 * BALANCE_MS:
            assert cmds == [ElectLeader(tid, 0, 1, 3)]
            cl.commit(cmds)
    assert [p.leader for p in cl.m.topics[tid].partitions] == [1, 2]


def test_balancing_skips_a_preferred_replica_out_of_the_isr_fenced_or_with_an_expired_lease() -> None:
    cl = started(1, 2, 3, 4)
    tid = cl.topic("t", ((1, 2), (2, 3), (3, 4)))
    cl.commit([ElectLeader(tid, i, r, 0) for i, r in enumerate((2, 3, 4))])
    # Partition 0: node 1 leaves the ISR. Partition 1: node 2 is fenced. Partition 2: node 3 goes silent.
    cl.commit([AlterPartition(tid, 0, 2, cl.epochs[2], 1, 1, (2,))])
    for t in range(500, BALANCE_MS + 1, 500):
        for n in (1, 4):
            cl.heartbeat(n, t)
        if t < 2_000:  # node 3 last heartbeats at 1_500: its lease runs out at 4_500
            cl.heartbeat(2, t, want_fence=True)
            cl.heartbeat(3, t)
    assert cl.m.nodes[2].fenced and not cl.m.nodes[3].fenced
    cmds = cl.c.tick(BALANCE_MS)
    assert cmds == [FenceNode(3, cl.epochs[3])]


def test_controlled_shutdown_moves_leaderships_first_then_fences() -> None:
    cl = started(1, 2, 3)
    tid = cl.topic("t", ((1, 2, 3), (1, 3, 2), (2, 1, 3)))
    d = cl.c.on_controlled_shutdown(1, cl.epochs[1], 100)
    assert d.ok and not d.shutdown_ready
    assert d.commands == (ElectLeader(tid, 0, 2, 0), ElectLeader(tid, 1, 3, 0))
    assert not cl.m.nodes[1].fenced
    cl.commit(d.commands)
    d = cl.c.on_controlled_shutdown(1, cl.epochs[1], 600)
    assert d.commands == (FenceNode(1, cl.epochs[1]),) and d.shutdown_ready
    cl.commit(d.commands)
    assert cl.m.nodes[1].fenced
    assert [p.leader for p in cl.m.topics[tid].partitions] == [2, 3, 2]
    # A retried ask after the fence is answered at once (the fence is repeated: see the next test).
    d = cl.c.on_controlled_shutdown(1, cl.epochs[1], 1_100)
    assert d.shutdown_ready and d.commands == (FenceNode(1, cl.epochs[1]),)


def test_controlled_shutdown_fences_after_an_unfence_still_in_flight() -> None:
    cl = started()
    (r,) = cl.commit(cl.c.on_register(1, b"x", "h", 1, "", 0))
    unfence = cl.c.on_heartbeat(1, r.broker_epoch, 100).commands
    assert unfence == (UnfenceNode(1, r.broker_epoch),)  # proposed, not committed yet
    d = cl.c.on_controlled_shutdown(1, r.broker_epoch, 150)
    assert d.shutdown_ready and d.commands == (FenceNode(1, r.broker_epoch),)
    cl.commit(unfence + d.commands)
    assert cl.m.nodes[1].fenced


def test_a_fence_after_an_unfence_in_flight_is_not_held_back() -> None:
    cl = started(1)
    e = cl.epochs[1]
    # The caller applies without reporting back, so the first fence still counts as in flight.
    (fence,) = cl.c.on_heartbeat(1, e, 100, want_fence=True).commands
    cl.m.apply(fence)
    assert cl.c.on_heartbeat(1, e, 200).commands == (UnfenceNode(1, e),)  # not committed yet
    d = cl.c.on_controlled_shutdown(1, e, 300)
    assert d.shutdown_ready and d.commands == (FenceNode(1, e),)
    cl.m.apply(UnfenceNode(1, e))
    cl.m.apply(FenceNode(1, e))
    assert cl.m.nodes[1].fenced


def test_controlled_shutdown_through_heartbeats_and_never_unfenced_meanwhile() -> None:
    cl = started(1, 2)
    tid = cl.topic("t", ((1, 2),))
    d = cl.heartbeat(1, 100, controlled_shutdown=True)
    assert d.commands == (ElectLeader(tid, 0, 2, 0),)
    # Balancing never hands the leadership back to a node that is shutting down.
    for t in range(500, BALANCE_MS + 1, 500):
        cl.heartbeat(2, t)
        assert cl.heartbeat(1, t).commands == ()
        assert cl.c.tick(t) == []
    d = cl.heartbeat(1, BALANCE_MS + 100, controlled_shutdown=True)
    assert d.shutdown_ready and d.commands == (FenceNode(1, cl.epochs[1]),)
    assert cl.heartbeat(1, BALANCE_MS + 200).commands == ()  # still fenced: it is stopping
    assert cl.m.nodes[1].fenced and cl.c.shutting_down() == {1}


def test_controlled_shutdown_of_the_only_live_isr_member_fences_and_the_partition_goes_offline() -> None:
    cl = started(1, 2)
    tid = cl.topic("t", ((1, 2),))
    cl.commit([AlterPartition(tid, 0, 1, cl.epochs[1], 0, 0, (1,))])
    d = cl.c.on_controlled_shutdown(1, cl.epochs[1], 100)
    assert d.shutdown_ready and d.commands == (FenceNode(1, cl.epochs[1]),)
    cl.commit(d.commands)
    p = cl.m.partition(tid, 0)
    assert p is not None and p.leader == NO_LEADER and p.isr == (1,)


def test_controlled_shutdown_with_stale_epoch_is_refused() -> None:
    cl = started(1)
    d = cl.c.on_controlled_shutdown(1, cl.epochs[1] + 1, 100)
    assert d.error_code == E.ERROR_CODE_STALE_BROKER_EPOCH and d.commands == ()
    assert cl.c.on_controlled_shutdown(5, 0, 100).error_code == E.ERROR_CODE_NODE_NOT_AVAILABLE


def test_create_topic_places_replicas_over_live_nodes_only() -> None:
    cl = started(1, 2, 3, 4)
    cl.heartbeat(4, 100, want_fence=True)
    cmd = cl.c.create_topic("t", 6, 3, (("retention.ms", "1000"),), b"\x07" * 16, 200)
    assert isinstance(cmd, CreateTopic)
    assert cmd.name == "t" and cmd.topic_id == b"\x07" * 16 and cmd.configs == (("retention.ms", "1000"),)
    assert len(cmd.assignments) == 6 and all(sorted(a) == [1, 2, 3] for a in cmd.assignments)
    assert sorted(a[0] for a in cmd.assignments) == [1, 1, 2, 2, 3, 3]  # leaders balanced
    (r,) = cl.commit([cmd])
    assert r.ok


def test_create_topic_is_rack_aware() -> None:
    racks = {1: "a", 2: "a", 3: "b", 4: "b", 5: "c", 6: "c"}
    cl = Cluster(racks=racks)
    cl.c.activate(0)
    for n in racks:
        cl.start(n)
    cmd = cl.c.create_topic("t", 12, 3, (), b"\x07" * 16, 0)
    assert isinstance(cmd, CreateTopic)
    assert all(len({racks[r] for r in a}) == 3 for a in cmd.assignments)


def test_create_topic_refuses_a_replication_factor_above_the_live_nodes() -> None:
    cl = started(1, 2, 3)
    for t in range(500, SESSION_MS + 1, 500):
        cl.heartbeat(1, t)
        cl.heartbeat(2, t)
    # Node 3's lease ran out but the fence is not committed yet: it does not count as live.
    refusal = cl.c.create_topic("t", 1, 3, (), b"\x07" * 16, SESSION_MS + 100)
    assert isinstance(refusal, Refusal) and refusal.error_code == E.ERROR_CODE_INVALID_REPLICATION_FACTOR
    assert isinstance(cl.c.create_topic("t", 1, 2, (), b"\x07" * 16, SESSION_MS + 100), CreateTopic)
    zero = cl.c.create_topic("t", 1, 0, (), b"\x07" * 16, SESSION_MS + 100)
    assert isinstance(zero, Refusal) and zero.error_code == E.ERROR_CODE_INVALID_REPLICATION_FACTOR


@pytest.mark.parametrize(
    ("name", "partitions", "configs", "code"),
    [
        ("bad name", 1, (), E.ERROR_CODE_INVALID_TOPIC),
        ("t", 0, (), E.ERROR_CODE_INVALID_PARTITIONS),
        ("t", 10**9, (), E.ERROR_CODE_INVALID_PARTITIONS),
        ("t", 1, (("no_such_config", "1"),), E.ERROR_CODE_INVALID_CONFIG),
        ("t", 1, (("retention.ms", "1"), ("retention_ms", "2")), E.ERROR_CODE_INVALID_CONFIG),
        ("taken", 1, (), E.ERROR_CODE_TOPIC_ALREADY_EXISTS),
    ],
)
def test_create_topic_refuses_bad_requests(
    name: str, partitions: int, configs: tuple[tuple[str, str], ...], code: int
) -> None:
    cl = started(1)
    cl.topic("taken", ((1,),))
    refusal = cl.c.create_topic(name, partitions, 1, configs, b"\x07" * 16, 0)
    assert isinstance(refusal, Refusal) and refusal.error_code == code, refusal


def test_create_topic_placement_is_replayable_from_the_seed() -> None:
    def placement(seed: int) -> tuple[tuple[int, ...], ...]:
        cl = started(1, 2, 3, 4, 5)
        cl.c = ActiveController(cl.m, random.Random(seed))
        cl.c.activate(0)
        cmd = cl.c.create_topic("t", 3, 2, (), b"\x07" * 16, 0)
        assert isinstance(cmd, CreateTopic)
        return cmd.assignments

    assert placement(3) == placement(3)
    assert len({placement(s) for s in range(10)}) > 1  # the start index spreads topics


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="session_timeout_ms"):
        ActiveController(ClusterMetadata(), random.Random(0), session_timeout_ms=100)
    with pytest.raises(ValueError, match="heartbeat_interval_ms"):
        ActiveController(ClusterMetadata(), random.Random(0), heartbeat_interval_ms=0)


# ---------------------------------------------------------------------- simulation

SEEDS = 200
STEPS = 300
NODE_IDS = (1, 2, 3, 4, 5)
RACKS = ("a", "b", "c")
TOPIC_NAMES = ("orders", "clicks", "logs", "audit", "events")


@dataclass
class SimNode:
    """One node process: its incarnation, the broker epoch it learned, and what it is doing."""

    node_id: int
    rack: str
    alive: bool = False
    incarnation_id: bytes = b""
    broker_epoch: int = -1
    paused_until_ms: int = 0
    shutting_down: bool = False
    want_fence_until_ms: int = 0
    # Epochs of incarnations that are gone: a zombie of one may still send a heartbeat.
    old_epochs: tuple[int, ...] = ()


@dataclass
class Counts:
    steps: int = 0
    tick_fences: int = 0
    requested_fences: int = 0
    unfences: int = 0
    balance_elections: int = 0
    shutdown_elections: int = 0
    shutdowns_done: int = 0
    refused: int = 0
    failovers: int = 0
    lost_proposals: int = 0
    topics_created: int = 0
    rf_refusals: int = 0
    not_controller: int = 0
    stale_heartbeats: int = 0
    refused_by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, other: Counts) -> None:
        for k, v in vars(other).items():
            if isinstance(v, dict):
                for kind, n in v.items():
                    self.refused_by_kind[kind] = self.refused_by_kind.get(kind, 0) + n
            else:
                setattr(self, k, getattr(self, k) + v)


@dataclass
class Proposal:
    cmd: Command
    controller: ActiveController
    # What the command is for, so its result can be handed back to the node that asked.
    kind: str
    node: SimNode | None = None
    incarnation_id: bytes = b""


@dataclass
class Simulation:
    seed: int
    rng: random.Random = field(init=False)
    now_ms: int = 0
    m: ClusterMetadata = field(default_factory=ClusterMetadata)
    controller: ActiveController | None = None
    deposed: list[ActiveController] = field(default_factory=list)
    queue: list[Proposal] = field(default_factory=list)
    nodes: dict[int, SimNode] = field(default_factory=dict)
    # The oracle's view of leases: when the active controller last accepted a heartbeat of each
    # (node, broker epoch), and when it became active. Kept apart from the controller's own state.
    contact_ms: dict[tuple[int, int], int] = field(default_factory=dict)
    activated_ms: int = 0
    counts: Counts = field(default_factory=Counts)
    seen_broker_epochs: dict[int, int] = field(default_factory=dict)
    seen_partition_epochs: dict[tuple[bytes, int], tuple[int, int]] = field(default_factory=dict)
    controller_less_until_step: int = -1

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.nodes = {n: SimNode(n, RACKS[n % len(RACKS)]) for n in NODE_IDS}
        self.new_controller()

    # ------------------------------------------------------------ the Raft log

    def propose(
        self, cmds: list[Command] | tuple[Command, ...], kind: str, node: SimNode | None = None
    ) -> None:
        assert self.controller is not None
        inc = node.incarnation_id if node else b""
        self.queue.extend(Proposal(c, self.controller, kind, node, inc) for c in cmds)

    def flush(self, keep: int | None = None) -> None:
        """Commit the queued proposals in order (only the first ``keep`` of them; the rest are lost)."""
        queue, self.queue = self.queue, []
        if keep is not None:
            self.counts.lost_proposals += len(queue) - keep
            queue = queue[:keep]
        for prop in queue:
            r = self.m.apply(prop.cmd)
            if prop.controller.active:
                prop.controller.on_applied(prop.cmd, r)
            if not r.ok:
                self.counts.refused += 1
                self.counts.refused_by_kind[type(prop.cmd).__name__] = (
                    self.counts.refused_by_kind.get(type(prop.cmd).__name__, 0) + 1
                )
            if prop.kind == "register" and r.ok and prop.node is not None:
                # The node learns its broker epoch, unless it restarted again meanwhile.
                if prop.node.incarnation_id == prop.incarnation_id:
                    prop.node.broker_epoch = r.broker_epoch
            self.check_state()

    def check_state(self) -> None:
        m = self.m
        m.check_invariants()  # a leader is in the ISR and unfenced; a shared ISR holds unfenced nodes
        for node_id, n in m.nodes.items():
            assert n.broker_epoch >= self.seen_broker_epochs.get(node_id, -1), self.seed
            self.seen_broker_epochs[node_id] = n.broker_epoch
        for tid, t in m.topics.items():
            for i, p in enumerate(t.partitions):
                old_le, old_pe = self.seen_partition_epochs.get((tid, i), (0, 0))
                assert p.leader_epoch >= old_le and p.partition_epoch >= old_pe, (self.seed, p)
                self.seen_partition_epochs[(tid, i)] = (p.leader_epoch, p.partition_epoch)

    # ------------------------------------------------------------ the controller

    def new_controller(self) -> None:
        self.controller = ActiveController(
            self.m,
            random.Random(self.rng.random()),
            heartbeat_interval_ms=HEARTBEAT_MS,
            session_timeout_ms=SESSION_MS,
            leader_balance_interval_ms=BALANCE_MS,
        )
        self.controller.activate(self.now_ms)
        self.activated_ms = self.now_ms

    def failover(self, step: int) -> None:
        """The active controller loses Raft leadership; a suffix of its proposals is lost."""
        assert self.controller is not None
        self.controller.deactivate()
        self.deposed.append(self.controller)
        self.controller = None
        self.counts.failovers += 1
        self.flush(keep=self.rng.randint(0, len(self.queue)))
        self.controller_less_until_step = step + self.rng.randint(0, 3)

    def lease_valid_until_ms(self, node_id: int, broker_epoch: int) -> int:
        return max(self.contact_ms.get((node_id, broker_epoch), -(10**12)), self.activated_ms) + SESSION_MS

    # ------------------------------------------------------------ node behaviour

    def register(self, node: SimNode) -> None:
        if node.broker_epoch >= 0:
            node.old_epochs += (node.broker_epoch,)
        node.incarnation_id = self.rng.randbytes(16)
        node.broker_epoch = -1
        node.alive = True
        node.paused_until_ms = 0
        node.shutting_down = False
        if self.controller is None:
            return  # it retries on its next heartbeat round
        cmds = self.controller.on_register(
            node.node_id, node.incarnation_id, f"10.0.0.{node.node_id}", 9092, node.rack, self.now_ms
        )
        self.propose(cmds, "register", node)

    def heartbeat(self, node: SimNode) -> None:
        if node.broker_epoch < 0:
            if self.controller is not None and not any(
                p.node is node and p.kind == "register" for p in self.queue
            ):
                self.register(node)
            return
        if self.controller is None:
            # Whoever it asks answers NOT_CONTROLLER.
            for old in self.deposed[-1:]:
                d = old.on_heartbeat(node.node_id, node.broker_epoch, self.now_ms)
                assert d.error_code == E.ERROR_CODE_NOT_CONTROLLER and d.commands == ()
                self.counts.not_controller += 1
            return
        want_fence = self.now_ms < node.want_fence_until_ms
        d = self.controller.on_heartbeat(
            node.node_id,
            node.broker_epoch,
            self.now_ms,
            want_fence=want_fence,
            controlled_shutdown=node.shutting_down,
        )
        if d.error_code in (E.ERROR_CODE_STALE_BROKER_EPOCH, E.ERROR_CODE_NODE_NOT_AVAILABLE):
            assert d.commands == ()
            self.counts.stale_heartbeats += 1
            node.broker_epoch = -1  # it registers again
            return
        assert d.ok, d
        self.contact_ms[(node.node_id, node.broker_epoch)] = self.now_ms
        for c in d.commands:
            if isinstance(c, FenceNode):
                assert c.node_id == node.node_id and (want_fence or node.shutting_down)
                self.counts.requested_fences += 1
            elif isinstance(c, UnfenceNode):
                assert c.node_id == node.node_id and not want_fence and not node.shutting_down
                self.counts.unfences += 1
            else:
                assert isinstance(c, ElectLeader) and node.shutting_down
                p = self.m.partition(c.topic_id, c.partition)
                assert p is not None and p.leader == node.node_id and c.new_leader != node.node_id
                assert c.new_leader in p.isr and not self.m.nodes[c.new_leader].fenced
                self.counts.shutdown_elections += 1
        self.propose(d.commands, "heartbeat", node)
        if d.shutdown_ready:
            self.flush()  # the node is answered once the fence commits, then it stops
            record = self.m.nodes[node.node_id]
            if record.broker_epoch == node.broker_epoch:
                assert record.fenced
                assert all(p.leader != node.node_id for t in self.m.topics.values() for p in t.partitions)
            node.alive = False
            node.shutting_down = False
            self.counts.shutdowns_done += 1

    def zombie_heartbeat(self) -> None:
        """A heartbeat from an incarnation that is gone, or from a node that never registered."""
        assert self.controller is not None
        ghosts = [(n.node_id, e) for n in self.nodes.values() for e in n.old_epochs]
        node_id, epoch = self.rng.choice(ghosts) if ghosts else (99, 0)
        if node_id in self.m.nodes and self.m.nodes[node_id].broker_epoch == epoch:
            return  # its re-registration is not committed yet: the epoch is still current
        before = self.controller.lease_deadline_ms(node_id)
        d = self.controller.on_heartbeat(
            node_id, epoch, self.now_ms, controlled_shutdown=self.rng.random() < 0.3
        )
        expected = (
            E.ERROR_CODE_STALE_BROKER_EPOCH if node_id in self.m.nodes else E.ERROR_CODE_NODE_NOT_AVAILABLE
        )
        assert d.error_code == expected and d.commands == () and not d.shutdown_ready, (self.seed, d)
        assert self.controller.lease_deadline_ms(node_id) == before
        self.counts.stale_heartbeats += 1

    def tick(self) -> None:
        assert self.controller is not None
        cmds = self.controller.tick(self.now_ms)
        for c in cmds:
            if isinstance(c, FenceNode):
                # Never while the lease the controller granted is still valid.
                assert self.now_ms >= self.lease_valid_until_ms(c.node_id, c.broker_epoch), (self.seed, c)
                self.counts.tick_fences += 1
            else:
                assert isinstance(c, ElectLeader), c
                p = self.m.partition(c.topic_id, c.partition)
                assert p is not None and c.new_leader == p.replicas[0] and c.new_leader in p.isr
                assert c.expected_leader_epoch == p.leader_epoch
                self.counts.balance_elections += 1
        self.propose(cmds, "tick")

    def check_silent_nodes_fenced(self) -> None:
        """After a tick under an active controller, every unfenced node was heard from recently."""
        for node_id, n in self.m.nodes.items():
            if not n.fenced:
                heard_ms = self.lease_valid_until_ms(node_id, n.broker_epoch) - SESSION_MS
                assert self.now_ms < heard_ms + SESSION_MS, (
                    f"seed {self.seed}: node {node_id} silent since {heard_ms} is unfenced at {self.now_ms}"
                )

    def create_topic(self) -> None:
        assert self.controller is not None
        name = self.rng.choice(TOPIC_NAMES)
        rf = self.rng.randint(1, 4)
        live = self.controller_live_nodes()
        out = self.controller.create_topic(
            name, self.rng.randint(1, 4), rf, (), self.rng.randbytes(16), self.now_ms
        )
        if isinstance(out, Refusal):
            if out.error_code == E.ERROR_CODE_INVALID_REPLICATION_FACTOR:
                assert rf > len(live), (self.seed, rf, live)
                self.counts.rf_refusals += 1
            else:
                assert out.error_code == E.ERROR_CODE_TOPIC_ALREADY_EXISTS and name in self.m.topic_ids
            return
        assert rf <= len(live)
        racks = {self.m.nodes[n].rack for n in live}
        for a in out.assignments:
            assert len(a) == rf and set(a) <= live
            assert len({self.m.nodes[r].rack for r in a}) == min(rf, len(racks))
        self.counts.topics_created += 1
        self.propose([out], "admin")

    def controller_live_nodes(self) -> set[int]:
        """Unfenced nodes with a valid lease that are not shutting down, by the oracle."""
        assert self.controller is not None
        shutting = self.controller.shutting_down()
        return {
            n.node_id
            for n in self.m.nodes.values()
            if not n.fenced
            and n.node_id not in shutting
            and self.now_ms < self.lease_valid_until_ms(n.node_id, n.broker_epoch)
        }

    def alter_partition(self) -> None:
        """A partition leader shrinks or grows its ISR (straight to the log: not this module's work)."""
        parts = [
            (tid, i, p)
            for tid, t in sorted(self.m.topics.items())
            for i, p in enumerate(t.partitions)
            if p.leader != NO_LEADER
        ]
        if not parts or self.controller is None:
            return
        tid, i, p = self.rng.choice(parts)
        live = self.m.unfenced_nodes()
        followers = [r for r in p.isr if r != p.leader]
        joiners = [r for r in p.replicas if r not in p.isr and r in live]
        if followers and (not joiners or self.rng.random() < 0.5):
            new_isr = tuple(r for r in p.isr if r != self.rng.choice(followers))
        elif joiners:
            new_isr = p.isr + (self.rng.choice(joiners),)
        else:
            return
        epoch = self.m.nodes[p.leader].broker_epoch
        self.queue.append(
            Proposal(
                AlterPartition(tid, i, p.leader, epoch, p.leader_epoch, p.partition_epoch, new_isr),
                self.controller,
                "alter",
            )
        )

    # ------------------------------------------------------------ the run

    def step(self, s: int) -> None:
        self.counts.steps += 1
        self.now_ms += self.rng.randint(50, 800)
        if self.controller is None and s >= self.controller_less_until_step:
            self.new_controller()
        for node in self.nodes.values():
            if node.alive and node.paused_until_ms <= self.now_ms and self.rng.random() < 0.8:
                self.heartbeat(node)
                if self.rng.random() < 0.3:
                    self.flush()
        action = self.rng.random()
        dead = [n for n in self.nodes.values() if not n.alive]
        alive = [n for n in self.nodes.values() if n.alive and not n.shutting_down]
        if action < 0.10 and dead:
            self.register(self.rng.choice(dead))
        elif action < 0.14 and alive:
            self.rng.choice(alive).alive = False  # kill -9: it just goes silent
        elif action < 0.18 and alive:
            self.register(self.rng.choice(alive))  # fast restart, before its lease runs out
        elif action < 0.23 and alive:
            self.rng.choice(alive).paused_until_ms = self.now_ms + self.rng.randint(1_000, 6_000)
        elif action < 0.27 and alive:
            self.rng.choice(alive).shutting_down = True  # SIGTERM
        elif action < 0.29 and alive:
            self.rng.choice(alive).want_fence_until_ms = self.now_ms + self.rng.randint(500, 2_000)
        elif action < 0.40 and self.controller is not None:
            self.create_topic()
        elif action < 0.65:
            self.alter_partition()
        elif action < 0.70 and self.controller is not None:
            self.zombie_heartbeat()
        if self.controller is not None:
            self.tick()
            if 0.70 <= action < 0.715:
                self.failover(s)  # before the tick's fences commit: the next controller decides afresh
                return
            if self.rng.random() < 0.25:
                return  # the commit lags into the next step
            self.flush()
            self.check_silent_nodes_fenced()  # the tick's fences have committed
        else:
            assert all(old.tick(self.now_ms) == [] for old in self.deposed[-1:])
            self.flush()

    def run(self, steps: int) -> None:
        for n in NODE_IDS[:3]:
            self.register(self.nodes[n])
        self.flush()
        for s in range(steps):
            self.step(s)


def run_seeds(seeds: range) -> Counts:
    total = Counts()
    for seed in seeds:
        sim = Simulation(seed)
        sim.run(STEPS)
        total.add(sim.counts)
    return total


@pytest.mark.parametrize("chunk", range(4))
def test_controller_simulation_keeps_invariants(chunk: int) -> None:
    run_seeds(range(chunk, SEEDS, 4))


def test_simulation_exercises_the_interesting_paths() -> None:
    """The simulation is not vacuous: each rule fires many times over a few seeds."""
    start = time.perf_counter()
    c = run_seeds(range(20))
    elapsed = time.perf_counter() - start
    assert c.tick_fences > 50 and c.requested_fences > 20 and c.unfences > 100, c
    assert c.balance_elections > 20 and c.shutdown_elections > 10 and c.shutdowns_done > 20, c
    assert c.refused > 20 and c.failovers > 20 and c.lost_proposals > 0, c
    assert c.topics_created > 20 and c.rf_refusals > 5 and c.not_controller > 5 and c.stale_heartbeats > 0, c
    print(f"{c.steps / elapsed:.0f} steps/s; {c}")
