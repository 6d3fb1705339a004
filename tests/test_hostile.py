"""A hostile or careless client cannot take a node out of service: each attack runs against a
cluster of real node processes, and the node must keep its lease (no fencing, no controller change),
stay within a memory bound, keep serving other clients, answer the attacker with a clear error,
and store nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import zstandard
from conftest import Cluster, free_port, leaders, metric

from headwater import Admin, Consumer, NewTopic, Producer, TopicPartition
from headwater.v1 import batch as batch_codec
from headwater.v1 import client_pb2 as pb
from headwater.v1 import client_pb2_grpc, errors_pb2, records_pb2

E = errors_pb2
# Bounds the tests hold a node to while it is attacked.
MAX_RSS_BYTES = 700 * 1024 * 1024
MAX_CLIENT_WAIT_S = 1.0
DEFAULT_LEASE = ["--heartbeat-interval-ms", "500", "--session-timeout-ms", "3000"]
# A connection of its own (no shared subchannel) whose streams take no more than the initial HTTP/2
# window: without BDP probing the client does not grow its windows and buffer tens of MB a stream
# for the application that never reads, so the node's writes wait, as for a reader that never reads.
NEVER_READS = [("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)]


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _bomb(record_count: int) -> records_pb2.RecordBatch:
    """33,554,432 empty records (64 MiB) compressed to a few KiB, with a valid CRC and a header
    that claims ``record_count`` records."""
    payload = zstandard.ZstdCompressor(level=19).compress(b"\x0a\x00" * (1 << 25))
    now = int(time.time() * 1000)
    b = records_pb2.RecordBatch(
        last_offset_delta=record_count - 1,
        record_count=record_count,
        first_timestamp_ms=now,
        max_timestamp_ms=now,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        compression=records_pb2.COMPRESSION_TYPE_ZSTD,
        records=payload,
    )
    b.crc = batch_codec.batch_crc(b)
    assert len(b.SerializeToString()) < 8192
    return b


class Watch:
    """Samples a cluster while it is attacked: fencing, controller changes, one node's memory and
    how long a plain client waits for Metadata from it."""

    def __init__(self, c: Cluster, victim: int, max_wait_s: float = MAX_CLIENT_WAIT_S) -> None:
        self.c, self.victim, self.max_wait_s = c, victim, max_wait_s
        self.controller = c.active_controller()
        self.rss_max = 0
        self.wait_max = 0.0
        self.fenced: set[int] = set()
        self.controllers: set[int] = set()

    def sample(self) -> None:
        pid = self.c.nodes[self.victim].proc.pid  # type: ignore[union-attr]
        self.rss_max = max(self.rss_max, _rss_bytes(pid))
        started = time.monotonic()
        self.c.metadata(self.victim)
        self.wait_max = max(self.wait_max, time.monotonic() - started)
        d = self.c.describe(self.controller)
        self.controllers.add(d.controller_id)
        self.fenced |= {n.node_id for n in d.nodes if n.fenced}

    def during(self, attack: Callable[[threading.Event], None], seconds: float) -> None:
        stop = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                attack(stop)
            except BaseException as e:  # reported below
                errors.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and t.is_alive():
                self.sample()
                time.sleep(0.1)
        finally:
            stop.set()
            t.join(30)
        assert not errors, errors
        self.sample()

    def check(self) -> None:
        print(
            f"victim node {self.victim}: RSS max {self.rss_max / 2**20:.0f} MiB, Metadata wait max "
            f"{self.wait_max * 1000:.0f} ms"
        )
        assert not self.fenced, f"nodes {self.fenced} were fenced"
        assert self.controllers == {self.controller}, f"the controller moved: {self.controllers}"
        assert self.rss_max < MAX_RSS_BYTES, self.rss_max
        assert self.wait_max < self.max_wait_s, self.wait_max


def _cluster_with_records(
    make_cluster: Callable[..., Cluster], lease: list[str] | None = None
) -> tuple[Cluster, int, dict[int, int], list[bytes]]:
    c = make_cluster(3)
    metrics = {i: free_port() for i in c.nodes}
    for i, n in c.nodes.items():
        n.extra_args += ["--metrics-port", str(metrics[i]), *(lease or [])]
    c.start()
    with Admin(c.bootstrap) as admin:
        admin.create_topics([NewTopic("target", partitions=1, replication_factor=1)])
    known = [b"known-%d" % i for i in range(30)]
    with Producer(bootstrap=c.bootstrap, acks=1, linger_ms=0) as producer:
        for v in known:
            producer.send("target", v, partition=0)
        producer.flush()
    victim = leaders(c.metadata(1, ["target"]), "target")[0]
    return c, victim, metrics, known


def _read_all(c: Cluster) -> list[bytes]:
    with Consumer(bootstrap=c.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition("target", 0)])
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got += [r.value for r in consumer.poll(timeout_s=0.5) if r.value is not None]
            if len(got) >= 30:
                time.sleep(0.5)  # anything stored past the known records would show now
                got += [r.value for r in consumer.poll(timeout_s=0.5) if r.value is not None]
                break
        return got


def test_a_compression_bomb_costs_the_leader_little_and_stores_nothing(
    make_cluster: Callable[..., Cluster],
) -> None:
    c, victim, metrics, known = _cluster_with_records(make_cluster)
    too_many = _bomb(1 << 25)  # the header matches the payload: more records than a batch may hold
    lying = _bomb(1000)  # the header claims fewer records than the payload holds
    part = pb.ProducePartitionData(partition=0, batches=[lying])
    answers: dict[str, set[int]] = {"too_many": set(), "lying": set(), "listed_thrice": set()}
    sent = [0]

    def attack(stop: threading.Event) -> None:
        with grpc.insecure_channel(c.nodes[victim].bootstrap) as ch:
            stub = client_pb2_grpc.HeadwaterServiceStub(ch)
            requests = {
                "too_many": [pb.ProduceTopicData(topic="target", partitions=[
                    pb.ProducePartitionData(partition=0, batches=[too_many])])],
                "lying": [pb.ProduceTopicData(topic="target", partitions=[part])],
                "listed_thrice": [pb.ProduceTopicData(topic="target", partitions=[part, part, part])],
            }  # fmt: skip
            while not stop.is_set():
                for name, topics in requests.items():
                    resp = stub.Produce(pb.ProduceRequest(acks=1, topics=topics), timeout=30)
                    answers[name] |= {p.error_code for t in resp.topics for p in t.partitions}
                    sent[0] += 1

    watch = Watch(c, victim)
    watch.during(attack, 8.0)
    watch.check()
    gap = metric(metrics[victim], "headwater_lease_heartbeat_gap_max_seconds")
    assert gap is not None
    print(f"{sent[0]} bomb requests; largest heartbeat gap of the victim {gap * 1000:.0f} ms")
    assert sent[0] >= 6
    assert answers["too_many"] == {E.ERROR_CODE_RECORD_TOO_LARGE}
    assert answers["lying"] == {E.ERROR_CODE_CORRUPT_MESSAGE}
    assert answers["listed_thrice"] == {E.ERROR_CODE_CORRUPT_MESSAGE, E.ERROR_CODE_INVALID_REQUEST}
    # Heartbeats every 200 ms; a gap of half the 1.5 s session timeout would already be a warning.
    assert gap < 0.75, gap
    assert _read_all(c) == known


def test_a_subscribe_flood_that_never_reads_is_bounded_and_other_readers_go_on(
    make_cluster: Callable[..., Cluster],
) -> None:
    # The default lease (heartbeat 500 ms, session 3 s): reading at full speed for 500 streams is
    # heavy, legitimate-looking load on a 2-core machine, and the node must keep its lease through it.
    c, victim, metrics, known = _cluster_with_records(make_cluster, DEFAULT_LEASE)
    with Producer(bootstrap=c.bootstrap, acks=1, linger_ms=0, compression="none") as producer:
        for i in range(100):
            producer.send("target", bytes([i]) * 100_000, partition=0)  # 10 MB behind the known records
        producer.flush()
    request = pb.SubscribeRequest(topic="target", partition=0, offset=-2)
    channels = [grpc.insecure_channel(c.nodes[victim].bootstrap, options=NEVER_READS) for _ in range(4)]
    with Admin(c.bootstrap) as admin:
        admin.create_topics([NewTopic("quiet", partitions=1, replica_assignments={0: [victim]})])
    quiet_request = pb.SubscribeRequest(topic="quiet", partition=0, offset=-2)
    quiet_channel = grpc.insecure_channel(c.nodes[victim].bootstrap, options=NEVER_READS)
    calls = []
    refused = 0
    try:

        def attack(stop: threading.Event) -> None:
            nonlocal refused
            # 100 streams per connection (the default share), then one more that must be refused.
            for ch in channels:
                stub = client_pb2_grpc.HeadwaterServiceStub(ch)
                calls.extend(stub.Subscribe(request) for _ in range(100))
            # The share, seen on a connection whose own streams are not jammed with unread data.
            quiet = client_pb2_grpc.HeadwaterServiceStub(quiet_channel)
            calls.extend(quiet.Subscribe(quiet_request) for _ in range(100))
            time.sleep(0.5)
            extra = quiet.Subscribe(quiet_request, timeout=10)
            try:
                next(extra)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                refused += 1
            stop.wait()

        watch = Watch(c, victim, max_wait_s=2.0)
        read_s: list[float] = []

        def polite_reader(stop: threading.Event) -> None:
            attacker = threading.Thread(target=attack, args=(stop,), daemon=True)
            attacker.start()
            time.sleep(3)  # the flood is open and holding what it may
            started = time.monotonic()
            assert _read_all(c)[:30] == known
            read_s.append(time.monotonic() - started)
            stop.wait()
            attacker.join(10)

        watch.during(polite_reader, 10.0)
        watch.check()
        gap = metric(metrics[victim], "headwater_lease_heartbeat_gap_max_seconds")
        assert gap is not None
        print(
            f"{len(calls)} idle streams; a polite reader read the partition in {read_s[0]:.2f} s; "
            f"largest heartbeat gap of the victim {gap * 1000:.0f} ms"
        )
        assert gap < 1.5, gap  # half the session timeout
        assert refused == 1
        assert read_s and read_s[0] < 10.0
    finally:
        for call in calls:
            call.cancel()
        for ch in [*channels, quiet_channel]:
            ch.close()
