"""ClusterMetadata, command by command: what each does, which epochs it bumps, and how each is refused.

A refused command must leave the state as it was: those tests compare snapshots before and after
(the offset aside, which every command advances).
"""

from __future__ import annotations

import json

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
    PartitionRecord,
    Result,
    SnapshotError,
    choose_leader,
    place_replicas,
)
from headwater.v1 import errors_pb2 as E

TID = bytes(range(1, 17))
TID2 = bytes(range(2, 18))


def inc(node_id: int, n: int = 0) -> bytes:
    return bytes([node_id, n]) * 8


class Cluster:
    """A ClusterMetadata with helpers; checks every invariant after each command."""

    def __init__(self, nodes: int = 3) -> None:
        self.m = ClusterMetadata()
        self.epochs: dict[int, int] = {}
        for n in range(1, nodes + 1):
            self.start(n)

    def apply(self, cmd: Command) -> Result:
        before = self.m.metadata_offset
        r = self.m.apply(cmd)
        assert self.m.metadata_offset == before + 1 == r.metadata_offset
        self.m.check_invariants()
        return r

    def start(self, node_id: int, incarnation: int = 0, rack: str = "") -> int:
        r = self.apply(RegisterNode(node_id, inc(node_id, incarnation), "127.0.0.1", 9000 + node_id, rack))
        assert r.ok, r
        self.epochs[node_id] = r.broker_epoch
        assert self.apply(UnfenceNode(node_id, r.broker_epoch)).ok
        return r.broker_epoch

    def fence(self, node_id: int) -> Result:
        return self.apply(FenceNode(node_id, self.epochs[node_id]))

    def create(self, assignments: tuple[tuple[int, ...], ...] = ((1, 2, 3),), **configs: str) -> Result:
        return self.apply(CreateTopic("t", TID, assignments, tuple(configs.items())))

    def p(self, index: int = 0, tid: bytes = TID) -> PartitionRecord:
        part = self.m.partition(tid, index)
        assert part is not None
        return part

    def alter(self, new_isr: tuple[int, ...], index: int = 0, **over: int) -> Result:
        part = self.m.partition(TID, index)
        assert part is not None
        args = dict(
            leader_id=part.leader,
            broker_epoch=self.epochs.get(part.leader, -1),
            leader_epoch=part.leader_epoch,
            partition_epoch=part.partition_epoch,
        )
        args.update(over)
        return self.apply(AlterPartition(TID, index, new_isr=new_isr, **args))

    def refused(self, cmd: Command, code: int) -> Result:
        """Apply ``cmd``, expect it refused with ``code`` and the state otherwise unchanged."""
        before = ClusterMetadata.from_snapshot(self.m.to_snapshot())
        r = self.apply(cmd)
        assert not r.ok and r.error_code == code, r
        assert r.message
        before.metadata_offset += 1
        assert self.m == before
        assert self.m.to_snapshot() == before.to_snapshot()
        return r


@pytest.fixture
def c() -> Cluster:
    return Cluster()


# ------------------------------------------------------------------ offsets and nodes


def test_every_command_advances_the_offset_even_refused_ones() -> None:
    m = ClusterMetadata()
    assert m.metadata_offset == -1
    assert m.apply(RegisterNode(1, inc(1), "h", 1)).ok
    assert not m.apply(FenceNode(1, 99)).ok
    assert m.metadata_offset == 1


def test_registration_gives_the_offset_as_broker_epoch_and_starts_fenced() -> None:
    m = ClusterMetadata()
    m.apply(DeleteTopic("nope", TID))
    r = m.apply(RegisterNode(7, inc(7), "h", 1, "r1"))
    assert r.ok and r.broker_epoch == 1 == r.metadata_offset
    assert m.nodes[7].fenced and m.nodes[7].rack == "r1"


def test_same_incarnation_re_registers_idempotently(c: Cluster) -> None:
    before = c.m.to_snapshot()
    r = c.apply(RegisterNode(1, inc(1), "127.0.0.1", 9001, ""))
    assert r.ok and r.broker_epoch == c.epochs[1]
    after = ClusterMetadata.from_snapshot(c.m.to_snapshot())
    after.metadata_offset -= 1
    assert after.to_snapshot() == before


def test_same_incarnation_with_another_address_is_refused(c: Cluster) -> None:
    c.refused(RegisterNode(1, inc(1), "10.0.0.1", 9001, ""), E.ERROR_CODE_INVALID_REQUEST)


def test_restart_gets_a_bigger_epoch_and_the_old_epoch_is_stale(c: Cluster) -> None:
    old = c.epochs[1]
    new = c.apply(RegisterNode(1, inc(1, 1), "127.0.0.1", 9001, "")).broker_epoch
    assert new > old
    assert c.m.nodes[1].fenced
    c.refused(UnfenceNode(1, old), E.ERROR_CODE_STALE_BROKER_EPOCH)
    c.refused(AllocateProducerIds(1, old, 10), E.ERROR_CODE_STALE_BROKER_EPOCH)
    assert c.apply(UnfenceNode(1, new)).ok and not c.m.nodes[1].fenced


def test_restart_moves_the_old_incarnations_leaderships(c: Cluster) -> None:
    c.create()
    assert c.p().leader == 1
    c.apply(RegisterNode(1, inc(1, 1), "127.0.0.1", 9001, ""))
    p = c.p()
    assert p.leader == 2 and p.isr == (2, 3) and p.leader_epoch == 1


@pytest.mark.parametrize(
    "cmd",
    [
        RegisterNode(-1, inc(1), "h", 1),
        RegisterNode(1, b"", "h", 1),
        RegisterNode(1, inc(1), "", 1),
        RegisterNode(1, inc(1), "h", 70000),
        RegisterNode(1, "not bytes", "h", 1),  # type: ignore[arg-type]
        FenceNode(True, 1),  # type: ignore[arg-type]
        CreateTopic("t", TID, [[1]], ()),  # type: ignore[arg-type]
        AlterPartition(TID, 0, 1, 1, 0, 0, (1.0,)),  # type: ignore[arg-type]
        "not a command",
    ],
)
def test_malformed_commands_are_refused(c: Cluster, cmd: Command) -> None:
    c.refused(cmd, E.ERROR_CODE_INVALID_REQUEST)


def test_fence_and_unfence_need_the_current_epoch_and_a_known_node(c: Cluster) -> None:
    c.refused(FenceNode(1, c.epochs[1] + 100), E.ERROR_CODE_STALE_BROKER_EPOCH)
    c.refused(FenceNode(9, 0), E.ERROR_CODE_NODE_NOT_AVAILABLE)
    c.refused(UnfenceNode(9, 0), E.ERROR_CODE_NODE_NOT_AVAILABLE)
    assert c.fence(1).ok and c.m.nodes[1].fenced
    assert c.fence(1).ok  # fencing twice is harmless
    assert c.apply(UnfenceNode(1, c.epochs[1])).ok and not c.m.nodes[1].fenced


# ------------------------------------------------------------------ fencing and leadership


def test_fencing_the_leader_moves_leadership_to_the_first_live_isr_member(c: Cluster) -> None:
    c.create()
    assert c.fence(1).ok
    p = c.p()
    assert (p.leader, p.isr, p.leader_epoch, p.partition_epoch) == (2, (2, 3), 1, 1)


def test_fencing_a_follower_shrinks_the_isr_and_keeps_the_leader_epoch(c: Cluster) -> None:
    c.create()
    c.fence(2)
    p = c.p()
    assert (p.leader, p.isr, p.leader_epoch, p.partition_epoch) == (1, (1, 3), 0, 1)


def test_the_last_isr_member_stays_and_the_partition_goes_offline(c: Cluster) -> None:
    c.create()
    c.fence(2)
    c.fence(3)
    c.fence(1)
    p = c.p()
    assert p.leader == NO_LEADER and p.isr == (1,)
    # Node 2 comes back: not in the ISR, so no clean leader.
    c.apply(UnfenceNode(2, c.epochs[2]))
    assert c.p().leader == NO_LEADER
    # Node 1 comes back: it had all the data, it leads again.
    c.apply(UnfenceNode(1, c.epochs[1]))
    p = c.p()
    assert p.leader == 1 and p.isr == (1,)


def test_unclean_election_only_when_the_topic_allows_it(c: Cluster) -> None:
    c.create()
    for n in (2, 3, 1):
        c.fence(n)
    c.apply(UnfenceNode(3, c.epochs[3]))
    assert c.p().leader == NO_LEADER
    assert c.apply(AlterConfigs("t", set=(("unclean.leader.election.enable", "true"),))).ok
    p = c.p()
    assert p.leader == 3 and p.isr == (3,)


def test_fencing_with_unclean_allowed_picks_a_live_out_of_sync_replica(c: Cluster) -> None:
    c.create(unclean_leader_election_enable="true")
    c.alter((1,))
    c.fence(1)
    p = c.p()
    assert p.leader == 2 and p.isr == (2,)


def test_preferred_election_gives_leadership_back(c: Cluster) -> None:
    c.create()
    c.fence(1)
    epoch = c.start(1, incarnation=1)
    assert epoch == c.epochs[1]
    p = c.p()
    assert p.leader == 2
    # Not in the ISR yet: the controller's choice is still node 2 (no change), node 1 is ineligible.
    r = c.apply(ElectLeader(TID, 0, NO_LEADER, p.leader_epoch))
    assert r.ok and r.leader_id == 2 and r.leader_epoch == p.leader_epoch
    c.refused(ElectLeader(TID, 0, 1, p.leader_epoch), E.ERROR_CODE_INELIGIBLE_REPLICA)
    assert c.alter((1, 2, 3)).ok
    p = c.p()
    r = c.apply(ElectLeader(TID, 0, NO_LEADER, p.leader_epoch))
    assert r.ok and r.leader_id == 1 and r.leader_epoch == p.leader_epoch + 1
    assert r.partition_epoch == p.partition_epoch + 1


def test_elect_leader_refusals(c: Cluster) -> None:
    c.create()
    p = c.p()
    c.refused(ElectLeader(TID2, 0, NO_LEADER, 0), E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION)
    c.refused(ElectLeader(TID, 5, NO_LEADER, 0), E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION)
    c.refused(ElectLeader(TID, 0, 2, p.leader_epoch + 1), E.ERROR_CODE_FENCED_LEADER_EPOCH)
    c.refused(ElectLeader(TID, 0, 4, 0), E.ERROR_CODE_INELIGIBLE_REPLICA)
    c.fence(2)
    c.refused(ElectLeader(TID, 0, 2, 0), E.ERROR_CODE_INELIGIBLE_REPLICA)
    r = c.apply(ElectLeader(TID, 0, 3, 0))
    assert r.ok and r.leader_id == 3 and r.leader_epoch == 1


def test_explicit_unclean_election_only_without_a_live_isr_member(c: Cluster) -> None:
    c.create()
    c.alter((1,))
    c.refused(ElectLeader(TID, 0, 2, 0, allow_unclean=True), E.ERROR_CODE_INELIGIBLE_REPLICA)
    c.fence(1)
    p = c.p()
    assert p.leader == NO_LEADER
    c.refused(ElectLeader(TID, 0, NO_LEADER, p.leader_epoch), E.ERROR_CODE_LEADER_NOT_AVAILABLE)
    r = c.apply(ElectLeader(TID, 0, 2, p.leader_epoch, allow_unclean=True))
    assert r.ok and r.leader_id == 2 and r.isr == (2,)


# ------------------------------------------------------------------ AlterPartition


def test_alter_partition_shrinks_and_expands_the_isr(c: Cluster) -> None:
    c.create()
    r = c.alter((1, 3))
    assert r.ok and r.isr == (1, 3) and r.partition_epoch == 1 and r.leader_epoch == 0
    r = c.alter((3, 2, 1))
    assert r.ok and r.isr == (1, 2, 3) and r.partition_epoch == 2  # kept in replica order
    r = c.alter((1, 2, 3))
    assert r.ok and r.partition_epoch == 2  # no change, no bump


def test_alter_partition_refusals(c: Cluster) -> None:
    c.create()
    c.refused(AlterPartition(TID2, 0, 1, c.epochs[1], 0, 0, (1,)), E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION)
    c.refused(AlterPartition(TID, 0, 1, c.epochs[1] - 1, 0, 0, (1,)), E.ERROR_CODE_STALE_BROKER_EPOCH)
    c.refused(AlterPartition(TID, 0, 2, c.epochs[2], 0, 0, (2,)), E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER)
    c.refused(AlterPartition(TID, 0, 1, c.epochs[1], 1, 0, (1,)), E.ERROR_CODE_FENCED_LEADER_EPOCH)
    c.refused(AlterPartition(TID, 0, 1, c.epochs[1], 0, 1, (1,)), E.ERROR_CODE_INVALID_UPDATE_VERSION)
    c.refused(AlterPartition(TID, 0, 1, c.epochs[1], 0, 0, (2, 3)), E.ERROR_CODE_INELIGIBLE_REPLICA)
    c.refused(AlterPartition(TID, 0, 1, c.epochs[1], 0, 0, (1, 4)), E.ERROR_CODE_INELIGIBLE_REPLICA)
    c.refused(AlterPartition(TID, 0, 1, c.epochs[1], 0, 0, (1, 1)), E.ERROR_CODE_INVALID_REQUEST)
    c.fence(3)
    c.refused(AlterPartition(TID, 0, 1, c.epochs[1], 0, 1, (1, 3)), E.ERROR_CODE_INELIGIBLE_REPLICA)


def test_a_deposed_leader_is_fenced_by_its_leader_epoch(c: Cluster) -> None:
    c.create()
    c.fence(1)
    c.start(1, incarnation=1)
    # Node 1's old incarnation still thinks it leads with epoch 0.
    c.refused(AlterPartition(TID, 0, 1, c.epochs[1], 0, 0, (1, 2)), E.ERROR_CODE_FENCED_LEADER_EPOCH)


# ------------------------------------------------------------------ topics and configs


def test_create_topic_elects_the_first_live_replica(c: Cluster) -> None:
    c.fence(2)
    assert c.create(((2, 1, 3), (3, 2, 1))).ok
    t = c.m.topic("t")
    assert t is not None and t.topic_id == TID
    p0, p1 = t.partitions
    assert (p0.leader, p0.isr) == (1, (1, 3))
    assert (p1.leader, p1.isr) == (3, (3, 1))


def test_create_topic_refusals(c: Cluster) -> None:
    assert c.create().ok
    c.refused(CreateTopic("t", TID2, ((1,),)), E.ERROR_CODE_TOPIC_ALREADY_EXISTS)
    c.refused(CreateTopic("u", TID, ((1,),)), E.ERROR_CODE_TOPIC_ALREADY_EXISTS)
    c.refused(CreateTopic("bad name", TID2, ((1,),)), E.ERROR_CODE_INVALID_TOPIC)
    c.refused(CreateTopic("..", TID2, ((1,),)), E.ERROR_CODE_INVALID_TOPIC)
    c.refused(CreateTopic("u", b"short", ((1,),)), E.ERROR_CODE_INVALID_REQUEST)
    c.refused(CreateTopic("u", bytes(16), ((1,),)), E.ERROR_CODE_INVALID_REQUEST)
    c.refused(CreateTopic("u", TID2, ()), E.ERROR_CODE_INVALID_PARTITIONS)
    c.refused(CreateTopic("u", TID2, ((1, 2), (1,))), E.ERROR_CODE_INVALID_REPLICA_ASSIGNMENT)
    c.refused(CreateTopic("u", TID2, ((),)), E.ERROR_CODE_INVALID_REPLICA_ASSIGNMENT)
    c.refused(CreateTopic("u", TID2, ((1, 1),)), E.ERROR_CODE_INVALID_REPLICA_ASSIGNMENT)
    c.refused(CreateTopic("u", TID2, ((1, 9),)), E.ERROR_CODE_INVALID_REPLICA_ASSIGNMENT)
    c.refused(CreateTopic("u", TID2, ((1,),), (("nope", "1"),)), E.ERROR_CODE_INVALID_CONFIG)
    c.refused(CreateTopic("u", TID2, ((1,),), (("retention_ms", "x"),)), E.ERROR_CODE_INVALID_CONFIG)
    c.refused(
        CreateTopic("u", TID2, ((1,),), (("retention_ms", "1"), ("retention.ms", "2"))),
        E.ERROR_CODE_INVALID_CONFIG,
    )
    c.fence(1)
    c.refused(CreateTopic("u", TID2, ((1,),)), E.ERROR_CODE_INVALID_REPLICA_ASSIGNMENT)


def test_delete_topic_and_delete_twice(c: Cluster) -> None:
    c.create()
    c.refused(DeleteTopic("t", TID2), E.ERROR_CODE_INCONSISTENT_TOPIC_ID)
    assert c.apply(DeleteTopic("t", TID)).ok
    assert c.m.topic("t") is None and c.m.partition(TID, 0) is None
    c.refused(DeleteTopic("t", TID), E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION)
    # The name is free again; the new topic has its own id and epochs.
    assert c.apply(CreateTopic("t", TID2, ((1,),))).ok


def test_alter_configs_sets_and_deletes(c: Cluster) -> None:
    c.create(retention_ms="1000")
    r = c.apply(AlterConfigs("t", set=(("retention.bytes", "10"),), delete=("retention_ms",)))
    assert r.ok
    t = c.m.topic("t")
    assert t is not None and t.configs == (("retention_bytes", "10"),)
    c.refused(AlterConfigs("u", set=(("retention_ms", "1"),)), E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION)
    c.refused(AlterConfigs("t", set=(("retention_ms", "-5"),)), E.ERROR_CODE_INVALID_CONFIG)
    c.refused(AlterConfigs("t", set=(("bogus", "1"),)), E.ERROR_CODE_INVALID_CONFIG)
    c.refused(AlterConfigs("t", delete=("bogus",)), E.ERROR_CODE_INVALID_CONFIG)
    c.refused(
        AlterConfigs("t", set=(("retention_ms", "1"),), delete=("retention.ms",)), E.ERROR_CODE_INVALID_CONFIG
    )


# ------------------------------------------------------------------ producer ids


def test_producer_id_blocks_never_overlap_and_start_at_1(c: Cluster) -> None:
    a = c.apply(AllocateProducerIds(1, c.epochs[1], 1000))
    b = c.apply(AllocateProducerIds(2, c.epochs[2], 10))
    # 0 and -1 mean "no producer id" on the wire (records.proto): the first id is 1.
    assert (a.producer_id_start, a.producer_id_count) == (1, 1000)
    assert (b.producer_id_start, b.producer_id_count) == (1001, 10)
    c.refused(AllocateProducerIds(1, c.epochs[1], 0), E.ERROR_CODE_INVALID_REQUEST)
    c.refused(AllocateProducerIds(1, c.epochs[1], 10**9), E.ERROR_CODE_INVALID_REQUEST)
    c.refused(AllocateProducerIds(9, 0, 10), E.ERROR_CODE_NODE_NOT_AVAILABLE)
    assert c.m.next_producer_id == 1011


def test_a_snapshot_from_when_ids_started_at_0_hands_out_1_first() -> None:
    old = json.loads(ClusterMetadata().to_snapshot())
    old["next_producer_id"] = 0
    m = ClusterMetadata.from_snapshot(json.dumps(old, separators=(",", ":")).encode())
    m.check_invariants()
    assert m.next_producer_id == FIRST_PRODUCER_ID == 1


# ------------------------------------------------------------------ snapshots and encoding


def test_snapshot_round_trips_exactly(c: Cluster) -> None:
    c.create(((1, 2, 3), (2, 3, 1)), retention_ms="5", unclean_leader_election_enable="true")
    c.apply(CreateTopic("other", TID2, ((3,),)))
    c.fence(2)
    c.apply(AllocateProducerIds(1, c.epochs[1], 7))
    raw = c.m.to_snapshot()
    back = ClusterMetadata.from_snapshot(raw)
    assert back == c.m and back.to_snapshot() == raw
    back.check_invariants()
    # The copy goes on exactly as the original does.
    cmd = FenceNode(3, c.epochs[3])
    assert back.apply(cmd) == c.m.apply(cmd)
    assert back.to_snapshot() == c.m.to_snapshot()


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b'{"version": 99}', b'{"version": 1}', b'{"version": 1, "metadata_offset": 0}'],
)
def test_bad_snapshots_are_refused(raw: bytes) -> None:
    with pytest.raises(SnapshotError):
        ClusterMetadata.from_snapshot(raw)


def test_snapshot_with_a_broken_invariant_is_refused(c: Cluster) -> None:
    c.create()
    good = c.m.to_snapshot()
    raw = good.replace(b"[[1,2,3],[1,2,3],1,", b"[[1,2,3],[2,3],1,")
    assert raw != good
    with pytest.raises(SnapshotError):
        ClusterMetadata.from_snapshot(raw)


def test_commands_encode_and_decode() -> None:
    cmds: list[Command] = [
        RegisterNode(1, inc(1), "h", 1, "r"),
        FenceNode(1, 2),
        UnfenceNode(1, 2),
        CreateTopic("t", TID, ((1, 2), (2, 1)), (("retention_ms", "1"),)),
        DeleteTopic("t", TID),
        AlterPartition(TID, 0, 1, 2, 3, 4, (1, 2)),
        ElectLeader(TID, 0, -1, 3, True),
        AlterConfigs("t", (("a", "b"),), ("c",)),
        AllocateProducerIds(1, 2, 1000),
    ]
    for cmd in cmds:
        assert decode_command(encode_command(cmd)) == cmd
    for bad in [
        b"x",
        b"{}",
        b'{"v":1,"type":"FenceNode","fields":{"node_id":1}}',
        b'{"v":1,"type":"FenceNode","fields":{"node_id":"1","broker_epoch":2}}',
    ]:
        with pytest.raises(ValueError):
            decode_command(bad)


# ------------------------------------------------------------------ placement and leader choice


def test_choose_leader_prefers_replica_order_then_unclean() -> None:
    assert choose_leader((1, 2, 3), (3, 2), {1, 2, 3}, False) == (2, (3, 2))
    assert choose_leader((1, 2, 3), (3,), {1, 2}, False) == (NO_LEADER, (3,))
    assert choose_leader((1, 2, 3), (3,), {2}, True) == (2, (2,))


def test_placement_balances_leaders_and_spreads_replicas() -> None:
    nodes = [(i, "") for i in range(1, 7)]
    a = place_replicas(12, 3, nodes, start_index=0)
    assert all(len(set(r)) == 3 for r in a)
    leaders = [r[0] for r in a]
    assert sorted(leaders) == sorted([1, 2, 3, 4, 5, 6] * 2)
    counts = {n: sum(n in r for r in a) for n in range(1, 7)}
    assert set(counts.values()) == {6}
    assert place_replicas(12, 3, nodes, start_index=4) != a
    assert place_replicas(12, 3, list(reversed(nodes)), start_index=0) == a


def test_placement_is_rack_aware() -> None:
    nodes = [(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "c"), (6, "c")]
    rack = dict(nodes)
    for start in range(6):
        for r in place_replicas(12, 3, nodes, start_index=start):
            assert len({rack[n] for n in r}) == 3, r
        for r in place_replicas(6, 2, nodes, start_index=start):
            assert len({rack[n] for n in r}) == 2, r
    # More replicas than racks: every rack once, then doubled up.
    for r in place_replicas(6, 4, nodes, start_index=1):
        assert len(set(r)) == 4 and len({rack[n] for n in r}) == 3


def test_placement_refuses_impossible_requests() -> None:
    with pytest.raises(ValueError):
        place_replicas(1, 4, [(1, ""), (2, ""), (3, "")], 0)
    with pytest.raises(ValueError):
        place_replicas(0, 1, [(1, "")], 0)
    with pytest.raises(ValueError):
        place_replicas(1, 1, [(1, ""), (1, "")], 0)
