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
    from headwater.node.isr import IsrSender

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
        self.ack_wait = Histogram(
            "headwater_acks_all_wait_seconds",
            "Time an acks=all produce waited, after its append, for every in-sync replica.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
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
        self.registry.register(_LogCollector(broker))

    def watch_lease(self, link: ClusterLink) -> None:
        """Report the node's lease: the longest gap between two of its heartbeats."""
        gap = Gauge(
            "headwater_lease_heartbeat_gap_max_seconds",
            "Longest time between two heartbeats of this node's lease since it started.",
            registry=self.registry,
        )
        gap.set_function(lambda: link.heartbeat_gap_max_s)

    def watch_isr(self, sender: IsrSender) -> None:
        """Report the ISR changes this node's leaders had committed."""
        shrinks = Gauge(
            "headwater_isr_shrinks",
            "ISR shrinks committed for partitions this node led, since it started.",
            registry=self.registry,
        )
        expands = Gauge(
            "headwater_isr_expands",
            "ISR expansions committed for partitions this node led, since it started.",
            registry=self.registry,
        )
        shrinks.set_function(lambda: sender.shrinks)
        expands.set_function(lambda: sender.expands)

    async def serve_http(
        self, host: str, port: int, max_connections: int, timeout_s: float
    ) -> MetricsEndpoint:
        """Serve the registry on ``host:port`` from the running event loop (see metrics_http.py)."""
        endpoint = MetricsEndpoint(self.registry, max_connections, timeout_s)
        await endpoint.start(host, port)
        return endpoint
