"""The follower side of replication: followers copy their leaders' logs (fetcher.py).

The headline: a failover no longer starts from an empty log. The answer handling is checked on a
real log with made-up answers, as replication.proto says a follower treats each one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Cluster, eventually, free_port, metric
from test_storage_replication import stamped

from headwater import Admin, Consumer, NewTopic, Producer, TopicPartition
from headwater.node.fetcher import Answer, FetcherManager, Requested, apply_answer
from headwater.node.partition import Partition
from headwater.raft.metadata import ClusterMetadata
from headwater.storage import LogStore
from headwater.v1 import client_pb2, errors_pb2, replication_pb2

E = errors_pb2
R = replication_pb2
TOPIC_ID = uuid.UUID(int=0xFE7C).bytes


# ----------------------------------------------------------------- answers, one at a time


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LogStore]:
    s = LogStore(str(tmp_path / "db"))
    yield s
    s.close()


def follower(store: LogStore, *, leader: int = 1, leader_epoch: int = 2) -> Partition:
    p = Partition("t", TOPIC_ID, 0, store.open_partition(TOPIC_ID, 0), node_id=2)
    p.follow(leader, leader_epoch, 0, (1, 2, 3), (1, 2, 3))
    return p


def asked(p: Partition) -> Requested:
    return Requested(p.leader_id, p.leader_epoch, p.log.log_end_offset)


def answer(**fields: object) -> R.ReplicatePartitionResponse:
    return R.ReplicatePartitionResponse(topic_id=TOPIC_ID, partition=0, **fields)  # type: ignore[arg-type]


def test_batches_are_appended_verbatim_and_the_high_watermark_never_passes_the_log_end(
    store: LogStore,
) -> None:
    p = follower(store)
    sent = [stamped(0, 0), stamped(2, 1)]
    got = apply_answer(p, asked(p), answer(batches=sent, high_watermark=10, log_end_offset=10))
    assert got is Answer.CONTINUE
    assert p.log.log_end_offset == 4 and p.log.epoch_entries() == [(0, 0), (1, 2)]
    assert p.log.read(0, 1 << 20) == [b.SerializeToString() for b in sent]
    assert p.high_watermark == 4  # min(leader's 10, own log end)


def test_a_diverged_follower_truncates_to_where_both_logs_agree(store: LogStore) -> None:
    # The follower copied epoch 1 from a leader that lost it; the new leader's log left epoch 0 at 2.
    p = follower(store)
    p.log.append_replicated([stamped(0, 0), stamped(2, 1)])
    d = client_pb2.EpochEndOffset(epoch=0, end_offset=2)
    assert apply_answer(p, asked(p), answer(diverging_epoch=d, high_watermark=2)) is Answer.CONTINUE
    assert p.log.log_end_offset == 2 and p.log.epoch_entries() == [(0, 0)]
    # The next fetch goes on from the new log end with the leader's epoch-2 batches.
    got = apply_answer(p, asked(p), answer(batches=[stamped(2, 2)], high_watermark=4))
    assert got is Answer.CONTINUE
    assert p.log.log_end_offset == 4 and p.log.epoch_entries() == [(0, 0), (2, 2)]
    assert p.high_watermark == 4


def test_a_follower_behind_the_leaders_log_start_restarts_its_log_there(store: LogStore) -> None:
    p = follower(store)
    p.log.append_replicated([stamped(0, 0)])
    code = E.ERROR_CODE_OFFSET_OUT_OF_RANGE
    got = apply_answer(p, asked(p), answer(error_code=code, log_start_offset=50, log_end_offset=80))
    assert got is Answer.CONTINUE
    assert p.log.log_start_offset == p.log.log_end_offset == 50 and p.log.epoch_entries() == []


def test_a_leader_whose_log_ends_below_the_fetch_offset_truncates_the_follower(store: LogStore) -> None:
    p = follower(store)
    p.log.append_replicated([stamped(0, 0), stamped(2, 0)])
    code = E.ERROR_CODE_OFFSET_OUT_OF_RANGE
    got = apply_answer(p, asked(p), answer(error_code=code, log_start_offset=0, log_end_offset=2))
    assert got is Answer.CONTINUE and p.log.log_end_offset == 2


def test_fenced_waits_for_metadata_and_retriable_errors_back_off_truncating_nothing(
    store: LogStore,
) -> None:
    p = follower(store)
    p.log.append_replicated([stamped(0, 0)])
    fenced = answer(error_code=E.ERROR_CODE_FENCED_LEADER_EPOCH)
    assert apply_answer(p, asked(p), fenced) is Answer.AWAIT_METADATA
    for code in (E.ERROR_CODE_UNKNOWN_LEADER_EPOCH, E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER):
        assert apply_answer(p, asked(p), answer(error_code=code)) is Answer.BACK_OFF
    assert p.log.log_end_offset == 2


def test_an_answer_to_a_request_the_replica_moved_on_from_changes_nothing(store: LogStore) -> None:
    p = follower(store)
    before = asked(p)
    p.follow(3, 3, 1, (1, 2, 3), (2, 3))  # a new leader and epoch while the request was out
    assert apply_answer(p, before, answer(batches=[stamped(0, 0)], high_watermark=2)) is Answer.CONTINUE
    assert p.log.log_end_offset == 0
    p.follow(2, 4, 2, (1, 2, 3), (2, 3))  # now the leader itself: never appends a fetched answer
    assert apply_answer(p, asked(p), answer(batches=[stamped(0, 0)])) is Answer.CONTINUE
    assert p.log.log_end_offset == 0


def test_a_batch_that_does_not_continue_the_log_is_dropped(store: LogStore) -> None:
    p = follower(store)
    got = apply_answer(p, asked(p), answer(batches=[stamped(5, 0)], high_watermark=7))
    assert got is Answer.BACK_OFF and p.log.log_end_offset == 0 and p.high_watermark == 0


# ----------------------------------------------------------------- three node processes


def _gauge(metrics_port: int, name: str, topic: str) -> float | None:
    return metric(metrics_port, name, f'{{partition="0",topic="{topic}"}}')


def _partition(c: Cluster, node_id: int, topic: str) -> client_pb2.PartitionMetadata | None:
    topics = [t for t in c.metadata(node_id, [topic]).topics if t.name == topic and t.partitions]
    return topics[0].partitions[0] if topics else None


def test_acked_writes_survive_a_leader_kill_once_followers_copied_them(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(3)
    metrics = {i: free_port() for i in c.nodes}
    for i, n in c.nodes.items():
        n.extra_args = [*n.extra_args, "--metrics-port", str(metrics[i])]
    c.start()
    with Admin(c.bootstrap) as admin:
        admin.create_topics([NewTopic("copied", partitions=1, replication_factor=3)])

    def placed() -> bool:
        ps = [_partition(c, i, "copied") for i in c.nodes]
        return all(p is not None and p.leader_id > 0 for p in ps)

    eventually(placed, 20, "the topic placed on every node's metadata")
    first = _partition(c, 1, "copied")
    assert first is not None
    leader = first.leader_id
    followers = [i for i in c.nodes if i != leader]
    count = 200
    with Producer(bootstrap=c.nodes[leader].bootstrap, acks=1, linger_ms=0) as producer:
        futures = [producer.send("copied", b"v%d" % i, partition=0) for i in range(count)]
        producer.flush()
    offsets = [f.result(10).offset for f in futures]
    log_end = max(offsets) + 1
    assert _gauge(metrics[leader], "headwater_log_end_offset", "copied") == log_end

    # Every follower copies the leader's log and its high watermark.
    copied_at = time.monotonic()

    def caught_up() -> bool:
        return all(
            _gauge(metrics[i], "headwater_log_end_offset", "copied") == log_end
            and _gauge(metrics[i], "headwater_high_watermark", "copied") == log_end
            for i in followers
        )

    eventually(caught_up, 10, "both followers to copy the leader's log")
    print(f"followers caught up {log_end} records within {time.monotonic() - copied_at:.2f}s")

    # The leader dies; a follower (in the ISR) leads, with every acknowledged record.
    c.nodes[leader].kill9()

    def new_leader() -> int:
        p = _partition(c, followers[0], "copied")
        return p.leader_id if p is not None and p.leader_id in followers else -1

    eventually(lambda: new_leader() > 0, 20, "a follower to take the leadership")
    successor = new_leader()
    consumer = Consumer(bootstrap=c.nodes[successor].bootstrap, auto_offset_reset="earliest")
    try:
        consumer.assign([TopicPartition("copied", 0)])
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(got) < count and time.monotonic() < deadline:
            got += [r.value for r in consumer.poll(1.0)]
    finally:
        consumer.close()
    assert got == [b"v%d" % i for i in range(count)]

    # The other follower now copies from the new leader: a write there reaches it too.
    other = next(i for i in followers if i != successor)
    with Producer(bootstrap=c.nodes[successor].bootstrap, acks=1, linger_ms=0) as producer:
        producer.send("copied", b"after", partition=0).result(10)
    eventually(
        lambda: _gauge(metrics[other], "headwater_log_end_offset", "copied") == log_end + 1,
        10,
        "the remaining follower to copy from the new leader",
    )

    # The old leader comes back as a follower of the new one and copies what it missed.
    c.nodes[leader].launch()
    c.nodes[leader].wait_serving(30)
    eventually(
        lambda: _gauge(metrics[leader], "headwater_log_end_offset", "copied") == log_end + 1,
        15,
        "the restarted old leader to copy from the new leader",
    )


def test_answers_of_an_fsync_topic_are_applied_then_synced_once(store: LogStore) -> None:
    p = follower(store)
    fsync_topic = {p.topic}
    manager = FetcherManager(
        2,
        image=ClusterMetadata,
        channel=lambda address: pytest.fail("no stream here"),
        auth=None,
        broker_epoch=lambda: -1,
        sync_for=lambda q: q.topic in fsync_topic,
    )
    manager.update([p])
    fetcher = manager.fetchers[1]
    response = R.ReplicateResponse()
    response.partitions.append(answer(batches=[stamped(0, 0)], high_watermark=2))
    # The answer is applied, and the fetcher is told to sync before its next request.
    assert fetcher._apply([p], {(p.topic, p.index): asked(p)}, response) is True
    assert p.log.log_end_offset == 2 and p.high_watermark == 2
    assert not fetcher.holds  # applied (Answer.CONTINUE), not held back
    # Nothing written, or a topic without fsync: no sync.
    assert fetcher._apply([p], {(p.topic, p.index): asked(p)}, R.ReplicateResponse()) is False
    fsync_topic.clear()
    response = R.ReplicateResponse()
    response.partitions.append(answer(batches=[stamped(2, 0)], high_watermark=4))
    assert fetcher._apply([p], {(p.topic, p.index): asked(p)}, response) is False
    assert p.log.log_end_offset == 4


def test_the_manager_keeps_one_fetcher_per_leader_of_this_nodes_followers(store: LogStore) -> None:
    def replica(index: int, leader: int) -> Partition:
        p = Partition("t", TOPIC_ID, index, store.open_partition(TOPIC_ID, index), node_id=2)
        p.follow(leader, 1, 0, (1, 2, 3), (1, 2, 3))
        return p

    manager = FetcherManager(
        2,
        image=ClusterMetadata,
        channel=lambda address: pytest.fail("no stream before start"),
        auth=None,
        broker_epoch=lambda: -1,
    )
    a, b, led, c = replica(0, 1), replica(1, 3), replica(2, 2), replica(3, 1)
    manager.update([a, b, led, c])
    assert sorted(manager.fetchers) == [1, 3]
    assert set(manager.fetchers[1].partitions.values()) == {a, c}
    assert set(manager.fetchers[3].partitions.values()) == {b}
    # Node 3 leads nothing here any more; node 2 now leads partition 1.
    b.follow(2, 2, 1, (1, 2, 3), (1, 2, 3))
    manager.update([a, b, led, c])
    assert sorted(manager.fetchers) == [1]
