"""The follower side of ``ReplicationService.Replicate`` (replication.proto): copy the leaders' logs.

``FetcherManager`` keeps one ``_LeaderFetcher`` per leader node that this node follows partitions
of. Each holds one Replicate stream to its leader, with at most one request in flight; every
request names every partition followed from that leader, with the follower's log end as
``fetch_offset`` and its latest epoch as ``last_fetched_epoch`` (KIP-320's fetch-time divergence
check). ``Replicas.apply`` tells the manager after each metadata image which partitions follow
which leader (``FetcherManager.update``).

``apply_answer`` is what a follower does with one partition's answer, as replication.proto lists
it: append the leader's batches verbatim, truncate on ``diverging_epoch`` (KIP-279), truncate or
restart the log on OFFSET_OUT_OF_RANGE (Kafka's AbstractFetcherThread), and stop fetching a
partition whose metadata is behind (FENCED_LEADER_EPOCH) until the next image.

A request's ``fetch_offset`` is the follower's word that it holds every record below: the leader
counts it toward its high watermark and ISR. So under ``flush_policy=fsync`` a follower syncs what
an answer wrote before it sends the next request: one write-ahead-log sync per answer, shared by
all its partitions (group commit, off the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from headwater.node.partition import Partition, Role
from headwater.node.replica_state import EpochEndOffset, truncation_offset
from headwater.storage import StorageError
from headwater.v1 import errors_pb2, replication_pb2, replication_pb2_grpc

if TYPE_CHECKING:
    from headwater.node.auth import NodeAuth
    from headwater.raft.metadata import ClusterMetadata

__all__ = ["Answer", "FetcherManager", "Requested", "apply_answer"]

E = errors_pb2
R = replication_pb2
log = logging.getLogger("headwater.node.fetcher")
Key = tuple[str, int]

# Default bounds of the fetch loop (settings replica_fetch_wait_max_ms, replica_fetch_max_bytes;
# the leader bounds max_wait_ms and max_bytes by its own maxima too).
FETCH_MAX_WAIT_MS = 500
FETCH_MAX_BYTES = 8 * 1024 * 1024
# Longest wait for an answer beyond max_wait_ms before the stream is taken for dead.
ANSWER_GRACE_S = 10.0
# Back-off after a stream error (doubling, with jitter) and for a partition answered with a
# retriable error.
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
PARTITION_BACKOFF_S = 0.5


class Answer(enum.Enum):
    """What the fetcher does with a partition after ``apply_answer``."""

    CONTINUE = "continue"  # fetch it again at once
    BACK_OFF = "back_off"  # fetch it again after PARTITION_BACKOFF_S
    AWAIT_METADATA = "await_metadata"  # fetch it again only once the image gives new epochs


@dataclass(frozen=True, slots=True)
class Requested:
    """What a request said of one partition: its answer applies only if this still holds."""

    leader_id: int
    leader_epoch: int
    fetch_offset: int


def request_for(p: Partition) -> R.ReplicatePartitionRequest:
    return R.ReplicatePartitionRequest(
        topic_id=p.topic_id,
        partition=p.index,
        current_leader_epoch=p.leader_epoch,
        fetch_offset=p.log.log_end_offset,
        last_fetched_epoch=p.log.latest_epoch,
        log_start_offset=p.log.log_start_offset,
    )


def apply_answer(p: Partition, asked: Requested, answer: R.ReplicatePartitionResponse) -> Answer:
    """Apply one partition's answer to the follower replica ``p`` (replication.proto, "What the
    follower does with each answer"). An answer to a request the replica has moved on from (a new
    role, leader or epoch, or a log end that changed meanwhile) changes nothing. Nothing here is
    synced: under flush_policy=fsync the fetcher syncs once for all of an answer's partitions."""
    if (
        p.role is not Role.FOLLOWER
        or p.leader_id != asked.leader_id
        or p.leader_epoch != asked.leader_epoch
        or p.log.log_end_offset != asked.fetch_offset
    ):
        return Answer.CONTINUE
    plog = p.log
    code = answer.error_code
    try:
        if code == E.ERROR_CODE_FENCED_LEADER_EPOCH:
            return Answer.AWAIT_METADATA
        if code == E.ERROR_CODE_OFFSET_OUT_OF_RANGE:
            if answer.log_end_offset < asked.fetch_offset:
                # Kafka's rule for a leader whose log ends below ours (after an unclean election).
                plog.truncate_to(answer.log_end_offset)
            elif asked.fetch_offset < answer.log_start_offset:
                # Retention moved the leader's start past our end: nothing here can be compared.
                plog.truncate_fully_and_start_at(answer.log_start_offset)
            else:
                return Answer.BACK_OFF
            p.on_log_changed()
            return Answer.CONTINUE
        if code != E.ERROR_CODE_NONE:
            # UNKNOWN_LEADER_EPOCH, NOT_LEADER_OR_FOLLOWER, unknown topic: retriable, truncate nothing.
            return Answer.BACK_OFF
        if answer.HasField("diverging_epoch"):
            d = answer.diverging_epoch
            cut = truncation_offset(
                plog.epoch_entries(),
                plog.log_end_offset,
                EpochEndOffset(d.epoch, d.end_offset),
                high_watermark=p.high_watermark,
            )
            log.info(
                "%s-%d diverged from leader %d at epoch %d (ends at %d): truncating to %d",
                p.topic,
                p.index,
                asked.leader_id,
                d.epoch,
                d.end_offset,
                cut,
            )
            # Truncate before appending anything more; the high-watermark checkpoint follows.
            plog.truncate_to(cut)
            p.on_log_changed()
            return Answer.CONTINUE
        if answer.batches:
            # The leader's bytes, offsets and epochs; all or none, in one write (append_replicated).
            plog.append_replicated(list(answer.batches))
        if answer.log_start_offset > plog.log_start_offset:
            plog.delete_before(min(answer.log_start_offset, plog.log_end_offset))
            p.on_log_changed()
    except StorageError as e:
        # A batch that does not continue the log is a leader bug or a stale answer: drop it.
        log.warning("%s-%d: answer from leader %d not applied: %s", p.topic, p.index, asked.leader_id, e)
        return Answer.BACK_OFF
    # A follower's high watermark: never past what it holds itself. It serves no client reads (it is
    # not the leader); it is what it keeps if it becomes the leader.
    hw = max(plog.log_start_offset, min(answer.high_watermark, plog.log_end_offset))
    p.advance_high_watermark(hw)
    return Answer.CONTINUE


@dataclass
class _Hold:
    """A partition left out of requests: until ``until_s``, or until its epochs change."""

    leader_epoch: int
    partition_epoch: int
    until_s: float


class _LeaderFetcher:
    """The Replicate stream to one leader node and the partitions copied over it."""

    def __init__(self, manager: FetcherManager, leader_id: int) -> None:
        self.manager = manager
        self.leader_id = leader_id
        self.partitions: dict[Key, Partition] = {}
        self.holds: dict[Key, _Hold] = {}
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def set_partitions(self, partitions: Mapping[Key, Partition]) -> None:
        self.partitions = dict(partitions)
        for key in list(self.holds):
            p = self.partitions.get(key)
            h = self.holds[key]
            if p is None or (p.leader_epoch, p.partition_epoch) != (h.leader_epoch, h.partition_epoch):
                del self.holds[key]
        self.changed.set()

    def _fetchable(self, now_s: float) -> tuple[list[Partition], float]:
        """The partitions to name in the next request, and when the earliest hold ends."""
        out: list[Partition] = []
        wake = math.inf
        for key, p in self.partitions.items():
            h = self.holds.get(key)
            if h is not None:
                if h.until_s > now_s:
                    wake = min(wake, h.until_s)
                    continue
                del self.holds[key]
            if p.role is Role.FOLLOWER and p.leader_id == self.leader_id:
                out.append(p)
        return out, wake

    async def run(self) -> None:
        backoff_s = BACKOFF_MIN_S
        failures = 0  # in a row; only the first of a streak is logged at info (a dead leader)
        while True:
            progressed = False
            try:
                progressed = await self._stream()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                log.log(
                    logging.DEBUG if failures else logging.INFO,
                    "replicate stream to node %d ended: %s %s",
                    self.leader_id,
                    e.code(),
                    e.details(),
                )
            except TimeoutError:
                log.info("node %d did not answer a replicate request in time", self.leader_id)
            except Exception:
                log.exception("replicate stream to node %d failed", self.leader_id)
            failures = 0 if progressed else failures + 1
            backoff_s = BACKOFF_MIN_S if progressed else min(BACKOFF_MAX_S, backoff_s * 2)
            await asyncio.sleep(backoff_s * (0.5 + self.manager.rng.random()))

    async def _wait_for_work(self) -> list[Partition]:
        while True:
            parts, wake_s = self._fetchable(self.manager.clock())
            if parts:
                return parts
            self.changed.clear()
            timeout = None if wake_s == math.inf else max(0.0, wake_s - self.manager.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout)

    async def _stream(self) -> bool:
        """One stream, until it fails or this node's broker epoch changes; True if any answer came."""
        manager = self.manager
        parts = await self._wait_for_work()
        address = manager.address_of(self.leader_id)
        broker_epoch = manager.broker_epoch()
        if address is None or broker_epoch < 0 or manager.auth is None:
            return False
        stub = replication_pb2_grpc.ReplicationServiceStub(manager.channel(address))  # type: ignore[no-untyped-call]
        call: Any = stub.Replicate()
        answered = False
        try:
            first = True
            while True:
                if not first:
                    parts = await self._wait_for_work()
                if manager.broker_epoch() != broker_epoch:
                    return answered  # re-registered: a new stream carries the new epoch
                asked = {
                    (p.topic, p.index): Requested(p.leader_id, p.leader_epoch, p.log.log_end_offset)
                    for p in parts
                }
                request = R.ReplicateRequest(
                    replica_id=manager.node_id,
                    broker_epoch=broker_epoch,
                    partitions=[request_for(p) for p in parts],
                    max_wait_ms=manager.max_wait_ms,
                    max_bytes=manager.max_bytes,
                )
                if first:
                    request.node_token = manager.auth.token(request)
                    first = False
                await call.write(request)
                response = await asyncio.wait_for(call.read(), manager.max_wait_ms / 1000 + ANSWER_GRACE_S)
                if response is grpc.aio.EOF:
                    return answered
                answered = True
                if response.error_code != E.ERROR_CODE_NONE:
                    # STALE_BROKER_EPOCH or NODE_NOT_AVAILABLE: our registration has not reached
                    # the leader yet, or this incarnation is behind; back off, then a new stream.
                    log.info("node %d refused replication: %s", self.leader_id, response.error_message)
                    return False
                if self._apply(parts, asked, response):
                    # Synced before the next request tells the leader these records are held.
                    await manager.sync_wal()
        finally:
            call.cancel()

    def _apply(self, parts: list[Partition], asked: dict[Key, Requested], response: Any) -> bool:
        """Apply every partition's answer; True when a flush_policy=fsync partition was written
        (appended, truncated or trimmed: the caller syncs once for all of them)."""
        now_s = self.manager.clock()
        by_key = {(p.topic_id, p.index): p for p in parts}
        needs_sync = False
        for answer in response.partitions:
            p = by_key.get((answer.topic_id, answer.partition))
            if p is None:
                continue
            key = (p.topic, p.index)
            if self.partitions.get(key) is not p:
                continue  # dropped or moved while the request was out
            start, end = p.log.log_start_offset, p.log.log_end_offset
            outcome = apply_answer(p, asked[key], answer)
            if self.manager.on_copied is not None and p.log.log_end_offset > end:
                self.manager.on_copied(sum(b.ByteSize() for b in answer.batches))
            changed = (p.log.log_start_offset, p.log.log_end_offset) != (start, end)
            if changed and self.manager.sync_for(p):
                needs_sync = True
            if outcome is Answer.BACK_OFF:
                self.holds[key] = _Hold(p.leader_epoch, p.partition_epoch, now_s + PARTITION_BACKOFF_S)
            elif outcome is Answer.AWAIT_METADATA:
                self.holds[key] = _Hold(p.leader_epoch, p.partition_epoch, math.inf)
        return needs_sync


async def _no_sync() -> None:
    return None


class FetcherManager:
    """This node's fetchers: one per leader node it follows partitions of (see the module docstring).

    ``update`` may run before ``start``; fetching begins with ``start`` and ends with ``close``.
    """

    def __init__(
        self,
        node_id: int,
        *,
        image: Callable[[], ClusterMetadata],
        channel: Callable[[str], grpc.aio.Channel],
        auth: NodeAuth | None,
        broker_epoch: Callable[[], int],
        sync_for: Callable[[Partition], bool] = lambda p: False,
        sync_wal: Callable[[], Awaitable[None]] | None = None,
        max_wait_ms: int = FETCH_MAX_WAIT_MS,
        max_bytes: int = FETCH_MAX_BYTES,
        on_copied: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self._image = image
        self.channel = channel
        self.auth = auth
        self.broker_epoch = broker_epoch
        # Whether a replica's topic has flush_policy=fsync, and the sync its writes wait for.
        self.sync_for = sync_for
        self.sync_wal = sync_wal or _no_sync
        self.max_wait_ms = max_wait_ms
        self.max_bytes = max_bytes
        # Told the batch bytes of each answer appended (a metric).
        self.on_copied = on_copied
        self.clock = clock
        self.rng = rng or random.Random()
        self.fetchers: dict[int, _LeaderFetcher] = {}
        # Fetchers of leaders no longer followed, cancelled and not yet ended.
        self._ending: set[asyncio.Task[None]] = set()
        self._started = False

    def address_of(self, node_id: int) -> str | None:
        node = self._image().nodes.get(node_id)
        return None if node is None else f"{node.host}:{node.port}"

    def update(self, replicas: Iterable[Partition]) -> None:
        """Follow what the latest image says: each follower replica fetched from its leader."""
        wanted: dict[int, dict[Key, Partition]] = {}
        for p in replicas:
            if p.role is Role.FOLLOWER and p.leader_id >= 0 and p.leader_id != self.node_id:
                wanted.setdefault(p.leader_id, {})[(p.topic, p.index)] = p
        for leader_id in list(self.fetchers):
            if leader_id not in wanted:
                self._stop(self.fetchers.pop(leader_id))
        for leader_id, parts in wanted.items():
            f = self.fetchers.get(leader_id)
            if f is None:
                f = self.fetchers[leader_id] = _LeaderFetcher(self, leader_id)
                if self._started:
                    self._launch(f)
            f.set_partitions(parts)

    def start(self) -> None:
        self._started = True
        for f in self.fetchers.values():
            if f.task is None:
                self._launch(f)

    def _launch(self, f: _LeaderFetcher) -> None:
        f.task = asyncio.get_running_loop().create_task(f.run(), name=f"fetcher-{f.leader_id}")

    def _stop(self, f: _LeaderFetcher) -> None:
        if f.task is not None:
            f.task.cancel()
            self._ending.add(f.task)
            f.task.add_done_callback(self._ending.discard)

    async def close(self) -> None:
        """Stop every fetcher and wait for them (before the store closes)."""
        self._started = False
        tasks = [f.task for f in self.fetchers.values() if f.task is not None] + list(self._ending)
        self.fetchers.clear()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
