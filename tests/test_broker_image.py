"""The broker serves its metadata image: replicas open and take roles from it, and data is removed
only once the image has caught up (a restarting node replays an old image first)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from pathlib import Path

import pytest

from headwater.config import NodeConfig
from headwater.node.broker import Broker
from headwater.node.partition import Role
from headwater.raft.commands import (
    CreateTopic,
    DeleteTopic,
    ElectLeader,
    FenceNode,
    RegisterNode,
    UnfenceNode,
)
from headwater.raft.metadata import ClusterMetadata
from headwater.storage import LogStore
from headwater.v1 import batch as batch_codec
from headwater.v1 import client_pb2 as pb
from headwater.v1 import errors_pb2

E = errors_pb2
TID = b"\x01" * 16


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    store = LogStore(str(tmp_path / "log"))
    yield Broker(NodeConfig(node_id=1, data_dir=str(tmp_path)), store, cluster_id="c")
    store.close()


def cluster(*commands: object) -> ClusterMetadata:
    md = ClusterMetadata()
    for node in (1, 2):
        assert md.apply(RegisterNode(node, bytes([node]) * 16, "127.0.0.1", 9000 + node)).ok
        epoch = md.nodes[node].broker_epoch
        assert md.apply(UnfenceNode(node, epoch)).ok
    for cmd in commands:
        assert md.apply(cmd).ok, cmd  # type: ignore[arg-type]
    return md


def produce(
    broker: Broker, topic: str, partition: int, acks: int = 1, timeout_ms: int = 0
) -> pb.ProducePartitionResponse:
    b = batch_codec.build_batch([(None, b"v", (), 1_000)])
    req = pb.ProduceRequest(
        acks=acks,
        timeout_ms=timeout_ms,
        topics=[
            pb.ProduceTopicData(
                topic=topic, partitions=[pb.ProducePartitionData(partition=partition, batches=[b])]
            )
        ],
    )
    return asyncio.run(broker.produce(req)).topics[0].partitions[0]


def test_replicas_open_with_the_role_the_image_gives(broker: Broker) -> None:
    md = cluster(CreateTopic("t", TID, ((1, 2), (2, 1))))
    broker.apply_image(md, caught_up=True)
    assert broker.partitions[("t", 0)].role is Role.LEADER
    assert broker.partitions[("t", 1)].role is Role.FOLLOWER
    assert produce(broker, "t", 0).error_code == E.ERROR_CODE_NONE
    refused = produce(broker, "t", 1)
    assert refused.error_code == E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER and refused.leader_id == 2
    # acks=all waits for the other member of the ISR, which copies nothing here: out of time, the
    # records stay in the leader's log, below no high watermark.
    timed_out = produce(broker, "t", 0, acks=-1, timeout_ms=100)
    assert timed_out.error_code == E.ERROR_CODE_REQUEST_TIMED_OUT
    assert broker.partitions[("t", 0)].high_watermark == 0
    # The image moves leadership: the roles follow, with the new epoch.
    moved = copy.deepcopy(md)
    assert moved.apply(ElectLeader(TID, 1, 1, 0)).ok
    broker.apply_image(moved, caught_up=True)
    p1 = broker.partitions[("t", 1)]
    assert p1.role is Role.LEADER and p1.leader_epoch == 1
    assert produce(broker, "t", 1).error_code == E.ERROR_CODE_NONE


def test_a_partition_with_the_leader_alone_in_the_isr_takes_acks_all(broker: Broker) -> None:
    md = cluster(CreateTopic("t", TID, ((1, 2),)))
    assert md.apply(FenceNode(2, md.nodes[2].broker_epoch)).ok  # node 2 leaves the ISR
    broker.apply_image(md, caught_up=True)
    assert broker.partitions[("t", 0)].isr == (1,)
    assert produce(broker, "t", 0, acks=-1).error_code == E.ERROR_CODE_NONE


def test_data_is_removed_only_once_the_image_has_caught_up(broker: Broker) -> None:
    md = cluster(CreateTopic("t", TID, ((1,),)))
    broker.apply_image(md, caught_up=True)
    assert produce(broker, "t", 0).error_code == E.ERROR_CODE_NONE
    # A restart replays the metadata from the start: an image from before the topic existed must
    # not remove its data.
    restarted = Broker(broker.config, broker.store, cluster_id="c")
    restarted.apply_image(cluster(), caught_up=False)
    assert (TID, 0) in broker.store.list_partitions()
    restarted.apply_image(md, caught_up=True)
    assert restarted.partitions[("t", 0)].log.log_end_offset == 1
    # Once caught up, a deleted topic's data goes.
    gone = copy.deepcopy(md)
    assert gone.apply(DeleteTopic("t", TID)).ok
    restarted.apply_image(gone, caught_up=True)
    assert ("t", 0) not in restarted.partitions
    assert broker.store.list_partitions() == []


def test_the_first_caught_up_image_removes_orphans_left_by_a_crash(broker: Broker) -> None:
    orphan = b"\x02" * 16
    broker.store.open_partition(orphan, 0)
    broker.apply_image(cluster(CreateTopic("t", TID, ((1,),))), caught_up=False)
    assert (orphan, 0) in broker.store.list_partitions()
    broker.apply_image(cluster(CreateTopic("t", TID, ((1,),))), caught_up=True)
    assert broker.store.list_partitions() == [(TID, 0)]


def test_metadata_answers_from_the_image(broker: Broker) -> None:
    md = cluster(CreateTopic("t", TID, ((1, 2), (2, 1))))
    assert md.apply(FenceNode(2, md.nodes[2].broker_epoch)).ok
    broker.apply_image(md, caught_up=True)
    broker.controller_id = 1
    resp = broker.metadata(pb.MetadataRequest())
    assert resp.controller_id == 1 and resp.metadata_offset == md.metadata_offset
    assert [(n.node_id, n.fenced) for n in resp.nodes] == [(1, False), (2, True)]
    parts = resp.topics[0].partitions
    assert [(p.leader_id, list(p.isr), list(p.offline_replicas)) for p in parts] == [
        (1, [1], [2]),
        (1, [1], [2]),
    ]
    assert broker.metadata(pb.MetadataRequest(topics=["nope"])).topics[0].error_code == (
        E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
    )


def test_an_unclean_election_is_logged_loudly(broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    md = cluster(CreateTopic("risky", TID, ((2, 1),), (("unclean_leader_election_enable", "true"),)))
    assert md.apply(FenceNode(1, md.nodes[1].broker_epoch)).ok  # node 1 drops out of the ISR
    broker.apply_image(md, caught_up=True)
    assert broker.partitions[("risky", 0)].role is Role.FOLLOWER
    later = copy.deepcopy(md)
    assert later.apply(FenceNode(2, later.nodes[2].broker_epoch)).ok  # the only in-sync replica dies
    assert later.apply(RegisterNode(1, b"\x09" * 16, "127.0.0.1", 9001)).ok
    assert later.apply(UnfenceNode(1, later.nodes[1].broker_epoch)).ok
    assert later.partition(TID, 0) is not None and later.partition(TID, 0).leader == 1  # type: ignore[union-attr]
    with caplog.at_level("WARNING", logger="headwater.node"):
        broker.apply_image(later, caught_up=True)
    assert broker.partitions[("risky", 0)].role is Role.LEADER
    assert any("UNCLEAN leader election" in r.getMessage() for r in caplog.records)


def test_an_older_image_is_never_served_again(broker: Broker) -> None:
    old = cluster()
    md = cluster(CreateTopic("t", TID, ((1,),)))
    broker.apply_image(md, caught_up=True)
    assert produce(broker, "t", 0).error_code == E.ERROR_CODE_NONE
    # A snapshot from a voter that lags (after a reconnect) must not undo what this node saw.
    broker.apply_image(old, caught_up=True)
    assert broker.image is md and (TID, 0) in broker.store.list_partitions()
    assert produce(broker, "t", 0).error_code == E.ERROR_CODE_NONE


def test_a_replica_that_cannot_open_does_not_stop_the_others_taking_their_roles(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from headwater.storage import StorageError

    other = b"\x03" * 16
    md = cluster(CreateTopic("a", TID, ((1, 2),)))
    broker.apply_image(md, caught_up=True)
    assert broker.partitions[("a", 0)].role is Role.LEADER
    moved = md.copy()
    assert moved.apply(CreateTopic("b", other, ((1,),))).ok
    assert moved.apply(ElectLeader(TID, 0, 2, 0)).ok
    real_open = broker.store.open_partition

    def failing(topic_id: bytes, index: int) -> object:
        if topic_id == other:
            raise StorageError("no space left on device")
        return real_open(topic_id, index)

    monkeypatch.setattr(broker.store, "open_partition", failing)
    broker.apply_image(moved, caught_up=True)
    assert broker.needs_reconcile and ("b", 0) not in broker.partitions
    assert broker.partitions[("a", 0)].role is Role.FOLLOWER  # not left acting as leader
    monkeypatch.undo()
    broker.apply_image(moved, caught_up=True)
    assert not broker.needs_reconcile and broker.partitions[("b", 0)].role is Role.LEADER
