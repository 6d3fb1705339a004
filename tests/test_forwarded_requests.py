"""Forwarded topic changes are safe to resend: the metadata remembers each forwarded request's id
with its answer, so a resend (after a lost answer, a timeout or a controller change) gets the first
answer and changes nothing. Plain data: the state machine and the command encoding, no threads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import grpc
from conftest import Cluster, eventually

from headwater.raft.commands import (
    AlterConfigs,
    Command,
    CreateTopic,
    DeleteTopic,
    FenceNode,
    RegisterNode,
    UnfenceNode,
    decode_command,
    encode_command,
)
from headwater.raft.metadata import (
    MAX_RECENT_REQUESTS,
    MAX_REQUEST_ID_LENGTH,
    ClusterMetadata,
    Result,
    place_replicas,
)
from headwater.v1 import client_pb2 as pb
from headwater.v1 import client_pb2_grpc, controller_pb2_grpc
from headwater.v1 import controller_pb2 as cpb
from headwater.v1 import errors_pb2 as E

TID = bytes(range(1, 17))
TID2 = bytes(range(2, 18))
RID = "2-6f1c0e1f6c2d4b7e9a0b1c2d3e4f5a6b"


def started(nodes: int = 3) -> ClusterMetadata:
    m = ClusterMetadata()
    for n in range(1, nodes + 1):
        r = m.apply(RegisterNode(n, bytes([n]) * 16, "127.0.0.1", 9000 + n))
        assert m.apply(UnfenceNode(n, r.broker_epoch)).ok
    return m


def apply(m: ClusterMetadata, cmd: Command) -> Result:
    r = m.apply(cmd)
    m.check_invariants()
    return r


def unchanged_but_offset(before: bytes, m: ClusterMetadata) -> bool:
    doc, now = json.loads(before), json.loads(m.to_snapshot())
    doc["metadata_offset"] = now["metadata_offset"]
    return bool(doc == now)


def test_a_create_resent_with_its_request_id_gets_the_first_answer_and_changes_nothing() -> None:
    m = started()
    first = apply(m, CreateTopic("t", TID, ((1,), (2,)), request_id=RID))
    assert first.ok
    before = m.to_snapshot()
    # The resend was placed afresh by whoever handled it: another topic id, other replicas.
    again = apply(m, CreateTopic("t", TID2, ((3,),), request_id=RID))
    assert again.ok and again.error_code == E.ERROR_CODE_NONE, again
    assert unchanged_but_offset(before, m)
    t = m.topic("t")
    assert t is not None and t.topic_id == TID and len(t.partitions) == 2
    assert m.request_answer(RID, "t") is not None


def test_the_same_create_without_a_request_id_still_says_the_topic_exists() -> None:
    m = started()
    assert apply(m, CreateTopic("t", TID, ((1,),))).ok
    again = apply(m, CreateTopic("t", TID2, ((1,),)))
    assert again.error_code == E.ERROR_CODE_TOPIC_ALREADY_EXISTS
    assert m.request_answer("", "t") is None


def test_a_refused_first_answer_is_the_answer_to_every_resend() -> None:
    m = started()
    assert apply(m, CreateTopic("t", TID, ((1,),))).ok
    refused = apply(m, CreateTopic("t", TID2, ((2,),), request_id=RID))
    assert refused.error_code == E.ERROR_CODE_TOPIC_ALREADY_EXISTS
    assert apply(m, DeleteTopic("t", TID)).ok
    # The name is free now, yet the resend is the same request: it gets the same answer.
    again = apply(m, CreateTopic("t", TID2, ((2,),), request_id=RID))
    assert again.error_code == E.ERROR_CODE_TOPIC_ALREADY_EXISTS
    assert m.topic("t") is None


def test_a_delete_resent_with_its_request_id_deletes_once_and_answers_success() -> None:
    m = started()
    assert apply(m, CreateTopic("t", TID, ((1,),))).ok
    assert apply(m, DeleteTopic("t", TID, request_id=RID)).ok
    # Another client creates a namesake before the resend lands: it must survive.
    assert apply(m, CreateTopic("t", TID2, ((2,),))).ok
    before = m.to_snapshot()
    again = apply(m, DeleteTopic("t", TID, request_id=RID))
    assert again.ok, again
    assert unchanged_but_offset(before, m)
    answer = m.request_answer(RID, "t")
    assert answer is not None and answer.topic_id == TID and answer.error_code == E.ERROR_CODE_NONE


def test_an_alter_configs_resent_with_its_request_id_is_applied_once() -> None:
    m = started()
    assert apply(m, CreateTopic("t", TID, ((1,),))).ok
    assert apply(m, AlterConfigs("t", set=(("retention_ms", "1000"),), request_id=RID)).ok
    assert apply(m, AlterConfigs("t", set=(("retention_ms", "2000"),))).ok
    again = apply(m, AlterConfigs("t", set=(("retention_ms", "1000"),), request_id=RID))
    assert again.ok
    t = m.topic("t")
    assert t is not None and t.config("retention_ms") == "2000"


def test_each_topic_of_a_request_has_its_own_answer() -> None:
    m = started()
    assert apply(m, CreateTopic("a", TID, ((1,),), request_id=RID)).ok
    # Topic "b" of the same request never committed before the controller changed: the resend
    # creates it.
    assert apply(m, CreateTopic("b", TID2, ((2,),), request_id=RID)).ok
    assert m.topic("a") is not None and m.topic("b") is not None


def test_the_remembered_answers_are_bounded_oldest_first() -> None:
    m = started()
    assert apply(m, CreateTopic("t", TID, ((1,),), request_id="first")).ok
    for i in range(MAX_RECENT_REQUESTS):
        apply(m, AlterConfigs("t", set=(("retention_ms", str(1000 + i)),), request_id=f"r{i}"))
    assert len(m.recent_requests) == MAX_RECENT_REQUESTS
    assert m.request_answer("first", "t") is None
    assert m.request_answer(f"r{MAX_RECENT_REQUESTS - 1}", "t") is not None


def test_remembered_answers_are_part_of_the_snapshot() -> None:
    m = started()
    assert apply(m, CreateTopic("t", TID, ((1,),), request_id=RID)).ok
    assert apply(m, DeleteTopic("t", TID, request_id="del")).ok
    copy = ClusterMetadata.from_snapshot(m.to_snapshot())
    assert copy == m
    assert copy.to_snapshot() == m.to_snapshot()
    assert list(copy.recent_requests) == list(m.recent_requests)
    # A voter restored from the snapshot answers a resend the same way.
    before = copy.to_snapshot()
    assert copy.apply(DeleteTopic("t", TID, request_id="del")).ok
    assert unchanged_but_offset(before, copy)


def test_a_snapshot_without_remembered_answers_still_loads() -> None:
    m = started()
    doc = json.loads(m.to_snapshot())
    doc.pop("requests", None)
    assert ClusterMetadata.from_snapshot(json.dumps(doc).encode()).recent_requests == {}


def test_a_request_id_longer_than_the_bound_is_refused() -> None:
    m = started()
    r = apply(m, CreateTopic("t", TID, ((1,),), request_id="x" * (MAX_REQUEST_ID_LENGTH + 1)))
    assert r.error_code == E.ERROR_CODE_INVALID_REQUEST
    assert m.topic("t") is None and not m.recent_requests


def test_commands_logged_before_request_ids_still_decode() -> None:
    cmd = CreateTopic("t", TID, ((1, 2),), (("retention_ms", "5"),), request_id=RID)
    assert decode_command(encode_command(cmd)) == cmd
    doc = json.loads(encode_command(cmd))
    del doc["fields"]["request_id"]
    old = CreateTopic("t", TID, ((1, 2),), (("retention_ms", "5"),))
    assert decode_command(json.dumps(doc).encode()) == old


def test_the_partition_count_follows_creates_and_deletes() -> None:
    m = started()
    assert m.partition_count == 0
    assert apply(m, CreateTopic("a", TID, ((1,),) * 3)).ok
    assert apply(m, CreateTopic("b", TID2, ((1,),) * 4)).ok
    assert m.partition_count == 7
    assert apply(m, DeleteTopic("a", TID)).ok
    assert m.partition_count == 4
    assert ClusterMetadata.from_snapshot(m.to_snapshot()).partition_count == 4


def test_fencing_a_node_of_large_topics_takes_time_linear_in_the_partitions() -> None:
    """The quorum applies entries on its tick thread: an apply that takes seconds starves Raft
    heartbeats and the followers elect another leader. Fencing used to copy a topic's partition
    tuple once per partition it changed (quadratic: 2.2 s for 5 topics of 10,000)."""
    m = started()
    nodes = [(1, ""), (2, ""), (3, "")]
    for k in range(3):
        tid = bytes([k + 1]) * 16
        assert m.apply(CreateTopic(f"t{k}", tid, place_replicas(10_000, 3, nodes, k))).ok
    started_s = time.perf_counter()
    assert m.apply(FenceNode(2, m.nodes[2].broker_epoch)).ok
    assert m.apply(UnfenceNode(2, m.nodes[2].broker_epoch)).ok
    took = time.perf_counter() - started_s
    m.check_invariants()
    assert took < 0.6, f"fence and unfence over 30,000 partitions took {took:.2f} s"


# ------------------------------------------------------------------ real clusters


def _create(name: str, partitions: int) -> pb.CreatableTopic:
    return pb.CreatableTopic(name=name, num_partitions=partitions, replication_factor=-1)


def _unfenced(c: Cluster, controller: int) -> None:
    def ready() -> bool:
        nodes = c.describe(controller).nodes
        return len(nodes) == len(c.nodes) and not any(n.fenced for n in nodes)

    eventually(ready, 30, "every node registered and unfenced")


def test_a_large_create_sent_to_a_non_controller_answers_success_for_every_topic_it_created(
    make_cluster: Callable[..., Cluster],
) -> None:
    """The attack report: 5 topics of 10,000 partitions sent to a node that is not the controller
    took 13.7 s, moved the controller, and answered TOPIC_ALREADY_EXISTS for the topics this very
    call created (the forwarding node resent it after its per-call timeout). Scaled down here, with
    a per-call timeout short enough that the forwarding node resends while the controller works."""
    c = make_cluster(3)
    for n in c.nodes.values():
        n.extra_args += ["--controller-call-timeout-ms", "300"]
    c.start()
    controller = c.active_controller()
    _unfenced(c, controller)
    term = c.describe(controller).raft_term
    other = next(i for i in c.nodes if i != controller)
    names = [f"big{i}" for i in range(4)]
    request = pb.CreateTopicsRequest(topics=[_create(n, 2_000) for n in names], timeout_ms=60_000)
    started_s = time.monotonic()
    with grpc.insecure_channel(c.nodes[other].bootstrap) as ch:
        resp = client_pb2_grpc.HeadwaterServiceStub(ch).CreateTopics(request, timeout=90)
    took = time.monotonic() - started_s
    print(f"4 topics x 2,000 partitions through node {other}: {took:.1f} s")
    answers = {t.name: (E.ErrorCode.Name(t.error_code), t.error_message) for t in resp.topics}
    assert answers == {n: ("ERROR_CODE_NONE", "") for n in names}
    md = c.metadata(other, names)
    assert {t.name: len(t.partitions) for t in md.topics} == {n: 2_000 for n in names}
    assert {t.name: t.topic_id for t in md.topics} == {t.name: t.topic_id for t in resp.topics}
    d = c.describe(controller)
    assert (d.controller_id, d.raft_term) == (controller, term), "the controller changed"
    assert not [n.node_id for n in d.nodes if n.fenced]


def _controller_call(c: Cluster, node_id: int, method: str, request: object) -> Any:
    with grpc.insecure_channel(c.nodes[node_id].bootstrap) as ch:
        stub = controller_pb2_grpc.ControllerServiceStub(ch)
        return getattr(stub, method)(request, timeout=30)


def test_a_forwarded_request_whose_answer_was_lost_gets_the_same_answer_and_changes_once(
    make_cluster: Callable[..., Cluster],
) -> None:
    """The forwarding node lost the first answer and resends with the same request id: to the same
    controller, and after that controller died, to the one that took over."""
    c = make_cluster(3)
    c.start()
    controller = c.active_controller()
    _unfenced(c, controller)
    create = cpb.ControllerServiceCreateTopicsRequest(
        request=pb.CreateTopicsRequest(topics=[_create("a", 3), _create("b", 2)]), request_id=RID
    )
    first = _controller_call(c, controller, "CreateTopics", create)
    assert first.error_code == E.ERROR_CODE_NONE
    assert [t.error_code for t in first.response.topics] == [E.ERROR_CODE_NONE] * 2
    offset = c.describe(controller).metadata_offset
    again = _controller_call(c, controller, "CreateTopics", create)
    assert again == first
    delete = cpb.ControllerServiceDeleteTopicsRequest(
        request=pb.DeleteTopicsRequest(names=["b"]), request_id="3-delete-b"
    )
    deleted = _controller_call(c, controller, "DeleteTopics", delete)
    assert [(t.error_code, t.topic_id) for t in deleted.response.topics] == [
        (E.ERROR_CODE_NONE, first.response.topics[1].topic_id)
    ]
    assert _controller_call(c, controller, "DeleteTopics", delete) == deleted
    # The controller dies; the resends go to the one that takes over, which knows the answers
    # from the metadata log alone.
    c.nodes[controller].kill9()
    survivors = [i for i in c.nodes if i != controller]
    successor = c.active_controller(among=survivors, timeout_s=30)
    after_create = _controller_call(c, successor, "CreateTopics", create)
    assert after_create.error_code == E.ERROR_CODE_NONE
    assert [(t.name, t.error_code, t.topic_id) for t in after_create.response.topics] == [
        ("a", E.ERROR_CODE_NONE, first.response.topics[0].topic_id),
        ("b", E.ERROR_CODE_NONE, first.response.topics[1].topic_id),
    ]
    after_delete = _controller_call(c, successor, "DeleteTopics", delete)
    assert [(t.error_code, t.topic_id) for t in after_delete.response.topics] == [
        (E.ERROR_CODE_NONE, first.response.topics[1].topic_id)
    ]
    md = c.metadata(successor)
    assert sorted((t.name, len(t.partitions)) for t in md.topics) == [("a", 3)]
    assert offset > 0


def test_partition_limits_refuse_with_the_setting_and_the_count(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(1)
    c.nodes[1].extra_args += ["--max-partitions", "50", "--max-partitions-per-request", "30"]
    c.start()
    _unfenced(c, c.active_controller())
    with grpc.insecure_channel(c.nodes[1].bootstrap) as ch:
        stub = client_pb2_grpc.HeadwaterServiceStub(ch)
        too_big = stub.CreateTopics(pb.CreateTopicsRequest(topics=[_create("x", 20), _create("y", 11)]))
        assert [t.error_code for t in too_big.topics] == [E.ERROR_CODE_POLICY_VIOLATION] * 2
        assert "would create 31 partitions" in too_big.topics[0].error_message
        assert "max_partitions_per_request=30" in too_big.topics[0].error_message
        for name in ("p", "q"):
            ok = stub.CreateTopics(pb.CreateTopicsRequest(topics=[_create(name, 20)]))
            assert ok.topics[0].error_code == E.ERROR_CODE_NONE, ok
        full = stub.CreateTopics(pb.CreateTopicsRequest(topics=[_create("r", 11)]))
        assert full.topics[0].error_code == E.ERROR_CODE_POLICY_VIOLATION
        assert "the cluster has 40 partitions" in full.topics[0].error_message
        assert "max_partitions=50" in full.topics[0].error_message
        fits = stub.CreateTopics(pb.CreateTopicsRequest(topics=[_create("r", 10)]))
        assert fits.topics[0].error_code == E.ERROR_CODE_NONE
    assert sorted(t.name for t in c.metadata(1).topics) == ["p", "q", "r"]
