"""The leader side of ReplicationService.Replicate, against a cluster of three node processes.

The nodes' own followers fetch too; every request here is the test's, made as a follower would make
it: with a node token from the cluster secret, the follower's registered broker epoch, and the
partition's leader epoch from the metadata.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import SECRET, Cluster, eventually

from headwater import Admin, NewTopic, Producer
from headwater.node.auth import NodeAuth
from headwater.node.replica_state import diverging_epoch
from headwater.v1 import client_pb2 as pb
from headwater.v1 import client_pb2_grpc, errors_pb2, replication_pb2, replication_pb2_grpc

E = errors_pb2
R = replication_pb2
AUTH = NodeAuth(SECRET)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("replication")), 3)
    try:
        c.start()
        c.active_controller()
        eventually(
            lambda: all(not n.fenced for n in c.metadata(1).nodes) and len(c.metadata(1).nodes) == 3,
            30,
            "three unfenced nodes",
        )
        yield c
    finally:
        c.stop()


@dataclass(frozen=True)
class Placed:
    name: str
    topic_id: bytes
    leader: int
    leader_epoch: int
    replicas: tuple[int, ...]

    @property
    def followers(self) -> list[int]:
        return [r for r in self.replicas if r != self.leader]


def create(c: Cluster, name: str, replication_factor: int = 3) -> Placed:
    with Admin(c.bootstrap) as admin:
        admin.create_topics([NewTopic(name, partitions=1, replication_factor=replication_factor)])

    def placed() -> pb.PartitionMetadata | None:
        for i in c.nodes:
            topics = [t for t in c.metadata(i, [name]).topics if t.name == name and t.partitions]
            if not topics or topics[0].partitions[0].leader_id < 0:
                return None
        return topics[0].partitions[0]

    eventually(lambda: placed() is not None, 20, f"{name} placed on every node's metadata")
    t = next(t for t in c.metadata(1, [name]).topics if t.name == name)
    p = t.partitions[0]
    leader = p.leader_id
    # The leader serves once its own metadata names it.
    eventually(
        lambda: (
            next(t for t in c.metadata(leader, [name]).topics if t.name == name).partitions[0].leader_id
            == leader
        ),
        20,
        "the leader knows it leads",
    )
    return Placed(name, t.topic_id, leader, p.leader_epoch, tuple(p.replicas))


def broker_epoch(c: Cluster, node_id: int) -> int:
    return next(n.broker_epoch for n in c.metadata(node_id).nodes if n.node_id == node_id)


def request(
    c: Cluster,
    t: Placed,
    replica_id: int,
    *,
    fetch_offset: int = 0,
    last_fetched_epoch: int = -1,
    current_leader_epoch: int | None = None,
    max_wait_ms: int = 0,
    token: str | None = None,
    epoch: int | None = None,
) -> R.ReplicateRequest:
    req = R.ReplicateRequest(
        replica_id=replica_id,
        broker_epoch=broker_epoch(c, replica_id) if epoch is None else epoch,
        max_wait_ms=max_wait_ms,
    )
    req.partitions.add(
        topic_id=t.topic_id,
        partition=0,
        current_leader_epoch=t.leader_epoch if current_leader_epoch is None else current_leader_epoch,
        fetch_offset=fetch_offset,
        last_fetched_epoch=last_fetched_epoch,
    )
    req.node_token = AUTH.token(req) if token is None else token
    return req


def replicate(c: Cluster, node_id: int, requests: Iterable[R.ReplicateRequest]) -> list[R.ReplicateResponse]:
    with grpc.insecure_channel(c.nodes[node_id].bootstrap) as ch:
        stub = replication_pb2_grpc.ReplicationServiceStub(ch)
        return list(stub.Replicate(iter(requests), timeout=20))


def produce(c: Cluster, t: Placed, n: int) -> None:
    with Producer(bootstrap=c.nodes[t.leader].bootstrap, acks="all", linger_ms=0) as producer:
        for i in range(n):
            producer.send(t.name, b"r%d" % i, partition=0)
            producer.flush()  # one batch per record


def fetch(c: Cluster, t: Placed, offset: int) -> pb.FetchPartitionResponse:
    req = pb.FetchRequest(max_wait_ms=0)
    req.topics.add(topic=t.name).partitions.add(partition=0, fetch_offset=offset)
    with grpc.insecure_channel(c.nodes[t.leader].bootstrap) as ch:
        resp = client_pb2_grpc.HeadwaterServiceStub(ch).Fetch(req, timeout=10)
    part: pb.FetchPartitionResponse = resp.topics[0].partitions[0]
    return part


def only(resp: R.ReplicateResponse) -> R.ReplicatePartitionResponse:
    assert resp.error_code == E.ERROR_CODE_NONE, resp.error_message
    assert len(resp.partitions) == 1
    part: R.ReplicatePartitionResponse = resp.partitions[0]
    return part


def test_a_stream_without_a_valid_node_token_is_refused(cluster: Cluster) -> None:
    t = create(cluster, "tokens")
    follower = t.followers[0]
    good = request(cluster, t, follower)
    other_epoch = request(cluster, t, follower, epoch=good.broker_epoch + 1)
    other_node = request(cluster, t, t.followers[1])
    bad_tokens = [
        "",
        NodeAuth("another-secret").token(good),
        AUTH.token(other_epoch),  # the scope names the broker epoch
        AUTH.token(other_node),  # and the token the replica id
        "1:" + "zz" * 32,
    ]
    for token in bad_tokens:
        req = request(cluster, t, follower, token=token)
        with pytest.raises(grpc.RpcError) as e:
            replicate(cluster, t.leader, [req])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
    # A stream may not change whose it is once open.
    with pytest.raises(grpc.RpcError) as e:
        replicate(cluster, t.leader, [good, other_node])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_only_a_registered_follower_of_its_current_incarnation_is_served(cluster: Cluster) -> None:
    t = create(cluster, "incarnations")
    follower = t.followers[0]
    stale = request(cluster, t, follower, epoch=broker_epoch(cluster, follower) - 1)
    [resp] = replicate(cluster, t.leader, [stale])
    assert resp.error_code == E.ERROR_CODE_STALE_BROKER_EPOCH
    assert not resp.partitions
    stranger = request(cluster, t, 42, epoch=0)
    [resp] = replicate(cluster, t.leader, [stranger])
    assert resp.error_code == E.ERROR_CODE_NODE_NOT_AVAILABLE
    assert not resp.partitions


def test_a_follower_reads_the_stored_batches_up_to_the_log_end_as_fetch_serves_them(
    cluster: Cluster,
) -> None:
    t = create(cluster, "copies")
    produce(cluster, t, 5)
    # The real followers copy the records and the high watermark reaches the log end.
    eventually(lambda: len(fetch(cluster, t, 0).batches) == 5, 20, "five batches committed")
    follower = t.followers[0]
    [resp] = replicate(cluster, t.leader, [request(cluster, t, follower)])
    part = only(resp)
    assert part.error_code == E.ERROR_CODE_NONE, part.error_message
    assert not part.HasField("diverging_epoch")
    assert (part.log_start_offset, part.log_end_offset) == (0, 5)
    # Read to the log end, not bounded by the high watermark.
    assert part.log_start_offset <= part.high_watermark <= part.log_end_offset
    last = part.batches[-1]
    assert last.base_offset + last.last_offset_delta + 1 == part.log_end_offset
    served = fetch(cluster, t, 0)
    assert [b.SerializeToString() for b in part.batches] == [b.SerializeToString() for b in served.batches]
    assert list(part.batches) == list(served.batches)
    # From the middle: the batch holding the offset on. At the log end, with the log's last epoch:
    # nothing to send and nothing diverged.
    [mid] = replicate(cluster, t.leader, [request(cluster, t, follower, fetch_offset=2)])
    assert [b.base_offset for b in only(mid).batches] == [2, 3, 4]
    end_req = request(cluster, t, follower, fetch_offset=5, last_fetched_epoch=last.partition_leader_epoch)
    [end] = replicate(cluster, t.leader, [end_req])
    assert only(end).error_code == E.ERROR_CODE_NONE
    assert not only(end).batches and not only(end).HasField("diverging_epoch")
    # Past the log end: out of range, with the leader's offsets to truncate by.
    [past] = replicate(cluster, t.leader, [request(cluster, t, follower, fetch_offset=9)])
    assert only(past).error_code == E.ERROR_CODE_OFFSET_OUT_OF_RANGE
    assert only(past).log_end_offset == 5


def test_a_stale_leader_epoch_is_fenced_and_a_future_one_unknown(cluster: Cluster) -> None:
    t = create(cluster, "epochs")
    follower = t.followers[0]
    stale = request(cluster, t, follower, current_leader_epoch=t.leader_epoch - 1)
    future = request(cluster, t, follower, current_leader_epoch=t.leader_epoch + 1)
    for req, code in [(stale, E.ERROR_CODE_FENCED_LEADER_EPOCH), (future, E.ERROR_CODE_UNKNOWN_LEADER_EPOCH)]:
        [resp] = replicate(cluster, t.leader, [req])
        assert only(resp).error_code == code
        assert not only(resp).batches


def test_a_follower_whose_log_diverged_gets_the_leaders_end_of_its_epoch(cluster: Cluster) -> None:
    t = create(cluster, "diverged")
    produce(cluster, t, 3)
    follower = t.followers[0]
    epoch = fetch(cluster, t, 0).batches[0].partition_leader_epoch
    assert epoch == t.leader_epoch
    # The follower claims records of the leader's epoch past the leader's log end (it appended them
    # as a leader of the same epoch that the leader never saw): it must truncate to the leader's end.
    req = request(cluster, t, follower, fetch_offset=7, last_fetched_epoch=epoch)
    [resp] = replicate(cluster, t.leader, [req])
    part = only(resp)
    expected = diverging_epoch([(epoch, 0)], 3, epoch, 7, leader_epoch=t.leader_epoch)
    assert expected is not None
    assert part.error_code == E.ERROR_CODE_NONE
    assert (part.diverging_epoch.epoch, part.diverging_epoch.end_offset) == (
        expected.epoch,
        expected.end_offset,
    )
    assert not part.batches
    # An epoch newer than any the leader knows has no end offset there: out of range.
    req = request(cluster, t, follower, fetch_offset=3, last_fetched_epoch=epoch + 5)
    [resp] = replicate(cluster, t.leader, [req])
    assert only(resp).error_code == E.ERROR_CODE_OFFSET_OUT_OF_RANGE


def test_a_node_that_does_not_lead_answers_not_leader_or_follower(cluster: Cluster) -> None:
    t = create(cluster, "elsewhere")
    follower, other = t.followers
    [resp] = replicate(cluster, other, [request(cluster, t, follower)])
    assert only(resp).error_code == E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER
    # The leader refuses a node that is not one of the partition's replicas.
    alone = create(cluster, "alone", replication_factor=1)
    outsider = next(i for i in cluster.nodes if i != alone.leader)
    [resp] = replicate(cluster, alone.leader, [request(cluster, alone, outsider)])
    assert only(resp).error_code == E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER


def test_a_long_poll_waits_for_data_and_answers_when_it_arrives(cluster: Cluster) -> None:
    t = create(cluster, "polled")
    follower = t.followers[0]
    # Nothing new: the leader holds the answer for max_wait_ms.
    started = time.monotonic()
    [idle] = replicate(cluster, t.leader, [request(cluster, t, follower, max_wait_ms=400)])
    assert time.monotonic() - started >= 0.35
    assert not only(idle).batches
    # A second request on the stream parks; a write wakes it long before its max_wait_ms.
    sent = threading.Event()
    answers: list[R.ReplicateResponse] = []

    def requests() -> Iterator[R.ReplicateRequest]:
        yield request(cluster, t, follower)
        yield request(cluster, t, follower, max_wait_ms=15_000)
        sent.set()

    def run() -> None:
        answers.extend(replicate(cluster, t.leader, requests()))

    reader = threading.Thread(target=run)
    started = time.monotonic()
    reader.start()
    # The client asks for the next request once it has sent the second; the producer's connect and
    # metadata round trips come before its write.
    assert sent.wait(10)
    produce(cluster, t, 1)
    reader.join(20)
    assert not reader.is_alive()
    assert time.monotonic() - started < 10
    assert len(answers) == 2
    assert [b.base_offset for b in only(answers[1]).batches] == [0]


def test_an_unknown_topic_id_or_partition_is_named_so(cluster: Cluster) -> None:
    t = create(cluster, "known")
    follower = t.followers[0]
    req = request(cluster, t, follower)
    req.partitions[0].topic_id = b"\x07" * 16
    req.partitions.add(topic_id=t.topic_id, partition=3, current_leader_epoch=t.leader_epoch)
    [resp] = replicate(cluster, t.leader, [req])
    assert resp.error_code == E.ERROR_CODE_NONE
    codes = [(p.topic_id, p.partition, p.error_code) for p in resp.partitions]
    assert codes == [
        (b"\x07" * 16, 0, E.ERROR_CODE_UNKNOWN_TOPIC_ID),
        (t.topic_id, 3, E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION),
    ]
