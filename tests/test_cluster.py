"""Clusters of real node processes: every node a metadata voter and a broker (KRaft combined mode)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import SECRET, Cluster, NodeProcess, eventually, free_port, leaders, metric

from headwater import Admin, Consumer, NewTopic, Producer, TopicPartition
from headwater.client.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError
from headwater.node.auth import NodeAuth
from headwater.v1 import client_pb2 as pb
from headwater.v1 import client_pb2_grpc, controller_pb2, controller_pb2_grpc, errors_pb2

E = errors_pb2
# ----------------------------------------------------------------------------------------------


def test_three_nodes_spread_topics_and_serve_clients_from_any_node(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(3)
    c.start()
    with Admin(c.nodes[2].bootstrap) as admin:
        admin.create_topics([NewTopic("spread", partitions=6, replication_factor=1)])
        cluster = admin.describe_cluster()
    assert sorted(n.node_id for n in cluster.nodes) == [1, 2, 3]
    assert not any(n.fenced for n in cluster.nodes)
    # Every node serves the same image, and the leaders cover every node.
    images = [c.metadata(i, ["spread"]) for i in (1, 2, 3)]
    assert all(leaders(md, "spread") == leaders(images[0], "spread") for md in images)
    assert set(leaders(images[0], "spread")) == {1, 2, 3}
    # A client that bootstraps from one node reaches every leader.
    with Producer(bootstrap=c.nodes[3].bootstrap, acks=1, linger_ms=0) as producer:
        futures = [producer.send("spread", b"v%d" % i, partition=i % 6) for i in range(60)]
        producer.flush()
    assert {f.result(10).partition for f in futures} == set(range(6))
    consumer = Consumer(bootstrap=c.nodes[1].bootstrap, auto_offset_reset="earliest")
    try:
        consumer.assign([TopicPartition("spread", p) for p in range(6)])
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(got) < 60 and time.monotonic() < deadline:
            got += [r.value for r in consumer.poll(1.0)]
    finally:
        consumer.close()
    assert sorted(got) == sorted(b"v%d" % i for i in range(60))
    # A follower refuses a write with NOT_LEADER_OR_FOLLOWER and names the leader.
    leader = leaders(images[0], "spread")[0]
    other = next(i for i in (1, 2, 3) if i != leader)
    with grpc.insecure_channel(c.nodes[other].bootstrap) as ch:
        r = client_pb2_grpc.HeadwaterServiceStub(ch).Produce(
            pb.ProduceRequest(
                acks=1,
                topics=[
                    pb.ProduceTopicData(topic="spread", partitions=[pb.ProducePartitionData(partition=0)])
                ],
            ),
            timeout=5,
        )
    p0 = r.topics[0].partitions[0]
    assert p0.error_code == E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER and p0.leader_id == leader


def _subscribe_values(
    bootstrap: str, topic: str, partition: int, want: int, relayed: bool = False
) -> list[bytes]:
    """Read ``want`` records of a partition from its start with Subscribe (decoded), or the first
    answer's error code as ``[b"error:<code>"]``."""
    got: list[bytes] = []
    with grpc.insecure_channel(bootstrap) as ch:
        stream = client_pb2_grpc.HeadwaterServiceStub(ch).Subscribe(
            pb.SubscribeRequest(topic=topic, partition=partition, offset=-2, decode=True),
            timeout=10,
            metadata=(("headwater-relayed", "1"),) if relayed else None,
        )
        for resp in stream:
            if resp.error_code != E.ERROR_CODE_NONE:
                return [b"error:%d" % resp.error_code]
            got += [r.value for r in resp.records]
            if len(got) >= want:
                stream.cancel()
                break
    return got


def test_subscribe_sent_to_any_node_reads_the_partition_from_its_leader(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(3)
    c.start()
    with Admin(c.bootstrap) as admin:
        admin.create_topics([NewTopic("anywhere", partitions=3, replication_factor=1)])
    with Producer(bootstrap=c.bootstrap, acks=1, linger_ms=0) as producer:
        for i in range(30):
            producer.send("anywhere", b"v%d" % i, partition=i % 3)
        producer.flush()
    lead = leaders(c.metadata(1, ["anywhere"]), "anywhere")
    assert set(lead) == {1, 2, 3}
    for node_id in (1, 2, 3):
        for partition in range(3):
            got = _subscribe_values(c.nodes[node_id].bootstrap, "anywhere", partition, 10)
            assert got == [b"v%d" % i for i in range(partition, 30, 3)], (node_id, partition)
    # A relayed call is answered by the node it reached, never passed on again.
    partition = lead.index(1)
    assert _subscribe_values(c.nodes[2].bootstrap, "anywhere", partition, 10, relayed=True) == [
        b"error:%d" % E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER
    ]
    # A stream relayed to a leader that dies ends with NOT_LEADER_OR_FOLLOWER, not a hang.
    c.nodes[1].kill9()
    assert _subscribe_values(c.nodes[2].bootstrap, "anywhere", partition, 10) == [
        b"error:%d" % E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER
    ]


def test_killing_the_active_controller_elects_another_that_acts_and_keeps_every_change(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(3)
    c.start()
    with Admin(c.bootstrap) as admin:
        admin.create_topics(
            [NewTopic("kept", partitions=3, replication_factor=3), NewTopic("solo", partitions=3)]
        )
    active = c.active_controller()
    before = c.metadata(active, ["kept"])
    led_by_active = [i for i, leader in enumerate(leaders(before, "kept")) if leader == active]
    c.nodes[active].kill9()
    killed_at = time.monotonic()
    survivors = [i for i in c.nodes if i != active]
    new_active = c.active_controller(survivors)
    assert new_active != active
    # The new controller acts: it commits a change, and every earlier change is still there.
    with Admin(",".join(c.nodes[i].bootstrap for i in survivors)) as admin:
        admin.create_topics([NewTopic("after", partitions=1)])
        assert {"kept", "solo", "after"} <= set(admin.list_topics())
    failover_s = time.monotonic() - killed_at
    assert failover_s < 15

    # The dead node is fenced and its leaderships of replicated partitions moved to live replicas.
    def moved() -> bool:
        md = c.metadata(survivors[0], ["kept"])
        fenced = {n.node_id for n in md.nodes if n.fenced}
        ls = leaders(md, "kept")
        return active in fenced and all(ls[i] in survivors for i in led_by_active)

    eventually(moved, 10, "the dead node's partitions to get new leaders")
    md = c.metadata(survivors[1], ["kept"])
    for p in md.topics[0].partitions:
        assert p.leader_id in p.isr and active not in p.isr
        if p.partition in led_by_active:
            assert p.leader_epoch >= 1


def test_restarting_every_voter_brings_the_metadata_back(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3)
    c.start()
    with Admin(c.bootstrap) as admin:
        admin.create_topics(
            [NewTopic("durable", partitions=4, replication_factor=1, config={"retention_ms": "60000"})]
        )
    first = {n.node_id: n.broker_epoch for n in c.metadata(1).nodes}
    with Producer(bootstrap=c.bootstrap, acks=1) as producer:
        for i in range(20):
            producer.send("durable", b"r%d" % i, partition=i % 4)
        producer.flush()
    for n in c.nodes.values():
        n.kill9()
    c.start()
    md = c.metadata(2, ["durable"])
    assert md.topics[0].error_code == E.ERROR_CODE_NONE and len(md.topics[0].partitions) == 4
    again = {n.node_id: n.broker_epoch for n in md.nodes}
    assert all(again[i] > first[i] for i in first), (first, again)  # new incarnations, new epochs
    with Admin(c.bootstrap) as admin:
        assert admin.describe_configs("durable")["retention_ms"].value == "60000"

    # Each partition's only replica leads it again, with its data (replication_factor=1,
    # so a partition's data is where its leader was).
    def all_led() -> bool:
        return all(p.leader_id > 0 for p in c.metadata(1, ["durable"]).topics[0].partitions)

    eventually(all_led, 15, "every partition to have a leader")
    consumer = Consumer(bootstrap=c.bootstrap, auto_offset_reset="earliest")
    try:
        consumer.assign([TopicPartition("durable", p) for p in range(4)])
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(got) < 20 and time.monotonic() < deadline:
            got += [r.value for r in consumer.poll(1.0)]
    finally:
        consumer.close()
    assert sorted(got) == sorted(b"r%d" % i for i in range(20))


def test_a_voter_with_the_wrong_secret_is_kept_out(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3)
    wrong = c.root / "wrong.secret"
    wrong.write_text("not-the-cluster-secret\n")
    c.nodes[3].extra_args = c.args(3, wrong)
    c.start([1, 2])
    c.nodes[3].launch()
    time.sleep(4)  # several election timeouts
    d3 = c.describe(3)
    # Its voter learned nothing and leads nothing; the other two carry on.
    assert d3.metadata_offset == -1 and d3.controller_id == -1
    assert c.active_controller([1, 2]) in (1, 2)
    with Admin(",".join(c.nodes[i].bootstrap for i in (1, 2))) as admin:
        admin.create_topics([NewTopic("without-3", partitions=1)])
    assert c.describe(3).metadata_offset == -1
    # Nor can it join as a broker: the controller refuses its registration.
    assert 3 not in {n.node_id for n in c.describe(1).nodes}
    assert "refused this node" in c.nodes[3].log()
    assert not c.nodes[3].wait_serving_within(0.5)
    assert SECRET not in c.nodes[1].log() + c.nodes[2].log() + c.nodes[3].log()
    assert "not-the-cluster-secret" not in c.nodes[3].log()


def test_five_voters_survive_two_down(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(5)
    c.start()
    active = c.active_controller()
    down = [active, next(i for i in c.nodes if i != active)]
    for i in down:
        c.nodes[i].kill9()
    up = [i for i in c.nodes if i not in down]
    assert c.active_controller(up, timeout_s=20) in up
    # Once their leases run out the dead voters are fenced, and placement leaves them out.
    eventually(
        lambda: {n.node_id for n in c.metadata(up[0]).nodes if n.fenced} == set(down),
        15,
        "the dead nodes fenced",
    )
    with Admin(",".join(c.nodes[i].bootstrap for i in up)) as admin:
        admin.create_topics([NewTopic("five", partitions=3)])
        placed = {p.leader for t in admin.describe_topics(["five"]) for p in t.partitions}
    assert placed <= set(up)


def test_bad_controller_requests_change_nothing(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(1)
    c.start()
    with grpc.insecure_channel(c.nodes[1].bootstrap) as ch:
        stub = controller_pb2_grpc.ControllerServiceStub(ch)
        before = c.describe(1).metadata_offset
        auth = NodeAuth(SECRET)
        register = controller_pb2.RegisterNodeRequest(node_id=1, incarnation_id=b"x" * 16, host="h", port=1)
        heartbeat = controller_pb2.NodeHeartbeatRequest(node_id=1, broker_epoch=0)
        # Without a node token, with one made from another secret, or with one made for another
        # request (another node, another host, a shutdown instead of a heartbeat), or malformed.
        other_node = controller_pb2.RegisterNodeRequest(node_id=2, incarnation_id=b"x" * 16, host="h", port=1)
        other_host = controller_pb2.RegisterNodeRequest(
            node_id=1, incarnation_id=b"x" * 16, host="evil", port=1
        )
        shutdown = controller_pb2.NodeHeartbeatRequest(node_id=1, broker_epoch=0, want_shutdown=True)
        stranger = NodeAuth("another-secret")
        header = "x-headwater-node-auth"
        bad_tokens = [
            (None, None),
            (stranger.metadata(register), stranger.metadata(heartbeat)),
            (auth.metadata(other_node), auth.metadata(shutdown)),
            (auth.metadata(other_host), auth.metadata(register)),
            (((header, "9" * 5000 + ":" + "a" * 64),), ((header, "1:" + "zz" * 40),)),
        ]
        for for_register, for_heartbeat in bad_tokens:
            with pytest.raises(grpc.RpcError) as e:
                stub.RegisterNode(register, metadata=for_register, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                stub.NodeHeartbeat(heartbeat, metadata=for_heartbeat, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A member's token for the very request gets to the checks behind it.
        unknown = controller_pb2.NodeHeartbeatRequest(node_id=42, broker_epoch=0)
        assert stub.NodeHeartbeat(unknown, metadata=auth.metadata(unknown), timeout=5).error_code == (
            E.ERROR_CODE_NODE_NOT_AVAILABLE
        )
        stale = controller_pb2.NodeHeartbeatRequest(node_id=1, broker_epoch=12345)
        assert stub.NodeHeartbeat(stale, metadata=auth.metadata(stale), timeout=5).error_code == (
            E.ERROR_CODE_STALE_BROKER_EPOCH
        )
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/headwater.v1.ControllerService/RegisterNode")(b"\xff\xff garbage", timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert c.describe(1).metadata_offset == before
    with Admin(c.bootstrap) as admin:
        admin.create_topics([NewTopic("twice", partitions=1)])
        out = admin.create_topics([NewTopic("twice", partitions=1)], raise_on_error=False)
        assert isinstance(out["twice"], TopicAlreadyExistsError)
        admin.delete_topics(["twice"])
        out2 = admin.delete_topics(["twice"], raise_on_error=False)
        assert isinstance(out2["twice"], UnknownTopicOrPartitionError)


def test_a_node_that_is_not_a_voter_follows_the_metadata_as_a_broker(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(1)
    broker = NodeProcess(c.root / "node-2", free_port(), c.args(2))
    c.nodes[2] = broker
    c.start()
    assert "metadata voter" not in broker.log()
    # It describes the cluster from its image, and names the controller for what only it does.
    d2 = c.describe(2)
    assert d2.answered_by == 2 and d2.raft_term == -1 and sorted(n.node_id for n in d2.nodes) == [1, 2]
    assert d2.cluster_id == c.describe(1).cluster_id != ""
    with grpc.insecure_channel(broker.bootstrap) as ch:
        refused = controller_pb2_grpc.ControllerServiceStub(ch).ElectLeaders(
            controller_pb2.ElectLeadersRequest(preferred=True), timeout=5
        )
    assert refused.error_code == E.ERROR_CODE_NOT_CONTROLLER
    assert (
        refused.controller.controller_id == 1
        and refused.controller.controller_address == c.nodes[1].bootstrap
    )
    with Admin(broker.bootstrap) as admin:
        assert admin.describe_cluster().answered_by == 2
        admin.elect_leaders(preferred=True)  # follows the hint to node 1
    with Admin(broker.bootstrap) as admin:  # forwarded to the controller on node 1
        admin.create_topics([NewTopic("both", partitions=4)])
    md = c.metadata(2, ["both"])
    assert set(leaders(md, "both")) == {1, 2}
    assert {n.node_id: n.fenced for n in md.nodes} == {1: False, 2: False}
    with Producer(bootstrap=broker.bootstrap, acks=1) as producer:
        futures = [producer.send("both", b"x", partition=p) for p in range(4)]
        producer.flush()
    assert sorted(f.result(10).partition for f in futures) == [0, 1, 2, 3]
    on_broker = [i for i, leader in enumerate(leaders(md, "both")) if leader == 2]
    data_dir = c.root / "node-2" / "log"
    assert data_dir.is_dir()
    with Admin(c.nodes[1].bootstrap) as admin:
        admin.delete_topics(["both"])
    # The broker learns of the deletion from the metadata stream and drops its replicas.
    eventually(lambda: all(t.name != "both" for t in c.metadata(2).topics), 10, "the deletion")
    with grpc.insecure_channel(broker.bootstrap) as ch:
        r = client_pb2_grpc.HeadwaterServiceStub(ch).ListOffsets(
            pb.ListOffsetsRequest(
                topics=[
                    pb.ListOffsetsTopic(
                        topic="both",
                        partitions=[pb.ListOffsetsPartition(partition=on_broker[0], timestamp_ms=-1)],
                    )
                ]
            ),
            timeout=5,
        )
    assert r.topics[0].partitions[0].error_code == E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION


def test_sigterm_moves_leaderships_away_before_the_node_stops(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3)
    c.start()
    with Admin(c.bootstrap) as admin:
        admin.create_topics([NewTopic("handover", partitions=6, replication_factor=3)])
    md = c.metadata(1, ["handover"])
    stopping = leaders(md, "handover")[0]
    led = [i for i, leader in enumerate(leaders(md, "handover")) if leader == stopping]
    started = time.monotonic()
    assert c.nodes[stopping].stop() == 0
    took = time.monotonic() - started
    log = c.nodes[stopping].log()
    assert "controlled shutdown done" in log, log
    survivor = next(i for i in c.nodes if i != stopping)
    md = c.metadata(survivor, ["handover"])
    # Already moved when the process exited: no waiting for the session timeout.
    assert all(leaders(md, "handover")[i] not in (stopping, -1) for i in led), leaders(md, "handover")
    assert next(n for n in md.nodes if n.node_id == stopping).fenced
    assert took < 10


def test_cluster_describe_and_metadata_agree_on_the_cluster_id(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3)
    c.start()
    ids = {c.describe(i).cluster_id for i in c.nodes} | {c.metadata(i).cluster_id for i in c.nodes}
    assert len(ids) == 1 and ids != {""}
    with Admin(c.bootstrap) as admin:
        assert admin.describe_cluster().cluster_id in ids


def test_a_data_dir_keeps_its_node_id_and_its_voters(tmp_path: Path) -> None:
    n = NodeProcess(tmp_path / "data", free_port())
    try:
        n.start()
        n.stop()
        # Another node id on the same data: refused before anything is served or deleted.
        n.extra_args = ["--node-id", "2"]
        n.launch()
        assert n.proc is not None and n.proc.wait(30) == 1
        assert "belongs to node 1" in n.log()
        # The dir of a node that was a quorum alone, reused as one of three voters: refused too.
        secret = tmp_path / "secret"
        secret.write_text(SECRET)
        voters = f"1@127.0.0.1:{free_port()},2@127.0.0.1:{free_port()},3@127.0.0.1:{free_port()}"
        n.extra_args = ["--voters", voters, "--cluster-secret-file", str(secret)]
        n.launch()
        assert n.proc.wait(30) == 1
        assert "Changing the voters of a quorum is not supported" in n.log()
        # With its own settings it starts again.
        n.extra_args = []
        n.start()
    finally:
        if n.alive():
            n.stop()


def test_validate_only_creates_nothing_and_checks_assignments(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(1)
    c.start()
    before = c.describe(1).metadata_offset

    def create(topic: pb.CreatableTopic) -> pb.CreatableTopicResult:
        with grpc.insecure_channel(c.nodes[1].bootstrap) as ch:
            stub = client_pb2_grpc.HeadwaterServiceStub(ch)
            resp = stub.CreateTopics(pb.CreateTopicsRequest(topics=[topic], validate_only=True), timeout=10)
        return resp.topics[0]

    ok_topic = create(pb.CreatableTopic(name="fine", num_partitions=2, replication_factor=1))
    assert ok_topic.error_code == E.ERROR_CODE_NONE and ok_topic.num_partitions == 2
    unknown_node = create(
        pb.CreatableTopic(name="bad", num_partitions=-1, replication_factor=-1,
                          assignments=[pb.ReplicaAssignment(partition=0, replicas=[7])])
    )  # fmt: skip
    assert unknown_node.error_code == E.ERROR_CODE_INVALID_REPLICA_ASSIGNMENT, unknown_node
    twice = create(
        pb.CreatableTopic(name="bad", num_partitions=-1, replication_factor=-1,
                          assignments=[pb.ReplicaAssignment(partition=0, replicas=[1, 1])])
    )  # fmt: skip
    assert twice.error_code == E.ERROR_CODE_INVALID_REPLICATION_FACTOR, twice  # two replicas, one node
    assert c.describe(1).metadata_offset == before
    assert [t.name for t in c.metadata(1).topics] == []


def test_health_metrics_count_under_replicated_under_min_isr_offline_partitions_and_fenced_nodes(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(3)
    ports = {i: free_port() for i in c.nodes}
    for i, n in c.nodes.items():
        n.extra_args += ["--metrics-port", str(ports[i])]
    c.start()
    with Admin(c.bootstrap) as admin:
        admin.create_topics(
            [
                NewTopic("r3", partitions=3, replication_factor=3, config={"min_insync_replicas": "3"}),
                NewTopic("solo", partitions=1, replica_assignments={0: [3]}),
            ]
        )
    live = (1, 2)

    def total(name: str) -> float:
        return sum(metric(ports[i], name) for i in live)

    def led() -> float:
        return total("headwater_leader_partitions") + metric(ports[3], "headwater_leader_partitions")

    def everywhere(name: str) -> float:
        return total(name) + metric(ports[3], name)

    eventually(lambda: led() == 4, 10, "every partition led")
    assert total("headwater_under_replicated_partitions") == 0
    assert total("headwater_offline_partitions") == 0
    # Exactly one node is the active controller, and it sees every node unfenced.
    eventually(lambda: everywhere("headwater_active_controller") == 1, 10, "one active controller")
    assert everywhere("headwater_registered_nodes") == 3
    assert everywhere("headwater_fenced_nodes") == 0 and everywhere("headwater_node_fenced") == 0
    c.nodes[3].kill9()
    # Node 3 is fenced: it leaves every ISR, its r3 leaderships move, and solo has no leader left.
    eventually(lambda: total("headwater_under_replicated_partitions") == 3, 20, "3 under-replicated")
    assert total("headwater_under_min_isr_partitions") == 3
    controller = c.active_controller(among=list(live))
    eventually(lambda: metric(ports[controller], "headwater_offline_partitions") == 1, 10, "solo offline")
    other = next(i for i in live if i != controller)
    assert metric(ports[other], "headwater_offline_partitions") == 0
    # The controller counts node 3 fenced; the others report 0, so the cluster's sum is 1.
    eventually(lambda: total("headwater_active_controller") == 1, 10, "one active controller left")
    assert metric(ports[controller], "headwater_fenced_nodes") == 1
    assert metric(ports[other], "headwater_fenced_nodes") == 0
