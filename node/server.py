"""The node process: an asyncio gRPC server over the node's store, with health, reflection and metrics.

``serve(config)`` runs until SIGTERM or SIGINT, then shuts down gracefully: it stops accepting
requests, lets in-flight ones finish (parked fetches answer at once), and closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from headwater.config import ConfigError, NodeConfig
from headwater.node.broker import Broker
from headwater.node.cluster import ClusterLink
from headwater.node.controller_service import SERVICE_NAME as CONTROLLER_SERVICE_NAME
from headwater.node.controller_service import add_controller_to_server
from headwater.node.fetcher import FetcherManager
from headwater.node.isr import IsrSender
from headwater.node.limits import connection_cap, raise_descriptor_limit, restrict_new_files, secure_data_dir
from headwater.node.metrics import NodeMetrics
from headwater.node.metrics_http import MetricsEndpoint
from headwater.node.replication_service import SERVICE_NAME as REPLICATION_SERVICE_NAME
from headwater.node.replication_service import ReplicationServicer, add_replication_to_server
from headwater.node.service import HeadwaterService, add_to_server
from headwater.raft.quorum import QuorumError
from headwater.storage import LogStore, StorageError
from headwater.v1 import client_pb2

__all__ = ["serve", "run_node"]

log = logging.getLogger("headwater.node")
SERVICE_NAME = client_pb2.DESCRIPTOR.services_by_name["HeadwaterService"].full_name
_CLUSTER_ID_KEY = b"catalog/cluster_id"
_NODE_ID_KEY = b"node/id"
_LEGACY_TOPIC_KEY = b"catalog/topic/"


def grpc_server_options(config: NodeConfig, max_connections: int = 0) -> list[tuple[str, int]]:
    """gRPC core settings of the client port. Each bound was checked against the grpcio in use by
    opening idle connections to a server (see tests/test_limits.py); names that grpc ignores fail
    silently, so a new grpcio is checked the same way."""
    options = [
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_send_message_length", config.max_request_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        # A connection that does not send the HTTP/2 preface in time is closed; without these a
        # silent connection stays open indefinitely. The settings timeout covers one that sends the
        # preface and then never acknowledges the node's SETTINGS.
        ("grpc.server_handshake_timeout_ms", config.handshake_timeout_ms),
        ("grpc.http2.settings_timeout", config.handshake_timeout_ms),
        # Keepalive pings find peers that vanished or never answer, with calls in flight or not.
        # The installed grpc enforces the ping's answer time by ping_timeout_ms; keepalive_timeout_ms
        # alone leaves such a connection open.
        ("grpc.keepalive_time_ms", config.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
        ("grpc.http2.ping_timeout_ms", config.keepalive_timeout_ms),
        ("grpc.max_connection_idle_ms", config.max_connection_idle_ms),
        # No max_connection_age: it would end long Subscribe and ProduceStream calls.
    ]
    if max_connections > 0:
        options.append(("grpc.max_allowed_incoming_connections", max_connections))
    return options


async def _retention_loop(broker: Broker, interval_s: float) -> None:
    """Retention, then the high-watermark checkpoints, every ``interval_s``."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            deleted = broker.apply_retention()
            if deleted:
                log.info("retention deleted %d batches", deleted)
        except Exception:
            log.exception("retention pass failed")
        failed = broker.checkpoint_high_watermarks()
        if failed:
            log.warning("%d high watermarks could not be checkpointed (tried again later)", failed)


def _check_store_owner(config: NodeConfig, store: LogStore) -> None:
    """A log store belongs to one node id (like Kafka's meta.properties). A store written by
    another node, or by a version that kept topics in the store rather than in the metadata
    quorum, is refused: serving it would delete every partition the metadata does not place here."""
    where = os.path.join(config.data_dir, "log")
    raw = store.get_meta(_NODE_ID_KEY)
    if raw is not None:
        owner = bytes(raw).decode()
        if owner != str(config.node_id):
            raise ConfigError(f"{where} belongs to node {owner}, not node {config.node_id}; check node_id")
        return
    if any(True for _ in store.iter_meta(_LEGACY_TOPIC_KEY)):
        raise ConfigError(
            f"{where} was written by a version that kept topics in the node's store; its topics are "
            "not in the metadata quorum and would be deleted. Move it away to start this node"
        )
    store.put_meta(_NODE_ID_KEY, str(config.node_id).encode())


def _cluster_id(link: ClusterLink, store: LogStore) -> str:
    cluster_id = link.cluster_id()
    if cluster_id:
        return str(cluster_id)
    raw = store.get_meta(_CLUSTER_ID_KEY)  # a node alone keeps its own, made on first start
    if raw is None:
        raw = uuid.uuid4().hex.encode()
        store.put_meta(_CLUSTER_ID_KEY, raw)
    return bytes(raw).decode()


def _fsync_topic(broker: Broker, topic: str) -> bool:
    if broker.catalog.get(topic) is None:  # deleted meanwhile: nothing more is written
        return False
    return bool(broker.topic_config(topic)["flush_policy"] == "fsync")


def _start_fetchers(
    config: NodeConfig, broker: Broker, link: ClusterLink, metrics: NodeMetrics
) -> FetcherManager:
    fetchers = FetcherManager(
        config.node_id,
        image=lambda: broker.image,
        channel=link.channel,
        auth=link.auth,
        broker_epoch=lambda: link.broker_epoch,
        sync_for=lambda p: _fsync_topic(broker, p.topic),
        sync_wal=broker.sync_wal,
        max_wait_ms=config.replica_fetch_wait_max_ms,
        max_bytes=config.replica_fetch_max_bytes,
        on_copied=metrics.replication_bytes_in.inc,
    )
    broker.replicas.on_roles = fetchers.update
    fetchers.update(broker.partitions.values())
    fetchers.start()
    return fetchers


def _start_isr_sender(config: NodeConfig, broker: Broker, link: ClusterLink) -> IsrSender:
    sender = IsrSender(
        config.node_id,
        broker.replicas,
        image=lambda: broker.image,
        call_controller=lambda method, request, timeout_s: link.call_controller(
            method, request, timeout_s, authenticate=True
        ),
        broker_epoch=lambda: link.broker_epoch,
        replica_lag_time_max_ms=config.replica_lag_time_max_ms,
    )
    sender.start()
    return sender


async def run_node(config: NodeConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    # Before the first file is made: records, the Raft journal and logs are this user's alone.
    restrict_new_files()
    secure_data_dir(config.data_dir)
    descriptor_limit = raise_descriptor_limit()
    max_connections = connection_cap(config.max_connections, descriptor_limit)
    store = LogStore(os.path.join(config.data_dir, "log"))
    link: ClusterLink | None = None
    fetchers: FetcherManager | None = None
    isr_sender: IsrSender | None = None
    metrics_endpoint: MetricsEndpoint | None = None
    try:
        _check_store_owner(config, store)
        broker = Broker(config, store)
        link = ClusterLink(config, broker, asyncio.get_running_loop())
        broker.replicas.broker_epoch = lambda: link.broker_epoch if link is not None else -1
        broker.catalog.cluster_id = _cluster_id(link, store)
        controller_servicer = link.start_voter(broker.catalog.cluster_id)
        metrics = NodeMetrics(broker)
        metrics.watch_cluster(link)
        server = grpc.aio.server(options=grpc_server_options(config, max_connections))
        log.info(
            "client connections: at most %s at once, handshake within %d ms, idle ones closed after %d ms",
            max_connections or "unbounded",
            config.handshake_timeout_ms,
            config.max_connection_idle_ms,
        )
        service = HeadwaterService(broker, metrics, link)
        add_to_server(service, server)
        add_controller_to_server(controller_servicer, server)
        # Followers authenticate with node tokens made from the cluster secret ``start_voter`` read.
        replication = ReplicationServicer(broker, link.auth, on_sent=metrics.replication_bytes_out.inc)
        add_replication_to_server(replication, server)
        broker.on_ack_wait = metrics.ack_wait.observe
        broker.on_subscribe_read = metrics.count_out
        services = [SERVICE_NAME, CONTROLLER_SERVICE_NAME, REPLICATION_SERVICE_NAME]
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                *services,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{config.host}:{config.port}"
        if server.add_insecure_port(address) == 0:
            raise OSError(f"cannot listen on {address}")
        await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        await link.start()
        if config.metrics_port:
            metrics_endpoint = await metrics.serve_http(
                config.host,
                config.metrics_port,
                config.metrics_max_connections,
                config.metrics_timeout_ms / 1000,
            )
        retention = asyncio.create_task(_retention_loop(broker, config.retention_check_interval_ms / 1000))
        log.info("node %d listening on %s; joining the cluster", config.node_id, address)
        ready = asyncio.create_task(link.ready.wait())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([ready, stopping], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if link.ready.is_set() and not stop.is_set():
            # Followers copy their leaders' logs once this node is registered and caught up.
            fetchers = _start_fetchers(config, broker, link, metrics)
            isr_sender = _start_isr_sender(config, broker, link)
            metrics.watch_isr(isr_sender)
            await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            log.info(
                "headwater node %d serving on %s (data in %s, %d topics)",
                config.node_id,
                address,
                config.data_dir,
                len(broker.catalog),
            )
        await stopping
        log.info("shutting down: moving leaderships away, then finishing in-flight requests")
        await health_servicer.enter_graceful_shutdown()
        await link.controlled_shutdown(min(config.shutdown_grace_s, 2 * config.session_timeout_ms / 1000))
        if fetchers is not None:
            await fetchers.close()
        if isr_sender is not None:
            await isr_sender.close()
        broker.close()
        service.close_streams()
        replication.close_streams()
        # The voter and its metadata streams stop first, so the server's grace covers in-flight
        # requests only, not watches that would never end on their own.
        await link.close()
        await server.stop(config.shutdown_grace_s)
        retention.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await retention
        broker.checkpoint_high_watermarks(sync=True)
    finally:
        if fetchers is not None:
            broker.replicas.on_roles = None
            await fetchers.close()
        if isr_sender is not None:
            await isr_sender.close()
        if metrics_endpoint is not None:
            await metrics_endpoint.close()
        if link is not None:
            await link.close()
        store.close()
    log.info("node %d stopped", config.node_id)


def serve(config: NodeConfig) -> int:
    """Run a node in this process until SIGTERM/SIGINT; returns the process exit code."""
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_node(config, stop)

    try:
        asyncio.run(main())
    except (OSError, StorageError, ConfigError, QuorumError) as e:
        log.error("node %d cannot run: %s", config.node_id, e)
        return 1
    return 0
