"""The controller's asyncio shell over real pysyncobj voters in this process, and its gRPC service."""

from __future__ import annotations

import asyncio
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

from headwater.node.controller import ControllerRuntime, MetadataFeed, monotonic_ms
from headwater.node.controller_service import ControllerServiceServicer, add_controller_to_server
from headwater.raft.commands import AlterPartition, decode_command
from headwater.raft.controller import ActiveController
from headwater.raft.metadata import ClusterMetadata
from headwater.raft.quorum import MetadataQuorum, QuorumSettings
from headwater.v1 import controller_pb2 as pb
from headwater.v1 import controller_pb2_grpc, errors_pb2

E = errors_pb2
SECRET = "test-secret-do-not-leak-0123456789"
FAST = QuorumSettings(connection_retry_s=0.5)
HEARTBEAT_MS = 100
SESSION_MS = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def factory(metadata: ClusterMetadata) -> ActiveController:
    return ActiveController(
        metadata, random.Random(7), heartbeat_interval_ms=HEARTBEAT_MS, session_timeout_ms=SESSION_MS
    )


async def eventually(pred: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


class Voters:
    """Quorum voters with a controller runtime each, on one loop; everything is closed at the end."""

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.voters = {i: f"127.0.0.1:{free_port()}" for i in range(1, size + 1)}
        self.quorums: dict[int, MetadataQuorum] = {}
        self.runtimes: dict[int, ControllerRuntime] = {}
        self.servers: dict[int, grpc.aio.Server] = {}
        self.grpc_ports: dict[int, int] = {}

    def start(self, node_id: int) -> ControllerRuntime:
        loop = asyncio.get_running_loop()
        feed = MetadataFeed(loop)
        q = MetadataQuorum(
            node_id,
            self.voters,
            self.root / f"voter{node_id}",
            SECRET,
            on_applied=feed.on_applied,
            on_snapshot_loaded=feed.on_snapshot_loaded,
            settings=FAST,
        )
        self.quorums[node_id] = q
        rt = ControllerRuntime(q, factory, monotonic_ms, loop, feed=feed, tick_interval_ms=HEARTBEAT_MS // 2)
        rt.start()
        self.runtimes[node_id] = rt
        return rt

    async def serve(self, node_id: int) -> str:
        server = grpc.aio.server()
        add_controller_to_server(ControllerServiceServicer(self.runtimes[node_id]), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.servers[node_id] = server
        self.grpc_ports[node_id] = port
        return f"127.0.0.1:{port}"

    async def active(self, timeout_s: float = 10.0) -> tuple[int, ControllerRuntime]:
        found: list[int] = []

        def one() -> bool:
            found[:] = [i for i, rt in self.runtimes.items() if rt.active]
            return len(found) == 1

        await eventually(one, timeout_s, "one active controller")
        return found[0], self.runtimes[found[0]]

    async def stop(self, node_id: int) -> None:
        server = self.servers.pop(node_id, None)
        if server is not None:
            await server.stop(0)
        await self.runtimes.pop(node_id).stop()
        self.quorums.pop(node_id).close()

    async def close(self) -> None:
        for node_id in list(self.runtimes):
            await self.stop(node_id)


@asynccontextmanager
async def voters(root: Path, size: int) -> AsyncIterator[Voters]:
    v = Voters(root, size)
    try:
        for i in v.voters:
            v.start(i)
        yield v
    finally:
        await v.close()


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


async def register(rt: ControllerRuntime, node_id: int, port: int = 0) -> int:
    o = await rt.register(node_id, uuid.uuid4().bytes, "127.0.0.1", port or 9000 + node_id, "")
    assert o.ok and o.result is not None, o
    return o.result.broker_epoch


# ------------------------------------------------------------------------------- leases


def test_registered_node_that_heartbeats_is_unfenced(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 1) as v:
            _, rt = await v.active()
            epoch = await register(rt, 1)
            assert rt.quorum.metadata.nodes[1].fenced
            hb = await rt.heartbeat(1, epoch)
            assert hb.error_code == E.ERROR_CODE_NONE and not hb.is_fenced
            assert not rt.quorum.metadata.nodes[1].fenced

    run(main)


def test_node_that_stops_heartbeating_is_fenced_after_session_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 1) as v:
            _, rt = await v.active()
            epoch = await register(rt, 1)
            # The lease runs from when the controller takes the heartbeat, which is before the
            # answer (it waits for the unfence to commit), so the clock starts before the call.
            stopped_ms = monotonic_ms()
            assert not (await rt.heartbeat(1, epoch)).is_fenced
            await eventually(lambda: rt.quorum.metadata.nodes[1].fenced, 5.0, "node 1 fenced")
            assert monotonic_ms() - stopped_ms >= SESSION_MS

    run(main)


def test_heartbeats_keep_a_node_unfenced_past_the_session_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 1) as v:
            _, rt = await v.active()
            epoch = await register(rt, 1)
            end = time.monotonic() + 3 * SESSION_MS / 1000
            while time.monotonic() < end:
                hb = await rt.heartbeat(1, epoch)
                assert hb.error_code == E.ERROR_CODE_NONE and not hb.is_fenced
                await asyncio.sleep(HEARTBEAT_MS / 1000)

    run(main)


def test_stale_broker_epoch_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 1) as v:
            _, rt = await v.active()
            old = await register(rt, 1)
            new = await register(rt, 1)  # the node restarted: a new incarnation
            assert new > old
            hb = await rt.heartbeat(1, old)
            assert hb.error_code == E.ERROR_CODE_STALE_BROKER_EPOCH
            assert (await rt.heartbeat(1, new)).error_code == E.ERROR_CODE_NONE
            created = await rt.create_topic("t", 1, 1)
            assert created.ok, created
            tid = rt.quorum.metadata.topic_ids["t"]
            p = rt.quorum.metadata.topics[tid].partitions[0]
            offset = rt.quorum.metadata_offset
            refused = await rt.alter_partition(
                AlterPartition(tid, 0, 1, old, p.leader_epoch, p.partition_epoch, (1,))
            )
            assert refused.error_code == E.ERROR_CODE_STALE_BROKER_EPOCH
            assert rt.quorum.metadata.topics[tid].partitions[0] == p
            assert rt.quorum.metadata_offset == offset + 1  # a rejected command takes an offset

    run(main)


# ------------------------------------------------------------------------------- roles


def test_non_leader_voter_answers_not_controller_naming_the_leader(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 3) as v:
            leader_id, rt = await v.active()
            addresses = {i: await v.serve(i) for i in v.voters}
            # The leader registers with its gRPC port, so a follower can give its address.
            await register(rt, leader_id, v.grpc_ports[leader_id])
            follower = next(i for i in v.voters if i != leader_id)
            await eventually(
                lambda: leader_id in v.quorums[follower].metadata.nodes, 5.0, "follower caught up"
            )
            o = await v.runtimes[follower].register(follower, uuid.uuid4().bytes, "127.0.0.1", 1, "")
            assert o.error_code == E.ERROR_CODE_NOT_CONTROLLER
            async with grpc.aio.insecure_channel(addresses[follower]) as ch:
                stub = controller_pb2_grpc.ControllerServiceStub(ch)
                r = await stub.RegisterNode(
                    pb.RegisterNodeRequest(
                        node_id=follower, incarnation_id=uuid.uuid4().bytes, host="127.0.0.1", port=1
                    )
                )
                assert r.error_code == E.ERROR_CODE_NOT_CONTROLLER
                assert r.controller.controller_id == leader_id
                assert r.controller.controller_address == addresses[leader_id]
                hb = await stub.NodeHeartbeat(pb.NodeHeartbeatRequest(node_id=leader_id, broker_epoch=0))
                assert hb.error_code == E.ERROR_CODE_NOT_CONTROLLER
                assert hb.controller.controller_id == leader_id
            async with grpc.aio.insecure_channel(addresses[leader_id]) as ch:
                stub = controller_pb2_grpc.ControllerServiceStub(ch)
                r = await stub.RegisterNode(
                    pb.RegisterNodeRequest(
                        node_id=follower, incarnation_id=uuid.uuid4().bytes, host="127.0.0.1", port=1
                    )
                )
                assert r.error_code == E.ERROR_CODE_NONE and r.broker_epoch >= 0

    run(main)


def test_stopping_the_leader_voter_activates_another_that_keeps_acting(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 3) as v:
            old_id, rt = await v.active()
            epochs = {i: await register(rt, i) for i in v.voters}
            for i, e in epochs.items():
                assert not (await rt.heartbeat(i, e)).is_fenced
            await v.stop(old_id)
            assert not rt.active
            new_id, new_rt = await v.active(15.0)
            assert new_id != old_id
            await eventually(lambda: new_rt.quorum.metadata.nodes.keys() == epochs.keys(), 5.0, "caught up")
            for i in v.runtimes:
                hb = await new_rt.heartbeat(i, epochs[i])
                assert hb.error_code == E.ERROR_CODE_NONE and not hb.is_fenced, hb

            async def keep_alive() -> None:
                while True:
                    for i in v.runtimes:
                        await new_rt.heartbeat(i, epochs[i])
                    await asyncio.sleep(HEARTBEAT_MS / 1000)

            alive = asyncio.create_task(keep_alive())
            try:
                # It acts on time too: the stopped voter's node stops heartbeating and is fenced.
                await eventually(
                    lambda: new_rt.quorum.metadata.nodes[old_id].fenced, 5.0, "old leader fenced"
                )
                assert not any(new_rt.quorum.metadata.nodes[i].fenced for i in v.runtimes)
                created = await new_rt.create_topic("after-failover", 2, 2)
                assert created.ok, created
                t = new_rt.quorum.metadata.topic("after-failover")
                assert t is not None
                assert all(old_id not in p.replicas for p in t.partitions)
            finally:
                alive.cancel()

    run(main)


def test_former_leader_refuses_at_once_after_losing_leadership(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 3) as v:
            old_id, rt = await v.active()
            await v.stop(old_id)
            o = await rt.register(9, uuid.uuid4().bytes, "127.0.0.1", 1, "")
            assert o.error_code == E.ERROR_CODE_NOT_CONTROLLER

    run(main)


# ------------------------------------------------------------------------------- service


def test_describe_cluster_never_contains_the_secret(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 3) as v:
            leader_id, rt = await v.active()
            await register(rt, leader_id)
            for i in v.voters:
                address = await v.serve(i)
                async with grpc.aio.insecure_channel(address) as ch:
                    stub = controller_pb2_grpc.ControllerServiceStub(ch)
                    r = await stub.DescribeCluster(pb.DescribeClusterRequest())
                    assert r.error_code == E.ERROR_CODE_NONE
                    assert r.controller_id == leader_id and r.answered_by == i
                    assert dict(r.voters) == v.voters
                    assert SECRET.encode() not in r.SerializeToString()
                    assert SECRET not in str(r)
            assert SECRET not in repr(rt.describe())

    run(main)


def test_malformed_request_is_invalid_argument(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 1) as v:
            address = await v.serve(1)
            async with grpc.aio.insecure_channel(address) as ch:
                call = ch.unary_unary("/headwater.v1.ControllerService/NodeHeartbeat")
                try:
                    await call(b"\xff\xff\xff")
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
                else:
                    raise AssertionError("an undecodable body was accepted")

    run(main)


def test_watch_metadata_streams_a_snapshot_then_deltas_in_order_and_resumes(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 1) as v:
            _, rt = await v.active()
            for i in (1, 2):
                await register(rt, i)
            address = await v.serve(1)
            async with grpc.aio.insecure_channel(address) as ch:
                stub = controller_pb2_grpc.ControllerServiceStub(ch)
                stream = stub.WatchMetadata(pb.WatchMetadataRequest(from_offset=-1))
                first = await stream.read()
                assert first.WhichOneof("event") == "snapshot"
                image = ClusterMetadata.from_snapshot(first.snapshot.data)
                assert image.metadata_offset == first.snapshot.metadata_offset == 1
                assert sorted(image.nodes) == [1, 2]
                for i in (3, 4, 5):
                    await register(rt, i)
                for expected in (2, 3, 4):
                    m = await asyncio.wait_for(stream.read(), 5.0)
                    assert m.WhichOneof("event") == "delta"
                    assert m.delta.metadata_offset == expected
                    assert m.delta.metadata_offset == image.metadata_offset + 1
                    image.apply(decode_command(m.delta.command))
                assert image == rt.quorum.metadata
                stream.cancel()

                # Resume: a watcher that has offsets up to 2 gets deltas from 3 on, no snapshot.
                resumed = stub.WatchMetadata(pb.WatchMetadataRequest(from_offset=3))
                offsets = []
                for _ in range(2):
                    m = await asyncio.wait_for(resumed.read(), 5.0)
                    assert m.WhichOneof("event") == "delta"
                    offsets.append(m.delta.metadata_offset)
                assert offsets == [3, 4]
                await register(rt, 6)
                m = await asyncio.wait_for(resumed.read(), 5.0)
                assert m.delta.metadata_offset == 5
                resumed.cancel()

    run(main)


def test_metadata_feed_wakes_every_watcher_that_took_the_event_before_an_apply() -> None:
    """No lost wake-up: watcher A waking (and the feed moving to a fresh event) must not leave
    watcher B, which looked before the apply, waiting for its whole poll interval."""
    import threading

    from headwater.raft.commands import RegisterNode
    from headwater.raft.metadata import Result

    async def scenario() -> float:
        feed = MetadataFeed(asyncio.get_running_loop())
        event_a = feed.changed_event()
        event_b = feed.changed_event()
        applier = threading.Thread(
            target=feed.on_applied,
            args=(0, RegisterNode(1, b"\x01" * 16, "127.0.0.1", 1, ""), Result(True, 0, "", 0)),
        )
        applier.start()
        applier.join()
        await feed.wait_changed(event_a, 5.0)  # A wakes; the feed now hands out a fresh event
        started = time.monotonic()
        await feed.wait_changed(event_b, 5.0)
        assert feed.entries_from(0) is not None and len(feed.entries_from(0) or []) == 1
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 1.0
