"""The active controller's asyncio shell: role changes, ordered proposals, and the metadata feed.

``ActiveController`` (``raft/controller.py``) decides; this module runs it on the node's event loop
around one ``MetadataQuorum`` voter:

- **Role.** A tick task polls ``quorum.is_leader`` every ``tick_interval_ms`` (half the heartbeat
  interval by default); every request checks it too. A voter that becomes Raft leader builds a fresh
  controller (``controller_factory``) and activates it; one that loses leadership deactivates it at
  once and fails every queued command with NOT_CONTROLLER, so a former leader stops acting (KIP-631).
  Each activation is a new *generation*; work of an older one is dropped, never proposed.
- **Order.** Every command goes through one asyncio queue and one worker task, which hands them to
  pysyncobj in queue order (the first step of each proposal, which appends it, runs in the order the
  worker started them: asyncio runs ready callbacks first in, first out). The controller relies on a
  later decision landing later in the log. Up to ``max_in_flight`` proposals wait for their commit
  at once; each outcome goes back to the controller with ``on_applied``. A large command (a
  ``CreateTopic`` of ``LARGE_COMMAND_PARTITIONS`` or more) is proposed alone: after everything
  before it has applied, and before anything after it. pysyncobj applies every committed entry in
  one pass of its tick thread, and a leader busy applying sends no Raft heartbeats; entries of
  10,000 partitions each (about 80 KB, some 60 ms to decode and apply) committed together would
  hold it past the followers' election timeout.
- **Answers.** A request is answered only after the commands it caused have committed and applied
  on this voter (``propose_async`` returns this voter's apply of the committed entry).
- **Feed.** ``MetadataFeed`` keeps the last ``max_retained`` applied commands for ``WatchMetadata``.
  pysyncobj reports them on its own thread; the feed takes them under a lock and wakes watchers
  with ``call_soon_threadsafe``. Build it first and pass its ``on_applied``/``on_snapshot_loaded``
  to the ``MetadataQuorum``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from headwater.raft.commands import (
    NO_LEADER,
    AlterConfigs,
    AlterPartition,
    Command,
    CreateTopic,
    DeleteTopic,
    ElectLeader,
    encode_command,
)
from headwater.raft.controller import DEFAULT_HEARTBEAT_INTERVAL_MS, ActiveController, Refusal
from headwater.raft.metadata import (
    MAX_REQUEST_ID_LENGTH,
    ClusterMetadata,
    PartitionRecord,
    Result,
    TopicRecord,
    choose_leader,
)
from headwater.raft.quorum import MetadataQuorum, QuorumError
from headwater.v1 import errors_pb2

__all__ = [
    "ControllerRuntime",
    "MetadataFeed",
    "FeedEntry",
    "Outcome",
    "HeartbeatOutcome",
    "ElectionOutcome",
    "default_controller_factory",
    "monotonic_ms",
    "DEFAULT_PROPOSE_TIMEOUT_S",
    "DEFAULT_MAX_QUEUED_COMMANDS",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_RETAINED_DELTAS",
    "MAX_ELECT_PARTITIONS",
    "LARGE_COMMAND_PARTITIONS",
]

log = logging.getLogger("headwater.node.controller")
E = errors_pb2

DEFAULT_PROPOSE_TIMEOUT_S = 5.0
# Commands waiting to be proposed; a request that would exceed it is refused as timed out.
DEFAULT_MAX_QUEUED_COMMANDS = 4096
# Proposals waiting for their commit at once.
DEFAULT_MAX_IN_FLIGHT = 128
# Applied commands a voter keeps for WatchMetadata; an older offset gets a snapshot first.
DEFAULT_MAX_RETAINED_DELTAS = 10_000
# A CreateTopic of this many partitions or more is proposed alone (see the module docstring).
LARGE_COMMAND_PARTITIONS = 1_000
# Distinct partitions one ElectLeaders request may name; a longer list is refused as INVALID_REQUEST.
MAX_ELECT_PARTITIONS = 10_000


def default_controller_factory(metadata: ClusterMetadata) -> ActiveController:
    """An ``ActiveController`` with the default timing and a fresh random seed for placement."""
    return ActiveController(metadata, random.Random())


def monotonic_ms() -> int:
    """The default controller clock: monotonic milliseconds."""
    return time.monotonic_ns() // 1_000_000


# ------------------------------------------------------------------------------------- the feed


@dataclass(frozen=True, slots=True)
class FeedEntry:
    """One applied command of the metadata log, encoded as it is in the Raft log."""

    metadata_offset: int
    command: bytes
    error_code: int
    error_message: str


class MetadataFeed:
    """The last applied commands, for ``WatchMetadata``; fed from pysyncobj's thread.

    Entries are contiguous by offset; a gap (an entry that was not a command, or a snapshot loaded
    from the leader) clears them, and a watcher that needs what is gone gets a snapshot instead.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_retained: int = DEFAULT_MAX_RETAINED_DELTAS):
        if max_retained < 1:
            raise ValueError("max_retained must be >= 1")
        self._loop = loop
        self._lock = threading.Lock()  # guards _entries
        self._entries: collections.deque[FeedEntry] = collections.deque(maxlen=max_retained)
        # Set on the loop whenever something was applied; replaced after each wake-up.
        self._changed = asyncio.Event()

    # Called on pysyncobj's tick thread: short, never raises into it.
    def on_applied(self, metadata_offset: int, cmd: Command, result: Result) -> None:
        entry = FeedEntry(metadata_offset, encode_command(cmd), result.error_code, result.message)
        with self._lock:
            if self._entries and self._entries[-1].metadata_offset + 1 != metadata_offset:
                self._entries.clear()
            self._entries.append(entry)
        self._wake()

    def on_snapshot_loaded(self, metadata: ClusterMetadata) -> None:
        with self._lock:
            self._entries.clear()
        self._wake()

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._set_changed)
        except RuntimeError:
            pass  # the loop is closed: nobody is watching any more

    def _set_changed(self) -> None:  # on the loop: wake everyone waiting on the current event
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def changed_event(self) -> asyncio.Event:
        """Take this BEFORE reading ``entries_from``: an apply after that read sets it, so a
        watcher that then waits on it cannot miss the apply (no lost wake-up between watchers)."""
        return self._changed

    def entries_from(self, offset: int) -> list[FeedEntry] | None:
        """Retained entries from ``offset`` on ([] when none yet), or None when ``offset`` is gone."""
        with self._lock:
            if not self._entries:
                return None
            first = self._entries[0].metadata_offset
            last = self._entries[-1].metadata_offset
            if offset < first or offset > last + 1:
                return None
            return list(self._entries)[offset - first :]

    async def wait_changed(self, event: asyncio.Event, timeout_s: float) -> None:
        """Return once ``event`` (from ``changed_event``) is set, or after ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)


# --------------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a controller request came to. ``result`` is the committed command's, when there was one."""

    error_code: int
    message: str = ""
    result: Result | None = None

    @property
    def ok(self) -> bool:
        return self.error_code == E.ERROR_CODE_NONE


@dataclass(frozen=True, slots=True)
class HeartbeatOutcome:
    error_code: int
    message: str = ""
    is_fenced: bool = True
    shutdown_ready: bool = False
    metadata_offset: int = -1


@dataclass(frozen=True, slots=True)
class ElectionOutcome:
    topic_id: bytes
    partition: int
    error_code: int
    message: str = ""
    leader_id: int = NO_LEADER
    leader_epoch: int = -1


@dataclass(slots=True)
class _Queued:
    generation: int
    command: Command
    future: asyncio.Future[Outcome] = field(repr=False)


_NOT_ACTIVE = "this voter is not the active controller"


# ---------------------------------------------------------------------------------- elections


def _election_needed(p: PartitionRecord, preferred: bool) -> bool:
    """Preferred: the first replica does not lead. Otherwise: nothing leads."""
    return bool(p.leader != p.replicas[0] if preferred else p.leader == NO_LEADER)


def _election_refusal(
    t: TopicRecord, p: PartitionRecord, live: set[int], preferred: bool
) -> tuple[int, str] | None:
    """Why the state machine would reject this election (error code, message), or None when it
    would take it. The same rule it applies (``choose_leader`` with the topic's unclean setting):
    the preferred replica can lead exactly when ``choose_leader`` picks it, and a leaderless
    partition can have a leader exactly when it picks anyone."""
    leader, _ = choose_leader(p.replicas, p.isr, live, t.unclean_allowed())
    if preferred and leader != p.replicas[0]:
        first = p.replicas[0]
        if first not in live:
            return E.ERROR_CODE_INELIGIBLE_REPLICA, f"preferred replica {first} is fenced"
        return E.ERROR_CODE_INELIGIBLE_REPLICA, f"preferred replica {first} is not in the ISR {list(p.isr)}"
    if not preferred and leader == NO_LEADER:
        return E.ERROR_CODE_LEADER_NOT_AVAILABLE, "no replica is eligible to lead"
    return None


# ---------------------------------------------------------------------------------- the runtime


class ControllerRuntime:
    """Runs an ``ActiveController`` on this voter while it is the Raft leader. See the module docstring.

    ``clock_ms`` is a monotonic clock in milliseconds (the controller's leases are measured on it).
    Call ``start()`` on ``loop`` and ``await stop()`` before closing the quorum.
    """

    def __init__(
        self,
        quorum: MetadataQuorum,
        controller_factory: Callable[[ClusterMetadata], ActiveController],
        clock_ms: Callable[[], int],
        loop: asyncio.AbstractEventLoop,
        *,
        feed: MetadataFeed | None = None,
        tick_interval_ms: int | None = None,
        propose_timeout_s: float = DEFAULT_PROPOSE_TIMEOUT_S,
        max_queued_commands: int = DEFAULT_MAX_QUEUED_COMMANDS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_partitions: int | None = None,
    ) -> None:
        if max_queued_commands < 1 or max_in_flight < 1:
            raise ValueError("max_queued_commands and max_in_flight must be >= 1")
        self.quorum = quorum
        self.feed = feed
        self._factory = controller_factory
        self._clock_ms = clock_ms
        self._loop = loop
        self._tick_interval_ms = tick_interval_ms
        self._propose_timeout_s = propose_timeout_s
        self._max_in_flight = max_in_flight
        # The cluster's partition limit (None: none), and partitions of creations not applied yet.
        self.max_partitions = max_partitions
        self._reserved_partitions = 0
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue(max_queued_commands)
        self._controller: ActiveController | None = None
        # Bumped on every activation and deactivation; queued work of another generation is dropped.
        self._generation = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopped = False
        # The cluster's id for DescribeCluster; set by whoever knows it, "" while unknown.
        self.cluster_id: str = ""

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the tick and proposal tasks on the loop (call from the loop)."""
        assert not self._tasks, "already started"
        self._tasks = [
            self._loop.create_task(self._tick_loop(), name="controller-tick"),
            self._loop.create_task(self._propose_loop(), name="controller-propose"),
        ]

    async def stop(self) -> None:
        """Deactivate, fail queued work, and stop the tasks. Idempotent."""
        self._stopped = True
        self._deactivate("stopping")
        for t in [*self._tasks, *self._in_flight]:
            t.cancel()
        for t in [*self._tasks, *self._in_flight]:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        self._fail_queued()

    @property
    def active(self) -> bool:
        """Whether this voter acts as the active controller right now."""
        return self._controller is not None

    @property
    def generation(self) -> int:
        return self._generation

    def _interval_s(self) -> float:
        if self._tick_interval_ms is not None:
            return self._tick_interval_ms / 1000
        c = self._controller
        hb: int = c.config.heartbeat_interval_ms if c is not None else DEFAULT_HEARTBEAT_INTERVAL_MS
        return hb / 2000

    # ---------------------------------------------------------------- role

    def _check_role(self) -> ActiveController | None:
        """Follow Raft leadership: activate on gaining it, deactivate at once on losing it. Returns
        the active controller with its view refreshed to the latest applied metadata, or None."""
        if self._stopped:
            return None
        leader = self.quorum.is_leader and not self.quorum.closed
        if not leader:
            if self._controller is not None:
                self._deactivate("lost raft leadership")
            return None
        c = self._controller
        if c is None:
            c = self._factory(self.quorum.metadata)
            c.activate(self._clock_ms())
            self._generation += 1
            self._controller = c
            log.info(
                "node %d is the active controller (raft term %d, metadata offset %d)",
                self.quorum.node_id,
                self.quorum.raft_term,
                self.quorum.metadata_offset,
            )
        # Copy-on-write: the quorum publishes a new object per apply; the controller reads this one.
        c.metadata = self.quorum.metadata
        return c

    def _deactivate(self, why: str) -> None:
        c = self._controller
        if c is None:
            return
        c.deactivate()
        self._controller = None
        self._generation += 1
        log.info("node %d stopped acting as controller: %s", self.quorum.node_id, why)
        self._fail_queued()

    def _fail_queued(self) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_result(Outcome(E.ERROR_CODE_NOT_CONTROLLER, _NOT_ACTIVE))

    def controller_hint(self) -> tuple[int, str]:
        """The active controller's node id and gRPC ``host:port`` as this voter knows them."""
        leader = self.quorum.leader_id
        if leader is None:
            return NO_LEADER, ""
        n = self.quorum.metadata.nodes.get(leader)
        return leader, (f"{n.host}:{n.port}" if n is not None else "")

    # ---------------------------------------------------------------- tasks

    async def _tick_loop(self) -> None:
        while True:
            try:
                c = self._check_role()
                if c is not None:
                    commands = c.tick(self._clock_ms())
                    if commands:
                        self._enqueue(commands)
            except Exception:
                log.exception("controller tick failed")
            await asyncio.sleep(self._interval_s())

    async def _propose_loop(self) -> None:
        window = asyncio.Semaphore(self._max_in_flight)
        while True:
            item = await self._queue.get()
            large = isinstance(item.command, CreateTopic) and (
                len(item.command.assignments) >= LARGE_COMMAND_PARTITIONS
            )
            if large:
                await self._drain()
            if item.future.done():
                continue
            if item.generation != self._generation or self._controller is None:
                item.future.set_result(Outcome(E.ERROR_CODE_NOT_CONTROLLER, _NOT_ACTIVE))
                continue
            await window.acquire()
            # Created in queue order, so their first steps (which append to the Raft log) run in it.
            task = self._loop.create_task(self._propose_one(item, window))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
            if large:
                await self._drain()

    async def _drain(self) -> None:
        """Wait until every proposal in flight has its outcome."""
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))

    async def _propose_one(self, item: _Queued, window: asyncio.Semaphore) -> None:
        try:
            result = await self.quorum.propose_async(item.command, self._propose_timeout_s)
        except asyncio.CancelledError:
            if not item.future.done():
                item.future.set_result(Outcome(E.ERROR_CODE_NOT_CONTROLLER, "the controller is stopping"))
            raise
        except QuorumError as e:
            if not item.future.done():
                item.future.set_result(Outcome(e.code, str(e)))
            return
        except Exception as e:  # a command the encoder refuses: a bug, reported to the one caller
            log.exception("proposing %r failed", type(item.command).__name__)
            if not item.future.done():
                item.future.set_result(Outcome(E.ERROR_CODE_UNKNOWN_SERVER_ERROR, str(e)))
            return
        finally:
            window.release()
        c = self._controller
        if c is not None and item.generation == self._generation:
            c.metadata = self.quorum.metadata
            c.on_applied(item.command, result)
        if not item.future.done():
            code = E.ERROR_CODE_NONE if result.ok else result.error_code
            item.future.set_result(Outcome(code, result.message, result))

    def _enqueue(self, commands: Iterable[Command]) -> list[asyncio.Future[Outcome]]:
        """Queue commands of the current generation, in order; each future settles on its outcome."""
        futures = []
        commands = list(commands)
        low_space = bool(commands) and self.quorum.low_space
        for cmd in commands:
            f: asyncio.Future[Outcome] = self._loop.create_future()
            if low_space:
                f.set_result(
                    Outcome(
                        E.ERROR_CODE_STORAGE_ERROR, "the metadata log's disk is full; nothing was changed"
                    )
                )
                futures.append(f)
                continue
            try:
                self._queue.put_nowait(_Queued(self._generation, cmd, f))
            except asyncio.QueueFull:
                f.set_result(Outcome(E.ERROR_CODE_REQUEST_TIMED_OUT, "the controller's queue is full"))
            futures.append(f)
        return futures

    async def _run(self, commands: Iterable[Command]) -> list[Outcome]:
        return list(await asyncio.gather(*self._enqueue(commands)))

    # ---------------------------------------------------------------- requests

    async def register(self, node_id: int, incarnation_id: bytes, host: str, port: int, rack: str) -> Outcome:
        """Register a node; the committed ``Result`` carries its new ``broker_epoch``."""
        c = self._check_role()
        if c is None:
            return Outcome(E.ERROR_CODE_NOT_CONTROLLER, _NOT_ACTIVE)
        commands = c.on_register(node_id, incarnation_id, host, port, rack, self._clock_ms())
        outcomes = await self._run(commands)
        return outcomes[-1] if outcomes else Outcome(E.ERROR_CODE_NOT_CONTROLLER, _NOT_ACTIVE)

    async def heartbeat(
        self, node_id: int, broker_epoch: int, want_fence: bool = False, want_shutdown: bool = False
    ) -> HeartbeatOutcome:
        """Renew a node's lease; answered after the commands it caused (unfence, fence, leadership
        moves) have committed and applied here."""
        c = self._check_role()
        if c is None:
            return HeartbeatOutcome(E.ERROR_CODE_NOT_CONTROLLER, _NOT_ACTIVE)
        decision = c.on_heartbeat(
            node_id, broker_epoch, self._clock_ms(), want_fence=want_fence, controlled_shutdown=want_shutdown
        )
        if not decision.ok:
            return HeartbeatOutcome(decision.error_code, decision.message)
        for o in await self._run(decision.commands):
            # A rejected decision (an epoch moved on meanwhile) is not the node's error: its state
            # below says where it stands, and the next heartbeat decides afresh. Quorum errors are.
            if o.result is None and not o.ok:
                return HeartbeatOutcome(o.error_code, o.message)
        md = self.quorum.metadata
        n = md.nodes.get(node_id)
        if n is None or n.broker_epoch != broker_epoch:
            return HeartbeatOutcome(E.ERROR_CODE_STALE_BROKER_EPOCH, "the node registered again meanwhile")
        return HeartbeatOutcome(
            E.ERROR_CODE_NONE,
            decision.message,
            is_fenced=n.fenced,
            shutdown_ready=decision.shutdown_ready and n.fenced,
            metadata_offset=md.metadata_offset,
        )

    async def alter_partition(self, request: AlterPartition) -> Outcome:
        """A partition leader's ISR compare-and-set; the state machine checks every epoch.

        A request whose ``request_id`` the applied metadata remembers for this partition is a copy
        of one answered before: it gets that first answer, checked before any epoch, and nothing is
        proposed. A copy that races the first one's commit is proposed, and the state machine
        answers it the same way (``ClusterMetadata``'s remembered answers)."""
        if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
            return Outcome(
                E.ERROR_CODE_INVALID_REQUEST, f"request id is longer than {MAX_REQUEST_ID_LENGTH} characters"
            )
        if self._check_role() is None:
            return Outcome(E.ERROR_CODE_NOT_CONTROLLER, _NOT_ACTIVE)
        md = self.quorum.metadata
        first = md.partition_request_answer(request.request_id, request.topic_id, request.partition)
        if first is not None:
            result = first.result(first.metadata_offset)
            return Outcome(E.ERROR_CODE_NONE if result.ok else result.error_code, result.message, result)
        return (await self._run([request]))[0]

    async def elect_leaders(
        self, partitions: Iterable[tuple[bytes, int]] | None, preferred: bool
    ) -> Outcome | list[ElectionOutcome]:
        """Preferred: move leadership to each partition's first replica. Otherwise: elect the first
        live ISR member of each leaderless partition. ``None`` means every partition that needs it
        and can have it. One answer per distinct partition, in the order first named.

        An election the state machine would reject (``_election_refusal``) is answered here and not
        proposed, so it takes no metadata offset. The whole request is NOT_CONTROLLER when every
        election it proposed failed with NOT_CONTROLLER (leadership was lost midway)."""
        wanted: list[tuple[bytes, int]] | None = None
        if partitions is not None:
            # Deduplicated first: the same partition named twice must not give two ElectLeaders.
            wanted = list(dict.fromkeys(partitions))
            if len(wanted) > MAX_ELECT_PARTITIONS:
                return Outcome(
                    E.ERROR_CODE_INVALID_REQUEST,
                    f"the request names {len(wanted)} partitions; the limit is {MAX_ELECT_PARTITIONS}",
                )
        if self._check_role() is None:
            return Outcome(E.ERROR_CODE_NOT_CONTROLLER, _NOT_ACTIVE)
        md = self.quorum.metadata
        live = md.unfenced_nodes()
        if wanted is None:
            wanted = [
                (tid, i)
                for tid, t in sorted(md.topics.items())
                for i, p in enumerate(t.partitions)
                if _election_needed(p, preferred) and _election_refusal(t, p, live, preferred) is None
            ]
        out: list[ElectionOutcome | None] = []
        commands: list[Command] = []
        for tid, i in wanted:
            p = md.partition(tid, i)
            if p is None:
                out.append(
                    ElectionOutcome(tid, i, E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION, "no such partition")
                )
            elif not _election_needed(p, preferred):
                out.append(
                    ElectionOutcome(
                        tid, i, E.ERROR_CODE_NONE, "election not needed", p.leader, p.leader_epoch
                    )
                )
            elif (refusal := _election_refusal(md.topics[tid], p, live, preferred)) is not None:
                out.append(ElectionOutcome(tid, i, *refusal))
            else:
                commands.append(
                    ElectLeader(tid, i, p.replicas[0] if preferred else NO_LEADER, p.leader_epoch)
                )
                out.append(None)
        outcomes = await self._run(commands)
        if outcomes and all(o.error_code == E.ERROR_CODE_NOT_CONTROLLER for o in outcomes):
            # Leadership was lost midway: the caller asks the new controller for the whole request.
            return Outcome(E.ERROR_CODE_NOT_CONTROLLER, "this voter stopped being the active controller")
        proposed = iter(outcomes)
        results: list[ElectionOutcome] = []
        for (tid, i), done in zip(wanted, out, strict=True):
            if done is not None:
                results.append(done)
                continue
            o = next(proposed)
            r = o.result
            if r is not None and r.ok:
                results.append(
                    ElectionOutcome(tid, i, E.ERROR_CODE_NONE, r.message, r.leader_id, r.leader_epoch)
                )
            else:
                results.append(ElectionOutcome(tid, i, o.error_code, o.message))
        return results

    async def create_topic(
        self,
        name: str,
        partitions: int,
        replication_factor: int,
        configs: Iterable[tuple[str, str]] = (),
        topic_id: bytes | None = None,
        assignments: tuple[tuple[int, ...], ...] | None = None,
        validate_only: bool = False,
        request_id: str = "",
    ) -> Outcome:
        """Place and create a topic (or take the ``assignments`` given); the outcome's message is
        empty on success. ``validate_only`` checks and places, and proposes nothing.

        The cluster keeps at most ``max_partitions``: counted over the applied metadata and the
        creations this controller has proposed but not yet applied, so concurrent requests cannot
        pass it together."""
        c = self._check_role()
        if c is None:
            return Outcome(E.ERROR_CODE_NOT_CONTROLLER, _NOT_ACTIVE)
        count = len(assignments) if assignments else partitions
        if self.max_partitions is not None:
            have = self.quorum.metadata.partition_count + self._reserved_partitions
            if have + count > self.max_partitions:
                return Outcome(
                    E.ERROR_CODE_POLICY_VIOLATION,
                    f"the cluster has {have} partitions; {count} more would pass "
                    f"max_partitions={self.max_partitions}",
                )
        configs = tuple(configs)
        decided = c.create_topic(
            name,
            len(assignments) if assignments else partitions,
            len(assignments[0]) if assignments else replication_factor,
            configs,
            topic_id or uuid.uuid4().bytes,
            self._clock_ms(),
        )
        if isinstance(decided, Refusal):
            return Outcome(decided.error_code, decided.message)
        decided = CreateTopic(
            decided.name, decided.topic_id, assignments or decided.assignments, decided.configs, request_id
        )
        if validate_only:
            # Dry run on a copy: the state machine's own checks (unknown or fenced nodes in the
            # assignments, a replica named twice) answer, and nothing is proposed.
            dry = self.quorum.metadata.copy().apply(decided)
            return Outcome(dry.error_code, dry.message)
        self._reserved_partitions += count
        try:
            return (await self._run([decided]))[0]
        finally:
            self._reserved_partitions -= count

    async def delete_topic(self, name: str, request_id: str = "") -> Outcome:
        """Delete a topic by name (the command carries its id, so a newer namesake is safe)."""
        if self._check_role() is None:
            return Outcome(E.ERROR_CODE_NOT_CONTROLLER, _NOT_ACTIVE)
        record = self.quorum.metadata.topic(name)
        if record is None:
            return Outcome(E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION, f"topic {name!r} does not exist")
        return (await self._run([DeleteTopic(name, record.topic_id, request_id)]))[0]

    async def alter_configs(
        self, name: str, set_: Iterable[tuple[str, str]], delete: Iterable[str], request_id: str = ""
    ) -> Outcome:
        """Set and delete topic configs; the state machine validates them."""
        if self._check_role() is None:
            return Outcome(E.ERROR_CODE_NOT_CONTROLLER, _NOT_ACTIVE)
        return (await self._run([AlterConfigs(name, tuple(set_), tuple(delete), request_id)]))[0]

    # ---------------------------------------------------------------- every voter

    def describe(self) -> dict[str, object]:
        """Facts for DescribeCluster from this voter's applied metadata. Never the secret."""
        status = self.quorum.status()
        controller_id, _ = self.controller_hint()
        return {
            "controller_id": controller_id,
            "answered_by": status["node_id"],
            "raft_term": status["raft_term"],
            "commit_index": status["commit_index"],
            "metadata_offset": status["metadata_offset"],
            "voters": status["voters"],
            "cluster_id": self.cluster_id,
        }

    async def watch(
        self, from_offset: int, poll_s: float = 1.0
    ) -> AsyncIterator[ClusterMetadata | FeedEntry]:
        """The metadata log from ``from_offset``: a ``ClusterMetadata`` snapshot when that offset is
        negative or not retained (then deltas after it), and every ``FeedEntry`` in offset order."""
        if self.feed is None:
            raise RuntimeError("WatchMetadata needs a MetadataFeed wired to the quorum")
        feed = self.feed
        next_offset = from_offset
        need_snapshot = from_offset < 0
        while not self._stopped:
            if not need_snapshot:
                changed = feed.changed_event()
                entries = feed.entries_from(next_offset)
                if entries is None and next_offset > self.quorum.metadata_offset:
                    entries = []  # nothing applied past the caller yet: wait
                if entries is None:
                    need_snapshot = True
                else:
                    for e in entries:
                        assert e.metadata_offset == next_offset
                        yield e
                        next_offset += 1
                    if not entries:
                        await feed.wait_changed(changed, poll_s)
                    continue
            md = self.quorum.metadata  # published before its command reached the feed
            yield md
            next_offset = md.metadata_offset + 1
            need_snapshot = False
