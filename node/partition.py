"""One partition replica on this node: its role, leader epoch, high watermark and parked waiters.

The role is an explicit state (Kafka's ``Partition``): a replica is the leader or a follower of a
given ``leader_epoch``, as the metadata image says (``follow``), and every request that names an
epoch is checked here, in one place. Followers copy the leader's log (``fetcher.py``), but the leader
does not count them yet, so the leader's high watermark is its log end; a follower's is the leader's,
bounded by its own log end.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
from dataclasses import dataclass

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
        # acks=all waiters: (offset, sequence, future), a heap by offset; each future gets an error
        # code once the high watermark reaches its offset (NONE) or the leadership ends.
        self._commit_waiters: list[tuple[int, int, asyncio.Future[int]]] = []
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
    ) -> None:
        """Take the role and epochs the metadata image gives this replica. A change of leader or
        epoch wakes parked readers, so they answer from the new role (NOT_LEADER_OR_FOLLOWER)."""
        role = Role.LEADER if leader_id == self.node_id else Role.FOLLOWER
        moved = role is not self.role or leader_epoch != self.leader_epoch or leader_id != self.leader_id
        self.role, self.leader_id, self.leader_epoch = role, leader_id, leader_epoch
        self.partition_epoch, self.replicas, self.isr = partition_epoch, replicas, isr
        if moved:
            # A write waiting on the old leadership can no longer be vouched for by this one.
            self.fail_commit_waiters(errors_pb2.ERROR_CODE_NOT_LEADER_OR_FOLLOWER)
        if role is Role.LEADER and isr == (self.node_id,):
            # The leader is the whole ISR: every record in its log is in every in-sync replica's.
            self.advance_high_watermark(self.log.log_end_offset)
        if moved:
            self.wake()

    def advance_high_watermark(self, offset: int) -> None:
        """Called once the records below ``offset`` meet the durability guarantee; wakes readers."""
        assert self.log.log_start_offset <= offset <= self.log.log_end_offset, (
            offset,
            self.log.log_end_offset,
        )
        if offset > self._high_watermark:
            self._high_watermark = offset
            self._release_commit_waiters()
            self.wake()
        elif offset < self._high_watermark:
            # Only truncation below the high watermark (a lost election in a later issue) moves it back.
            self._high_watermark = offset

    def checkpoint_high_watermark(self, *, sync: bool = False) -> None:
        """Write the high watermark to the log's checkpoint (where a restart loads it from)."""
        hw = min(max(self._high_watermark, self.log.log_start_offset), self.log.log_end_offset)
        self.log.checkpoint_high_watermark(hw, sync=sync)

    def on_log_changed(self) -> None:
        """After retention or truncation: keep the high watermark inside the log."""
        hw = min(max(self._high_watermark, self.log.log_start_offset), self.log.log_end_offset)
        self._high_watermark = hw

    # ----------------------------------------------------------------- acks=all waiters

    def wait_for_commit(self, offset: int) -> asyncio.Future[int]:
        """A future that gets ERROR_CODE_NONE once the high watermark reaches ``offset`` (the
        offset after a write's last record), or the error that ended the wait."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if offset <= self._high_watermark:
            fut.set_result(errors_pb2.ERROR_CODE_NONE)
            return fut
        self._commit_seq += 1
        heapq.heappush(self._commit_waiters, (offset, self._commit_seq, fut))
        return fut

    def _release_commit_waiters(self) -> None:
        heap = self._commit_waiters
        while heap and heap[0][0] <= self._high_watermark:
            _, _, fut = heapq.heappop(heap)
            if not fut.done():
                fut.set_result(errors_pb2.ERROR_CODE_NONE)

    def fail_commit_waiters(self, code: int) -> None:
        """End every acks=all wait with ``code`` (the leadership ended, the replica was dropped)."""
        waiters, self._commit_waiters = self._commit_waiters, []
        for _, _, fut in waiters:
            if not fut.done():
                fut.set_result(code)

    # ----------------------------------------------------------------- parked readers

    def park(self, fut: asyncio.Future[None]) -> None:
        self._waiters.add(fut)

    def unpark(self, fut: asyncio.Future[None]) -> None:
        self._waiters.discard(fut)

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
