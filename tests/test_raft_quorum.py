"""The metadata quorum binding: real pysyncobj voters on loopback ports, in this process."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from headwater.raft.commands import AllocateProducerIds, Command, RegisterNode, UnfenceNode
from headwater.raft.metadata import ClusterMetadata, Result
from headwater.raft.quorum import (
    DUMP_FORMAT,
    MetadataQuorum,
    NotLeaderError,
    QuorumError,
    QuorumSettings,
    parse_voters,
)

SECRET = "correct horse battery staple"
FAST = QuorumSettings(connection_retry_s=0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def register(node_id: int) -> RegisterNode:
    return RegisterNode(node_id, uuid.uuid4().bytes, "127.0.0.1", 9000 + node_id, "")


class Cluster:
    """Voters in this process; every one started is closed at teardown."""

    def __init__(self, root: Path, size: int, settings: QuorumSettings = FAST):
        self.root = root
        self.voters = {i: f"127.0.0.1:{free_port()}" for i in range(1, size + 1)}
        self.settings = settings
        self.started: list[MetadataQuorum] = []
        self.up: dict[int, MetadataQuorum] = {}

    def start(self, node_id: int, secret: str = SECRET, **kwargs: object) -> MetadataQuorum:
        q = MetadataQuorum(
            node_id, self.voters, self.root / f"voter{node_id}", secret, settings=self.settings, **kwargs
        )
        self.started.append(q)
        self.up[node_id] = q
        return q

    def start_all(self) -> list[MetadataQuorum]:
        return [self.start(i) for i in self.voters]

    def stop(self, node_id: int) -> None:
        self.up.pop(node_id).close()

    def leader(self, timeout_s: float = 10.0) -> MetadataQuorum:
        found: list[MetadataQuorum] = []

        def one_leader() -> bool:
            found[:] = [q for q in self.up.values() if q.is_leader]
            return len(found) == 1

        wait_until(one_leader, timeout_s, "a single leader")
        return found[0]

    def converged(self, timeout_s: float = 10.0) -> bytes:
        """Wait until every running voter holds the same state; return its snapshot."""
        wait_until(
            lambda: len({q.metadata.to_snapshot() for q in self.up.values()}) == 1,
            timeout_s,
            "voters to converge",
        )
        snapshot: bytes = next(iter(self.up.values())).metadata.to_snapshot()
        return snapshot

    def close(self) -> None:
        for q in self.started:
            q.close()


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(size: int, settings: QuorumSettings = FAST) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", size, settings)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# ------------------------------------------------------------------------------- configuration


def test_parse_voters_reads_ids_and_addresses() -> None:
    assert parse_voters("1@127.0.0.1:9201,2@127.0.0.1:9202") == {1: "127.0.0.1:9201", 2: "127.0.0.1:9202"}
    assert parse_voters(" 3@voter-3.headwater:9201 ") == {3: "voter-3.headwater:9201"}


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty"),
        ("127.0.0.1:9201", "id@host:port"),
        ("x@127.0.0.1:9201", "non-negative integer"),
        ("-1@127.0.0.1:9201", "non-negative integer"),
        ("1@127.0.0.1", "host:port"),
        ("1@:9201", "host:port"),
        ("1@127.0.0.1:http", "port"),
        ("1@127.0.0.1:70000", "port"),
        ("1@[::1]:9201", "IPv6"),
        ("1@a:1,1@b:2", "appears twice"),
        ("1@a:1,2@a:1", "appears twice"),
        ("1@a:1,", "id@host:port"),
    ],
)
def test_parse_voters_refuses_bad_entries_clearly(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_voters(text)


def test_a_secret_is_required_and_the_voter_must_be_named(tmp_path: Path) -> None:
    voters = {1: f"127.0.0.1:{free_port()}"}
    with pytest.raises(ValueError, match="secret is required"):
        MetadataQuorum(1, voters, tmp_path / "v", "")
    with pytest.raises(ValueError, match="not one of the voters"):
        MetadataQuorum(2, voters, tmp_path / "v", SECRET)


# ---------------------------------------------------------------------------------- one voter


def test_single_voter_commits_register_node_and_gives_a_broker_epoch(
    cluster_factory: Callable[..., Cluster], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    applied: list[tuple[int, Command, Result]] = []
    c = cluster_factory(1)
    q = c.start(1, on_applied=lambda off, cmd, res: applied.append((off, cmd, res)))
    assert q.wait_for_leader(10) == 1
    cmd = register(7)

    result = q.propose(cmd, timeout_s=5)

    assert result.ok and result.metadata_offset == 0 and result.broker_epoch == 0
    assert q.metadata_offset == 0 and q.metadata.nodes[7].broker_epoch == 0
    assert applied == [(0, cmd, result)]
    status = q.status()
    assert status["state"] == "leader" and status["leader_id"] == 1 and status["metadata_offset"] == 0
    assert status["raft_term"] >= 1 and status["commit_index"] >= 1
    # The secret stays out of everything a person or a log can see.
    for text in (repr(q), str(q), json.dumps(status), caplog.text):
        assert SECRET not in text
    assert q._raft.conf.password is None
    # A second voter process cannot open the same data dir.
    with pytest.raises(QuorumError, match="another voter"):
        MetadataQuorum(1, c.voters, c.root / "voter1", SECRET)
    q.close()
    q.close()  # idempotent
    assert q.closed


def test_a_rejected_command_is_committed_with_its_reason(cluster_factory: Callable[..., Cluster]) -> None:
    q = cluster_factory(1).start(1)
    q.wait_for_leader(10)
    result = q.propose(UnfenceNode(node_id=42, broker_epoch=0), timeout_s=5)
    assert not result.ok and result.error_code != 0 and result.metadata_offset == 0
    with pytest.raises(ValueError):
        q.propose(RegisterNode(1, b"x", "h", "not a port"), timeout_s=5)
    assert q.metadata_offset == 0


# ------------------------------------------------------------------------------- three voters


def test_three_voters_apply_the_same_log(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory(3)
    c.start_all()
    leader = c.leader()
    before = leader.metadata
    results = [leader.propose(register(n), timeout_s=5) for n in range(1, 6)]
    results.append(leader.propose(AllocateProducerIds(1, results[0].broker_epoch, 1000), timeout_s=5))
    assert all(r.ok for r in results) and [r.metadata_offset for r in results] == list(range(6))
    assert results[-1].producer_id_count == 1000

    snapshot = c.converged()

    assert ClusterMetadata.from_snapshot(snapshot).metadata_offset == 5
    assert all(q.metadata_offset == 5 for q in c.up.values())
    # Copy-on-write: a state a reader holds never changes under it.
    assert before.metadata_offset == -1 and before.nodes == {}


def test_propose_async_hands_the_outcome_to_the_callers_loop(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory(3)
    c.start_all()
    leader = c.leader()

    async def main() -> list[Result]:
        return await asyncio.gather(*(leader.propose_async(register(n), timeout_s=5) for n in range(20)))

    results = asyncio.run(main())
    assert sorted(r.metadata_offset for r in results) == list(range(20))
    assert c.converged()


def test_a_voter_that_is_not_leader_refuses_and_names_the_leader(
    cluster_factory: Callable[..., Cluster],
) -> None:
    """Decision: no transparent forwarding. Only the active controller (the Raft leader) proposes."""
    c = cluster_factory(3)
    c.start_all()
    leader = c.leader()
    follower = next(q for q in c.up.values() if q is not leader)
    wait_until(lambda: follower.leader_id == leader.node_id, 5, "the follower to know the leader")

    with pytest.raises(NotLeaderError) as err:
        follower.propose(register(1), timeout_s=5)
    assert err.value.leader_id == leader.node_id and err.value.retriable
    with pytest.raises(NotLeaderError):
        asyncio.run(follower.propose_async(register(1), timeout_s=5))
    assert leader.metadata_offset == -1


def test_stopping_the_leader_elects_another_that_commits_with_state_intact(
    cluster_factory: Callable[..., Cluster],
) -> None:
    c = cluster_factory(3)
    c.start_all()
    old = c.leader()
    for n in range(1, 4):
        old.propose(register(n), timeout_s=5)
    committed = c.converged()

    started = time.monotonic()
    c.stop(old.node_id)
    new = c.leader(timeout_s=10)
    result = new.propose(register(4), timeout_s=5)
    failover_s = time.monotonic() - started

    print(f"\nfail-over: leader stopped -> next command committed in {failover_s:.2f}s")
    assert failover_s < 8
    assert new.node_id != old.node_id and result.ok and result.metadata_offset == 3
    survivor = ClusterMetadata.from_snapshot(c.converged())
    old_state = ClusterMetadata.from_snapshot(committed)
    assert all(survivor.nodes[n] == old_state.nodes[n] for n in (1, 2, 3))


def test_restarting_every_voter_recovers_the_metadata_from_journal_and_dump(
    cluster_factory: Callable[..., Cluster],
) -> None:
    c = cluster_factory(3, QuorumSettings(connection_retry_s=0.5, log_compaction_min_entries=10))
    c.start_all()
    leader = c.leader()
    for n in range(30):
        leader.propose(register(n % 7), timeout_s=5)
    before = c.converged()
    wait_until(lambda: all((c.root / f"voter{i}" / "raft.dump").exists() for i in c.voters), 10, "dumps")
    for node_id in list(c.up):
        c.stop(node_id)

    dump = json.loads((c.root / "voter1" / "raft.dump").read_bytes())  # JSON, never a pickle
    assert dump["format"] == DUMP_FORMAT
    loaded: dict[int, list[ClusterMetadata]] = {i: [] for i in c.voters}
    for i in c.voters:
        c.start(i, on_snapshot_loaded=loaded[i].append)
    wait_until(lambda: all(q.metadata_offset == 29 for q in c.up.values()), 15, "state to come back")
    assert all(loaded[i] and loaded[i][0].metadata_offset <= 29 for i in c.voters)  # the dump was used

    assert c.converged() == before
    assert c.leader().propose(register(99), timeout_s=5).metadata_offset == 30


# -------------------------------------------------------------------------------- strangers


def test_a_voter_with_the_wrong_secret_is_kept_out(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory(3)
    good = [c.start(1), c.start(2)]
    intruder = c.start(3, secret="not the cluster secret")
    leader = c.leader()
    assert leader in good
    for n in range(3):
        leader.propose(register(n), timeout_s=5)
    wait_until(lambda: all(q.metadata_offset == 2 for q in good), 5, "the good voters")
    time.sleep(1.5)  # time enough to connect, replicate or start an election, were it let in

    assert intruder.metadata_offset == -1 and intruder.leader_id is None and not intruder.is_leader
    with pytest.raises(NotLeaderError) as err:
        intruder.propose(register(9), timeout_s=2)
    assert err.value.leader_id is None
    assert 3 not in leader.status()["connected_voters"]
    assert all(q.metadata_offset == 2 for q in good) and leader.is_leader


class _Evil:
    """Unpickling this creates ``marker``: proof that a stranger's bytes were unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.marker, "w"))


def test_garbage_on_the_raft_port_neither_crashes_nor_changes_anything(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    import zlib

    c = cluster_factory(3)
    c.start_all()
    leader = c.leader()
    leader.propose(register(1), timeout_s=5)
    before = c.converged()
    marker = tmp_path / "unpickled"
    evil = zlib.compress(pickle.dumps(_Evil(str(marker)), protocol=2))
    payloads = [
        os.urandom(4096),
        struct.pack("i", len(evil)) + evil,  # a framed, unencrypted pickle
        struct.pack("i", 2**31 - 1) + b"x" * 1000,  # a frame that never ends
        struct.pack("i", -5) + b"garbage",
        b"",
    ]
    for q in c.up.values():
        host, port = q.raft_address.rsplit(":", 1)
        for payload in payloads:
            with socket.create_connection((host, int(port)), timeout=2) as s:
                s.sendall(payload)
                time.sleep(0.05)
    time.sleep(0.5)

    assert not marker.exists()
    assert c.converged() == before
    leader = c.leader()
    assert leader.propose(register(2), timeout_s=5).metadata_offset == 1
    c.converged()


def test_a_crash_between_a_dump_and_its_compaction_loses_no_committed_entry(
    cluster_factory: Callable[..., Cluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dump is written and renamed into place, then the process dies before the journal drops
    the entries it covers: at restart the journal does not start at the dump, and every committed
    entry after the dump must still be there."""
    from headwater.raft.journal import SyncedJournal

    c = cluster_factory(1, QuorumSettings(connection_retry_s=0.5, log_compaction_min_entries=20))
    q = c.start(1)
    c.leader()
    monkeypatch.setattr(SyncedJournal, "deleteEntriesTo", lambda self, entry_to: None)  # the "crash"
    for n in range(60):
        q.propose(register(n), timeout_s=5)
    assert (c.root / "voter1" / "raft.dump").exists()
    before = q.metadata.to_snapshot()
    c.stop(1)
    monkeypatch.undo()
    again = c.start(1)
    wait_until(lambda: again.metadata_offset == 59, 10, "the committed entries after the dump")
    assert again.metadata.to_snapshot() == before
