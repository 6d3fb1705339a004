"""A deterministic simulation of the active controller driving ClusterMetadata, over many seeds.

A small model controller keeps heartbeat leases on a fake clock and commits every decision as a
command: nodes register, heartbeat, pause, die and restart with a new incarnation; topics come and
go; partition leaders shrink and expand their ISR (sometimes from a stale view); the controller
fences nodes whose lease ran out and elects preferred leaders. After every command the invariants
hold, epochs only grow, no fenced node leads and stale requests are refused without a change. At the
end, replicas fed the same log (one through the log encoding, one from a mid-way snapshot) hold
exactly the same state and gave exactly the same results. A failure names its seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from headwater.raft.commands import (
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
    decode_command,
    encode_command,
)
from headwater.raft.metadata import (
    FIRST_PRODUCER_ID,
    ClusterMetadata,
    Result,
    choose_leader,
    place_replicas,
)
from headwater.v1 import errors_pb2 as E

SEEDS = 200
STEPS = 200
NODE_IDS = (1, 2, 3, 4, 5)
RACKS = ("a", "b", "c")
TOPIC_NAMES = ("orders", "clicks", "logs", "audit")
HEARTBEAT_INTERVAL_MS = 500
SESSION_TIMEOUT_MS = 3_000


@dataclass
class SimNode:
    """One node process as it sees itself: alive or not, its incarnation and broker epoch."""

    node_id: int
    rack: str
    alive: bool = False
    paused_until_ms: int = 0
    incarnation: int = 0
    broker_epoch: int = -1
    # Epochs of incarnations that are gone; requests carrying them must be refused.
    old_epochs: tuple[int, ...] = ()


@dataclass(frozen=True)
class PartitionView:
    """What a leader believed at some moment; replayed later to check stale requests are refused."""

    topic_id: bytes
    partition: int
    leader_id: int
    broker_epoch: int
    leader_epoch: int
    partition_epoch: int


class Simulation:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now_ms = 0
        self.m = ClusterMetadata()
        self.log: list[Command] = []
        self.results: list[Result] = []
        # The controller's volatile state: when each node's lease runs out.
        self.lease_deadline_ms: dict[int, int] = {}
        self.nodes = {n: SimNode(n, RACKS[n % len(RACKS)]) for n in NODE_IDS}
        self.views: list[PartitionView] = []
        # Highest epochs seen, to check they never go down.
        self.seen_partition_epochs: dict[tuple[bytes, int], tuple[int, int]] = {}
        self.seen_broker_epochs: dict[int, int] = {}
        self.next_producer_id = FIRST_PRODUCER_ID  # ids start at 1: 0 means none
        self.mid_snapshot = b""
        self.mid_offset = -1

    # ------------------------------------------------------------ committing

    def commit(self, cmd: Command) -> Result:
        r = self.m.apply(cmd)
        self.log.append(cmd)
        self.results.append(r)
        assert r.metadata_offset == self.m.metadata_offset == len(self.log) - 1
        self.check()
        return r

    def commit_refused(self, cmd: Command, *codes: int) -> Result:
        """Commit a command that must be refused with one of ``codes`` and change nothing."""
        before = self.m.to_snapshot()
        r = self.commit(cmd)
        assert not r.ok and r.error_code in codes, (cmd, r)
        after = ClusterMetadata.from_snapshot(self.m.to_snapshot())
        after.metadata_offset -= 1
        assert after.to_snapshot() == before, cmd
        return r

    def check(self) -> None:
        m = self.m
        m.check_invariants()
        for node_id, n in m.nodes.items():
            assert n.broker_epoch >= self.seen_broker_epochs.get(node_id, -1)
            self.seen_broker_epochs[node_id] = n.broker_epoch
        for tid, t in m.topics.items():
            for i, p in enumerate(t.partitions):
                old_le, old_pe = self.seen_partition_epochs.get((tid, i), (0, 0))
                assert p.leader_epoch >= old_le and p.partition_epoch >= old_pe, (self.seed, p)
                self.seen_partition_epochs[(tid, i)] = (p.leader_epoch, p.partition_epoch)
                if p.leader != NO_LEADER:
                    assert not m.nodes[p.leader].fenced, "a fenced node leads"

    # ------------------------------------------------------------ the controller's duties

    def heartbeat(self, node: SimNode) -> None:
        """A live node heartbeats; the controller renews its lease and unfences it if it was fenced."""
        record = self.m.nodes.get(node.node_id)
        if record is None or record.broker_epoch != node.broker_epoch:
            return  # the real controller answers STALE_BROKER_EPOCH; the node re-registers
        self.lease_deadline_ms[node.node_id] = self.now_ms + SESSION_TIMEOUT_MS
        if record.fenced:
            assert self.commit(UnfenceNode(node.node_id, node.broker_epoch)).ok

    def fence_expired(self) -> None:
        for node_id, record in sorted(self.m.nodes.items()):
            if not record.fenced and self.lease_deadline_ms.get(node_id, 0) < self.now_ms:
                assert self.commit(FenceNode(node_id, record.broker_epoch)).ok
                assert self.m.nodes[node_id].fenced
                assert all(node_id != p.leader for t in self.m.topics.values() for p in t.partitions)

    def register(self, node: SimNode) -> None:
        if node.broker_epoch >= 0:
            node.old_epochs += (node.broker_epoch,)
        node.incarnation += 1
        inc = self.rng.randbytes(16)
        r = self.commit(RegisterNode(node.node_id, inc, f"10.0.0.{node.node_id}", 9092, node.rack))
        assert r.ok and r.broker_epoch == r.metadata_offset
        assert all(r.broker_epoch > e for e in node.old_epochs)
        assert self.m.nodes[node.node_id].fenced
        # A retried registration of the same incarnation is idempotent.
        if self.rng.random() < 0.1:
            again = self.commit(RegisterNode(node.node_id, inc, f"10.0.0.{node.node_id}", 9092, node.rack))
            assert again.ok and again.broker_epoch == r.broker_epoch
        node.broker_epoch = r.broker_epoch
        node.alive = True
        node.paused_until_ms = 0
        self.lease_deadline_ms[node.node_id] = self.now_ms + SESSION_TIMEOUT_MS

    # ------------------------------------------------------------ actions

    def partitions(self) -> list[tuple[bytes, int]]:
        return [(tid, i) for tid, t in sorted(self.m.topics.items()) for i in range(len(t.partitions))]

    def create_topic(self) -> None:
        name = self.rng.choice(TOPIC_NAMES)
        live = sorted((n, self.m.nodes[n].rack) for n in self.m.unfenced_nodes())
        if not live:
            return
        rf = self.rng.randint(1, min(3, len(live)))
        assignments = place_replicas(self.rng.randint(1, 3), rf, live, self.rng.randrange(len(live)))
        configs: tuple[tuple[str, str], ...] = ()
        if self.rng.random() < 0.3:
            configs = (("unclean.leader.election.enable", "true"),)
        cmd = CreateTopic(name, self.rng.randbytes(16), assignments, configs)
        if name in self.m.topic_ids:
            self.commit_refused(cmd, E.ERROR_CODE_TOPIC_ALREADY_EXISTS)
            return
        assert self.commit(cmd).ok
        t = self.m.topic(name)
        assert t is not None
        for p in t.partitions:
            assert p.leader == p.replicas[0] and p.isr == p.replicas  # every placed node is live

    def delete_topic(self) -> None:
        name = self.rng.choice(TOPIC_NAMES)
        t = self.m.topic(name)
        if t is None:
            self.commit_refused(
                DeleteTopic(name, self.rng.randbytes(16)), E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
            )
            return
        assert self.commit(DeleteTopic(name, t.topic_id)).ok
        # Deleting twice is refused.
        if self.rng.random() < 0.3:
            self.commit_refused(DeleteTopic(name, t.topic_id), E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION)

    def alter_partition(self) -> None:
        """The leader of a random partition shrinks or expands its ISR, sometimes with stale epochs."""
        candidates = [
            (tid, i) for tid, i in self.partitions() if self.m.topics[tid].partitions[i].leader >= 0
        ]
        if not candidates:
            return
        tid, i = self.rng.choice(candidates)
        p = self.m.topics[tid].partitions[i]
        leader = self.nodes[p.leader]
        view = PartitionView(tid, i, p.leader, leader.broker_epoch, p.leader_epoch, p.partition_epoch)
        self.views.append(view)
        live = self.m.unfenced_nodes()
        followers = [r for r in p.isr if r != p.leader]
        joiners = [r for r in p.replicas if r not in p.isr and r in live]
        if followers and (not joiners or self.rng.random() < 0.5):
            new_isr = tuple(r for r in p.isr if r != self.rng.choice(followers))
        elif joiners:
            new_isr = p.isr + (self.rng.choice(joiners),)
        else:
            new_isr = p.isr
        stale = self.rng.random()
        if stale < 0.1 and p.leader_epoch > 0:
            cmd = AlterPartition(
                tid, i, p.leader, leader.broker_epoch, p.leader_epoch - 1, p.partition_epoch, new_isr
            )
            self.commit_refused(cmd, E.ERROR_CODE_FENCED_LEADER_EPOCH)
        elif stale < 0.2 and p.partition_epoch > 0:
            cmd = AlterPartition(
                tid, i, p.leader, leader.broker_epoch, p.leader_epoch, p.partition_epoch - 1, new_isr
            )
            self.commit_refused(cmd, E.ERROR_CODE_INVALID_UPDATE_VERSION)
        elif stale < 0.3 and leader.old_epochs:
            old = self.rng.choice(leader.old_epochs)
            cmd = AlterPartition(tid, i, p.leader, old, p.leader_epoch, p.partition_epoch, new_isr)
            self.commit_refused(cmd, E.ERROR_CODE_STALE_BROKER_EPOCH)
        else:
            cmd = AlterPartition(
                tid, i, p.leader, leader.broker_epoch, p.leader_epoch, p.partition_epoch, new_isr
            )
            r = self.commit(cmd)
            assert r.ok, r
            after = self.m.topics[tid].partitions[i]
            assert after.isr == tuple(x for x in p.replicas if x in new_isr)
            assert after.leader_epoch == p.leader_epoch
            assert after.partition_epoch == p.partition_epoch + (new_isr != p.isr)

    def replay_stale_view(self) -> None:
        """A leader acts on an old view: it may only succeed if the view is still exactly current."""
        if not self.views:
            return
        v = self.rng.choice(self.views)
        p = self.m.partition(v.topic_id, v.partition)
        record = self.m.nodes.get(v.leader_id)
        current = (
            p is not None
            and record is not None
            and (p.leader, p.leader_epoch, p.partition_epoch)
            == (v.leader_id, v.leader_epoch, v.partition_epoch)
            and record.broker_epoch == v.broker_epoch
        )
        new_isr = (v.leader_id,)
        cmd = AlterPartition(
            v.topic_id, v.partition, v.leader_id, v.broker_epoch, v.leader_epoch, v.partition_epoch, new_isr
        )
        if current:
            assert self.commit(cmd).ok
        else:
            self.commit_refused(
                cmd,
                E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION,
                E.ERROR_CODE_STALE_BROKER_EPOCH,
                E.ERROR_CODE_FENCED_LEADER_EPOCH,
                E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER,
                E.ERROR_CODE_INVALID_UPDATE_VERSION,
                E.ERROR_CODE_NODE_NOT_AVAILABLE,
            )

    def elect_preferred(self) -> None:
        parts = self.partitions()
        if not parts:
            return
        tid, i = self.rng.choice(parts)
        t = self.m.topics[tid]
        p = t.partitions[i]
        live = self.m.unfenced_nodes()
        expected, _ = choose_leader(p.replicas, p.isr, live, t.unclean_allowed())
        if self.rng.random() < 0.1:
            self.commit_refused(
                ElectLeader(tid, i, NO_LEADER, p.leader_epoch + 1), E.ERROR_CODE_FENCED_LEADER_EPOCH
            )
            return
        r = self.commit(ElectLeader(tid, i, NO_LEADER, p.leader_epoch))
        if expected == NO_LEADER:
            assert not r.ok and r.error_code == E.ERROR_CODE_LEADER_NOT_AVAILABLE
            return
        assert r.ok and r.leader_id == expected
        if expected == p.replicas[0]:
            assert self.m.topics[tid].partitions[i].leader == p.replicas[0]
        assert r.leader_epoch == p.leader_epoch + (expected != p.leader)

    def toggle_unclean(self) -> None:
        name = self.rng.choice(TOPIC_NAMES)
        value = self.rng.choice(("true", "false"))
        cmd = AlterConfigs(name, set=(("unclean_leader_election_enable", value),))
        if name not in self.m.topic_ids:
            self.commit_refused(cmd, E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION)
            return
        assert self.commit(cmd).ok
        if value == "true":  # every partition with a live replica has a leader now
            live = self.m.unfenced_nodes()
            t = self.m.topic(name)
            assert t is not None
            for p in t.partitions:
                assert p.leader != NO_LEADER or not live & set(p.replicas)

    def allocate_producer_ids(self) -> None:
        alive = [n for n in self.nodes.values() if n.alive]
        if not alive:
            return
        node = self.rng.choice(alive)
        if node.old_epochs and self.rng.random() < 0.3:
            old = self.rng.choice(node.old_epochs)
            self.commit_refused(AllocateProducerIds(node.node_id, old, 1000), E.ERROR_CODE_STALE_BROKER_EPOCH)
            return
        r = self.commit(AllocateProducerIds(node.node_id, node.broker_epoch, 1000))
        assert r.ok and r.producer_id_start == self.next_producer_id
        self.next_producer_id += 1000

    def step(self) -> None:
        self.now_ms += self.rng.randint(50, 800)
        for node in self.nodes.values():
            if node.alive and node.paused_until_ms <= self.now_ms and self.rng.random() < 0.8:
                self.heartbeat(node)
        self.fence_expired()
        dead = [n for n in self.nodes.values() if not n.alive]
        alive = [n for n in self.nodes.values() if n.alive]
        action = self.rng.random()
        if action < 0.12 and dead:
            self.register(self.rng.choice(dead))
        elif action < 0.17 and alive:
            self.rng.choice(alive).alive = False  # kill -9: it just stops heartbeating
        elif action < 0.22 and alive:
            self.register(self.rng.choice(alive))  # fast restart: new incarnation before the lease runs out
        elif action < 0.27 and alive:
            self.rng.choice(alive).paused_until_ms = self.now_ms + self.rng.randint(1_000, 6_000)
        elif action < 0.40:
            self.create_topic()
        elif action < 0.46:
            self.delete_topic()
        elif action < 0.70:
            self.alter_partition()
        elif action < 0.78:
            self.replay_stale_view()
        elif action < 0.88:
            self.elect_preferred()
        elif action < 0.93:
            self.toggle_unclean()
        else:
            self.allocate_producer_ids()

    def run(self, steps: int) -> None:
        for n in NODE_IDS[:3]:
            self.register(self.nodes[n])
        for s in range(steps):
            if s == steps // 2:
                self.mid_snapshot = self.m.to_snapshot()
                self.mid_offset = self.m.metadata_offset
            self.step()


def replay(log: list[Command], start: ClusterMetadata | None = None) -> tuple[ClusterMetadata, list[Result]]:
    m = start or ClusterMetadata()
    results = [m.apply(cmd) for cmd in log[m.metadata_offset + 1 :]]
    return m, results


@pytest.mark.parametrize("chunk", range(4))
def test_controller_simulation_keeps_invariants_and_replicas_agree(chunk: int) -> None:
    for seed in range(chunk, SEEDS, 4):
        sim = Simulation(seed)
        sim.run(STEPS)
        final = sim.m.to_snapshot()
        # Voters applying the same log end identical and answer identically.
        for _ in range(2):
            m, results = replay(sim.log)
            assert m.to_snapshot() == final and results == sim.results, f"seed {seed}"
        # One voter reads the log through its encoding.
        encoded = [decode_command(encode_command(c)) for c in sim.log]
        assert encoded == sim.log
        m, results = replay(encoded)
        assert m.to_snapshot() == final, f"seed {seed}"
        # One restores the mid-way snapshot and replays the rest.
        restored = ClusterMetadata.from_snapshot(sim.mid_snapshot)
        assert restored.metadata_offset == sim.mid_offset
        m, results = replay(sim.log, restored)
        assert m.to_snapshot() == final and results == sim.results[sim.mid_offset + 1 :], f"seed {seed}"
        assert m == sim.m


def test_simulation_exercises_the_interesting_paths() -> None:
    """The model is not vacuous: over a few seeds fences, restarts, refusals and offline partitions occur."""
    fences = registrations = refusals = offline = elections = 0
    for seed in range(20):
        sim = Simulation(seed)
        sim.run(STEPS)
        fences += sum(isinstance(c, FenceNode) for c in sim.log)
        registrations += sum(isinstance(c, RegisterNode) for c in sim.log)
        refusals += sum(not r.ok for r in sim.results)
        elections += sum(
            isinstance(c, ElectLeader) and r.ok for c, r in zip(sim.log, sim.results, strict=True)
        )
        m = ClusterMetadata()
        for cmd in sim.log:
            m.apply(cmd)
            offline += sum(p.leader == NO_LEADER for t in m.topics.values() for p in t.partitions)
    assert fences > 50 and registrations > 100 and refusals > 100 and elections > 50
    assert offline > 0
