"""Admin's cluster calls and the ``headwater cluster`` command against real in-process voters.

Three pysyncobj voters, each with its controller runtime and one gRPC server carrying the
ControllerService and a HeadwaterService that answers Metadata from that voter's applied metadata
(what a node's broker does), run on an asyncio loop on a background thread; the synchronous Admin
and CLI talk to them from the test thread. Nodes 1-3 (the voters) heartbeat all along; node 4 is a
broker that registered, was unfenced, and was then fenced again, so topic ``solo`` partition 0 (its
only replica is node 4) is offline.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import test_controller_runtime as harness
from test_controller_runtime import SECRET, Voters, eventually, free_port, register

from headwater.cli import main
from headwater.client import (
    Admin,
    LeaderNotAvailableError,
    NotControllerError,
    UnknownTopicOrPartitionError,
)
from headwater.node.catalog import add_topic_metadata, node_infos
from headwater.node.controller import ControllerRuntime
from headwater.node.controller_service import ControllerServiceServicer, add_controller_to_server
from headwater.raft.commands import NO_LEADER, Command, CreateTopic, ElectLeader, FenceNode
from headwater.raft.controller import ActiveController
from headwater.raft.metadata import ClusterMetadata, Result
from headwater.v1 import client_pb2, client_pb2_grpc, controller_pb2, controller_pb2_grpc, errors_pb2

E = errors_pb2
T = TypeVar("T")
CLUSTER_ID = "admin-cluster-test"
BROKER = 4  # a registered node that is not a voter; fenced for the whole module
KEEP_ALIVE_S = 0.1


def patient_factory(metadata: ClusterMetadata) -> ActiveController:
    """The harness's controller, with a lease long enough that a busy machine never fences a voter
    node, and no automatic leader balancing, which would undo a displaced leadership by itself."""
    return ActiveController(
        metadata,
        random.Random(7),
        heartbeat_interval_ms=harness.HEARTBEAT_MS,
        session_timeout_ms=10_000,
        leader_balance_interval_ms=3_600_000,
    )


class MetadataServicer(client_pb2_grpc.HeadwaterServiceServicer):
    """HeadwaterService.Metadata from one voter's applied metadata, shaped as a node's broker does."""

    def __init__(self, runtime: ControllerRuntime) -> None:
        self.runtime = runtime
        self.calls = 0

    async def Metadata(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method name
        self.calls += 1
        md = self.runtime.quorum.metadata
        resp = client_pb2.MetadataResponse(
            cluster_id=CLUSTER_ID,
            controller_id=self.runtime.controller_hint()[0],
            metadata_offset=md.metadata_offset,
        )
        resp.nodes.extend(node_infos(md))
        add_topic_metadata(resp, md, request.topics or sorted(md.topic_ids))
        return resp


class Cluster:
    """Three voters on a loop thread, node registrations kept alive, and helpers to drive them."""

    def __init__(self, root: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="voters-loop", daemon=True)
        self.v = Voters(root, 3)
        self.addresses: dict[int, str] = {}
        self.metadata_servicers: dict[int, MetadataServicer] = {}
        self.epochs: dict[int, int] = {}
        self.alive: set[int] = set()
        self.keep_alive: asyncio.Task[None] | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.thread.start()
        self.run(self._start())

    async def _start(self) -> None:
        for i in self.v.voters:
            self.v.start(i)
        _, rt = await self.v.active(15.0)
        for i in self.v.voters:
            self.addresses[i] = await self._serve(i)
            # Registered with its gRPC port, so a voter's hint names an address that answers.
            self.epochs[i] = await register(rt, i, self.v.grpc_ports[i])
            assert not (await rt.heartbeat(i, self.epochs[i])).is_fenced
        self.alive = set(self.v.voters)
        self.keep_alive = asyncio.create_task(self._keep_alive())
        self.epochs[BROKER] = await register(rt, BROKER, free_port())
        assert not (await rt.heartbeat(BROKER, self.epochs[BROKER])).is_fenced
        await self.propose(CreateTopic("solo", uuid.uuid4().bytes, ((BROKER,), (1,))))
        await self.propose(FenceNode(BROKER, self.epochs[BROKER]))
        await self.caught_up()

    async def _serve(self, node_id: int) -> str:
        server = grpc.aio.server()
        runtime = self.v.runtimes[node_id]
        add_controller_to_server(ControllerServiceServicer(runtime), server)
        self.metadata_servicers[node_id] = MetadataServicer(runtime)
        client_pb2_grpc.add_HeadwaterServiceServicer_to_server(self.metadata_servicers[node_id], server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.v.servers[node_id] = server
        self.v.grpc_ports[node_id] = port
        return f"127.0.0.1:{port}"

    async def _keep_alive(self) -> None:
        while True:
            for rt in list(self.v.runtimes.values()):
                if rt.active:
                    for i in sorted(self.alive):
                        await rt.heartbeat(i, self.epochs[i])
            await asyncio.sleep(KEEP_ALIVE_S)

    def stop(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10.0)
            self.loop.close()

    async def _stop(self) -> None:
        if self.keep_alive is not None:
            self.keep_alive.cancel()
            await asyncio.gather(self.keep_alive, return_exceptions=True)
        await self.v.close()

    # ---------------------------------------------------------------- helpers (on the loop)

    async def active(self) -> tuple[int, ControllerRuntime]:
        return await self.v.active()

    async def propose(self, cmd: Command) -> Result:
        _, rt = await self.active()
        result = await rt.quorum.propose_async(cmd, 10.0)
        assert result.ok, result
        return result

    async def caught_up(self) -> None:
        """Every voter has applied what the active one has."""
        _, rt = await self.active()
        offset = rt.quorum.metadata_offset
        quorums = self.v.quorums.values()
        await eventually(lambda: all(q.metadata_offset >= offset for q in quorums), 10.0, "voters caught up")

    # ---------------------------------------------------------------- helpers (from the test thread)

    def leader(self) -> int:
        return self.run(self.active())[0]

    def follower(self) -> int:
        leader = self.leader()
        return next(i for i in sorted(self.v.voters) if i != leader)

    def partition(self, topic: str, index: int) -> Any:
        md = self.v.runtimes[self.leader()].quorum.metadata
        tid = md.topic_ids[topic]
        return md.topics[tid].partitions[index]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    before = set(threading.enumerate())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "factory", patient_factory)
        c = Cluster(tmp_path_factory.mktemp("voters"))
        try:
            c.start()
            yield c
        finally:
            c.stop()
    # Nothing left behind: the voters' threads end with their quorums.
    deadline = time.monotonic() + 10.0
    while (left := [t for t in threading.enumerate() if t not in before and t.is_alive()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert not left, f"threads left running: {left}"


# ------------------------------------------------------------------------------- describe


def test_describe_cluster_lists_nodes_with_fence_state_and_the_controller_from_any_voter(
    cluster: Cluster,
) -> None:
    leader = cluster.leader()
    follower = cluster.follower()
    unreachable = f"127.0.0.1:{free_port()}"
    for answering in (leader, follower):
        # An unreachable address first: the client goes on to one that answers.
        with Admin([unreachable, cluster.addresses[answering]], request_timeout_ms=10_000) as admin:
            d = admin.describe_cluster()
        assert d.answered_by == answering
        assert d.controller_id == leader
        assert d.controller is not None and d.controller.address == cluster.addresses[leader]
        assert d.cluster_id == CLUSTER_ID
        assert d.voters == cluster.v.voters
        assert d.raft_term >= 1 and d.commit_index >= 1
        assert d.metadata_offset == cluster.v.quorums[answering].metadata_offset
        assert {n.node_id: n.fenced for n in d.nodes} == {1: False, 2: False, 3: False, BROKER: True}
        for n in d.nodes:
            assert n.broker_epoch == cluster.epochs[n.node_id]
            if n.node_id in cluster.addresses:
                assert n.address == cluster.addresses[n.node_id]


def test_describe_cluster_takes_the_cluster_id_from_the_voter_without_a_metadata_request(
    cluster: Cluster,
) -> None:
    answering = cluster.follower()
    with Admin(cluster.addresses[answering], request_timeout_ms=10_000) as admin:
        # A voter that does not know the cluster id yet: the client asks Metadata for it.
        assert admin.describe_cluster().cluster_id == CLUSTER_ID
        for rt in cluster.v.runtimes.values():
            rt.cluster_id = "known-to-the-voters"
        try:
            calls = sum(s.calls for s in cluster.metadata_servicers.values())
            d = admin.describe_cluster()
            assert sum(s.calls for s in cluster.metadata_servicers.values()) == calls
        finally:
            for rt in cluster.v.runtimes.values():
                rt.cluster_id = ""
    assert d.cluster_id == "known-to-the-voters" and d.answered_by == answering


# ------------------------------------------------------------------------------- elections


def test_preferred_election_moves_leadership_back_following_the_controller_hint(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    replicas = ((1, 2, 3), (2, 3, 1))
    tid = uuid.uuid4().bytes

    async def displaced() -> None:
        await cluster.propose(CreateTopic("pref", tid, replicas))
        for i, r in enumerate(replicas):
            _, rt = await cluster.active()
            p = rt.quorum.metadata.topics[tid].partitions[i]
            assert p.leader == r[0] and set(p.isr) == set(r)
            await cluster.propose(ElectLeader(tid, i, r[1], p.leader_epoch))
        await cluster.caught_up()

    cluster.run(displaced())
    before = [cluster.partition("pref", i) for i in range(2)]
    assert [p.leader for p in before] == [r[1] for r in replicas]

    follower = cluster.follower()
    # Only a voter that is not the controller is known: it must answer NOT_CONTROLLER with a hint.
    with Admin(cluster.addresses[follower], request_timeout_ms=10_000) as admin:
        results = admin.elect_leaders([("pref", 0)], preferred=True)
        assert list(results) == [("pref", 0)]
        r = results[("pref", 0)]
        assert r.error is None and r.leader_id == replicas[0][0]
        assert r.leader_epoch > before[0].leader_epoch
        assert cluster.partition("pref", 0).leader == replicas[0][0]
        assert cluster.partition("pref", 1).leader == replicas[1][1]  # not asked: not moved

        # Already led by its preferred replica: no error, nothing changes.
        again = admin.elect_leaders([("pref", 0)], preferred=True)[("pref", 0)]
        assert again.error is None and (again.leader_id, again.leader_epoch) == (r.leader_id, r.leader_epoch)

    code = main(
        ["cluster", "elect-leaders", "--preferred", "--topic", "pref", "--partition", "1", "--format", "json",
         "--bootstrap", cluster.addresses[follower]]
    )  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out) == [
        {
            "topic": "pref",
            "partition": 1,
            "leader": replicas[1][0],
            "leader_epoch": before[1].leader_epoch + 1,
            "error": None,
            "error_message": None,
        }
    ]
    assert cluster.partition("pref", 1).leader == replicas[1][0]


def test_elect_leaders_reports_unknown_topics_and_partitions_without_an_eligible_leader(
    cluster: Cluster,
) -> None:
    with Admin(cluster.addresses[cluster.leader()], request_timeout_ms=10_000) as admin:
        with pytest.raises(UnknownTopicOrPartitionError):
            admin.elect_leaders([("no-such-topic", 0)])
        # Nothing left to ask for: no request goes out (an empty one would mean "every partition",
        # and would try solo-0 again: a rejected command, which still takes a metadata offset).
        offset = cluster.v.quorums[cluster.leader()].metadata_offset
        (only,) = admin.elect_leaders([("no-such-topic", 0)], raise_on_error=False).values()
        assert isinstance(only.error, UnknownTopicOrPartitionError)
        time.sleep(0.2)
        assert cluster.v.quorums[cluster.leader()].metadata_offset == offset
        # solo-0's only replica is fenced: nothing can lead it.
        with pytest.raises(LeaderNotAvailableError):
            admin.elect_leaders([("solo", 0)])

        results = admin.elect_leaders(
            [("no-such-topic", 0), ("solo", 9), ("solo", 0), ("solo", 1)], raise_on_error=False
        )
    assert list(results) == [("no-such-topic", 0), ("solo", 9), ("solo", 0), ("solo", 1)]
    unknown, no_partition, offline, led = results.values()
    assert isinstance(unknown.error, UnknownTopicOrPartitionError) and unknown.leader_id == NO_LEADER
    assert isinstance(no_partition.error, UnknownTopicOrPartitionError)
    assert isinstance(offline.error, LeaderNotAvailableError)
    assert led.error is None and led.leader_id == 1  # it has a leader: no election needed
    assert cluster.partition("solo", 0).leader == NO_LEADER


class _EndlesslyRefusing(controller_pb2_grpc.ControllerServiceServicer):
    """A voter that is never the controller and names another that is not either."""

    def __init__(self) -> None:
        self.hint = ""
        self.calls = 0

    def ElectLeaders(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method name
        self.calls += 1
        return controller_pb2.ElectLeadersResponse(
            error_code=E.ERROR_CODE_NOT_CONTROLLER,
            error_message="not the controller",
            controller=controller_pb2.ControllerHint(controller_id=9, controller_address=self.hint),
        )


def test_elect_leaders_follows_hints_a_bounded_number_of_times_then_times_out() -> None:
    refusing = [_EndlesslyRefusing(), _EndlesslyRefusing()]
    servers, executors, addresses = [], [], []
    for servicer in refusing:
        executors.append(futures.ThreadPoolExecutor(max_workers=2))
        server = grpc.server(executors[-1])
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        server.start()
        servers.append(server)
    refusing[0].hint, refusing[1].hint = addresses[1], addresses[0]  # each names the other
    try:
        started = time.monotonic()
        with Admin(addresses[0], request_timeout_ms=1_500) as admin, pytest.raises(NotControllerError):
            admin.elect_leaders(preferred=True)
        elapsed_s = time.monotonic() - started
    finally:
        for server in servers:
            server.stop(None).wait(5.0)
        for executor in executors:
            executor.shutdown(wait=True)
    assert 1.3 <= elapsed_s < 5.0
    # The hint was followed, but with backoff between rounds, not in a tight loop.
    assert refusing[1].calls >= 1
    assert refusing[0].calls + refusing[1].calls <= 20


# ------------------------------------------------------------------------------- the command


def test_cli_cluster_describe_shows_the_nodes_and_never_the_secret(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    leader = cluster.leader()
    monkeypatch.setenv("HEADWATER_BOOTSTRAP", cluster.addresses[cluster.follower()])
    assert main(["cluster", "describe", "--format", "json"]) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    d = json.loads(out.out)
    assert d["controller_id"] == leader and d["cluster_id"] == CLUSTER_ID
    assert d["voters"] == {str(k): v for k, v in cluster.v.voters.items()}
    assert [(n["node_id"], n["fenced"], n["controller"], n["voter"]) for n in d["nodes"]] == [
        (i, i == BROKER, i == leader, i != BROKER) for i in (1, 2, 3, BROKER)
    ]

    # Not a terminal: a tab-separated nodes table, an empty line, then the quorum's name/value rows.
    assert main(["cluster", "describe"]) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    nodes_block, quorum_block = out.out.strip("\n").split("\n\n")
    header, *rows = [line.split("\t") for line in nodes_block.splitlines()]
    assert header == ["node_id", "address", "rack", "state", "broker_epoch", "role"]
    by_id = {int(r[0]): r for r in rows}
    assert sorted(by_id) == [1, 2, 3, BROKER]
    assert by_id[leader][1] == cluster.addresses[leader] and by_id[leader][5] == "active controller"
    assert by_id[BROKER][3] == "fenced" and by_id[BROKER][5] == "broker"
    assert all(by_id[i][3] == "unfenced" for i in (1, 2, 3))
    quorum = dict(line.split("\t") for line in quorum_block.splitlines()[1:])
    assert quorum["controller_id"] == str(leader)
    assert int(quorum["raft_term"]) >= 1 and int(quorum["metadata_offset"]) >= 0
    assert quorum["voters"] == ",".join(f"{k}={v}" for k, v in sorted(cluster.v.voters.items()))


def test_cli_topic_describe_marks_offline_partitions(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    b = ["--bootstrap", cluster.addresses[cluster.leader()], "--no-offsets"]
    assert main(["topic", "describe", "solo", "--format", "json", *b]) == 0
    (topic,) = json.loads(capsys.readouterr().out)
    p0, p1 = topic["partitions"]
    assert (p0["leader"], p0["offline"], p0["replicas"], p0["isr"]) == (NO_LEADER, True, [BROKER], [BROKER])
    assert (p1["leader"], p1["offline"]) == (1, False)
    assert p0["partition_epoch"] == cluster.partition("solo", 0).partition_epoch >= 1

    assert main(["topic", "describe", "solo", *b]) == 0
    header, *rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    status = header.index("status")
    assert [(r[header.index("leader")], r[status]) for r in rows] == [("none", "offline"), ("1", "ok")]
    assert "partition_epoch" in header and "leader_epoch" in header


def test_cli_elect_leaders_fails_cleanly_when_an_election_fails(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    b = ["--bootstrap", cluster.addresses[cluster.follower()]]
    assert main(["cluster", "elect-leaders", "--topic", "solo", *b]) == 1
    out = capsys.readouterr()
    header, *rows = [line.split("\t") for line in out.out.splitlines()]
    assert header == ["topic", "partition", "leader", "leader_epoch", "result"]
    assert [r[:3] for r in rows] == [["solo", "0", "none"], ["solo", "1", "1"]]
    assert "LEADER_NOT_AVAILABLE" in rows[0][4] and rows[1][4] == "ok"
    errors = [line for line in out.err.splitlines() if line.startswith("headwater: error:")]
    assert len(errors) == 1 and "1 of 2" in errors[0] and "solo-0" in errors[0]

    assert main(["cluster", "elect-leaders", "--partition", "0", *b]) == 2
    assert "--partition needs --topic" in capsys.readouterr().err
