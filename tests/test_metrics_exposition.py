"""What a node exposes on its metrics port: Prometheus names and types (``promtool check metrics``
clean), every metric the README, the alerts and the dashboard name, and values that follow the
traffic a test sends.

promtool comes from the ``prometheus`` Debian package (.ci/run installs it); without it the tests
that need it fail, they never skip.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import NodeProcess, free_port
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from headwater.node.metrics import EXPORTED, _Guarded
from headwater.storage.store import LogStore
from headwater.v1 import batch as codec
from headwater.v1 import client_pb2 as pb
from headwater.v1 import client_pb2_grpc

TOPIC = "orders"


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install prometheus"
    return found


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in found, f"no sample {name}{labels}"
    return found[key]


@pytest.fixture
def served(node_factory: object) -> Iterator[tuple[NodeProcess, int]]:
    """A node with its metrics port, after a produce of 3 records and a publish of 2, two fetches
    (one refused) and a Subscribe answer on topic ``orders``."""
    port = free_port()
    node: NodeProcess = node_factory(extra_args=["--metrics-port", str(port)])  # type: ignore[operator]
    with grpc.insecure_channel(node.bootstrap) as channel:
        stub = client_pb2_grpc.HeadwaterServiceStub(channel)  # type: ignore[no-untyped-call]
        created = stub.CreateTopics(
            pb.CreateTopicsRequest(
                topics=[pb.CreatableTopic(name=TOPIC, num_partitions=1, replication_factor=1)]
            ),
            timeout=10,
        )
        assert created.topics[0].error_code == 0, created
        now = int(time.time() * 1000)
        batch = codec.build_batch([(None, v, None, now) for v in (b"a", b"b", b"c")])
        produced = stub.Produce(
            pb.ProduceRequest(
                acks=-1,
                timeout_ms=10_000,
                topics=[
                    pb.ProduceTopicData(
                        topic=TOPIC, partitions=[pb.ProducePartitionData(partition=0, batches=[batch])]
                    )
                ],
            ),
            timeout=10,
        )
        assert produced.topics[0].partitions[0].error_code == 0, produced
        published = stub.Publish(
            pb.PublishRequest(topic=TOPIC, records=[pb.PublishRecord(value=v) for v in (b"d", b"e")]),
            timeout=10,
        )
        assert [r.error_code for r in published.results] == [0, 0], published
        for topic in (TOPIC, "no-such-topic"):
            stub.Fetch(
                pb.FetchRequest(
                    replica_id=-1,
                    max_bytes=1 << 20,
                    topics=[
                        pb.FetchTopic(
                            topic=topic,
                            partitions=[
                                pb.FetchPartition(partition=0, fetch_offset=1, current_leader_epoch=-1)
                            ],
                        )
                    ],
                ),
                timeout=10,
            )
        stream = stub.Subscribe(pb.SubscribeRequest(topic=TOPIC, partition=0, offset=0), timeout=10)
        assert next(stream).error_code == 0
        stream.cancel()
        yield node, port


def test_the_scrape_is_promtool_clean_and_has_every_exported_metric_with_its_type(
    served: tuple[NodeProcess, int],
) -> None:
    _, port = served
    text = scrape(port)
    lint = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0 and not lint.stdout.strip(), f"promtool:\n{lint.stdout}{lint.stderr}"
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in EXPORTED.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert types.get(family) == kind, f"{name}: exposed as {types.get(family)}, listed as {kind}"
    ours = {n for n in types if n.startswith("headwater_")}
    listed = {n.removesuffix("_total") if EXPORTED[n] == "counter" else n for n in EXPORTED}
    assert ours <= listed, f"exposed but not listed in EXPORTED: {sorted(ours - listed)}"


def test_metric_values_follow_the_traffic_and_the_cluster_state(served: tuple[NodeProcess, int]) -> None:
    node, port = served
    found = samples(scrape(port))
    # Traffic per topic: 3 + 2 records in; the fetch from offset 1 took readers 4 offsets on and
    # the Subscribe from 0 took them 5.
    assert value(found, "headwater_bytes_in_total", topic=TOPIC) > 0
    assert value(found, "headwater_records_in_total", topic=TOPIC) == 3 + 2
    assert value(found, "headwater_bytes_out_total", topic=TOPIC) > 0
    assert value(found, "headwater_records_out_total", topic=TOPIC) == 4 + 5
    assert value(found, "headwater_requests_total", rpc="Produce", outcome="ok") == 1
    assert value(found, "headwater_requests_total", rpc="Publish", outcome="ok") == 1
    assert value(found, "headwater_requests_total", rpc="Fetch", outcome="ok") == 2
    assert value(found, "headwater_request_duration_seconds_count", rpc="Produce") == 1
    assert value(found, "headwater_request_duration_seconds_bucket", rpc="Produce", le="+Inf") == 1
    unknown = {"rpc": "Fetch", "error": "UNKNOWN_TOPIC_OR_PARTITION"}
    assert value(found, "headwater_partition_errors_total", **unknown) == 1
    assert value(found, "headwater_acks_all_wait_seconds_count") == 2
    # The partition.
    part = {"topic": TOPIC, "partition": "0"}
    assert value(found, "headwater_log_end_offset", **part) == 5
    assert value(found, "headwater_high_watermark", **part) == 5
    assert value(found, "headwater_log_start_offset", **part) == 0
    assert value(found, "headwater_under_replicated_partitions") == 0
    assert value(found, "headwater_under_min_isr_partitions") == 0
    assert value(found, "headwater_isr_shrinks_total") == 0
    # The cluster, as a lone voter sees it: it is the active controller of one unfenced node.
    assert value(found, "headwater_active_controller") == 1
    assert value(found, "headwater_offline_partitions") == 0
    assert value(found, "headwater_registered_nodes") == 1
    assert value(found, "headwater_fenced_nodes") == 0
    assert value(found, "headwater_node_fenced") == 0
    assert value(found, "headwater_metadata_offset") >= 1  # the registration and the topic at least
    assert value(found, "headwater_raft_commit_index") >= value(found, "headwater_metadata_offset")
    # Storage and the process.
    assert value(found, "headwater_rocksdb_live_sst_bytes") >= 0
    assert value(found, "headwater_rocksdb_pending_compaction_bytes") >= 0
    free, size = value(found, "headwater_data_dir_free_bytes"), value(found, "headwater_data_dir_size_bytes")
    assert 0 < free <= size
    assert value(found, "process_resident_memory_bytes") > 10 << 20


def test_a_deleted_topics_samples_are_dropped(served: tuple[NodeProcess, int]) -> None:
    node, port = served
    with grpc.insecure_channel(node.bootstrap) as channel:
        stub = client_pb2_grpc.HeadwaterServiceStub(channel)  # type: ignore[no-untyped-call]
        deleted = stub.DeleteTopics(pb.DeleteTopicsRequest(names=[TOPIC]), timeout=10)
        assert deleted.topics[0].error_code == 0, deleted
    scrape(port)  # drops the topic's samples; the next scrape shows none (whatever the order)
    text = scrape(port)
    assert f'topic="{TOPIC}"' not in text


class _Broken(Collector):
    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("headwater_fine", "A sample before the failure.", value=1)
        raise RuntimeError("a collector that fails")


def test_a_failing_collector_costs_its_own_metrics_never_the_scrape() -> None:
    registry = CollectorRegistry()
    registry.register(_Guarded("broken", _Broken()))
    registry.register(_Guarded("fine", _Fine()))
    text = generate_latest(registry).decode()
    assert "headwater_fine " not in text and "headwater_other 2.0" in text


class _Fine(Collector):
    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("headwater_other", "Another collector's sample.", value=2)


def test_rocksdb_properties_are_summed_over_column_families_and_absent_once_closed(tmp_path: Path) -> None:
    store = LogStore(str(tmp_path / "log"))
    try:
        assert store.rocksdb_property("rocksdb.live-sst-files-size") == 0  # nothing flushed yet
        memtables = store.rocksdb_property("rocksdb.cur-size-all-mem-tables")
        assert memtables is not None and memtables > 0  # each column family's empty memtable
        assert store.rocksdb_property("rocksdb.no-such-property") is None
    finally:
        store.close()
    assert store.rocksdb_property("rocksdb.live-sst-files-size") is None
