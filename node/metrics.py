"""Prometheus metrics of a node: ``headwater_*`` names, base units, on their own HTTP port."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from headwater.node.metrics_http import MetricsEndpoint
from headwater.raft.commands import NO_LEADER

if TYPE_CHECKING:
    from headwater.node.broker import Broker
    from headwater.node.cluster import ClusterLink

__all__ = ["NodeMetrics"]


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
                min_isr = int(self._broker.topic_config(topic)["min_insync_replicas"])
            except Exception:  # the topic went away between the two reads
                continue
            under_min_isr += len(p.isr) < min_isr
        yield GaugeMetricFamily(
            "headwater_under_min_isr_partitions",
            "Partitions this node leads whose ISR is smaller than min_insync_replicas (acks=all refused).",
            value=under_min_isr,
        )
        # As in Kafka, the active controller reports the cluster's offline partitions; others say 0.
        broker = self._broker
        offline = 0
        if broker.controller_id == broker.config.node_id:
            offline = sum(
                1 for t in broker.image.topics.values() for rec in t.partitions if rec.leader == NO_LEADER
            )
        yield GaugeMetricFamily(
            "headwater_offline_partitions",
            "Partitions with no leader (reported by the active controller, 0 on other nodes).",
            value=offline,
        )


class NodeMetrics:
    """The node's metrics in their own registry."""

    def __init__(self, broker: Broker) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "headwater_requests",
            "Requests handled, by RPC and outcome.",
            ["rpc", "outcome"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "headwater_request_duration_seconds",
            "Time to answer a request, by RPC (long-poll waits included).",
            ["rpc"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.bytes_in = Counter("headwater_bytes_in", "Record batch bytes appended.", registry=self.registry)
        self.bytes_out = Counter(
            "headwater_bytes_out", "Record batch bytes sent to readers.", registry=self.registry
        )
        self.records_in = Counter("headwater_records_in", "Records appended.", registry=self.registry)
        self.registry.register(_LogCollector(broker))

    def watch_lease(self, link: ClusterLink) -> None:
        """Report the node's lease: the longest gap between two of its heartbeats."""
        gap = Gauge(
            "headwater_lease_heartbeat_gap_max_seconds",
            "Longest time between two heartbeats of this node's lease since it started.",
            registry=self.registry,
        )
        gap.set_function(lambda: link.heartbeat_gap_max_s)

    async def serve_http(
        self, host: str, port: int, max_connections: int, timeout_s: float
    ) -> MetricsEndpoint:
        """Serve the registry on ``host:port`` from the running event loop (see metrics_http.py)."""
        endpoint = MetricsEndpoint(self.registry, max_connections, timeout_s)
        await endpoint.start(host, port)
        return endpoint
