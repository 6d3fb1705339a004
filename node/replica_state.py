"""The leader's view of one partition's replicas: ISR, high watermark and acks=all waiters, as pure state.

``ReplicaState`` is what a partition leader knows about its followers and decides from it. It never
reads a clock (time comes in as ``now_ms``), never touches the log, the network or the metadata
quorum: the fetch server, the produce path and the metadata follower feed it facts and act on what
it answers (send an ``AlterPartition``, answer a producer, write a high-watermark checkpoint).
One instance lives for one leadership (one leader epoch on this node); a new leader epoch or a lost
leadership ends it. The rules follow Kafka's ``Partition`` and ``Replica``:

- **Follower progress** (Kafka's replication protocol). A follower's fetch at ``fetch_offset`` says
  it holds every record below it: that is its log end offset as the leader knows it. Unknown (-1)
  until its first fetch in this leadership.
- **Caught up** (Kafka's ``lastCaughtUpTimeMs``). A fetch that reaches the leader's log end makes
  the follower caught up at the fetch's time; a fetch that reaches the leader's log end *as it was
  at the follower's previous fetch* makes it caught up at the previous fetch's time. A follower is
  in sync while it is at the leader's log end or caught up within ``replica_lag_time_max_ms``.
- **High watermark**: the smallest log end offset over the *maximal* ISR, the leader included.
  While an ISR change is pending (sent, not committed) the maximal ISR is the committed ISR joined
  with the proposed one (KIP-497): a member leaving still holds the high watermark back until the
  controller commits its removal, and a member joining holds it back at once, because it may be in
  the ISR as soon as the controller commits and a new leader may be elected from it. The high
  watermark never moves back (it is loaded from this node's checkpoint at becoming leader).
- **ISR changes** go to the controller as an ``AlterPartition`` carrying the leader epoch and
  partition epoch the leader holds (a compare-and-set, KIP-497). One at a time: while one is pending
  the leader proposes nothing. A shrink removes followers of the committed ISR that are out of sync;
  an expansion adds followers out of the ISR, eligible as the metadata says (not fenced), whose last
  fetch named this leader epoch and whose log end reached the high watermark and the start of this
  epoch (Kafka's ``isFollowerInSync``: a follower that copied nothing of this epoch may still hold a
  suffix the leader truncated away).
- **The leader follows the metadata.** A newer partition epoch (from the controller's answer or the
  metadata log, whichever comes first) is adopted as the committed state and ends the pending
  change: the controller can no longer apply a proposal made at an older partition epoch. A refusal
  that says the proposal was not applied at the current partition epoch (INELIGIBLE_REPLICA,
  INVALID_REQUEST) drops the pending change so a new one can be proposed. A refusal that says the
  leader is behind (FENCED_LEADER_EPOCH, INVALID_UPDATE_VERSION, NOT_LEADER_OR_FOLLOWER, ...) keeps
  the change pending until the metadata brings the newer state, as Kafka does. An answer counts
  only for the very proposal object it answers. Dropping is safe only if the refused proposal is
  never applied later: a resent copy of it must not be applied after the controller refused one
  (else a member the leader stopped counting joins the ISR behind the high watermark). So each
  proposal carries a ``request_id`` of its own (the shell gives a new one per proposal, as
  ``forwarding.new_request_id`` does), and the metadata answers every copy of it with its first
  answer and applies none of them (``ClusterMetadata``'s remembered answers).
- **acks=all** (KIP-497's *effective* ISR is the committed one). A produce is refused before the
  append with NOT_ENOUGH_REPLICAS when the committed ISR is smaller than ``min_insync_replicas``.
  A parked acks=all request is released once the high watermark reaches its ``required_offset`` (its
  last offset + 1), in offset order; with NOT_ENOUGH_REPLICAS_AFTER_APPEND if by then the committed
  ISR is smaller than its ``min_insync_replicas`` (Kafka's ``checkEnoughReplicasReachOffset``), and
  with NOT_LEADER_OR_FOLLOWER if the leadership ends first.
- **Follower fetches are checked in one place** (KIP-320): a ``current_leader_epoch`` older than the
  leader's is FENCED_LEADER_EPOCH, a newer one UNKNOWN_LEADER_EPOCH; a node that is not a replica
  gets NOT_LEADER_OR_FOLLOWER; a fetch past the leader's log end gets OFFSET_OUT_OF_RANGE; a follower
  whose ``last_fetched_epoch`` does not match the leader's log at ``fetch_offset`` is answered with
  the ``diverging_epoch`` it must truncate to (KIP-320's fetch-time check of KIP-101/KIP-279's
  OffsetsForLeaderEpoch; KIP-595 does the same in KRaft). A refused or diverging fetch tells the
  leader nothing about the follower's log.

``end_offset_for_epoch`` and ``diverging_epoch`` are the epoch rules as pure functions of a leader
epoch cache (``[(epoch, start_offset)]``, oldest first) and a log end offset, for this module, the
fetch server and tests; ``truncation_offset`` is the follower's side of the same rule (KIP-279).
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace

from headwater.raft.commands import AlterPartition
from headwater.raft.metadata import PartitionRecord
from headwater.v1 import errors_pb2

__all__ = [
    "UNDEFINED_EPOCH",
    "UNDEFINED_OFFSET",
    "EpochEndOffset",
    "end_offset_for_epoch",
    "diverging_epoch",
    "truncation_offset",
    "FollowerState",
    "AckRelease",
    "FetchOutcome",
    "ReplicaState",
]

E = errors_pb2

# Kafka's UNDEFINED_EPOCH and UNDEFINED_EPOCH_OFFSET: no epoch / no offset known.
UNDEFINED_EPOCH = -1
UNDEFINED_OFFSET = -1

# Refusals of an AlterPartition that say it was checked against the partition epoch the leader holds
# and not applied: the leader may propose again at once (Kafka's INELIGIBLE_REPLICA and
# OPERATION_NOT_ATTEMPTED). Every other refusal leaves the change pending until newer metadata.
_NOT_APPLIED = frozenset({E.ERROR_CODE_INELIGIBLE_REPLICA, E.ERROR_CODE_INVALID_REQUEST})


@dataclass(frozen=True, slots=True)
class EpochEndOffset:
    """A leader epoch and the offset its records end at (the next epoch's start, or the log end)."""

    epoch: int
    end_offset: int


_UNDEFINED = EpochEndOffset(UNDEFINED_EPOCH, UNDEFINED_OFFSET)


def end_offset_for_epoch(
    epoch_entries: Sequence[tuple[int, int]],
    log_end_offset: int,
    requested_epoch: int,
    *,
    leader_epoch: int = UNDEFINED_EPOCH,
) -> EpochEndOffset:
    """The largest epoch ``<= requested_epoch`` in the log and the offset where it ends (Kafka's
    ``LeaderEpochFileCache.endOffsetFor``, the answer to OffsetsForLeaderEpoch, KIP-101/KIP-279).

    - ``requested_epoch`` undefined (negative), or above every epoch the log knows: undefined.
    - The latest epoch: it ends at the log end.
    - Below the earliest epoch the cache holds (retention removed older ones): ``requested_epoch``
      ending at the start of the earliest, so a follower keeps no more than the leader may have had.
    - Otherwise the floor epoch, ending where the next higher epoch starts.

    ``leader_epoch`` is the current epoch of a leader: Kafka writes it to the cache when the leader
    takes office, this log only with the first batch of that epoch. When it is newer than the
    cache's latest, it counts as the latest epoch, starting at ``log_end_offset``.
    """
    entries = list(epoch_entries)
    if leader_epoch >= 0 and (not entries or entries[-1][0] < leader_epoch):
        entries.append((leader_epoch, log_end_offset))
    if requested_epoch < 0 or not entries:
        return _UNDEFINED
    if requested_epoch == entries[-1][0]:
        return EpochEndOffset(requested_epoch, log_end_offset)
    higher = next((i for i, (e, _) in enumerate(entries) if e > requested_epoch), None)
    if higher is None:
        return _UNDEFINED
    if higher == 0:
        return EpochEndOffset(requested_epoch, entries[0][1])
    return EpochEndOffset(entries[higher - 1][0], entries[higher][1])


def diverging_epoch(
    epoch_entries: Sequence[tuple[int, int]],
    log_end_offset: int,
    last_fetched_epoch: int,
    fetch_offset: int,
    *,
    leader_epoch: int = UNDEFINED_EPOCH,
) -> EpochEndOffset | None:
    """None when a follower's log, ending at ``fetch_offset`` with a batch of ``last_fetched_epoch``,
    is a prefix of the leader's; else the ``diverging_epoch`` to answer (KIP-320, as KIP-595 does).

    The follower then truncates to the smaller of ``end_offset`` and the end of its own copy of
    ``epoch`` (KIP-279), and fetches again: two leader changes in a row, or a follower that led
    briefly, converge in as many round trips as there are diverging epochs. A ``last_fetched_epoch``
    below 0 (an empty follower, or a consumer) is never checked.
    """
    if last_fetched_epoch < 0:
        return None
    found = end_offset_for_epoch(epoch_entries, log_end_offset, last_fetched_epoch, leader_epoch=leader_epoch)
    if found.epoch < last_fetched_epoch or found.end_offset < fetch_offset:
        return found
    return None


def truncation_offset(
    epoch_entries: Sequence[tuple[int, int]],
    log_end_offset: int,
    diverging: EpochEndOffset,
    *,
    high_watermark: int,
) -> int:
    """Where a follower whose log is ``epoch_entries`` up to ``log_end_offset`` truncates on a
    ``diverging`` answer (Kafka's ``getOffsetTruncationState``, KIP-279).

    If the follower has the leader's epoch, both copies of it agree up to the smaller end. If not
    (the follower skipped it), truncate to the end of the follower's own largest earlier epoch: the
    next fetch, with that epoch as ``last_fetched_epoch``, asks again, one epoch further back at a
    time. An answer with no offset (the leader knows no such epoch) keeps only what was committed:
    the follower's ``high_watermark``.
    """
    if diverging.end_offset < 0:
        return min(high_watermark, log_end_offset)
    if diverging.epoch < 0:
        return min(diverging.end_offset, log_end_offset)
    own = end_offset_for_epoch(epoch_entries, log_end_offset, diverging.epoch)
    if own.epoch < 0:
        return min(diverging.end_offset, log_end_offset)
    if own.epoch != diverging.epoch:
        return min(own.end_offset, log_end_offset)
    return min(own.end_offset, diverging.end_offset, log_end_offset)


@dataclass(frozen=True, slots=True)
class FollowerState:
    """What the leader knows of one follower in this leadership (Kafka's ``ReplicaState``)."""

    replica_id: int
    # The follower's last fetch offset: it holds every record below. -1 until it fetched.
    log_end_offset: int = UNDEFINED_OFFSET
    # Last time the follower was known to have reached the leader's log end (see module docstring).
    last_caught_up_time_ms: int = 0
    # Time of its last fetch, and the leader's log end offset at that time (-1: none yet).
    last_fetch_time_ms: int = 0
    last_fetch_leader_log_end_offset: int = UNDEFINED_OFFSET
    # The current_leader_epoch its last fetch named (-1: none named, or no fetch yet).
    last_fetch_leader_epoch: int = UNDEFINED_EPOCH


@dataclass(frozen=True, slots=True)
class AckRelease:
    """An acks=all waiter the leader may now answer, with the error to answer (NONE: success)."""

    waiter_id: int
    required_offset: int
    error_code: int


@dataclass(frozen=True, slots=True)
class FetchOutcome:
    """The leader's answer to one follower fetch, and the acks=all waiters it released."""

    error_code: int
    message: str = ""
    # Set when the follower's log diverged: truncate, then fetch again (error_code is NONE).
    diverging_epoch: EpochEndOffset | None = None
    released: tuple[AckRelease, ...] = ()

    @property
    def ok(self) -> bool:
        """The fetch was accepted and counted: read records from ``fetch_offset`` for it."""
        return self.error_code == E.ERROR_CODE_NONE and self.diverging_epoch is None


class ReplicaState:
    """The leader's replica state for one partition in one leadership; see the module docstring.

    Invariants (checked by ``check_invariants``):
    ``0 <= high_watermark <= log_end_offset``; the leader is in the committed ISR; the committed ISR
    is a subset of replicas; every replica but the leader has a ``FollowerState``.
    """

    def __init__(
        self,
        *,
        node_id: int,
        topic_id: bytes,
        partition: int,
        broker_epoch: int,
        record: PartitionRecord,
        log_end_offset: int,
        high_watermark_checkpoint: int,
        now_ms: int,
    ) -> None:
        """Become the leader ``record`` names this node (KIP-101: the epoch starts at the log end).

        ``high_watermark_checkpoint`` is this node's own high watermark (its checkpoint, as the log
        keeps it), so the leader never answers below what a previous leader had committed and this
        node had learnt. Followers in the ISR start caught up now (they were in sync when the
        controller last said so); the others start lagging. Nobody's log end is known yet.
        """
        if record.leader != node_id:
            raise ValueError(f"node {node_id} is not the leader in {record}")
        if not 0 <= high_watermark_checkpoint <= log_end_offset:
            raise ValueError(
                f"high watermark checkpoint {high_watermark_checkpoint} outside [0, {log_end_offset}]"
            )
        self.node_id = node_id
        self.topic_id = topic_id
        self.partition = partition
        self.broker_epoch = broker_epoch
        self.leader_epoch = record.leader_epoch
        # The leader's log end when it took this epoch: the first offset of the epoch.
        self.leader_epoch_start_offset = log_end_offset
        self.log_end_offset = log_end_offset
        self.high_watermark = high_watermark_checkpoint
        self.partition_epoch = record.partition_epoch
        self.replicas: tuple[int, ...] = record.replicas
        # The ISR the controller committed: the effective ISR for min_insync_replicas (KIP-497).
        self.isr: tuple[int, ...] = record.isr
        # The AlterPartition sent and not yet answered or superseded; None when none is in flight.
        self.pending: AlterPartition | None = None
        # True once the leadership ended (``resign``): every request is refused from then on.
        self.resigned = False
        self._followers: dict[int, FollowerState] = {}
        self._reset_followers(now_ms)
        # acks=all waiters: (required_offset, waiter_id, min_insync_replicas), smallest offset first.
        self._waiters: list[tuple[int, int, int]] = []
        self._waiter_ids: set[int] = set()
        self.check_invariants()

    # ------------------------------------------------------------------ views

    @property
    def maximal_isr(self) -> tuple[int, ...]:
        """The committed ISR joined with a pending proposal's, in replica order (KIP-497)."""
        if self.pending is None:
            return self.isr
        members = set(self.isr) | set(self.pending.new_isr)
        return tuple(r for r in self.replicas if r in members)

    def follower(self, replica_id: int) -> FollowerState:
        """The leader's knowledge of one follower; KeyError for a node that is not a follower."""
        return self._followers[replica_id]

    def lag(self, replica_id: int, now_ms: int) -> tuple[int, int]:
        """``(records, ms)`` a follower is behind: records below the leader's log end it is not
        known to hold, and time since it last caught up (0 when it is at the log end)."""
        f = self._followers[replica_id]
        records = self.log_end_offset - max(f.log_end_offset, 0)
        if f.log_end_offset == self.log_end_offset:
            return records, 0
        return records, max(0, now_ms - f.last_caught_up_time_ms)

    def is_caught_up(self, replica_id: int, now_ms: int, replica_lag_time_max_ms: int) -> bool:
        """At the leader's log end, or caught up within the lag time (Kafka's ``isCaughtUp``)."""
        f = self._followers[replica_id]
        return (
            f.log_end_offset == self.log_end_offset
            or now_ms - f.last_caught_up_time_ms <= replica_lag_time_max_ms
        )

    def shrink_candidates(self, now_ms: int, replica_lag_time_max_ms: int) -> tuple[int, ...]:
        """Followers of the committed ISR that have not caught up within the lag time."""
        return tuple(
            r
            for r in self.isr
            if r != self.node_id and not self.is_caught_up(r, now_ms, replica_lag_time_max_ms)
        )

    def expand_candidates(self, ineligible: Collection[int] = ()) -> tuple[int, ...]:
        """Followers out of the committed ISR whose last fetch named this leader epoch and whose log
        end reached the high watermark and the start of this epoch (so they copied this epoch's log,
        not a suffix another leader wrote).

        ``ineligible``: nodes the metadata says may not join (fenced, shutting down), left out as
        Kafka's ``isReplicaIsrEligible`` does; the controller would refuse them (INELIGIBLE_REPLICA).
        """
        floor = max(self.high_watermark, self.leader_epoch_start_offset)
        return tuple(
            r
            for r in self.replicas
            if r not in self.isr
            and r not in ineligible
            and self._followers[r].log_end_offset >= floor
            and self._followers[r].last_fetch_leader_epoch == self.leader_epoch
        )

    # ------------------------------------------------------------------ ISR changes

    def propose_isr_change(
        self,
        now_ms: int,
        replica_lag_time_max_ms: int,
        *,
        ineligible: Collection[int] = (),
        request_id: str = "",
    ) -> AlterPartition | None:
        """The ``AlterPartition`` to send, or None (nothing to change, or a change is in flight).

        Removes the shrink candidates and adds the expand candidates in one compare-and-set on the
        epochs this leader holds. The proposal is pending from now: the high watermark counts the
        maximal ISR until the controller's answer or newer metadata settles it. ``request_id`` is
        the caller's new id for this proposal, never one given to an earlier proposal: every resend
        carries it, so the controller answers each copy with the first answer (see the module
        docstring). Time and randomness stay outside: the caller draws it.
        """
        if self.pending is not None:
            return None
        out = set(self.shrink_candidates(now_ms, replica_lag_time_max_ms))
        add = set(self.expand_candidates(ineligible))
        if not out and not add:
            return None
        new_isr = tuple(r for r in self.replicas if (r in self.isr and r not in out) or r in add)
        self.pending = AlterPartition(
            topic_id=self.topic_id,
            partition=self.partition,
            leader_id=self.node_id,
            broker_epoch=self.broker_epoch,
            leader_epoch=self.leader_epoch,
            partition_epoch=self.partition_epoch,
            new_isr=new_isr,
            request_id=request_id,
        )
        self.check_invariants()
        return self.pending

    def on_alter_partition_answer(
        self,
        proposal: AlterPartition,
        error_code: int,
        *,
        isr: tuple[int, ...] = (),
        leader_epoch: int = -1,
        partition_epoch: int = -1,
    ) -> tuple[AckRelease, ...]:
        """The controller's answer to ``proposal`` (a ``Result``'s fields): adopt a committed state
        newer than ours, or drop the pending change when the refusal says it was not applied.

        ``proposal`` is the very object ``propose_isr_change`` returned (a resend sends that object
        again). An answer to anything else is stale and changes nothing, even one to an earlier
        proposal equal to it: a refusal of that one says nothing about this one. A committed shrink
        may move the high watermark: the released acks=all waiters are returned.
        """
        if proposal is not self.pending:
            return ()
        if error_code == E.ERROR_CODE_NONE:
            if leader_epoch == self.leader_epoch and partition_epoch > self.partition_epoch:
                self._adopt(self.replicas, isr, partition_epoch)
            elif leader_epoch == self.leader_epoch and partition_epoch == self.partition_epoch:
                # Applied as a no-op ("ISR unchanged"): the committed state stands.
                self.pending = None
            return self._advance()
        if error_code in _NOT_APPLIED:
            self.pending = None
            return self._advance()
        # The leader is behind the controller: stay pending until the metadata brings the news.
        return ()

    def on_metadata(self, record: PartitionRecord, now_ms: int) -> tuple[AckRelease, ...]:
        """The partition as the metadata log now has it. Returns the waiters released.

        Leadership ended (another leader, or a newer leader epoch, after which the caller starts a
        new ``ReplicaState``): every waiter is released with NOT_LEADER_OR_FOLLOWER, and ``resigned``
        is true. An older or equal partition epoch is stale and ignored. A newer one is adopted as
        committed (replicas and ISR), ending any pending change.
        """
        if record.leader_epoch < self.leader_epoch or record.partition_epoch <= self.partition_epoch:
            return ()
        if record.leader != self.node_id or record.leader_epoch != self.leader_epoch:
            return self.resign()
        self._adopt(record.replicas, record.isr, record.partition_epoch)
        for r in record.replicas:
            if r != self.node_id and r not in self._followers:
                self._followers[r] = self._fresh_follower(r, now_ms)
        for r in list(self._followers):
            if r not in record.replicas:
                del self._followers[r]
        return self._advance()

    def resign(self) -> tuple[AckRelease, ...]:
        """This node stops leading: release every waiter with NOT_LEADER_OR_FOLLOWER."""
        self.resigned = True
        self.pending = None
        out = tuple(
            AckRelease(waiter_id, required, E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER)
            for required, waiter_id, _ in sorted(self._waiters)
        )
        self._waiters.clear()
        self._waiter_ids.clear()
        return out

    # ------------------------------------------------------------------ fetches and appends

    def check_fetch(self, replica_id: int, current_leader_epoch: int) -> tuple[int, str]:
        """The epoch and membership checks of a follower fetch: ``(error_code, message)``.

        ``current_leader_epoch`` below 0 means the fetcher named none (no check), as in the proto.
        """
        if self.resigned:
            return E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER, f"node {self.node_id} no longer leads"
        if current_leader_epoch >= 0:
            if current_leader_epoch < self.leader_epoch:
                return (
                    E.ERROR_CODE_FENCED_LEADER_EPOCH,
                    f"leader epoch {current_leader_epoch} is older than the current {self.leader_epoch}",
                )
            if current_leader_epoch > self.leader_epoch:
                return (
                    E.ERROR_CODE_UNKNOWN_LEADER_EPOCH,
                    f"leader epoch {current_leader_epoch} is newer than the current {self.leader_epoch}",
                )
        if replica_id not in self._followers:
            return (
                E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER,
                f"node {replica_id} is not a follower of this partition (replicas {list(self.replicas)})",
            )
        return E.ERROR_CODE_NONE, ""

    def on_follower_fetch(
        self,
        replica_id: int,
        fetch_offset: int,
        *,
        current_leader_epoch: int,
        last_fetched_epoch: int,
        epoch_entries: Sequence[tuple[int, int]],
        now_ms: int,
    ) -> FetchOutcome:
        """A follower fetches from ``fetch_offset``; ``epoch_entries`` is the leader's epoch cache.

        Checks epochs and membership, then divergence, then the offset (as Kafka does: a follower
        past the leader's log end in the leader's epoch is told to truncate, not refused). Only an
        accepted fetch updates the follower's state (its log end and caught-up time), which may move
        the high watermark. Read records for it only when ``outcome.ok``. The log start is not known
        here: the fetch server refuses a fetch below it (OFFSET_OUT_OF_RANGE) without calling this.
        """
        code, message = self.check_fetch(replica_id, current_leader_epoch)
        if code != E.ERROR_CODE_NONE:
            return FetchOutcome(code, message)
        diverged = diverging_epoch(
            epoch_entries,
            self.log_end_offset,
            last_fetched_epoch,
            fetch_offset,
            leader_epoch=self.leader_epoch,
        )
        if diverged is not None:
            return FetchOutcome(E.ERROR_CODE_NONE, "", diverged)
        if not 0 <= fetch_offset <= self.log_end_offset:
            return FetchOutcome(
                E.ERROR_CODE_OFFSET_OUT_OF_RANGE,
                f"fetch offset {fetch_offset} is outside [0, {self.log_end_offset}], the leader's log",
            )
        f = self._followers[replica_id]
        caught_up = f.last_caught_up_time_ms
        if fetch_offset >= self.log_end_offset:
            caught_up = max(caught_up, now_ms)
        elif fetch_offset >= f.last_fetch_leader_log_end_offset >= 0:
            caught_up = max(caught_up, f.last_fetch_time_ms)
        self._followers[replica_id] = replace(
            f,
            log_end_offset=fetch_offset,
            last_caught_up_time_ms=caught_up,
            last_fetch_time_ms=now_ms,
            last_fetch_leader_log_end_offset=max(self.log_end_offset, f.last_fetch_leader_log_end_offset),
            last_fetch_leader_epoch=current_leader_epoch,
        )
        return FetchOutcome(E.ERROR_CODE_NONE, "", None, self._advance())

    def on_leader_append(self, log_end_offset: int) -> tuple[AckRelease, ...]:
        """The leader's log now ends at ``log_end_offset`` (it only grows while it leads)."""
        if log_end_offset < self.log_end_offset:
            raise ValueError(f"a leader's log end moves back from {self.log_end_offset} to {log_end_offset}")
        self.log_end_offset = log_end_offset
        return self._advance()

    # ------------------------------------------------------------------ acks=all

    def check_min_isr(self, min_insync_replicas: int) -> tuple[int, str]:
        """Before an acks=all append: NOT_ENOUGH_REPLICAS when the committed ISR is too small."""
        if len(self.isr) < min_insync_replicas:
            return (
                E.ERROR_CODE_NOT_ENOUGH_REPLICAS,
                f"the ISR {list(self.isr)} has fewer than min_insync_replicas={min_insync_replicas} members",
            )
        return E.ERROR_CODE_NONE, ""

    def add_ack_waiter(
        self, waiter_id: int, required_offset: int, min_insync_replicas: int
    ) -> tuple[AckRelease, ...]:
        """Park an acks=all request until the high watermark reaches ``required_offset`` (its last
        offset + 1). Returns it at once when the high watermark already has."""
        if waiter_id in self._waiter_ids:
            raise ValueError(f"ack waiter {waiter_id} is already parked")
        if not 0 <= required_offset <= self.log_end_offset:
            raise ValueError(f"required offset {required_offset} outside [0, {self.log_end_offset}]")
        if self.resigned:
            return (AckRelease(waiter_id, required_offset, E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER),)
        heapq.heappush(self._waiters, (required_offset, waiter_id, min_insync_replicas))
        self._waiter_ids.add(waiter_id)
        return self._release()

    def remove_ack_waiter(self, waiter_id: int) -> bool:
        """Forget a waiter (its request timed out or went away). False if it was not parked."""
        if waiter_id not in self._waiter_ids:
            return False
        self._waiter_ids.discard(waiter_id)
        self._waiters = [w for w in self._waiters if w[1] != waiter_id]
        heapq.heapify(self._waiters)
        return True

    @property
    def ack_waiter_count(self) -> int:
        return len(self._waiters)

    # ------------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        assert 0 <= self.high_watermark <= self.log_end_offset, (self.high_watermark, self.log_end_offset)
        if self.resigned:
            return
        assert self.node_id in self.isr, (self.node_id, self.isr)
        assert set(self.isr) <= set(self.replicas), (self.isr, self.replicas)
        assert set(self._followers) == set(self.replicas) - {self.node_id}, (self._followers, self.replicas)
        # Not asserted: high_watermark <= every maximal-ISR follower's log end. It holds while
        # followers keep what they acknowledged, but a fetch offset is a peer's word, and a follower
        # that lost unflushed records in a crash fetches below it (KIP-903 is the controller's cure).

    # ------------------------------------------------------------------ internals

    def _reset_followers(self, now_ms: int) -> None:
        self._followers = {r: self._fresh_follower(r, now_ms) for r in self.replicas if r != self.node_id}

    def _fresh_follower(self, replica_id: int, now_ms: int) -> FollowerState:
        # Kafka's resetReplicaState for a new leader: an ISR member is taken as caught up now.
        if replica_id in self.isr:
            return FollowerState(replica_id, UNDEFINED_OFFSET, now_ms, now_ms, self.log_end_offset)
        return FollowerState(replica_id)

    def _adopt(self, replicas: Iterable[int], isr: Iterable[int], partition_epoch: int) -> None:
        self.replicas = tuple(replicas)
        self.isr = tuple(isr)
        self.partition_epoch = partition_epoch
        self.pending = None

    def _advance(self) -> tuple[AckRelease, ...]:
        """Raise the high watermark to the smallest log end over the maximal ISR; release waiters."""
        candidate = self.log_end_offset
        for r in self.maximal_isr:
            if r != self.node_id:
                candidate = min(candidate, self._followers[r].log_end_offset)
        if candidate > self.high_watermark:
            self.high_watermark = candidate
        self.check_invariants()
        return self._release()

    def _release(self) -> tuple[AckRelease, ...]:
        out: list[AckRelease] = []
        while self._waiters and self._waiters[0][0] <= self.high_watermark:
            required, waiter_id, min_isr = heapq.heappop(self._waiters)
            self._waiter_ids.discard(waiter_id)
            code = (
                E.ERROR_CODE_NONE
                if len(self.isr) >= min_isr
                else E.ERROR_CODE_NOT_ENOUGH_REPLICAS_AFTER_APPEND
            )
            out.append(AckRelease(waiter_id, required, code))
        return tuple(out)

    def __repr__(self) -> str:
        return (
            f"ReplicaState(leader={self.node_id}, leader_epoch={self.leader_epoch}, "
            f"partition_epoch={self.partition_epoch}, isr={list(self.isr)}, "
            f"maximal_isr={list(self.maximal_isr)}, log_end_offset={self.log_end_offset}, "
            f"high_watermark={self.high_watermark})"
        )
