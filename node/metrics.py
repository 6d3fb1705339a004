"""Prometheus metrics of a node: ``headwater_*`` names, base units, on their own HTTP port.

Names follow Prometheus' conventions (``promtool check metrics`` is clean, a test runs it): counters
end in ``_total``, sizes are ``_bytes``, times ``_seconds``. Counters and histograms are updated on
the request path; everything else is read from the node's state when Prometheus scrapes (collectors
below), so a gauge costs nothing between scrapes. A collector that fails is logged and skipped: a
scrape never fails the node, and a scrape of a node in trouble still answers what it can.

Cluster-wide facts are reported by the active controller only, 0 elsewhere (as Kafka does), so a
``sum()`` over every node counts each once: ``headwater_offline_partitions``,
``headwater_fenced_nodes``; ``headwater_active_controller`` is 1 on it, so its sum is 1 in a healthy
cluster. ``EXPORTED`` lists every metric name the node exposes; the README's Monitoring section, the
alerts and the dashboard in the Helm chart use these names, and tests check them against a scrape.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from headwater.node.metrics_http import MetricsEndpoint
from headwater.raft.commands import NO_LEADER
from headwater.v1 import errors_pb2

if TYPE_CHECKING:
    from headwater.node.broker import Broker, FetchResult
    from headwater.node.cluster import ClusterLink
    from headwater.node.isr import IsrSender

__all__ = ["EXPORTED", "NodeMetrics"]

log = logging.getLogger("headwater.node.metrics")

# Every metric family a node exposes, as Prometheus names its samples' family (a counter's with
# ``_total``); ``process_*`` come from prometheus_client's process collector (Linux).
EXPORTED: dict[str, str] = {
    # requests (client RPCs)
    "headwater_requests_total": "counter",
    "headwater_request_duration_seconds": "histogram",
    "headwater_partition_errors_total": "counter",
    "headwater_acks_all_wait_seconds": "histogram",
    # traffic per topic, and replication traffic
    "headwater_bytes_in_total": "counter",
    "headwater_records_in_total": "counter",
    "headwater_bytes_out_total": "counter",
    "headwater_records_out_total": "counter",
    "headwater_replication_bytes_in_total": "counter",
    "headwater_replication_bytes_out_total": "counter",
    # partitions
    "headwater_log_end_offset": "gauge",
    "headwater_log_start_offset": "gauge",
    "headwater_high_watermark": "gauge",
    "headwater_log_size_bytes": "gauge",
    "headwater_partitions": "gauge",
    "headwater_leader_partitions": "gauge",
    "headwater_under_replicated_partitions": "gauge",
    "headwater_under_min_isr_partitions": "gauge",
    "headwater_follower_lag_records": "gauge",
    "headwater_follower_lag_seconds": "gauge",
    "headwater_isr_shrinks_total": "counter",
    "headwater_isr_expands_total": "counter",
    # the cluster
    "headwater_offline_partitions": "gauge",
    "headwater_active_controller": "gauge",
    "headwater_fenced_nodes": "gauge",
    "headwater_registered_nodes": "gauge",
    "headwater_node_fenced": "gauge",
    "headwater_metadata_offset": "gauge",
    "headwater_raft_commit_index": "gauge",
    "headwater_raft_term": "gauge",
    "headwater_lease_heartbeat_gap_max_seconds": "gauge",
    # storage and process
    "headwater_rocksdb_live_sst_bytes": "gauge",
    "headwater_rocksdb_total_sst_bytes": "gauge",
    "headwater_rocksdb_pending_compaction_bytes": "gauge",
    "headwater_rocksdb_memtable_bytes": "gauge",
    "headwater_data_dir_free_bytes": "gauge",
    "headwater_data_dir_size_bytes": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_cpu_seconds_total": "counter",
    "process_open_fds": "gauge",
}

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ERROR_PREFIX = "ERROR_CODE_"


class _LogCollector(Collector):
    """Per-partition gauges read from the broker at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["topic", "partition"]
        end = GaugeMetricFamily(
            "headwater_log_end_offset", "Offset after the last record of the log.", labels=labels
        )
        start = GaugeMetricFamily(
            "headwater_log_start_offset", "First offset still in the log.", labels=labels
        )
        hw = GaugeMetricFamily(
            "headwater_high_watermark", "Offset below which records are committed.", labels=labels
        )
        size = GaugeMetricFamily("headwater_log_size_bytes", "Bytes of batches in the log.", labels=labels)
        partitions = list(self._broker.partitions.items())
        for (topic, index), p in partitions:
            lv = [topic, str(index)]
            end.add_metric(lv, p.log.log_end_offset)
            start.add_metric(lv, p.log.log_start_offset)
            hw.add_metric(lv, p.high_watermark)
            size.add_metric(lv, p.log.size_bytes)
        yield from (end, start, hw, size)
        yield GaugeMetricFamily(
            "headwater_partitions", "Partition replicas on this node.", value=len(partitions)
        )
        led = [(topic, p) for (topic, _), p in partitions if p.leader_id == p.node_id]
        yield GaugeMetricFamily("headwater_leader_partitions", "Partitions this node leads.", value=len(led))
        under_replicated = sum(1 for _, p in led if len(p.isr) < len(p.replicas))
        yield GaugeMetricFamily(
            "headwater_under_replicated_partitions",
            "Partitions this node leads whose ISR is smaller than their replica set.",
            value=under_replicated,
        )
        under_min_isr = 0
        for topic, p in led:
            try:
                min_isr = self._broker.min_insync_replicas(topic, self._broker.topic_config(topic), p)
            except Exception:  # the topic went away between the two reads
                continue
            under_min_isr += len(p.isr) < min_isr
        yield GaugeMetricFamily(
            "headwater_under_min_isr_partitions",
            "Partitions this node leads whose ISR is smaller than min_insync_replicas (acks=all refused).",
            value=under_min_isr,
        )
        # Each follower's lag as its leader sees it: records behind the leader's log end, and time
        # since it was last caught up (Kafka's lastCaughtUpTimeMs).
        lag_records = GaugeMetricFamily(
            "headwater_follower_lag_records",
            "Records a follower is behind this leader's log end (as of its last fetch).",
            labels=["topic", "partition", "follower"],
        )
        lag_seconds = GaugeMetricFamily(
            "headwater_follower_lag_seconds",
            "Time since a follower last caught up to this leader's log end.",
            labels=["topic", "partition", "follower"],
        )
        now_ms = self._broker.replicas.now_ms()
        for topic, p in led:
            state = p.state
            if state is None:
                continue
            for r in state.replicas:
                if r == state.node_id:
                    continue
                lv = [topic, str(p.index), str(r)]
                records, ms = state.lag(r, now_ms)
                lag_records.add_metric(lv, records)
                lag_seconds.add_metric(lv, ms / 1000)
        yield lag_records
        yield lag_seconds


class _Guarded(Collector):
    """Runs a collector so that its failure costs its own metrics only, never the scrape."""

    def __init__(self, name: str, inner: Collector) -> None:
        self._name = name
        self._inner = inner

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._inner.collect())
        except Exception:
            log.exception("collecting the %s metrics failed; this scrape goes without them", self._name)
            return []


class _ClusterCollector(Collector):
    """The node's view of the cluster, read at scrape time: the active controller, fenced nodes,
    offline partitions, this node's own lease, the metadata it applied and its Raft commit index."""

    def __init__(self, broker: Broker, link: ClusterLink) -> None:
        self._broker = broker
        self._link = link

    def collect(self) -> Iterator[Metric]:
        broker, link = self._broker, self._link
        runtime = link.runtime
        # The voter whose controller runtime runs an active controller; on any other node 0. During a
        # leader change an old leader may say 1 until it notices (one tick): alert on it with a `for`.
        active = runtime is not None and runtime.active
        yield GaugeMetricFamily(
            "headwater_active_controller",
            "1 on the node acting as the active controller, 0 on every other node.",
            value=int(active),
        )
        image = broker.image
        offline = fenced = registered = 0
        if active:
            offline = sum(1 for t in image.topics.values() for rec in t.partitions if rec.leader == NO_LEADER)
            registered = len(image.nodes)
            fenced = sum(1 for n in image.nodes.values() if n.fenced)
        yield GaugeMetricFamily(
            "headwater_offline_partitions",
            "Partitions with no leader (reported by the active controller, 0 on other nodes).",
            value=offline,
        )
        yield GaugeMetricFamily(
            "headwater_fenced_nodes",
            "Registered nodes that are fenced: lease expired or shut down (active controller, else 0).",
            value=fenced,
        )
        yield GaugeMetricFamily(
            "headwater_registered_nodes",
            "Nodes registered with the cluster, fenced or not (active controller, else 0).",
            value=registered,
        )
        yield GaugeMetricFamily(
            "headwater_node_fenced",
            "1 while this node is fenced (before it registers, and whenever its heartbeat answer says so).",
            value=int(link.fenced),
        )
        yield GaugeMetricFamily(
            "headwater_metadata_offset",
            "Offset of the last metadata command applied to this node's image (-1 before the first).",
            value=image.metadata_offset,
        )
        quorum = link.quorum
        if quorum is not None and not quorum.closed:
            yield GaugeMetricFamily(
                "headwater_raft_commit_index",
                "Raft commit index of this metadata voter (counts Raft's own no-op entries too).",
                value=quorum.commit_index,
            )
            yield GaugeMetricFamily(
                "headwater_raft_term", "Raft term of this metadata voter.", value=quorum.raft_term
            )
        yield GaugeMetricFamily(
            "headwater_lease_heartbeat_gap_max_seconds",
            "Longest time between two heartbeats of this node's lease since it started.",
            value=link.heartbeat_gap_max_s,
        )


class _IsrCollector(Collector):
    """ISR changes committed for partitions this node led, as counters (0 until the node serves)."""

    def __init__(self) -> None:
        self.sender: IsrSender | None = None

    def collect(self) -> Iterator[Metric]:
        sender = self.sender
        yield CounterMetricFamily(
            "headwater_isr_shrinks",
            "ISR shrinks committed for partitions this node led, since it started.",
            value=sender.shrinks if sender is not None else 0,
        )
        yield CounterMetricFamily(
            "headwater_isr_expands",
            "ISR expansions committed for partitions this node led, since it started.",
            value=sender.expands if sender is not None else 0,
        )


class _StorageCollector(Collector):
    """RocksDB's sizes and the data dir's file system, read at scrape time (a few property reads and
    one statvfs: cheap)."""

    _PROPERTIES = (
        (
            "headwater_rocksdb_live_sst_bytes",
            "rocksdb.live-sst-files-size",
            "Bytes of the SST files the database uses now.",
        ),
        (
            "headwater_rocksdb_total_sst_bytes",
            "rocksdb.total-sst-files-size",
            "Bytes of every SST file, obsolete ones not deleted yet included.",
        ),
        (
            "headwater_rocksdb_pending_compaction_bytes",
            "rocksdb.estimate-pending-compaction-bytes",
            "RocksDB's estimate of the bytes compaction must rewrite to settle its levels.",
        ),
        ("headwater_rocksdb_memtable_bytes", "rocksdb.cur-size-all-mem-tables", "Bytes of the memtables."),
    )

    def __init__(self, broker: Broker, data_dir: str) -> None:
        self._broker = broker
        self._data_dir = data_dir

    def collect(self) -> Iterator[Metric]:
        store = self._broker.store
        for name, prop, doc in self._PROPERTIES:
            value = store.rocksdb_property(prop)
            if value is not None:  # the database is being reopened: no sample this time
                yield GaugeMetricFamily(name, f"{doc} (all column families)", value=value)
        try:
            usage = shutil.disk_usage(self._data_dir)
        except OSError:
            return
        yield GaugeMetricFamily(
            "headwater_data_dir_free_bytes",
            "Bytes free for the node on the data dir's file system.",
            value=usage.free,
        )
        yield GaugeMetricFamily(
            "headwater_data_dir_size_bytes", "Size of the data dir's file system.", value=usage.total
        )


class NodeMetrics:
    """The node's metrics in their own registry (see the module docstring)."""

    def __init__(self, broker: Broker) -> None:
        # A ``*_created`` series beside each counter and histogram doubles what every scrape stores
        # and no dashboard or alert reads it (process-wide; a node process serves one registry).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self._broker = broker
        # Topics with per-topic samples, so that a deleted topic's are dropped (bounded label sets).
        # Registered first: collectors run in registration order, so it prunes before the counters.
        self._topics: set[str] = set()
        self.registry.register(_Guarded("topic", _TopicPruner(self)))
        self.requests = Counter(
            "headwater_requests",
            "Client requests handled, by RPC and outcome (ok; invalid: malformed; error: failed here).",
            ["rpc", "outcome"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "headwater_request_duration_seconds",
            "Time to answer a request, by RPC (long-poll waits included).",
            ["rpc"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.partition_errors = Counter(
            "headwater_partition_errors",
            "Partitions a Produce, Publish or Fetch answered with an error code, by RPC and code.",
            ["rpc", "error"],
            registry=self.registry,
        )
        self.bytes_in = Counter(
            "headwater_bytes_in", "Record batch bytes appended, by topic.", ["topic"], registry=self.registry
        )
        self.records_in = Counter(
            "headwater_records_in", "Records appended, by topic.", ["topic"], registry=self.registry
        )
        self.bytes_out = Counter(
            "headwater_bytes_out",
            "Record batch bytes sent to clients (Fetch, Subscribe), by topic.",
            ["topic"],
            registry=self.registry,
        )
        self.records_out = Counter(
            "headwater_records_out",
            "Offsets sent to clients (Fetch, Subscribe), by topic: records, plus a compacted log's gaps.",
            ["topic"],
            registry=self.registry,
        )
        self.ack_wait = Histogram(
            "headwater_acks_all_wait_seconds",
            "Time an acks=all produce waited, after its append, for every in-sync replica.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.replication_bytes_out = Counter(
            "headwater_replication_bytes_out",
            "Record batch bytes this node sent to its followers.",
            registry=self.registry,
        )
        self.replication_bytes_in = Counter(
            "headwater_replication_bytes_in",
            "Record batch bytes this node copied from its leaders.",
            registry=self.registry,
        )
        self._isr = _IsrCollector()
        self.registry.register(_Guarded("partition", _LogCollector(broker)))
        self.registry.register(_Guarded("ISR", self._isr))
        self.registry.register(_Guarded("storage", _StorageCollector(broker, broker.config.data_dir)))
        # process_resident_memory_bytes, process_cpu_seconds_total, ... (read from /proc on Linux),
        # and the interpreter's own: the default registry has them, a registry of our own does not.
        ProcessCollector(registry=self.registry)
        self.registry.register(PLATFORM_COLLECTOR)
        self.registry.register(GC_COLLECTOR)

    # ---------------------------------------------------------------- request path

    def count_in(self, topic: str, batch_bytes: int, records: int) -> None:
        """Count what a produce appended to ``topic``."""
        self._topics.add(topic)
        self.bytes_in.labels(topic).inc(batch_bytes)
        self.records_in.labels(topic).inc(records)

    def count_out(self, topic: str, batch_bytes: int, records: int) -> None:
        """Count what a client read from ``topic`` (a Fetch answer or a Subscribe message)."""
        self._topics.add(topic)
        self.bytes_out.labels(topic).inc(batch_bytes)
        self.records_out.labels(topic).inc(records)

    def count_error(self, rpc: str, code: int) -> None:
        """Count a partition that ``rpc`` answered with error ``code``."""
        name = errors_pb2.ErrorCode.Name(code) if code in errors_pb2.ErrorCode.values() else str(code)
        self.partition_errors.labels(rpc, name.removeprefix(_ERROR_PREFIX)).inc()

    def count_fetch(self, result: FetchResult) -> None:
        """Count a Fetch answer: bytes and offsets out per topic, and its partitions' errors."""
        for topic, partitions in result.topics:
            batch_bytes = 0
            for header, batches in partitions:
                if header.error_code:
                    self.count_error("Fetch", header.error_code)
                batch_bytes += sum(map(len, batches))
            if batch_bytes:
                self.count_out(topic, batch_bytes, result.records.get(topic, 0))

    def prune_topics(self) -> None:
        """Drop the per-topic samples of topics deleted since (at scrape time)."""
        catalog = self._broker.catalog
        for topic in [t for t in self._topics if catalog.get(t) is None]:
            self._topics.discard(topic)
            for counter in (self.bytes_in, self.records_in, self.bytes_out, self.records_out):
                try:
                    counter.remove(topic)
                except KeyError:
                    pass

    # ---------------------------------------------------------------- parts that start later

    def watch_cluster(self, link: ClusterLink) -> None:
        """Report the node's view of the cluster and its lease (see ``_ClusterCollector``)."""
        self.registry.register(_Guarded("cluster", _ClusterCollector(self._broker, link)))

    def watch_isr(self, sender: IsrSender) -> None:
        """Report the ISR changes this node's leaders had committed."""
        self._isr.sender = sender

    async def serve_http(
        self, host: str, port: int, max_connections: int, timeout_s: float
    ) -> MetricsEndpoint:
        """Serve the registry on ``host:port`` from the running event loop (see metrics_http.py)."""
        endpoint = MetricsEndpoint(self.registry, max_connections, timeout_s)
        await endpoint.start(host, port)
        return endpoint


class _TopicPruner(Collector):
    """Yields nothing: drops deleted topics' samples before the counters are collected."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        self._metrics.prune_topics()
        return iter(())
