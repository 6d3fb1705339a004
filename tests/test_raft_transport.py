"""The Raft port's bounds (raft/transport.py): what a stranger can cost a voter, against real voters
on loopback ports in this process. No stranger holds the secret; none may stall Raft."""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE
from pysyncobj.transport import TCPTransport
from test_raft_quorum import Cluster, register, wait_until

import headwater.raft.quorum as quorum_module
from headwater.raft.quorum import MetadataQuorum, QuorumSettings
from headwater.raft.transport import BoundedConnection, TransportLimits, _Warnings

AUTH_TIMEOUT_S = 2.0
SETTINGS = QuorumSettings(connection_retry_s=0.5, auth_timeout_s=AUTH_TIMEOUT_S)
# A command proposed while a stranger attacks the leader commits within this (it takes ~10 ms alone).
COMMIT_DURING_ATTACK_S = 2.0
# The slack a tick-driven deadline may add (pysyncobj ticks every 50 ms; the tests share two cores).
SWEEP_SLACK_S = 1.0
TRANSPORT_LOGGER = "headwater.raft.transport"


@pytest.fixture
def voters(tmp_path: Path) -> Iterator[Cluster]:
    """Three voters with a leader and one committed command."""
    c = Cluster(tmp_path / "cluster", 3, SETTINGS)
    try:
        c.start_all()
        c.leader().propose(register(1), timeout_s=5)
        c.converged()
        yield c
    finally:
        c.close()


def address_of(q: MetadataQuorum) -> tuple[str, int]:
    host, port = q.raft_address.rsplit(":", 1)
    return host, int(port)


def wait_closed_by_peer(s: socket.socket, timeout_s: float) -> float | None:
    """Seconds until the voter closed ``s`` (EOF or reset; what we sent is discarded), or None."""
    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        readable, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            return None
        try:
            if not s.recv(65536):
                return time.monotonic() - start
        except OSError:
            return time.monotonic() - start


def terms_and_leaders(c: Cluster) -> dict[int, tuple[int, int | None]]:
    return {i: (q.raft_term, q.leader_id) for i, q in c.up.items()}


@dataclass
class Attack:
    """A stranger that announces a 2 GiB frame and then streams 64 KiB writes, reconnecting each
    time the voter closes it, for ``duration_s``."""

    target: tuple[str, int]
    duration_s: float
    connections: int = 0
    # Seconds from connecting to seeing the connection closed, per connection.
    close_s: list[float] = field(default_factory=list)
    first_peer: str = ""
    never_closed: int = 0

    def run(self) -> None:
        chunk = b"\0" * 65536
        end = time.monotonic() + self.duration_s
        while time.monotonic() < end:
            s = socket.create_connection(self.target, timeout=2.0)
            self.connections += 1
            if not self.first_peer:
                host, port = s.getsockname()[:2]
                self.first_peer = f"{host}:{port}"
            opened = time.monotonic()
            try:
                s.sendall(struct.pack("i", 0x7FFFFFFF))
                while time.monotonic() < max(end, opened + 1.0):
                    s.sendall(chunk)
                self.never_closed += 1  # open for a second of streaming
            except TimeoutError:
                self.never_closed += 1  # the voter neither read nor closed for 2 s
            except OSError:
                self.close_s.append(time.monotonic() - opened)
            finally:
                s.close()


def test_a_stranger_streaming_a_2gib_frame_at_the_leader_neither_deposes_it_nor_stalls_commits(
    voters: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger=TRANSPORT_LOGGER)
    leader = voters.leader()
    before = terms_and_leaders(voters)
    attack = Attack(address_of(leader), duration_s=5.0)
    thread = threading.Thread(target=attack.run, daemon=True)
    thread.start()
    wait_until(lambda: attack.connections >= 2, 5, "the attack to be under way")

    latencies = []
    for n in range(10, 20):
        started = time.monotonic()
        result = leader.propose(register(n), timeout_s=COMMIT_DURING_ATTACK_S)
        latencies.append(time.monotonic() - started)
        assert result.ok
        time.sleep(0.2)
    thread.join(10)

    assert not thread.is_alive()
    assert max(latencies) < COMMIT_DURING_ATTACK_S
    # No election happened: every voter still has the same term and the same leader.
    assert terms_and_leaders(voters) == before and leader.is_leader
    # Every connection was closed as soon as its length was read, however long the attack went on.
    assert attack.never_closed == 0 and attack.connections == len(attack.close_s) >= 2
    assert max(attack.close_s) < 1.0
    voters.converged()
    # Warned about, naming the stranger, and rate-limited (one per 10 s however many connections).
    warnings = [r.getMessage() for r in caplog.records if r.name == TRANSPORT_LOGGER]
    assert 1 <= len(warnings) <= 2
    assert attack.first_peer in warnings[0] and "before authentication" in warnings[0]


def test_hundreds_of_idle_connections_are_closed_by_the_auth_timeout_while_commits_go_on(
    voters: Cluster,
) -> None:
    leader = voters.leader()
    strangers = [socket.create_connection(address_of(leader), timeout=2.0) for _ in range(200)]
    opened = time.monotonic()
    try:
        result = leader.propose(register(30), timeout_s=2)
        assert result.ok
        # Past the cap of 64 waiting connections each newcomer closes the oldest: the first 136
        # go at once (~20 ms), long before the auth timeout.
        closed: set[int] = set()

        def count_closed() -> int:
            for i, s in enumerate(strangers):
                if i not in closed and wait_closed_by_peer(s, 0.0) is not None:
                    closed.add(i)
            return len(closed)

        wait_until(lambda: count_closed() >= 136, AUTH_TIMEOUT_S / 2, "all but 64 closed")
        assert closed == set(range(136))
        assert leader.propose(register(31), timeout_s=2).ok
        # The 64 left are closed by the auth timeout.
        deadline = opened + AUTH_TIMEOUT_S + SWEEP_SLACK_S
        for s in strangers[136:]:
            assert wait_closed_by_peer(s, max(0.0, deadline - time.monotonic())) is not None
        assert time.monotonic() - opened >= AUTH_TIMEOUT_S - 0.2
        assert leader.propose(register(32), timeout_s=2).ok
    finally:
        for s in strangers:
            s.close()
    assert leader.is_leader
    voters.converged()


def _framed(data: bytes) -> bytes:
    return struct.pack("i", len(data)) + data


def _other_secret_frame() -> bytes:
    return _framed(Fernet(Fernet.generate_key()).encrypt(zlib.compress(pickle.dumps(os.urandom(32), 2))))


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack("i", 1000) + os.urandom(1000),  # a frame of the right size, not a Fernet token
        _other_secret_frame(),  # a handshake encrypted with another secret
        _framed(zlib.compress(pickle.dumps(os.urandom(32), 2))),  # an unencrypted handshake
        struct.pack("i", -5) + b"garbage",  # a negative length
        struct.pack("i", 5000) + os.urandom(100),  # above the bound before authentication
    ],
    ids=["random-frame", "other-secret", "plain-pickle", "negative-length", "oversized"],
)
def test_a_frame_that_is_not_a_message_under_the_secret_closes_the_connection(
    voters: Cluster, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger=TRANSPORT_LOGGER)
    leader = voters.leader()
    before = terms_and_leaders(voters)
    with socket.create_connection(address_of(leader), timeout=2.0) as s:
        peer = "{}:{}".format(*s.getsockname()[:2])
        s.sendall(payload)
        closed_after = wait_closed_by_peer(s, 1.0)
    assert closed_after is not None
    assert any(peer in r.getMessage() for r in caplog.records if r.name == TRANSPORT_LOGGER)
    assert leader.propose(register(40), timeout_s=2).ok
    assert terms_and_leaders(voters) == before


def test_a_slow_drip_is_closed_by_the_auth_timeout(voters: Cluster) -> None:
    leader = voters.leader()
    # A frame of legal size, one byte per 100 ms: it would take 30 s to arrive.
    payload = struct.pack("i", 300) + os.urandom(300)
    with socket.create_connection(address_of(leader), timeout=2.0) as s:
        opened = time.monotonic()
        closed_after = None
        for byte in payload:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - opened
                break
            if wait_closed_by_peer(s, 0.1) is not None:
                closed_after = time.monotonic() - opened
                break
            if time.monotonic() - opened > AUTH_TIMEOUT_S + SWEEP_SLACK_S:
                break
    assert closed_after is not None, "the drip was never closed"
    assert AUTH_TIMEOUT_S - 0.2 <= closed_after <= AUTH_TIMEOUT_S + SWEEP_SLACK_S
    assert leader.propose(register(50), timeout_s=2).ok


def test_a_voter_on_pysyncobjs_own_transport_still_works_with_bounded_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same wire format and handshake: a cluster can be upgraded one voter at a time."""
    c = Cluster(tmp_path / "cluster", 3, SETTINGS)
    try:
        c.start(1)
        c.start(2)
        with monkeypatch.context() as m:
            m.setattr(quorum_module, "bounded_transport_class", lambda limits: TCPTransport)
            c.start(3)
        leader = c.leader()
        assert leader.propose(register(1), timeout_s=5).ok
        c.converged()
        # Stop a bounded voter (the leader if it is one): the two left, voter 3 among them, must
        # elect and commit together.
        stopped = leader.node_id if leader.node_id != 3 else 1
        c.stop(stopped)
        new_leader = c.leader()
        assert new_leader.propose(register(2), timeout_s=5).ok
        c.converged()
        assert all(q.status()["connected_voters"] for q in c.up.values())
    finally:
        c.close()


# ------------------------------------------------------------- one connection, no cluster, no tick


class FakePoller:
    """pysyncobj's poller interface; a test fires events by hand."""

    def __init__(self) -> None:
        self.callbacks: dict[int, Callable[[int, int], None]] = {}
        self.masks: dict[int, int] = {}

    def subscribe(self, descr: int, callback: Callable[[int, int], None], mask: int) -> None:
        self.callbacks[descr] = callback
        self.masks[descr] = mask

    def unsubscribe(self, descr: int) -> None:
        self.callbacks.pop(descr, None)
        self.masks.pop(descr, None)

    def fire(self, conn: BoundedConnection, event: int = POLL_EVENT_TYPE.READ) -> None:
        fd = conn.fileno()
        assert fd is not None
        self.callbacks[fd](fd, event)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


LIMITS = TransportLimits(
    max_frame_bytes_before_auth=4096,
    max_frame_bytes=1024 * 1024,
    max_read_bytes_per_event=64 * 1024,
    auth_timeout_s=3.0,
    idle_timeout_s=3.5,
    max_unauthenticated_connections=4,
    listen_backlog=8,
    warning_interval_s=10.0,
)


@dataclass
class Pair:
    """An accepted BoundedConnection (``conn``) and the raw socket of the peer (``peer``)."""

    conn: BoundedConnection
    peer: socket.socket
    poller: FakePoller
    clock: FakeClock
    received: list[object]


@pytest.fixture
def pair() -> Iterator[Pair]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    poller, clock, received = FakePoller(), FakeClock(), []
    conn = BoundedConnection(
        poller, LIMITS, _Warnings(LIMITS.warning_interval_s, clock), sock=ours, peer="peer:1", clock=clock
    )
    conn.encryptor = Fernet(Fernet.generate_key())
    conn.setOnMessageReceivedCallback(received.append)
    yield Pair(conn, theirs, poller, clock, received)
    conn.disconnect()
    theirs.close()


def handshake(p: Pair) -> bytes:
    """Play the dialling peer of pysyncobj's handshake until ``p.conn`` is authenticated."""
    enc = p.conn.encryptor
    their_key = os.urandom(32)
    p.peer.sendall(_framed(enc.encrypt(zlib.compress(pickle.dumps(their_key, 2)))))
    p.poller.fire(p.conn)
    assert p.received == [their_key] and not p.conn.authenticated
    p.conn.sendRandKey, p.conn.recvRandKey = their_key, os.urandom(32)  # what the transport does
    p.peer.sendall(_framed(enc.encrypt(zlib.compress(pickle.dumps((p.conn.recvRandKey, "hello"), 2)))))
    p.poller.fire(p.conn)
    assert p.received[-1] == "hello" and p.conn.authenticated
    return their_key


def test_a_connection_authenticates_only_with_its_own_key_and_then_takes_larger_frames(pair: Pair) -> None:
    handshake(pair)
    big = os.urandom(200 * 1024)  # incompressible: a frame far above the bound before authentication
    token = pair.conn.encryptor.encrypt(zlib.compress(pickle.dumps((pair.conn.recvRandKey, big), 2)))
    data = memoryview(_framed(token))
    pair.peer.setblocking(False)
    for _ in range(1000):  # the peer writes what the socket pair takes, the connection reads
        with contextlib.suppress(BlockingIOError):
            data = data[pair.peer.send(data) :]
        pair.poller.fire(pair.conn)
        if pair.received[-1] == big:
            break
    assert pair.received[-1] == big
    assert pair.conn.state == CONNECTION_STATE.CONNECTED


def test_a_replayed_handshake_carrying_another_key_does_not_authenticate(pair: Pair) -> None:
    enc = pair.conn.encryptor
    pair.peer.sendall(_framed(enc.encrypt(zlib.compress(pickle.dumps(os.urandom(32), 2)))))
    pair.poller.fire(pair.conn)
    pair.conn.recvRandKey = os.urandom(32)
    recorded = enc.encrypt(zlib.compress(pickle.dumps((os.urandom(32), "hello"), 2)))
    pair.peer.sendall(_framed(recorded))
    pair.poller.fire(pair.conn)
    assert pair.conn.state == CONNECTION_STATE.DISCONNECTED and not pair.conn.authenticated


def test_one_event_reads_at_most_its_budget(pair: Pair) -> None:
    handshake(pair)
    pair.peer.setblocking(False)
    pair.peer.sendall(struct.pack("i", 900 * 1024))
    with contextlib.suppress(BlockingIOError):
        for _ in range(64):
            pair.peer.send(b"\0" * 16384)  # as much as the socket pair holds, up to 1 MiB
    pair.poller.fire(pair.conn)
    assert len(pair.conn._read_buf) <= LIMITS.max_read_bytes_per_event
    pair.poller.fire(pair.conn)
    assert len(pair.conn._read_buf) <= 2 * LIMITS.max_read_bytes_per_event


def test_the_length_is_refused_before_the_body_arrives(pair: Pair) -> None:
    pair.peer.sendall(struct.pack("i", 4097))
    pair.poller.fire(pair.conn)
    assert pair.conn.state == CONNECTION_STATE.DISCONNECTED


def test_deadlines_close_an_unauthenticated_then_an_idle_connection(pair: Pair) -> None:
    pair.clock.now += LIMITS.auth_timeout_s
    pair.conn.check_deadlines(pair.clock.now)
    assert pair.conn.state == CONNECTION_STATE.CONNECTED
    pair.clock.now += 0.01
    pair.conn.check_deadlines(pair.clock.now)
    assert pair.conn.state == CONNECTION_STATE.DISCONNECTED


def test_an_authenticated_connection_is_closed_when_idle_only(pair: Pair) -> None:
    handshake(pair)
    pair.clock.now += LIMITS.idle_timeout_s
    pair.conn.check_deadlines(pair.clock.now)
    assert pair.conn.state == CONNECTION_STATE.CONNECTED
    pair.clock.now += 0.01
    pair.conn.check_deadlines(pair.clock.now)
    assert pair.conn.state == CONNECTION_STATE.DISCONNECTED


def test_warnings_are_rate_limited_and_count_what_they_left_out(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger=TRANSPORT_LOGGER)
    clock = FakeClock()
    warnings = _Warnings(10.0, clock)
    for n in range(5):
        warnings.connection_closed(f"10.0.0.{n}:1", "a bound")
    clock.now += 10.0
    warnings.connection_closed("10.0.0.9:1", "a bound")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "10.0.0.0:1" in messages[0] and "10.0.0.9:1" in messages[1] and "4 more" in messages[1]
