"""One partition replica on this node: its role, leader epoch, high watermark and parked waiters.

The role is an explicit state (Kafka's ``Partition``): a replica is the leader or a follower of a
given ``leader_epoch``, as the metadata image says (``follow``), and every request that names an
epoch is checked here, in one place. Followers copy the leader's log (``fetcher.py``); a follower's
high watermark is the leader's, bounded by its own log end.

A leader keeps a ``ReplicaState`` (replica_state.py, the pure core) for its leadership: followers'
fetches (``on_follower_fetch``) and its own appends (``on_append``) feed it, and its high watermark,
the smallest log end over the maximal ISR, is the partition's. acks=all waiters park in it
(``wait_for_commit``) and are answered as it releases them. ISR changes it proposes are sent by
``isr.py``.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from headwater.node.replica_state import AckRelease, FetchOutcome, ReplicaState
from headwater.raft.metadata import PartitionRecord
from headwater.storage import PartitionLog
from headwater.v1 import errors_pb2

__all__ = ["Role", "Partition", "EpochCheck", "compare_leader_epoch"]

E = errors_pb2


class Role(enum.Enum):
    LEADER = "leader"
    FOLLOWER = "follower"


@dataclass(frozen=True)
class EpochCheck:
    error_code: errors_pb2.ErrorCode
    message: str = ""


_OK = EpochCheck(E.ERROR_CODE_NONE)


def compare_leader_epoch(current_leader_epoch: int, leader_epoch: int) -> EpochCheck:
    """A requester's ``current_leader_epoch`` against this node's ``leader_epoch`` (KIP-320): older is
    FENCED_LEADER_EPOCH (the requester's metadata is behind), newer UNKNOWN_LEADER_EPOCH (ours is)."""
    if current_leader_epoch < leader_epoch:
        return EpochCheck(
            E.ERROR_CODE_FENCED_LEADER_EPOCH,
            f"leader epoch {current_leader_epoch} is older than the current {leader_epoch}",
        )
    if current_leader_epoch > leader_epoch:
        return EpochCheck(
            E.ERROR_CODE_UNKNOWN_LEADER_EPOCH,
            f"leader epoch {current_leader_epoch} is newer than the current {leader_epoch}",
        )
    return _OK


class Partition:
    """A replica of ``(topic, index)`` on this node."""

    def __init__(
        self,
        topic: str,
        topic_id: bytes,
        index: int,
        log: PartitionLog,
        *,
        node_id: int,
        leader_epoch: int = 0,
    ) -> None:
        self.topic = topic
        self.topic_id = topic_id
        self.index = index
        self.log = log
        self.node_id = node_id
        self.role = Role.LEADER
        self.leader_id = node_id
        self.leader_epoch = leader_epoch
        self.partition_epoch = 0
        self.replicas: tuple[int, ...] = (node_id,)
        self.isr: tuple[int, ...] = (node_id,)
        # Parked long-poll fetches and Subscribe streams, woken when the high watermark moves.
        self._waiters: set[asyncio.Future[None]] = set()
        # Parked follower fetches (Replicate), woken when the log grows or the role changes.
        self._replica_waiters: set[asyncio.Future[None]] = set()
        # The leader's replica state for its current leadership; None on a follower.
        self.state: ReplicaState | None = None
        # acks=all waiters by id: each future gets an error code once the replica state releases
        # it (NONE when the high watermark passed it) or the leadership ends.
        self._commit_waiters: dict[int, asyncio.Future[int]] = {}
        self._commit_seq = 0
        # The one high watermark: loaded from the log's checkpoint, written back by
        # ``checkpoint_high_watermark`` (on a timer and at shutdown).
        self._high_watermark: int = log.high_watermark

    @property
    def high_watermark(self) -> int:
        return self._high_watermark

    def check_leader(self, current_leader_epoch: int) -> EpochCheck:
        """Is this replica the leader a request expects? (KIP-320 fencing by ``current_leader_epoch``)."""
        if self.role is not Role.LEADER:
            return EpochCheck(
                E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER,
                f"node {self.node_id} is not the leader of {self.topic}-{self.index}"
                + (f"; node {self.leader_id} is" if self.leader_id >= 0 else "; it has no leader now"),
            )
        if current_leader_epoch >= 0:
            return compare_leader_epoch(current_leader_epoch, self.leader_epoch)
        return _OK

    def check_replicate(self, replica_id: int, current_leader_epoch: int) -> EpochCheck:
        """May follower ``replica_id`` fetch from this replica? The checks of replication.proto in its
        order: the epoch first (so a follower whose metadata is behind learns that, not who leads),
        then this node's leadership and the follower's membership at that epoch."""
        epoch = compare_leader_epoch(current_leader_epoch, self.leader_epoch)
        if epoch.error_code != E.ERROR_CODE_NONE:
            return epoch
        if self.role is not Role.LEADER:
            return self.check_leader(current_leader_epoch)
        if replica_id == self.node_id or replica_id not in self.replicas:
            return EpochCheck(
                E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER,
                f"node {replica_id} is not a follower of {self.topic}-{self.index} "
                f"(replicas {list(self.replicas)})",
            )
        return _OK

    def follow(
        self,
        leader_id: int,
        leader_epoch: int,
        partition_epoch: int,
        replicas: tuple[int, ...],
        isr: tuple[int, ...],
        *,
        broker_epoch: int = -1,
        now_ms: int = 0,
    ) -> None:
        """Take the role and epochs the metadata image gives this replica. A change of leader or
        epoch wakes parked readers, so they answer from the new role (NOT_LEADER_OR_FOLLOWER).
        Becoming leader starts a ``ReplicaState`` for the leadership (at this node's
        ``broker_epoch``); newer metadata of the same leadership goes to it."""
        role = Role.LEADER if leader_id == self.node_id else Role.FOLLOWER
        moved = role is not self.role or leader_epoch != self.leader_epoch or leader_id != self.leader_id
        record = PartitionRecord(replicas, isr, leader_id, leader_epoch, partition_epoch)
        self.role, self.leader_id, self.leader_epoch = role, leader_id, leader_epoch
        self.partition_epoch, self.replicas, self.isr = partition_epoch, replicas, isr
        if moved or role is not Role.LEADER:
            self._end_leadership()
        if role is Role.LEADER:
            if self.state is None:
                leo = self.log.log_end_offset
                self.state = ReplicaState(
                    node_id=self.node_id,
                    topic_id=self.topic_id,
                    partition=self.index,
                    broker_epoch=broker_epoch,
                    record=record,
                    log_end_offset=leo,
                    high_watermark_checkpoint=min(max(self._high_watermark, 0), leo),
                    now_ms=now_ms,
                )
                self.settle(self.state.on_leader_append(leo))
            else:
                self.settle(self.state.on_metadata(record, now_ms))
        if moved:
            self.wake()
            self.wake_replicas()

    # ----------------------------------------------------------------- the leader's replica state

    def on_follower_fetch(
        self,
        replica_id: int,
        fetch_offset: int,
        *,
        current_leader_epoch: int,
        last_fetched_epoch: int,
        now_ms: int,
    ) -> FetchOutcome | None:
        """A follower's fetch, counted by the leader's replica state (None: not the leader)."""
        if self.state is None:
            return None
        outcome = self.state.on_follower_fetch(
            replica_id,
            fetch_offset,
            current_leader_epoch=current_leader_epoch,
            last_fetched_epoch=last_fetched_epoch,
            epoch_entries=self.log.epoch_entries(),
            now_ms=now_ms,
        )
        self.settle(outcome.released)
        return outcome

    def on_append(self, end_offset: int) -> None:
        """The leader's records below ``end_offset`` count toward the high watermark (appended, and
        synced under flush_policy=fsync); parked followers wake to copy them."""
        if self.state is not None and end_offset > self.state.log_end_offset:
            self.settle(self.state.on_leader_append(min(end_offset, self.log.log_end_offset)))
        self.wake_replicas()

    def settle(self, released: tuple[AckRelease, ...]) -> None:
        """Answer the acks=all waiters the replica state released, and take its high watermark."""
        for r in released:
            fut = self._commit_waiters.pop(r.waiter_id, None)
            if fut is not None and not fut.done():
                fut.set_result(r.error_code)
        if self.state is not None and self.state.high_watermark > self._high_watermark:
            self._high_watermark = min(self.state.high_watermark, self.log.log_end_offset)
            self.wake()

    def advance_high_watermark(self, offset: int) -> None:
        """A follower learnt the leader's high watermark (bounded by its own log end); wakes readers."""
        assert self.log.log_start_offset <= offset <= self.log.log_end_offset, (
            offset,
            self.log.log_end_offset,
        )
        if offset > self._high_watermark:
            self._high_watermark = offset
            self.wake()
        elif offset < self._high_watermark:
            # Only truncation below the high watermark moves it back.
            self._high_watermark = offset

    def _within_log(self) -> int:
        return min(max(self._high_watermark, self.log.log_start_offset), self.log.log_end_offset)

    def checkpoint_high_watermark(self, *, sync: bool = False) -> None:
        """Write the high watermark to the log's checkpoint (where a restart loads it from)."""
        self.log.checkpoint_high_watermark(self._within_log(), sync=sync)

    def on_log_changed(self) -> None:
        """After retention or truncation: keep the high watermark inside the log."""
        self._high_watermark = self._within_log()

    # ----------------------------------------------------------------- acks=all waiters

    def wait_for_commit(self, offset: int, min_insync_replicas: int = 1) -> asyncio.Future[int]:
        """A future that gets ERROR_CODE_NONE once the high watermark reaches ``offset`` (the
        offset after a write's last record) with at least ``min_insync_replicas`` in the ISR, or
        the error that ended the wait (NOT_ENOUGH_REPLICAS_AFTER_APPEND, NOT_LEADER_OR_FOLLOWER).
        Cancel it (a timeout) and the replica state forgets it."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self.state is None or offset > self.state.log_end_offset:
            # Not the leader, or a leadership that does not count those records (it began after a
            # truncation while the append waited for its sync): this one cannot vouch for them.
            fut.set_result(errors_pb2.ERROR_CODE_NOT_LEADER_OR_FOLLOWER)
            return fut
        self._commit_seq += 1
        waiter_id = self._commit_seq
        self._commit_waiters[waiter_id] = fut
        state = self.state
        fut.add_done_callback(lambda f: self._forget(state, waiter_id) if f.cancelled() else None)
        self.settle(state.add_ack_waiter(waiter_id, offset, min_insync_replicas))
        return fut

    def _forget(self, state: ReplicaState, waiter_id: int) -> None:
        self._commit_waiters.pop(waiter_id, None)
        state.remove_ack_waiter(waiter_id)

    def fail_commit_waiters(self, code: int) -> None:
        """End every acks=all wait with ``code`` (the leadership ended, the replica was dropped)."""
        waiters, self._commit_waiters = self._commit_waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_result(code)

    def _end_leadership(self) -> None:
        """The leadership (if any) ends: a write waiting on it can no longer be vouched for."""
        if self.state is not None:
            self.settle(self.state.resign())
            self.state = None
        self.fail_commit_waiters(errors_pb2.ERROR_CODE_NOT_LEADER_OR_FOLLOWER)

    def close(self) -> None:
        """The replica is dropped or the node stops: the leadership's waits end, parked readers and
        followers wake (and find it gone)."""
        self._end_leadership()
        self.wake()
        self.wake_replicas()

    # ----------------------------------------------------------------- parked readers

    def park(self, fut: asyncio.Future[None]) -> None:
        self._waiters.add(fut)

    def unpark(self, fut: asyncio.Future[None]) -> None:
        self._waiters.discard(fut)

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        _release(waiters)

    def park_replica(self, fut: asyncio.Future[None]) -> None:
        self._replica_waiters.add(fut)

    def unpark_replica(self, fut: asyncio.Future[None]) -> None:
        self._replica_waiters.discard(fut)

    def wake_replicas(self) -> None:
        waiters, self._replica_waiters = self._replica_waiters, set()
        _release(waiters)


def _release(waiters: set[asyncio.Future[None]]) -> None:
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)
