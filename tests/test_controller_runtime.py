"""The controller's asyncio shell over real pysyncobj voters in this process, and its gRPC service."""

from __future__ import annotations

import asyncio
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from headwater.node.controller import (
    MAX_ELECT_PARTITIONS,
    ControllerRuntime,
    ElectionOutcome,
    MetadataFeed,
    _election_needed,
    _election_refusal,
    monotonic_ms,
)
from headwater.node.controller_service import ControllerServiceServicer, add_controller_to_server
from headwater.raft.commands import (
    NO_LEADER,
    AlterPartition,
    Command,
    CreateTopic,
    ElectLeader,
    FenceNode,
    UnfenceNode,
    decode_command,
)
from headwater.raft.controller import ActiveController
from headwater.raft.metadata import ClusterMetadata, NodeRecord, PartitionRecord, Result, TopicRecord
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
    """Quorum voters with a controller runtime each, on one loop; everything is closed at the end.
    ``controller_factory`` defaults to this module's ``factory``."""

    def __init__(
        self,
        root: Path,
        size: int,
        controller_factory: Callable[[ClusterMetadata], ActiveController] | None = None,
    ) -> None:
        self.root = root
        self.controller_factory = controller_factory
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
        rt = ControllerRuntime(
            q,
            self.controller_factory or factory,
            monotonic_ms,
            loop,
            feed=feed,
            tick_interval_ms=HEARTBEAT_MS // 2,
        )
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
async def voters(
    root: Path, size: int, controller_factory: Callable[[ClusterMetadata], ActiveController] | None = None
) -> AsyncIterator[Voters]:
    v = Voters(root, size, controller_factory)
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
                    deadline = time.monotonic() + 5
                    while r.controller_id == -1 and time.monotonic() < deadline:
                        # A follower learns who leads from the leader's next append: on a busy
                        # machine that may come after this question.
                        await asyncio.sleep(0.05)
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


# ------------------------------------------------------------------------------- elections


def patient_factory(metadata: ClusterMetadata) -> ActiveController:
    """No lease runs out and no leader is moved back by the controller itself during a test, so only
    the test's own requests change the metadata (and its offset)."""
    return ActiveController(
        metadata,
        random.Random(7),
        heartbeat_interval_ms=HEARTBEAT_MS,
        session_timeout_ms=60_000,
        leader_balance_interval_ms=3_600_000,
    )


async def propose(rt: ControllerRuntime, cmd: Command) -> Result:
    result = await rt.quorum.propose_async(cmd, 10.0)
    assert result.ok, result
    return result


async def election_topics(rt: ControllerRuntime) -> dict[str, bytes]:
    """Nodes 1-3 registered and unfenced, then node 3 fenced, and a one-partition topic in each state
    an election can meet; returns their topic ids by name:

    - ``displaced``: replicas (1, 2), led by 2: a preferred election moves it back to 1.
    - ``fenced-preferred``: replicas (3, 1), led by 1 since its preferred replica 3 was fenced.
    - ``out-of-sync``: replicas (2, 1), led by 1 with ISR (1,): 2 is unfenced but not in sync.
    - ``offline``: replicas (3,), no leader: its only replica is fenced.
    """
    epochs = {i: await register(rt, i) for i in (1, 2, 3)}
    for i, e in epochs.items():
        assert not (await rt.heartbeat(i, e)).is_fenced
    ids: dict[str, bytes] = {}
    for name, replicas in (
        ("displaced", (1, 2)),
        ("fenced-preferred", (3, 1)),
        ("out-of-sync", (2, 1)),
        ("offline", (3,)),
    ):
        ids[name] = uuid.uuid4().bytes
        await propose(rt, CreateTopic(name, ids[name], (replicas,)))

    def part(name: str) -> PartitionRecord:
        p = rt.quorum.metadata.partition(ids[name], 0)
        assert p is not None
        return p

    await propose(rt, ElectLeader(ids["displaced"], 0, 2, part("displaced").leader_epoch))
    await propose(rt, ElectLeader(ids["out-of-sync"], 0, 1, part("out-of-sync").leader_epoch))
    p = part("out-of-sync")
    await propose(
        rt, AlterPartition(ids["out-of-sync"], 0, 1, epochs[1], p.leader_epoch, p.partition_epoch, (1,))
    )
    await propose(rt, FenceNode(3, epochs[3]))
    assert (part("displaced").leader, part("displaced").isr) == (2, (1, 2))
    assert (part("fenced-preferred").leader, part("fenced-preferred").isr) == (1, (1,))
    assert (part("out-of-sync").leader, part("out-of-sync").isr) == (1, (1,))
    assert (part("offline").leader, part("offline").isr) == (NO_LEADER, (3,))
    return ids


def summary(results: object) -> list[tuple[bytes, int, int, int]]:
    assert isinstance(results, list), results
    return [
        (r.topic_id, r.partition, r.error_code, r.leader_id)
        for r in results
        if isinstance(r, ElectionOutcome)
    ]


def test_electing_every_partition_proposes_only_elections_that_can_succeed(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 1, patient_factory) as v:
            _, rt = await v.active()
            ids = await election_topics(rt)
            offset = rt.quorum.metadata_offset
            # ``offline`` is leaderless but nothing can lead it: not an election this request needs.
            assert await rt.elect_leaders(None, preferred=False) == []
            assert rt.quorum.metadata_offset == offset
            # Preferred: ``fenced-preferred`` and ``out-of-sync`` cannot move to their first replica.
            results = await rt.elect_leaders(None, preferred=True)
            assert summary(results) == [(ids["displaced"], 0, E.ERROR_CODE_NONE, 1)]
            assert rt.quorum.metadata_offset == offset + 1  # one ElectLeader, and no rejected ones

    run(main)


def test_named_elections_that_cannot_succeed_are_answered_without_a_proposal(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 1, patient_factory) as v:
            _, rt = await v.active()
            ids = await election_topics(rt)
            before = rt.quorum.metadata
            names = ("fenced-preferred", "out-of-sync", "offline")
            results = await rt.elect_leaders([(ids[n], 0) for n in names], preferred=True)
            assert summary(results) == [
                (ids[n], 0, E.ERROR_CODE_INELIGIBLE_REPLICA, NO_LEADER) for n in names
            ]
            assert isinstance(results, list)
            assert [r.message for r in results] == [
                "preferred replica 3 is fenced",
                "preferred replica 2 is not in the ISR [1]",
                "preferred replica 3 is fenced",
            ]
            results = await rt.elect_leaders([(ids["offline"], 0)], preferred=False)
            assert summary(results) == [(ids["offline"], 0, E.ERROR_CODE_LEADER_NOT_AVAILABLE, NO_LEADER)]
            assert rt.quorum.metadata_offset == before.metadata_offset
            assert rt.quorum.metadata == before

    run(main)


def test_a_partition_named_twice_is_elected_once_and_answered_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 1, patient_factory) as v:
            _, rt = await v.active()
            ids = await election_topics(rt)
            offset = rt.quorum.metadata_offset
            displaced, unknown = (ids["displaced"], 0), (uuid.uuid4().bytes, 0)
            results = await rt.elect_leaders(
                [displaced, displaced, unknown, displaced, unknown], preferred=True
            )
            assert summary(results) == [
                (*displaced, E.ERROR_CODE_NONE, 1),
                (*unknown, E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION, NO_LEADER),
            ]
            # A second ElectLeader would take an offset too (rejected on its stale leader epoch).
            assert rt.quorum.metadata_offset == offset + 1

    run(main)


def test_losing_leadership_midway_answers_not_controller_for_the_whole_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with voters(tmp_path, 1, patient_factory) as v:
            _, rt = await v.active()
            ids = await election_topics(rt)
            address = await v.serve(1)
            q = v.quorums[1]
            offset = q.metadata_offset
            propose_async = q.propose_async

            async def lose_leadership_first(cmd: Command, timeout_s: float) -> Result:
                q.close()  # the voter stops, and its leadership with it, while the elections are queued
                return await propose_async(cmd, timeout_s)

            monkeypatch.setattr(q, "propose_async", lose_leadership_first)
            # One election to propose, one answered without a proposal, one unknown partition: the
            # answers of the last two go too, and the caller asks the new controller for all three.
            wanted = [(ids["displaced"], 0), (ids["out-of-sync"], 0), (uuid.uuid4().bytes, 0)]
            async with grpc.aio.insecure_channel(address) as ch:
                stub = controller_pb2_grpc.ControllerServiceStub(ch)
                r = await stub.ElectLeaders(
                    pb.ElectLeadersRequest(
                        partitions=[pb.TopicPartition(topic_id=t, partition=i) for t, i in wanted],
                        preferred=True,
                    )
                )
            assert r.error_code == E.ERROR_CODE_NOT_CONTROLLER, r
            assert r.HasField("controller")
            assert r.controller.controller_id == rt.controller_hint()[0]
            assert not r.results
            assert not rt.active
            assert q.metadata_offset == offset

    run(main)


def test_elect_leaders_refuses_more_partitions_than_the_limit_in_one_request(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 1, patient_factory) as v:
            _, rt = await v.active()
            address = await v.serve(1)
            offset = rt.quorum.metadata_offset
            tid = uuid.uuid4().bytes

            def request(partitions: range) -> pb.ElectLeadersRequest:
                return pb.ElectLeadersRequest(
                    partitions=[pb.TopicPartition(topic_id=tid, partition=i) for i in partitions]
                )

            async with grpc.aio.insecure_channel(address) as ch:
                stub = controller_pb2_grpc.ControllerServiceStub(ch)
                r = await stub.ElectLeaders(request(range(MAX_ELECT_PARTITIONS + 1)))
                assert r.error_code == E.ERROR_CODE_INVALID_REQUEST, r.error_message
                assert str(MAX_ELECT_PARTITIONS) in r.error_message
                assert not r.results and not r.HasField("controller")
                # The limit counts distinct partitions: repeats of one do not add up.
                repeated = pb.ElectLeadersRequest(
                    partitions=[pb.TopicPartition(topic_id=tid, partition=0)] * (MAX_ELECT_PARTITIONS + 1)
                )
                r = await stub.ElectLeaders(repeated)
                assert r.error_code == E.ERROR_CODE_NONE and len(r.results) == 1
                r = await stub.ElectLeaders(request(range(MAX_ELECT_PARTITIONS)))
                assert r.error_code == E.ERROR_CODE_NONE and len(r.results) == MAX_ELECT_PARTITIONS
                assert {x.error_code for x in r.results} == {E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION}
            assert rt.quorum.metadata_offset == offset

    run(main)


def test_describe_cluster_carries_the_cluster_id_the_runtime_was_given(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 1) as v:
            _, rt = await v.active()
            address = await v.serve(1)
            async with grpc.aio.insecure_channel(address) as ch:
                stub = controller_pb2_grpc.ControllerServiceStub(ch)
                r = await stub.DescribeCluster(pb.DescribeClusterRequest())
                assert r.error_code == E.ERROR_CODE_NONE and r.cluster_id == ""  # not known yet
                rt.cluster_id = "cluster-7"
                r = await stub.DescribeCluster(pb.DescribeClusterRequest())
                assert r.cluster_id == "cluster-7"
            assert rt.describe()["cluster_id"] == "cluster-7"

    run(main)


def test_an_election_is_skipped_exactly_when_the_state_machine_would_reject_it() -> None:
    """``_election_refusal`` against ``ClusterMetadata.apply`` over random partition states (fenced
    replicas, short ISRs, leaderless partitions, unclean topics): it refuses exactly the elections
    the state machine rejects, with the same error code."""
    rng = random.Random(20240611)
    checked = {True: 0, False: 0}
    refused = {True: 0, False: 0}
    for _ in range(2000):
        md = ClusterMetadata()
        md.metadata_offset = 10
        for node_id in (1, 2, 3, 4):
            md.nodes[node_id] = NodeRecord(node_id, bytes([node_id]) * 16, "h", 1, "", 0, rng.random() < 0.4)
        live = md.unfenced_nodes()
        replicas = tuple(rng.sample([1, 2, 3, 4], rng.randint(1, 3)))
        isr = tuple(r for r in replicas if rng.random() < 0.6 and r in live) or (rng.choice(replicas),)
        leaders = [r for r in isr if r in live]
        leader = rng.choice([NO_LEADER, *leaders])
        unclean = rng.random() < 0.5
        tid = b"\x01" * 16
        configs = (("unclean_leader_election_enable", "true"),) if unclean else ()
        partition = PartitionRecord(replicas, isr, leader, 0, 0)
        topic = TopicRecord("t", tid, (partition,), configs)
        md.topics[tid], md.topic_ids["t"] = topic, tid
        md.check_invariants()
        for preferred in (True, False):
            if not _election_needed(partition, preferred):
                continue
            refusal = _election_refusal(topic, partition, live, preferred)
            applied = ClusterMetadata.from_snapshot(md.to_snapshot())
            result = applied.apply(ElectLeader(tid, 0, replicas[0] if preferred else NO_LEADER, 0))
            assert (refusal is None) == result.ok, (partition, unclean, preferred, refusal, result)
            if refusal is not None:
                assert refusal[0] == result.error_code
                refused[preferred] += 1
            checked[preferred] += 1
    # Every kind of case came up: elections taken and refused, preferred and not.
    assert all(checked[p] > refused[p] > 0 for p in (True, False)), (checked, refused)


# ------------------------------------------------------------------------------- ISR changes


async def isr_topic(rt: ControllerRuntime) -> tuple[bytes, dict[int, int]]:
    """Nodes 1-3 registered and unfenced, and a one-partition topic on (1, 2, 3) led by 1."""
    epochs = {i: await register(rt, i) for i in (1, 2, 3)}
    for i, e in epochs.items():
        assert not (await rt.heartbeat(i, e)).is_fenced
    tid = uuid.uuid4().bytes
    await propose(rt, CreateTopic("isr", tid, ((1, 2, 3),)))
    return tid, epochs


def isr_change(
    rt: ControllerRuntime, tid: bytes, epochs: dict[int, int], isr: tuple[int, ...], rid: str
) -> AlterPartition:
    p = rt.quorum.metadata.partition(tid, 0)
    assert p is not None and p.leader == 1
    return AlterPartition(tid, 0, 1, epochs[1], p.leader_epoch, p.partition_epoch, isr, rid)


def test_a_resent_alter_partition_gets_the_first_answer_without_a_proposal(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 1, patient_factory) as v:
            _, rt = await v.active()
            tid, epochs = await isr_topic(rt)
            shrink = isr_change(rt, tid, epochs, (1, 3), "1-shrink")
            first = await rt.alter_partition(shrink)
            assert first.ok and first.result is not None and first.result.isr == (1, 3), first
            await propose(rt, FenceNode(2, epochs[2]))
            grow = isr_change(rt, tid, epochs, (1, 2, 3), "1-grow")
            refused = await rt.alter_partition(grow)
            assert refused.error_code == E.ERROR_CODE_INELIGIBLE_REPLICA, refused
            # 2 is back: the refused request's epochs would allow it now.
            await propose(rt, UnfenceNode(2, epochs[2]))
            offset = rt.quorum.metadata_offset
            again = await rt.alter_partition(grow)
            assert (again.error_code, again.message) == (refused.error_code, refused.message)
            ok_again = await rt.alter_partition(shrink)
            assert ok_again.ok and ok_again.result is not None
            assert (
                ok_again.result.isr == (1, 3)
                and ok_again.result.partition_epoch == first.result.partition_epoch
            )
            # Answered from the applied metadata: nothing was proposed.
            assert rt.quorum.metadata_offset == offset
            # Through the service too: the request id travels in the RPC.
            address = await v.serve(1)
            async with grpc.aio.insecure_channel(address) as ch:
                stub = controller_pb2_grpc.ControllerServiceStub(ch)
                r = await stub.AlterPartition(
                    pb.AlterPartitionRequest(
                        topic_id=tid,
                        partition=0,
                        leader_id=1,
                        broker_epoch=epochs[1],
                        leader_epoch=grow.leader_epoch,
                        partition_epoch=grow.partition_epoch,
                        new_isr=list(grow.new_isr),
                        request_id=grow.request_id,
                    )
                )
                assert r.error_code == E.ERROR_CODE_INELIGIBLE_REPLICA, r
            p = rt.quorum.metadata.partition(tid, 0)
            assert p is not None and p.isr == (1, 3) and rt.quorum.metadata_offset == offset

    run(main)


def test_a_new_controller_answers_a_resent_refusal_the_same_way(tmp_path: Path) -> None:
    async def main() -> None:
        async with voters(tmp_path, 3, patient_factory) as v:
            old_id, rt = await v.active()
            tid, epochs = await isr_topic(rt)
            await propose(rt, FenceNode(2, epochs[2]))
            grow = replace(isr_change(rt, tid, epochs, (1, 3), "1-x"), new_isr=(1, 2, 3))
            refused = await rt.alter_partition(grow)
            assert refused.error_code == E.ERROR_CODE_INELIGIBLE_REPLICA, refused
            await propose(rt, UnfenceNode(2, epochs[2]))
            await v.stop(old_id)
            _, new_rt = await v.active(15.0)
            want = rt.quorum.metadata_offset
            await eventually(lambda: new_rt.quorum.metadata_offset >= want, 5.0, "caught up")
            again = await new_rt.alter_partition(grow)
            assert again.error_code == E.ERROR_CODE_INELIGIBLE_REPLICA, again
            p = new_rt.quorum.metadata.partition(tid, 0)
            assert p is not None and 2 not in p.isr

    run(main)
