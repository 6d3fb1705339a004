"""Replication under process faults, against real node processes: kill -9 of a leader under an
acks=all load, a second kill in a 5-node cluster, a follower that stops and rejoins, and a leader
paused (SIGSTOP) until it is replaced, then woken.

What an acknowledged record means is checked by offset: every record a producer had acknowledged
with acks=all is read back afterwards at the partition and offset it was acknowledged at.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from conftest import Cluster, eventually, free_port, metric

from headwater import Admin, Consumer, NewTopic, Producer, TopicPartition
from headwater.storage import LogStore
from headwater.v1 import client_pb2 as pb

# Fast failure detection for tests: a follower that stops fetching leaves the ISR within 1.5 s.
REPLICATION = ["--replica-lag-time-max-ms", "1500", "--min-insync-replicas", "2"]


def _start(c: Cluster) -> None:
    for n in c.nodes.values():
        n.extra_args = [*n.extra_args, *REPLICATION, "--metrics-port", str(free_port())]
    c.start()


def _partitions(c: Cluster, node_id: int, topic: str) -> list[pb.PartitionMetadata]:
    try:
        md = c.metadata(node_id, [topic])
    except grpc.RpcError:
        return []
    for t in md.topics:
        if t.name == topic:
            return sorted(t.partitions, key=lambda p: p.partition)
    return []


def _create(c: Cluster, topic: str, partitions: int, rf: int = 3) -> None:
    with Admin(c.bootstrap) as admin:
        admin.create_topics([NewTopic(topic, partitions=partitions, replication_factor=rf)])
    _wait_full_isr(c, topic, partitions, rf, [i for i in c.nodes if c.nodes[i].alive()])


def _wait_full_isr(
    c: Cluster, topic: str, partitions: int, size: int, on: list[int], timeout_s: float = 30
) -> None:
    def full() -> bool:
        for i in on:
            ps = _partitions(c, i, topic)
            if len(ps) != partitions or any(len(p.isr) < size or p.leader_id < 0 for p in ps):
                return False
        return True

    eventually(full, timeout_s, f"every partition of {topic} with an ISR of {size}")


class Load:
    """A producer thread sending unique values with acks=all (and retries) until stopped; keeps
    what was acknowledged: value -> (partition, offset)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.topic = topic
        self.partitions = partitions
        self.acked: dict[bytes, tuple[int, int]] = {}
        self.failed = 0
        self._stop = threading.Event()
        self._producer = Producer(bootstrap=bootstrap, acks="all", linger_ms=2, delivery_timeout_ms=60_000)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def _run(self) -> None:
        i = 0
        pending: list[tuple[bytes, object]] = []
        while not self._stop.is_set():
            value = b"v%08d" % i
            pending.append((value, self._producer.send(self.topic, value, partition=i % self.partitions)))
            i += 1
            if len(pending) >= 50:
                self._settle(pending)
                pending = []
        self._settle(pending)

    def _settle(self, pending: list[tuple[bytes, object]]) -> None:
        for value, fut in pending:
            try:
                md = fut.result(90)  # type: ignore[attr-defined]
            except Exception:
                self.failed += 1
                continue
            self.acked[value] = (md.partition, md.offset)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)
        self._producer.close()
        assert not self._thread.is_alive()


class Reader:
    """A consumer thread polling every partition from the beginning until stopped; keeps what it
    saw and any error the application would have seen."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.seen: dict[tuple[int, int], bytes] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._consumer = Consumer(bootstrap=bootstrap, auto_offset_reset="earliest")
        self._consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for r in self._consumer.poll(0.2):
                    self.seen[(r.partition, r.offset)] = r.value
            except Exception as e:  # what the application would see
                self.errors.append(e)
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._consumer.close()
        assert not self._thread.is_alive()


def _read_all(
    bootstrap: str, topic: str, partitions: int, until: dict[int, int]
) -> dict[tuple[int, int], bytes]:
    """Every record of ``topic`` below offset ``until[partition]``: (partition, offset) -> value."""
    got: dict[tuple[int, int], bytes] = {}
    with Consumer(bootstrap=bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for r in consumer.poll(0.5):
                got[(r.partition, r.offset)] = r.value
            if all(until[p] == 0 or (p, until[p] - 1) in got for p in until):
                break
    return got


def _check_acked(load: Load, got: dict[tuple[int, int], bytes]) -> None:
    lost = {v: at for v, at in load.acked.items() if got.get(at) != v}
    assert not lost, (
        f"{len(lost)} of {len(load.acked)} acknowledged records lost, e.g. {list(lost.items())[:5]}"
    )


def _until(load: Load) -> dict[int, int]:
    until = dict.fromkeys(range(load.partitions), 0)
    for p, o in load.acked.values():
        until[p] = max(until[p], o + 1)
    return until


def _leader_of(c: Cluster, topic: str, partition: int, asking: list[int]) -> int:
    for i in asking:
        ps = _partitions(c, i, topic)
        if ps and ps[partition].leader_id > 0:
            return ps[partition].leader_id
    return -1


def _cli(c: Cluster, *args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "headwater", *args, "--bootstrap", c.bootstrap],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def _survivor_bootstrap(c: Cluster) -> str:
    return ",".join(n.bootstrap for n in c.nodes.values() if n.alive())


def test_kill9_of_a_leader_under_acks_all_load_loses_no_acknowledged_record(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(3)
    _start(c)
    _create(c, "load", 3)
    victim = _leader_of(c, "load", 0, list(c.nodes))
    with Load(c.bootstrap, "load", 3) as load, Reader(c.bootstrap, "load", 3) as reader:
        eventually(lambda: len(load.acked) >= 300, 30, "records acknowledged before the kill")
        c.nodes[victim].kill9()
        killed_at = len(load.acked)
        survivors = [i for i in c.nodes if i != victim]
        eventually(lambda: len(load.acked) >= killed_at + 500, 60, "the load to go on after the kill")
        # The consumer reads on through the failover, up to what was acknowledged.
        eventually(lambda: len(reader.seen) >= killed_at + 500, 60, "the consumer to go on after the kill")
    # Producer and consumer carried on with their retries: the application saw no error.
    assert load.failed == 0 and not reader.errors, (load.failed, reader.errors[:3])
    # The acknowledged records are all there, at their offsets, on the surviving replicas; and
    # nothing the consumer read during the failover is gone or changed.
    final = _read_all(_survivor_bootstrap(c), "load", 3, _until(load))
    _check_acked(load, final)
    changed = {at: v for at, v in reader.seen.items() if final.get(at) != v}
    assert not changed, f"the consumer read {len(changed)} records that are gone, e.g. {list(changed)[:5]}"
    print(f"{len(load.acked)} acknowledged, {len(reader.seen)} read; node {victim} killed")

    # The killed node comes back with its data, catches up and rejoins every ISR by itself.
    c.nodes[victim].start()
    _wait_full_isr(c, "load", 3, 3, survivors + [victim])
    # Now it may lead: its copy has every acknowledged record too.
    c.nodes[survivors[0]].kill9()
    remaining = [i for i in c.nodes if c.nodes[i].alive()]
    eventually(
        lambda: all(_leader_of(c, "load", p, remaining) in remaining for p in range(3)), 30, "new leaders"
    )
    _check_acked(load, _read_all(_survivor_bootstrap(c), "load", 3, _until(load)))


def test_five_nodes_two_kills_in_a_row_keep_every_acknowledged_record(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(5)
    _start(c)
    _create(c, "five", 2)
    first = _leader_of(c, "five", 0, list(c.nodes))
    with Load(c.bootstrap, "five", 2) as load:
        eventually(lambda: len(load.acked) >= 300, 30, "records acknowledged before the first kill")
        c.nodes[first].kill9()
        mark = len(load.acked)
        eventually(lambda: len(load.acked) >= mark + 300, 60, "the load to go on after the first kill")
        alive = [i for i in c.nodes if c.nodes[i].alive()]
        # The second kill takes the new leader of partition 0 (another replica of it).
        second = _leader_of(c, "five", 0, alive)
        assert second in alive and second != first
        c.nodes[second].kill9()
        mark = len(load.acked)
        # Partition 0 has one replica left: with min_insync_replicas=2, acks=all is refused there
        # until a replica comes back; partition 1 may go on. Let the load run a little.
        time.sleep(3)
    alive = [i for i in c.nodes if c.nodes[i].alive()]
    eventually(lambda: all(_leader_of(c, "five", p, alive) in alive for p in range(2)), 30, "leaders")
    _check_acked(load, _read_all(_survivor_bootstrap(c), "five", 2, _until(load)))
    print(f"{len(load.acked)} acknowledged, {load.failed} failed; nodes {first} and {second} killed")


def test_a_stopped_follower_leaves_the_isr_catches_up_and_rejoins(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(3)
    _start(c)
    _create(c, "rejoin", 1)
    leader = _leader_of(c, "rejoin", 0, list(c.nodes))
    follower = next(i for i in c.nodes if i != leader)
    c.nodes[follower].stop()
    others = [i for i in c.nodes if i != follower]
    eventually(
        lambda: all(follower not in _partitions(c, i, "rejoin")[0].isr for i in others),
        20,
        "the stopped follower out of the ISR",
    )
    # acks=all goes on with the two replicas left (min_insync_replicas=2).
    with Producer(bootstrap=c.nodes[leader].bootstrap, acks="all", linger_ms=5) as producer:
        futures = [producer.send("rejoin", b"x" * 1000, partition=0) for _ in range(3000)]
        producer.flush()
    end = max(f.result(30).offset for f in futures) + 1
    # What an operator sees: the partition under-replicated (not under min ISR), the stopped
    # follower's lag, and the count in cluster describe.
    under = _cli(c, "topic", "describe", "--under-replicated", "--format", "json")
    [row] = [p for t in under for p in t["partitions"]]
    assert sorted(row["isr"]) == sorted(others)
    lagging = {r["node_id"]: r for r in row["replica_status"]}
    assert lagging[follower]["lag_records"] >= end - 1 and not lagging[follower]["in_isr"]
    assert row["high_watermark"] == end == row["log_end_offset"]
    assert _cli(c, "topic", "describe", "--under-min-isr", "--format", "json") == []
    assert _cli(c, "cluster", "describe", "--format", "json")["under_replicated_partitions"] == 1
    c.nodes[follower].start()
    _wait_full_isr(c, "rejoin", 1, 3, list(c.nodes))
    assert _cli(c, "topic", "describe", "--under-replicated", "--format", "json") == []
    with Admin(c.bootstrap) as admin:
        [status] = admin.describe_replicas(["rejoin"])
    assert status.leader == leader and {r.node_id for r in status.replicas} == set(c.nodes)
    assert all(r.in_isr for r in status.replicas)
    # Once back in the ISR it holds everything: make it the only way to read (stop the others).
    for i in others:
        c.nodes[i].kill9()
    c.nodes[others[0]].start(timeout_s=30)
    alive = [follower, others[0]]
    eventually(lambda: _leader_of(c, "rejoin", 0, alive) in alive, 30, "a leader among the restarted")
    got = _read_all(_survivor_bootstrap(c), "rejoin", 1, {0: end})
    assert all((0, o) in got for o in range(end)), "the rejoined follower lost records"


def _pid_paused(c: Cluster, node_id: int) -> None:
    proc = c.nodes[node_id].proc
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)


def _pid_resumed(c: Cluster, node_id: int) -> None:
    proc = c.nodes[node_id].proc
    assert proc is not None
    proc.send_signal(signal.SIGCONT)


def test_a_paused_leader_is_replaced_acknowledges_nothing_after_and_is_truncated_to_the_new_leader(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(3)
    _start(c)
    _create(c, "paused", 1)
    old = _leader_of(c, "paused", 0, list(c.nodes))
    others = [i for i in c.nodes if i != old]
    # A producer that talks to the old leader alone: its acks can come from nowhere else.
    stale = Producer(bootstrap=c.nodes[old].bootstrap, acks="all", linger_ms=0, delivery_timeout_ms=20_000)
    try:
        before = [stale.send("paused", b"before-%d" % i, partition=0) for i in range(50)]
        stale.flush()
        acked = {f.result(10).offset: b"before-%d" % i for i, f in enumerate(before)}
        _pid_paused(c, old)
        try:
            eventually(
                lambda: all(_leader_of(c, "paused", 0, [i]) in others for i in others),
                30,
                "a new leader while the old one sleeps",
            )
            new = _leader_of(c, "paused", 0, others)
            with Producer(bootstrap=c.nodes[new].bootstrap, acks="all", linger_ms=0) as producer:
                after = [producer.send("paused", b"after-%d" % i, partition=0) for i in range(50)]
                producer.flush()
                for i, f in enumerate(after):
                    acked[f.result(10).offset] = b"after-%d" % i
            # Sent to the sleeping leader: it may append them when it wakes, but never acknowledge.
            zombie = [stale.send("paused", b"zombie-%d" % i, partition=0) for i in range(20)]
        finally:
            _pid_resumed(c, old)
        zombie_acked = []
        for f in zombie:
            try:
                md = f.result(40)
            except Exception:
                continue
            zombie_acked.append(md.offset)
    finally:
        stale.close()
    # The producer's retries may land the zombie records on the new leader (that is a real ack);
    # every acknowledged offset holds what was acknowledged there.
    _wait_full_isr(c, "paused", 1, 3, list(c.nodes))
    end = max([*acked, *zombie_acked]) + 1
    got = _read_all(c.bootstrap, "paused", 1, {0: end})
    for offset, value in acked.items():
        assert got.get((0, offset)) == value, (offset, value, got.get((0, offset)))
    for offset in zombie_acked:
        assert got.get((0, offset), b"").startswith(b"zombie-")
    # Every replica's log is the same, byte for byte: the old leader truncated whatever it appended
    # alone. Compared on disk once the nodes stopped, after their log ends agreed.
    eventually(lambda: len({_metric_end(c, i, "paused") for i in c.nodes}) == 1, 20, "equal log ends")
    assert (_metric_end(c, old, "paused") or 0) >= end
    topic_id = next(t.topic_id for t in c.metadata(new, ["paused"]).topics if t.name == "paused")
    for n in c.nodes.values():
        n.stop()
    logs = {i: _stored(c.nodes[i].data_dir, topic_id) for i in c.nodes}
    assert logs[old] and logs[old] == logs[new] == logs[others[0] if others[0] != new else others[1]]


def _metric_end(c: Cluster, node_id: int, topic: str) -> float | None:
    port = int(c.nodes[node_id].extra_args[c.nodes[node_id].extra_args.index("--metrics-port") + 1])
    return metric(port, "headwater_log_end_offset", f'{{partition="0",topic="{topic}"}}')


def _stored(data_dir: Path, topic_id: bytes) -> list[bytes]:
    store = LogStore(str(data_dir / "log"))
    try:
        plog = store.open_partition(topic_id, 0)
        return list(plog.read(0, 1 << 30, None))
    finally:
        store.close()
