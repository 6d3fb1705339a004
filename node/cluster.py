"""A node's place in the cluster: its quorum voter, its metadata image, its lease with the controller.

``ClusterLink`` runs, on the node's event loop:

- **The voter** (when ``voters`` names this node): a ``MetadataQuorum`` with its journal and dumps
  in ``<data_dir>/raft``, a ``ControllerRuntime`` that acts while this voter is the Raft leader, and
  the ``ControllerService`` the node's gRPC server exposes. A node alone (no ``voters``) is a quorum
  of one on ``host:raft_port``, with a secret it generates in its data dir.
- **The image.** A voter applies the metadata log itself, so its image is its quorum's metadata. A
  node that is not a voter follows ``WatchMetadata`` from a voter (a snapshot, then every command,
  applied in offset order to its own ``ClusterMetadata``). Each new image goes to
  ``Broker.apply_image``, which opens the replicas placed here and sets their roles.
- **The lease** (KIP-631): the node registers with the active controller (a new ``incarnation_id``
  per process, so a restart gets a new ``broker_epoch``), asks to stay fenced until its image has
  caught up with the metadata as of its registration, then heartbeats every
  ``heartbeat_interval_ms`` and is unfenced. ``ready`` is set once it is unfenced and caught up.
  On a clean stop it asks for a controlled shutdown: the controller moves its leaderships away
  first, so clients fail over without waiting for the session timeout.
- **Forwarding** (KIP-590): CreateTopics, DeleteTopics and AlterConfigs from clients go to the
  active controller; the answer waits until this node's image has the change, so the caller sees it
  here at once.

The active controller is found through a hint (the last one that answered, or what a voter says),
this node's own voter, and ``controller_addresses``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
import uuid
from typing import Any

import grpc

from headwater.config import ConfigError, NodeConfig, read_cluster_secret, write_secret_file
from headwater.node.auth import NodeAuth
from headwater.node.broker import Broker
from headwater.node.controller import ControllerRuntime, MetadataFeed, monotonic_ms
from headwater.node.controller_service import BrokerControllerService, ControllerServiceServicer
from headwater.node.forwarding import FORWARDED_METHODS, new_request_id
from headwater.raft.commands import NO_LEADER, decode_command
from headwater.raft.controller import ActiveController
from headwater.raft.metadata import ClusterMetadata
from headwater.raft.quorum import MetadataQuorum, parse_voters
from headwater.v1 import controller_pb2, controller_pb2_grpc, errors_pb2

__all__ = ["ClusterLink", "SECRET_FILE"]

log = logging.getLogger("headwater.node.cluster")
E = errors_pb2
cpb: Any = controller_pb2

SECRET_FILE = "cluster.secret"
VOTERS_FILE = "voters.json"
_RETRY_S = 0.2
_MAX_RETRY_S = 2.0


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _lone_secret(raft_dir: str) -> str:
    """The secret of a node that is a quorum of one: generated once, kept readable by the node alone."""
    path = os.path.join(raft_dir, SECRET_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            secret = fh.read().strip()
        if secret:
            return secret
    except FileNotFoundError:
        pass
    return write_secret_file(path)


def _report_failure(task: asyncio.Task[None]) -> None:
    """A task of the link that ends with an error would leave the node silently out of the
    cluster: say so loudly (the loops catch what they expect; this is a bug if it fires)."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("%s stopped: %r", task.get_name(), task.exception(), exc_info=task.exception())


class ClusterLink:
    """See the module docstring. ``start_voter()`` (sync, before the server starts), then
    ``await start()`` once the gRPC server serves; at the end ``await controlled_shutdown(...)``
    while the server still serves, then ``await close()``."""

    def __init__(self, config: NodeConfig, broker: Broker, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.broker = broker
        self._loop = loop
        host, port = config.advertised()
        self.address = f"{host}:{port}"
        self.raft_dir = os.path.join(config.data_dir, "raft")
        if config.voters:
            try:
                self.voters = parse_voters(config.voters)
            except ValueError as e:
                raise ConfigError(f"setting voters: {e}") from None
        else:
            self.voters = {config.node_id: f"{config.host}:{config.raft_port or _free_port(config.host)}"}
        self.is_voter = config.node_id in self.voters
        self.controller_addresses = [a.strip() for a in config.controller_addresses.split(",") if a.strip()]
        if not self.is_voter and not self.controller_addresses:
            raise ConfigError(
                f"node {config.node_id} is not one of the voters {sorted(self.voters)}: "
                "set controller_addresses so it can find the controller"
            )
        self.auth: NodeAuth | None = None
        self.quorum: MetadataQuorum | None = None
        self.runtime: ControllerRuntime | None = None
        self.feed: MetadataFeed | None = None
        self.incarnation_id = uuid.uuid4().bytes
        self.broker_epoch = -1
        self.fenced = True
        # The longest time between two heartbeats of this node's lease (a metric).
        self.heartbeat_gap_max_s = 0.0
        # Set once registered, caught up and unfenced.
        self.ready = asyncio.Event()
        self._hint_address = ""
        self._hinted_controller_id = NO_LEADER
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._image_moved = asyncio.Event()
        self._stopping = False
        self._closed = False
        self._shutdown_ready = asyncio.Event()
        self._shutdown_abandoned = False
        # The metadata watch of a node that is not a voter, and when its image began to lag.
        self._watch_call: Any = None
        self._rewatch = False
        self._lagging_since: float | None = None

    # ---------------------------------------------------------------- lifecycle

    def start_voter(self, cluster_id: str = "") -> ControllerServiceServicer | BrokerControllerService:
        """Start this node's quorum voter and controller runtime; returns the ControllerService to
        serve (on a node that is not a voter, one that describes the cluster from its image and
        names the active controller). Blocks until the Raft port is bound."""
        if not self.is_voter:
            secret = read_cluster_secret(self.config)
            if not secret:
                raise ConfigError("a node that is not a voter needs the cluster secret (cluster_secret_file)")
            self.auth = NodeAuth(secret)
            return BrokerControllerService(
                self.config.node_id,
                lambda: self.broker.image,
                self.controller_hint,
                self.voters,
                lambda: cluster_id,
            )
        os.makedirs(self.raft_dir, exist_ok=True)
        self._check_voters()
        secret = read_cluster_secret(self.config)
        if not secret:
            if len(self.voters) > 1:
                raise ConfigError("several voters need a cluster secret (cluster_secret_file)")
            secret = _lone_secret(self.raft_dir)
        self.auth = NodeAuth(secret)
        self.feed = MetadataFeed(self._loop)
        self.quorum = MetadataQuorum(
            self.config.node_id,
            self.voters,
            self.raft_dir,
            secret,
            on_applied=self.feed.on_applied,
            on_snapshot_loaded=self.feed.on_snapshot_loaded,
        )
        del secret
        cfg = self.config

        def factory(metadata: ClusterMetadata) -> ActiveController:
            return ActiveController(
                metadata,
                random.Random(),
                heartbeat_interval_ms=cfg.heartbeat_interval_ms,
                session_timeout_ms=cfg.session_timeout_ms,
            )

        self.runtime = ControllerRuntime(
            self.quorum, factory, monotonic_ms, self._loop, feed=self.feed, max_partitions=cfg.max_partitions
        )
        self.runtime.cluster_id = cluster_id
        self.runtime.start()
        log.info(
            "node %d is a metadata voter on raft %s (voters %s)",
            cfg.node_id,
            self.voters[cfg.node_id],
            ",".join(f"{i}@{a}" for i, a in sorted(self.voters.items())),
        )
        return ControllerServiceServicer(self.runtime, cfg, self.auth)

    def _check_voters(self) -> None:
        """The quorum in this data dir keeps the voters it was formed with: a voter that joined
        another set (say a dir of a one-node cluster reused for three) could hold entries that
        clash with theirs at the same index and term. Changing voters is refused, not guessed."""
        path = os.path.join(self.raft_dir, VOTERS_FILE)
        lone = not self.config.voters
        current = {
            "lone": lone,
            "voters": {} if lone else {str(i): a for i, a in sorted(self.voters.items())},
        }
        try:
            with open(path, encoding="utf-8") as fh:
                recorded = json.load(fh)
        except FileNotFoundError:
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(current, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            return
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        if recorded != current:

            def show(d: Any) -> str:
                voters = d.get("voters") if isinstance(d, dict) else None
                return "this node alone" if not voters else ",".join(f"{i}@{a}" for i, a in voters.items())

            raise ConfigError(
                f"the metadata quorum in {self.raft_dir} was formed by voters {show(recorded)}, but this "
                f"node is configured with {show(current)}. Changing the voters of a quorum is not "
                "supported: restore the old setting, or start from an empty data dir"
            )

    async def start(self) -> None:
        """Follow the metadata and keep the lease; returns at once (``ready`` tells when unfenced)."""
        follow = self._follow_local() if self.is_voter else self._follow_remote()
        self._tasks = [
            self._loop.create_task(follow, name="metadata-follow"),
            self._loop.create_task(self._lease(), name="node-lease"),
            self._loop.create_task(self._reconcile(), name="replica-reconcile"),
        ]
        for t in self._tasks:
            t.add_done_callback(_report_failure)

    async def controlled_shutdown(self, timeout_s: float) -> None:
        """Ask the controller to move this node's leaderships away; wait for it up to ``timeout_s``."""
        self._stopping = True
        if self.broker_epoch >= 0 and timeout_s > 0 and self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._shutdown_ready.wait(), timeout_s)
            if self._shutdown_abandoned:
                pass  # said where it was decided
            elif self._shutdown_ready.is_set():
                log.info("controlled shutdown done: node %d leads nothing", self.config.node_id)
            else:
                log.warning("controlled shutdown did not finish in %.1fs; stopping anyway", timeout_s)

    async def close(self) -> None:
        """Stop following the metadata, the lease, the controller runtime and the voter. Idempotent."""
        self._stopping = True
        self._closed = True
        tasks, self._tasks = self._tasks, []
        # Cancel until they end: on this Python a cancellation that races a wait_for finishing can
        # be lost, and the loops also stop on their own once _closed is set.
        for _ in range(10):
            pending = [t for t in tasks if not t.done()]
            if not pending:
                break
            for t in pending:
                t.cancel()
            await asyncio.wait(pending, timeout=1.0)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                log.warning("%s ended with %r", t.get_name(), t.exception())
            elif not t.done():
                log.error("%s did not stop", t.get_name())
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        if self.runtime is not None:
            await self.runtime.stop()
        if self.quorum is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.quorum.close)

    # ---------------------------------------------------------------- the image

    def _caught_up(self, image: ClusterMetadata) -> bool:
        return self.broker_epoch >= 0 and image.metadata_offset >= self.broker_epoch

    def _apply(self, image: ClusterMetadata) -> None:
        try:
            self.broker.apply_image(image, caught_up=self._caught_up(image))
        except Exception:
            log.exception("applying metadata offset %d failed", image.metadata_offset)
            self.broker.needs_reconcile = True
        self.broker.controller_id = self.controller_id()
        old, self._image_moved = self._image_moved, asyncio.Event()
        old.set()

    def cluster_id(self) -> str:
        """The configured cluster id, or one derived from the voters (the same on every node)."""
        if self.config.cluster_id:
            return self.config.cluster_id
        if not self.config.voters:
            return ""  # a node alone: the caller keeps one in its store
        spec = ",".join(f"{i}@{a}" for i, a in sorted(self.voters.items()))
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"headwater:voters:{spec}"))

    def controller_hint(self) -> tuple[int, str]:
        """The active controller's id and client address as this node knows them (-1, "" if not)."""
        if self.runtime is not None:
            controller_id, hinted = self.runtime.controller_hint()
            return int(controller_id), str(hinted)
        address = self._hint_address
        for n in self.broker.image.nodes.values():
            if address and f"{n.host}:{n.port}" == address:
                return n.node_id, address
        return self._hinted_controller_id, address

    def controller_id(self) -> int:
        return self.controller_hint()[0]

    async def wait_for_offset(self, offset: int, timeout_s: float) -> bool:
        """Wait until this node's image has applied ``offset``; False on timeout."""
        deadline = self._loop.time() + timeout_s
        while self.broker.image.metadata_offset < offset:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._image_moved.wait(), remaining)
        return True

    async def _follow_local(self) -> None:
        assert self.feed is not None and self.quorum is not None
        feed, quorum = self.feed, self.quorum
        last: ClusterMetadata | None = None
        was_caught_up = False
        while not self._closed:
            changed = feed.changed_event()
            image = quorum.metadata
            caught_up = self._caught_up(image)
            if image is not last or caught_up != was_caught_up:
                self._apply(image)
                last, was_caught_up = image, caught_up
            else:
                self.broker.controller_id = self.controller_id()
            await feed.wait_changed(changed, 0.25)

    async def _follow_remote(self) -> None:
        image = ClusterMetadata()
        from_offset = -1
        backoff = _RETRY_S
        while not self._closed:
            for address in self._candidates():
                stub = controller_pb2_grpc.ControllerServiceStub(self.channel(address))  # type: ignore[no-untyped-call]
                try:
                    call = stub.WatchMetadata(cpb.WatchMetadataRequest(from_offset=from_offset))
                    self._watch_call = call
                    async for event in call:
                        backoff = _RETRY_S
                        if event.HasField("snapshot"):
                            image = ClusterMetadata.from_snapshot(event.snapshot.data)
                        else:
                            d = event.delta
                            if d.metadata_offset != image.metadata_offset + 1:
                                log.warning(
                                    "metadata gap: have %d, got %d; asking for a snapshot",
                                    image.metadata_offset,
                                    d.metadata_offset,
                                )
                                from_offset = -1
                                call.cancel()
                                break
                            image = image.copy()  # the broker keeps the previous image
                            image.apply(decode_command(d.command))
                        from_offset = image.metadata_offset + 1
                        self._apply(image)
                except grpc.aio.AioRpcError as e:
                    log.debug("metadata watch on %s ended: %s", address, e.code())
                except asyncio.CancelledError:
                    if not self._rewatch or self._stopping:
                        raise
                    log.warning("the metadata from %s lags the controller; watching another voter", address)
                except Exception:
                    log.exception("metadata watch on %s failed", address)
                    from_offset = -1
                self._watch_call = None
                self._rewatch = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_RETRY_S)

    def _check_lag(self, controller_offset: int) -> None:
        """A node that is not a voter: when its image stays behind the offset the controller
        reports for longer than a session, the voter it watches is cut off; watch another."""
        if self.is_voter or controller_offset < 0:
            return
        now = time.monotonic()
        if self.broker.image.metadata_offset >= controller_offset:
            self._lagging_since = None
            return
        if self._lagging_since is None:
            self._lagging_since = now
        elif (
            now - self._lagging_since > self.config.session_timeout_ms / 1000 and self._watch_call is not None
        ):
            self._lagging_since = None
            self._rewatch = True
            self._watch_call.cancel()

    async def _reconcile(self) -> None:
        """Apply the image again while some replica could not be opened (e.g. a full disk)."""
        while not self._closed:
            await asyncio.sleep(1.0)
            if self.broker.needs_reconcile:
                self._apply(self.broker.image)

    # ---------------------------------------------------------------- the controller

    def channel(self, address: str) -> grpc.aio.Channel:
        """A cached channel to another node's client port (controller calls, relayed reads)."""
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(
                address,
                options=[
                    ("grpc.max_receive_message_length", self.config.max_request_bytes),
                    ("grpc.max_send_message_length", self.config.max_request_bytes),
                    # A peer that was down when first dialled (a node starting before the others)
                    # is dialled again within a second or two, not after gRPC's default backoff.
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 2000),
                ],
            )
        return ch

    def _candidates(self) -> list[str]:
        out: list[str] = []
        if self.runtime is not None and self.quorum is not None and self.quorum.is_leader:
            out.append(self.address)
        if self.runtime is not None:
            _, hinted = self.runtime.controller_hint()
            if hinted:
                out.append(hinted)
        if self._hint_address:
            out.append(self._hint_address)
        out += self.controller_addresses
        if self.is_voter:
            out.append(self.address)
        return list(dict.fromkeys(out))

    async def call_controller(
        self, method: str, request: Any, timeout_s: float, *, authenticate: bool = False
    ) -> Any | None:
        """Send a ControllerService call to the active controller, following hints, until it answers
        with something other than NOT_CONTROLLER or ``timeout_s`` passes (then None).

        A call that fails (UNAVAILABLE, no answer within ``controller_call_timeout_ms``) or meets
        NOT_CONTROLLER is sent again, to the next candidate or after a backoff. A call may have
        taken effect before its answer was lost, so only calls safe to repeat go through here:
        registration and heartbeats are idempotent by incarnation and broker epoch, and a
        forwarded topic change must carry its request id (forwarding.py)."""
        if method in FORWARDED_METHODS and not request.request_id:
            raise ValueError(f"a forwarded {method} is resent on failure and needs a request id")
        call_timeout_s = self.config.controller_call_timeout_ms / 1000
        deadline = self._loop.time() + timeout_s
        backoff = _RETRY_S
        while True:
            for address in self._candidates():
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    return None
                stub = controller_pb2_grpc.ControllerServiceStub(self.channel(address))  # type: ignore[no-untyped-call]
                try:
                    metadata = self.auth.metadata(request) if authenticate and self.auth is not None else None
                    resp = await getattr(stub, method)(
                        request, timeout=min(call_timeout_s, remaining), metadata=metadata
                    )
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                        log.error("the controller at %s refused this node: %s", address, e.details())
                    log.debug("%s to %s failed: %s", method, address, e.code())
                    if self._hint_address == address:
                        self._hint_address = ""
                    continue
                if resp.error_code == E.ERROR_CODE_NOT_CONTROLLER:
                    if self._hint_address == address:
                        self._hint_address = ""
                    hint = resp.controller
                    if hint.controller_address and hint.controller_address != address:
                        self._hint_address = hint.controller_address
                        self._hinted_controller_id = hint.controller_id
                    continue
                self._hint_address = address
                return resp
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, _MAX_RETRY_S)

    # ---------------------------------------------------------------- the lease

    async def _register(self) -> None:
        cfg = self.config
        host, port = cfg.advertised()
        request = cpb.RegisterNodeRequest(
            node_id=cfg.node_id,
            incarnation_id=self.incarnation_id,
            host=host,
            port=port,
            rack=cfg.rack,
            raft_address=self.voters.get(cfg.node_id, ""),
        )
        while not self._closed:
            resp = await self.call_controller("RegisterNode", request, 30.0, authenticate=True)
            if resp is not None and resp.error_code == E.ERROR_CODE_NONE:
                self.broker_epoch = resp.broker_epoch
                log.info("node %d registered with broker epoch %d", cfg.node_id, self.broker_epoch)
                return
            if resp is not None:
                log.warning(
                    "registration refused: %s (%s)", E.ErrorCode.Name(resp.error_code), resp.error_message
                )
            else:
                log.info("no active controller answers yet; still trying to register")
            await asyncio.sleep(_MAX_RETRY_S)

    async def _lease(self) -> None:
        while not self._closed:
            try:
                await self._keep_lease()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the node's lease loop failed; starting it again")
                await asyncio.sleep(_MAX_RETRY_S)

    async def _keep_lease(self) -> None:
        cfg = self.config
        interval_s = cfg.heartbeat_interval_ms / 1000
        if self.broker_epoch < 0:
            await self._register()
        last_sent: float | None = None
        while not self._closed:
            now = time.monotonic()
            if last_sent is not None:
                # The lease must never wait behind client work: a late heartbeat means the event
                # loop was held (or the controller was slow to answer), and a late enough one gets
                # this node fenced.
                gap = now - last_sent
                self.heartbeat_gap_max_s = max(self.heartbeat_gap_max_s, gap)
                if gap > cfg.session_timeout_ms / 2000:
                    log.warning(
                        "heartbeat sent %.2f s after the previous one (interval %d ms, session "
                        "timeout %d ms): the event loop was held or the controller answered slowly",
                        gap,
                        cfg.heartbeat_interval_ms,
                        cfg.session_timeout_ms,
                    )
            last_sent = now
            caught_up = self._caught_up(self.broker.image)
            if caught_up and not self.broker.caught_up:
                self._apply(self.broker.image)
            request = cpb.NodeHeartbeatRequest(
                node_id=cfg.node_id,
                broker_epoch=self.broker_epoch,
                want_fence=not caught_up,
                want_shutdown=self._stopping,
            )
            started = time.monotonic()
            resp = await self.call_controller(
                "NodeHeartbeat", request, max(interval_s, cfg.session_timeout_ms / 2000), authenticate=True
            )
            if resp is not None:
                if resp.error_code == E.ERROR_CODE_NONE:
                    self._check_lag(resp.metadata_offset)
                    if self.fenced != resp.is_fenced:
                        log.info("node %d is %s", cfg.node_id, "fenced" if resp.is_fenced else "unfenced")
                    self.fenced = resp.is_fenced
                    if caught_up and not resp.is_fenced:
                        self.ready.set()
                    if self._stopping and resp.shutdown_ready:
                        self._shutdown_ready.set()
                        return
                elif resp.error_code in (E.ERROR_CODE_STALE_BROKER_EPOCH, E.ERROR_CODE_NODE_NOT_AVAILABLE):
                    log.warning("heartbeat refused (%s); registering again", resp.error_message)
                    self.fenced = True
                    await self._register()
                    last_sent = None
                    continue
                else:
                    log.warning("heartbeat failed: %s", resp.error_message)
            elif self._stopping:
                # No active controller answers (say the rest of the cluster is stopping too):
                # nobody can move the leaderships, so waiting out the bound helps no one.
                log.warning("no active controller answers; stopping without a controlled shutdown")
                self._shutdown_abandoned = True
                self._shutdown_ready.set()
                return
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    # ---------------------------------------------------------------- forwarding

    async def forward(self, method: str, request: Any, timeout_s: float) -> tuple[Any | None, str]:
        """Forward a topic change to the active controller. Returns its inner response (once this
        node's image has the change) or None and why. Every resend carries the one request id
        given here, so the change is made once and a resend gets the first answer."""
        deadline = self._loop.time() + timeout_s
        wrapped = getattr(cpb, f"ControllerService{method}Request")(
            request=request, request_id=new_request_id(self.config.node_id)
        )
        resp = await self.call_controller(method, wrapped, timeout_s)
        if resp is None:
            return None, f"no active controller answered within {timeout_s:.1f}s"
        if resp.error_code != E.ERROR_CODE_NONE:
            return None, resp.error_message
        if resp.metadata_offset >= 0:
            await self.wait_for_offset(resp.metadata_offset, max(0.0, deadline - self._loop.time()))
        return resp.response, ""


def timeout_of(request: Any, default_s: float = 30.0) -> float:
    """A request's ``timeout_ms`` in seconds, when it has one."""
    ms = getattr(request, "timeout_ms", 0)
    return ms / 1000 if ms > 0 else default_s
