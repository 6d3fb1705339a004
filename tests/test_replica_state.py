"""The leader's replica state, rule by rule, with a fake clock; the epoch rules on KIP-101 and KIP-279's
scenarios; then two seeded simulations against the real metadata state machine, checking invariants
after every step: one leadership (high watermark monotone and within every ISR member's log, acks
only for records every ISR member holds), and many leaderships (kills, restarts, elections, late
metadata, deposed leaders still serving: acked writes survive, followers converge).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from headwater.node.replica_state import (
    UNDEFINED_EPOCH,
    AckRelease,
    EpochEndOffset,
    FetchOutcome,
    ReplicaState,
    diverging_epoch,
    end_offset_for_epoch,
    truncation_offset,
)
from headwater.raft.commands import (
    AlterPartition,
    CreateTopic,
    ElectLeader,
    FenceNode,
    RegisterNode,
    UnfenceNode,
)
from headwater.raft.metadata import ClusterMetadata, PartitionRecord, Result
from headwater.v1 import errors_pb2 as E

TID = bytes(range(1, 17))
LAG_MS = 10_000
OK = E.ERROR_CODE_NONE


class Clock:
    """A fake clock: tests move it, the core only ever sees ``now_ms``."""

    def __init__(self, now_ms: int = 1_000_000) -> None:
        self.now_ms = now_ms

    def advance(self, ms: int) -> int:
        self.now_ms += ms
        return self.now_ms


def record(
    isr: tuple[int, ...] = (1, 2, 3),
    *,
    replicas: tuple[int, ...] = (1, 2, 3),
    leader: int = 1,
    leader_epoch: int = 5,
    partition_epoch: int = 9,
) -> PartitionRecord:
    return PartitionRecord(replicas, isr, leader, leader_epoch, partition_epoch)


def leader(
    clock: Clock,
    isr: tuple[int, ...] = (1, 2, 3),
    *,
    log_end_offset: int = 10,
    high_watermark: int = 10,
    replicas: tuple[int, ...] = (1, 2, 3),
) -> ReplicaState:
    return ReplicaState(
        node_id=1,
        topic_id=TID,
        partition=0,
        broker_epoch=7,
        record=record(isr, replicas=replicas),
        log_end_offset=log_end_offset,
        high_watermark_checkpoint=high_watermark,
        now_ms=clock.now_ms,
    )


def fetch(
    s: ReplicaState, clock: Clock, replica: int, offset: int, *, epoch: int | None = None
) -> FetchOutcome:
    """A well-behaved follower's fetch in the leader's epoch (its log is a prefix of the leader's)."""
    return s.on_follower_fetch(
        replica,
        offset,
        current_leader_epoch=s.leader_epoch if epoch is None else epoch,
        last_fetched_epoch=UNDEFINED_EPOCH,
        epoch_entries=[(s.leader_epoch, 0)],
        now_ms=clock.now_ms,
    )


def released(s: ReplicaState, clock: Clock, replica: int, offset: int) -> tuple[AckRelease, ...]:
    out = s.on_follower_fetch(
        replica,
        offset,
        current_leader_epoch=s.leader_epoch,
        last_fetched_epoch=UNDEFINED_EPOCH,
        epoch_entries=[(s.leader_epoch, 0)],
        now_ms=clock.now_ms,
    )
    assert out.ok, out
    return out.released


def committed(s: ReplicaState, proposal: AlterPartition) -> tuple[AckRelease, ...]:
    """The controller applies ``proposal`` (epochs as the metadata state machine bumps them)."""
    return s.on_alter_partition_answer(
        proposal,
        OK,
        isr=proposal.new_isr,
        leader_epoch=proposal.leader_epoch,
        partition_epoch=proposal.partition_epoch + 1,
    )


# ------------------------------------------------------------------ high watermark


def test_becoming_leader_loads_the_checkpoint_and_knows_no_follower_yet() -> None:
    clock = Clock()
    s = leader(clock, log_end_offset=10, high_watermark=4)
    assert s.high_watermark == 4
    assert s.leader_epoch_start_offset == 10
    assert s.follower(2).log_end_offset == -1
    # ISR members start caught up now; an out-of-ISR replica starts lagging.
    assert s.follower(2).last_caught_up_time_ms == clock.now_ms
    with pytest.raises(ValueError):
        leader(clock, log_end_offset=10, high_watermark=11)
    with pytest.raises(ValueError):
        ReplicaState(
            node_id=2,
            topic_id=TID,
            partition=0,
            broker_epoch=7,
            record=record(),
            log_end_offset=0,
            high_watermark_checkpoint=0,
            now_ms=0,
        )


def test_high_watermark_is_the_smallest_log_end_over_the_isr() -> None:
    clock = Clock()
    s = leader(clock, log_end_offset=10, high_watermark=4)
    s.on_leader_append(15)
    released(s, clock, 2, 12)
    assert s.high_watermark == 4  # follower 3 has not fetched in this leadership
    released(s, clock, 3, 8)
    assert s.high_watermark == 8
    released(s, clock, 3, 15)
    assert s.high_watermark == 12
    released(s, clock, 2, 15)
    assert s.high_watermark == 15


def test_high_watermark_never_moves_back() -> None:
    clock = Clock()
    s = leader(clock, log_end_offset=10, high_watermark=10)
    s.on_leader_append(20)
    released(s, clock, 2, 20)
    released(s, clock, 3, 18)
    assert s.high_watermark == 18
    # A follower fetching lower (it lost unflushed records) does not pull the high watermark back.
    released(s, clock, 3, 12)
    assert s.high_watermark == 18
    released(s, clock, 2, 12)
    assert s.high_watermark == 18


def test_a_leader_alone_in_the_isr_commits_at_its_log_end() -> None:
    clock = Clock()
    s = leader(clock, (1,), log_end_offset=0, high_watermark=0)
    s.on_leader_append(3)
    assert s.high_watermark == 3
    with pytest.raises(ValueError):
        s.on_leader_append(2)


# ------------------------------------------------------------------ caught up, shrink, expand


def test_follower_behind_for_longer_than_the_lag_time_is_a_shrink_candidate() -> None:
    clock = Clock()
    s = leader(clock, log_end_offset=10, high_watermark=10)
    released(s, clock, 2, 10)
    released(s, clock, 3, 10)
    s.on_leader_append(11)
    t0 = clock.now_ms
    clock.advance(LAG_MS)
    released(s, clock, 2, 11)  # 2 keeps up
    assert s.shrink_candidates(clock.now_ms, LAG_MS) == ()  # 3 last caught up exactly LAG_MS ago
    clock.advance(1)
    assert s.shrink_candidates(clock.now_ms, LAG_MS) == (3,)
    assert s.follower(3).last_caught_up_time_ms == t0


def test_a_follower_fetching_the_previous_log_end_counts_as_caught_up_at_its_previous_fetch() -> None:
    """Kafka's lastCaughtUpTimeMs: under steady writes a follower never equals the log end, but each
    fetch reaches where the log ended at its previous fetch."""
    clock = Clock()
    s = leader(clock, log_end_offset=10, high_watermark=10)
    released(s, clock, 3, 10)
    for i in range(1, 20):
        prev_fetch = clock.now_ms
        s.on_leader_append(10 + 5 * i)
        clock.advance(LAG_MS // 2)
        # The follower got everything up to the log end at its previous fetch, never the newest.
        released(s, clock, 3, 10 + 5 * (i - 1))
        released(s, clock, 2, s.log_end_offset)
        assert s.follower(3).last_caught_up_time_ms == prev_fetch
        assert s.shrink_candidates(clock.now_ms, LAG_MS) == ()
    # One fetch that falls behind the previous log end leaves the caught-up time where it was.
    s.on_leader_append(s.log_end_offset + 5)
    before = s.follower(3).last_caught_up_time_ms
    clock.advance(LAG_MS)
    released(s, clock, 3, s.follower(3).log_end_offset + 1)
    assert s.follower(3).last_caught_up_time_ms == before
    assert s.shrink_candidates(clock.now_ms, LAG_MS) == (3,)


def test_a_follower_at_the_log_end_is_never_a_shrink_candidate_however_long_ago_it_fetched() -> None:
    clock = Clock()
    s = leader(clock, log_end_offset=10, high_watermark=10)
    released(s, clock, 2, 10)
    released(s, clock, 3, 10)
    clock.advance(100 * LAG_MS)
    assert s.shrink_candidates(clock.now_ms, LAG_MS) == ()


def test_an_isr_member_silent_since_the_leader_took_office_is_shrunk_after_the_lag_time() -> None:
    clock = Clock()
    s = leader(clock, log_end_offset=10, high_watermark=10)
    released(s, clock, 2, 10)
    clock.advance(LAG_MS)
    assert s.shrink_candidates(clock.now_ms, LAG_MS) == ()
    clock.advance(1)
    assert s.shrink_candidates(clock.now_ms, LAG_MS) == (3,)


def test_shrink_is_proposed_with_the_epochs_the_leader_holds_and_committed() -> None:
    clock = Clock()
    s = leader(clock, log_end_offset=10, high_watermark=10)
    released(s, clock, 2, 10)
    s.on_leader_append(14)
    released(s, clock, 2, 14)
    clock.advance(LAG_MS + 1)
    p = s.propose_isr_change(clock.now_ms, LAG_MS)
    assert p == AlterPartition(
        TID, 0, leader_id=1, broker_epoch=7, leader_epoch=5, partition_epoch=9, new_isr=(1, 2)
    )
    # Pending shrink: follower 3 still holds the high watermark back (maximal ISR), and nothing
    # else is proposed while it is in flight.
    assert s.maximal_isr == (1, 2, 3) and s.isr == (1, 2, 3)
    assert s.high_watermark == 10
    assert s.propose_isr_change(clock.now_ms, LAG_MS) is None
    s.add_ack_waiter(1, 14, 2)
    assert committed(s, p) == (AckRelease(1, 14, OK),)
    assert s.isr == (1, 2) and s.partition_epoch == 10 and s.pending is None
    assert s.high_watermark == 14


def test_expand_when_the_follower_reaches_the_high_watermark_within_this_leader_epoch() -> None:
    clock = Clock()
    s = leader(clock, (1, 2), log_end_offset=10, high_watermark=6)
    assert s.leader_epoch_start_offset == 10
    released(s, clock, 2, 10)
    assert s.high_watermark == 10
    released(s, clock, 3, 7)
    assert s.expand_candidates() == ()
    s.on_leader_append(20)
    released(s, clock, 2, 20)
    assert s.high_watermark == 20
    released(s, clock, 3, 19)
    assert s.expand_candidates() == ()  # behind the high watermark
    released(s, clock, 3, 20)
    assert s.expand_candidates() == (3,)
    p = s.propose_isr_change(clock.now_ms, LAG_MS)
    assert p is not None and p.new_isr == (1, 2, 3)


def test_a_follower_past_the_high_watermark_but_short_of_this_epochs_start_does_not_join() -> None:
    """Kafka's isFollowerInSync: the new leader's high watermark may trail the start of its epoch;
    a follower between the two has not shown it holds this leader's log rather than another's."""
    clock = Clock()
    s = leader(clock, (1, 2), log_end_offset=10, high_watermark=4)
    released(s, clock, 3, 6)
    assert s.high_watermark == 4
    assert s.expand_candidates() == ()
    released(s, clock, 3, 10)
    assert s.expand_candidates() == (3,)


def test_only_a_fetch_naming_this_leader_epoch_qualifies_a_follower_to_join() -> None:
    clock = Clock()
    s = leader(clock, (1, 2), log_end_offset=10, high_watermark=10)
    assert fetch(s, clock, 3, 10, epoch=-1).ok
    assert s.follower(3).log_end_offset == 10 and s.expand_candidates() == ()
    assert fetch(s, clock, 3, 10).ok
    assert s.expand_candidates() == (3,)


def test_pending_expansion_counts_in_the_high_watermark_but_not_for_min_isr() -> None:
    """KIP-497: the maximal ISR (committed + proposed) for the high watermark, the committed ISR for
    min_insync_replicas."""
    clock = Clock()
    s = leader(clock, (1, 2), log_end_offset=10, high_watermark=10)
    released(s, clock, 2, 10)
    released(s, clock, 3, 10)
    p = s.propose_isr_change(clock.now_ms, LAG_MS)
    assert p is not None and p.new_isr == (1, 2, 3)
    assert s.maximal_isr == (1, 2, 3) and s.isr == (1, 2)
    s.on_leader_append(15)
    released(s, clock, 2, 15)
    assert s.high_watermark == 10  # 3 may be in the ISR as soon as the controller commits
    assert s.check_min_isr(3)[0] == E.ERROR_CODE_NOT_ENOUGH_REPLICAS
    committed(s, p)
    assert s.isr == (1, 2, 3)
    assert s.check_min_isr(3)[0] == OK
    released(s, clock, 3, 15)
    assert s.high_watermark == 15


def test_refused_alter_partition_not_applied_is_dropped_and_may_be_proposed_again() -> None:
    clock = Clock()
    s = leader(clock, (1, 2), log_end_offset=10, high_watermark=10)
    released(s, clock, 2, 10)
    released(s, clock, 3, 10)
    p = s.propose_isr_change(clock.now_ms, LAG_MS)
    assert p is not None
    # Node 3 is fenced: the controller refuses at our partition epoch and applied nothing.
    assert s.on_alter_partition_answer(p, E.ERROR_CODE_INELIGIBLE_REPLICA) == ()
    assert s.pending is None and s.isr == (1, 2) and s.maximal_isr == (1, 2)
    assert s.propose_isr_change(clock.now_ms, LAG_MS) == p


def test_a_late_refusal_of_an_equal_earlier_proposal_does_not_drop_the_pending_one() -> None:
    clock = Clock()
    s = leader(clock, (1, 2), log_end_offset=10, high_watermark=10)
    released(s, clock, 2, 10)
    released(s, clock, 3, 10)
    first = s.propose_isr_change(clock.now_ms, LAG_MS)
    assert first is not None
    # The first is refused (3 was fenced), then proposed again: equal, but a new proposal.
    s.on_alter_partition_answer(first, E.ERROR_CODE_INELIGIBLE_REPLICA)
    second = s.propose_isr_change(clock.now_ms, LAG_MS)
    assert second == first and second is not first
    # A second copy of the first one's refusal arrives late: it says nothing about the second.
    assert s.on_alter_partition_answer(first, E.ERROR_CODE_INELIGIBLE_REPLICA) == ()
    assert s.pending is second and s.maximal_isr == (1, 2, 3)


def test_refusal_because_the_leader_is_behind_waits_for_the_metadata() -> None:
    clock = Clock()
    s = leader(clock, log_end_offset=10, high_watermark=10)
    released(s, clock, 2, 10)
    clock.advance(LAG_MS + 1)
    p = s.propose_isr_change(clock.now_ms, LAG_MS)
    assert p is not None and p.new_isr == (1, 2)
    # Meanwhile the controller fenced node 2 (partition epoch 10): our compare-and-set fails.
    assert s.on_alter_partition_answer(p, E.ERROR_CODE_INVALID_UPDATE_VERSION) == ()
    assert s.pending == p and s.propose_isr_change(clock.now_ms, LAG_MS) is None
    s.on_metadata(record((1, 3), partition_epoch=10), clock.now_ms)
    assert s.pending is None and s.isr == (1, 3) and s.partition_epoch == 10
    # A late answer to the old proposal changes nothing.
    assert committed(s, p) == () and s.isr == (1, 3)
    # Now 3 (lagging) is proposed out of the ISR the metadata has, and 2, caught up but fenced,
    # is not proposed back in while the metadata says it is fenced.
    assert s.expand_candidates() == (2,) and s.expand_candidates(ineligible={2}) == ()
    p2 = s.propose_isr_change(clock.now_ms, LAG_MS, ineligible={2})
    assert p2 is not None and p2.partition_epoch == 10 and p2.new_isr == (1,)


def test_stale_metadata_is_ignored_and_a_new_leader_ends_the_leadership() -> None:
    clock = Clock()
    s = leader(clock, log_end_offset=10, high_watermark=0)
    s.add_ack_waiter(8, 10, 2)
    s.add_ack_waiter(7, 5, 2)
    assert s.on_metadata(record((1,), partition_epoch=9), clock.now_ms) == ()
    assert s.on_metadata(record((1,), partition_epoch=8), clock.now_ms) == ()
    assert s.isr == (1, 2, 3)
    out = s.on_metadata(record((2, 3), leader=2, leader_epoch=6, partition_epoch=10), clock.now_ms)
    assert out == (
        AckRelease(7, 5, E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER),
        AckRelease(8, 10, E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER),
    )
    assert s.resigned and s.ack_waiter_count == 0
    assert fetch(s, clock, 2, 10, epoch=-1).error_code == E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER


def test_a_new_leader_epoch_on_the_same_leader_ends_this_leadership() -> None:
    """Kafka resets every follower's state on a new leader epoch; here the caller starts a new
    ReplicaState, and parked producers retry against it."""
    clock = Clock()
    s = leader(clock, log_end_offset=10, high_watermark=0)
    s.add_ack_waiter(1, 10, 1)
    assert s.on_metadata(record(leader_epoch=6, partition_epoch=10), clock.now_ms) == (
        AckRelease(1, 10, E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER),
    )
    assert s.resigned
    assert s.add_ack_waiter(2, 10, 1) == (AckRelease(2, 10, E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER),)


def test_reassignment_in_the_metadata_adds_and_drops_followers() -> None:
    clock = Clock()
    s = leader(clock, log_end_offset=10, high_watermark=10)
    s.on_metadata(record((1, 2), replicas=(1, 2, 4), partition_epoch=10), clock.now_ms)
    assert s.replicas == (1, 2, 4)
    assert s.follower(4).log_end_offset == -1
    with pytest.raises(KeyError):
        s.follower(3)
    assert fetch(s, clock, 3, 10).error_code == E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER


# ------------------------------------------------------------------ acks=all


def test_min_isr_refuses_before_the_append() -> None:
    clock = Clock()
    s = leader(clock, (1, 2), log_end_offset=0, high_watermark=0)
    assert s.check_min_isr(2) == (OK, "")
    code, message = s.check_min_isr(3)
    assert code == E.ERROR_CODE_NOT_ENOUGH_REPLICAS and "min_insync_replicas=3" in message


def test_waiters_are_released_in_offset_order_as_the_high_watermark_passes_them() -> None:
    clock = Clock()
    s = leader(clock, (1, 2), log_end_offset=0, high_watermark=0)
    s.on_leader_append(30)
    for waiter_id, required in [(1, 30), (2, 10), (3, 20), (4, 10), (5, 25)]:
        assert s.add_ack_waiter(waiter_id, required, 2) == ()
    assert released(s, clock, 2, 9) == ()
    assert released(s, clock, 2, 22) == (AckRelease(2, 10, OK), AckRelease(4, 10, OK), AckRelease(3, 20, OK))
    assert released(s, clock, 2, 30) == (AckRelease(5, 25, OK), AckRelease(1, 30, OK))
    # Already committed: answered at once.
    assert s.add_ack_waiter(6, 30, 2) == (AckRelease(6, 30, OK),)
    with pytest.raises(ValueError):
        s.add_ack_waiter(7, 31, 2)


def test_isr_falling_below_min_while_waiting_answers_not_enough_replicas_after_append() -> None:
    clock = Clock()
    s = leader(clock, (1, 2, 3), log_end_offset=0, high_watermark=0)
    released(s, clock, 2, 0)
    released(s, clock, 3, 0)
    s.on_leader_append(5)
    assert s.check_min_isr(2)[0] == OK
    s.add_ack_waiter(1, 5, 2)
    s.add_ack_waiter(2, 5, 1)
    # Both followers stall; the leader shrinks the ISR to itself. The high watermark reaches the
    # waiters, but only the one asking for a single in-sync replica got what it asked for.
    clock.advance(LAG_MS + 1)
    p = s.propose_isr_change(clock.now_ms, LAG_MS)
    assert p is not None and p.new_isr == (1,)
    assert committed(s, p) == (
        AckRelease(1, 5, E.ERROR_CODE_NOT_ENOUGH_REPLICAS_AFTER_APPEND),
        AckRelease(2, 5, OK),
    )


def test_a_waiter_that_timed_out_is_forgotten() -> None:
    clock = Clock()
    s = leader(clock, (1, 2), log_end_offset=5, high_watermark=0)
    s.add_ack_waiter(1, 5, 2)
    assert s.remove_ack_waiter(1) and not s.remove_ack_waiter(1)
    assert released(s, clock, 2, 5) == ()
    s.on_leader_append(8)
    assert s.add_ack_waiter(2, 8, 2) == ()
    with pytest.raises(ValueError):
        s.add_ack_waiter(2, 8, 2)


# ------------------------------------------------------------------ fetch checks


def test_fetch_epoch_and_membership_checks() -> None:
    clock = Clock()
    s = leader(clock, log_end_offset=10, high_watermark=10)
    # name: (replica, fetch_offset, current_leader_epoch, last_fetched_epoch, error_code)
    cases = {
        "stale epoch": (2, 10, 4, 5, E.ERROR_CODE_FENCED_LEADER_EPOCH),
        "future epoch": (2, 10, 6, 5, E.ERROR_CODE_UNKNOWN_LEADER_EPOCH),
        "not a replica": (9, 10, 5, 5, E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER),
        "past the log end, no epoch to check": (2, 11, 5, -1, E.ERROR_CODE_OFFSET_OUT_OF_RANGE),
        "negative offset": (2, -1, 5, -1, E.ERROR_CODE_OFFSET_OUT_OF_RANGE),
        "no epoch named": (2, 10, -1, 5, OK),
        "current epoch": (3, 10, 5, 5, OK),
    }
    for name, (replica, offset, epoch, last_epoch, code) in cases.items():
        out = s.on_follower_fetch(
            replica,
            offset,
            current_leader_epoch=epoch,
            last_fetched_epoch=last_epoch,
            epoch_entries=[(3, 0), (5, 4)],
            now_ms=clock.now_ms,
        )
        assert out.error_code == code, (name, out)
        assert out.ok == (code == OK)
    # Past the log end in the leader's own epoch: the follower holds records the leader does not
    # (divergence is checked first, as in Kafka), so it is told to truncate, not refused.
    out = s.on_follower_fetch(
        2, 12, current_leader_epoch=5, last_fetched_epoch=5, epoch_entries=[(3, 0), (5, 4)], now_ms=0
    )
    assert out.error_code == OK and out.diverging_epoch == EpochEndOffset(5, 10)
    # Only the accepted fetches taught the leader anything.
    assert s.follower(2).log_end_offset == 10 and s.follower(3).log_end_offset == 10


def test_a_diverging_fetch_is_answered_with_the_epoch_to_truncate_to_and_not_counted() -> None:
    clock = Clock()
    s = leader(clock, (1, 2), log_end_offset=10, high_watermark=10)
    out = s.on_follower_fetch(
        3,
        12,
        current_leader_epoch=5,
        last_fetched_epoch=4,
        epoch_entries=[(3, 0), (5, 8)],
        now_ms=clock.now_ms,
    )
    assert out.error_code == OK and not out.ok
    assert out.diverging_epoch == EpochEndOffset(3, 8)
    assert s.follower(3).log_end_offset == -1 and s.expand_candidates() == ()


# ------------------------------------------------------------------ divergence (KIP-101/279/320)


def test_end_offset_for_epoch_follows_kafkas_epoch_cache() -> None:
    cache = [(1, 0), (3, 10), (6, 20)]
    cases = {
        "undefined epoch": (-1, EpochEndOffset(-1, -1)),
        "latest epoch ends at the log end": (6, EpochEndOffset(6, 25)),
        "an epoch ends where the next starts": (3, EpochEndOffset(3, 20)),
        "a skipped epoch answers its floor": (4, EpochEndOffset(3, 20)),
        "below the earliest epoch": (0, EpochEndOffset(0, 0)),
        "above every epoch": (7, EpochEndOffset(-1, -1)),
    }
    for name, (requested, want) in cases.items():
        assert end_offset_for_epoch(cache, 25, requested) == want, name
    assert end_offset_for_epoch([], 0, 0) == EpochEndOffset(-1, -1)
    # A leader that wrote nothing yet in its epoch: the epoch starts at its log end.
    assert end_offset_for_epoch(cache, 25, 7, leader_epoch=8) == EpochEndOffset(6, 25)
    assert end_offset_for_epoch(cache, 25, 8, leader_epoch=8) == EpochEndOffset(8, 25)
    assert end_offset_for_epoch([], 0, 0, leader_epoch=0) == EpochEndOffset(0, 0)


def test_truncation_offset_named_cases() -> None:
    follower = [(1, 0), (3, 10), (5, 20)]
    cases = {
        "same epoch, the leader's copy ends first": (EpochEndOffset(3, 15), 15),
        "same epoch, the follower's copy ends first": (EpochEndOffset(3, 25), 20),
        "an epoch the follower skipped: back to its own earlier epoch": (EpochEndOffset(4, 30), 20),
        "older than anything the follower has": (EpochEndOffset(0, 7), 0),
        "the leader knows no epoch: keep what was committed": (EpochEndOffset(-1, -1), 12),
        "never past the follower's log end": (EpochEndOffset(5, 40), 26),
    }
    for name, (answer, want) in cases.items():
        assert truncation_offset(follower, 26, answer, high_watermark=12) == want, name
    assert truncation_offset([], 0, EpochEndOffset(2, 5), high_watermark=0) == 0


@dataclass
class Log:
    """A replica's log as epochs only: [(epoch, start_offset)] and the log end."""

    epochs: list[tuple[int, int]] = field(default_factory=list)
    end: int = 0
    high_watermark: int = 0

    def append(self, epoch: int, n: int) -> None:
        if not self.epochs or self.epochs[-1][0] != epoch:
            assert not self.epochs or self.epochs[-1][0] < epoch
            self.epochs.append((epoch, self.end))
        self.end += n

    def truncate(self, offset: int) -> None:
        self.epochs = [(e, s) for e, s in self.epochs if s < offset]
        self.end = min(self.end, offset)

    def epoch_at(self, offset: int) -> int:
        return max(e for e, s in self.epochs if s <= offset)

    def last_epoch(self) -> int:
        return self.epochs[-1][0] if self.epochs else UNDEFINED_EPOCH


def reconcile(follower: Log, leader_log: Log, leader_epoch: int) -> list[EpochEndOffset]:
    """The follower fetches and truncates until its log is a prefix of the leader's, then copies the
    rest; returns the diverging answers it got, one per round trip."""
    answers = []
    for _ in range(10):
        d = diverging_epoch(
            leader_log.epochs, leader_log.end, follower.last_epoch(), follower.end, leader_epoch=leader_epoch
        )
        if d is None:
            break
        answers.append(d)
        follower.truncate(
            truncation_offset(follower.epochs, follower.end, d, high_watermark=follower.high_watermark)
        )
    else:
        raise AssertionError("no convergence")
    assert follower.end <= leader_log.end
    for offset in range(follower.end, leader_log.end):
        follower.append(leader_log.epoch_at(offset), 1)
    assert follower.epochs == leader_log.epochs and follower.end == leader_log.end
    return answers


def test_kip101_follower_that_restarts_keeps_records_above_its_high_watermark() -> None:
    """KIP-101 scenario 1: truncating to the high watermark on restart loses a committed record once
    the follower leads. With epochs the follower keeps its log: nothing diverged."""
    a = Log()
    a.append(0, 2)  # leader A, epoch 0: offsets 0, 1
    b = Log(high_watermark=1)
    b.append(0, 2)  # B copied both; its high watermark still says 1
    assert diverging_epoch(a.epochs, a.end, b.last_epoch(), b.end, leader_epoch=0) is None
    assert reconcile(b, a, 0) == [] and b.end == 2


def test_kip101_logs_that_diverged_across_a_restart_converge_on_the_new_leaders() -> None:
    """KIP-101 scenario 2: A held offsets 0-1 in epoch 0, B only offset 0; both crash, B comes back
    first and leads epoch 1, writing offset 1. A must drop its offset 1."""
    a = Log()
    a.append(0, 2)
    b = Log()
    b.append(0, 1)
    b.append(1, 1)
    assert reconcile(a, b, 1) == [EpochEndOffset(0, 1)]
    assert a.epochs == [(0, 0), (1, 1)]


def test_kip279_two_leader_changes_in_a_row() -> None:
    """A leads epoch 1 (offsets 0-2), B and C copy 0-1. A fails; B leads epoch 2 and writes 2-3 that
    nobody copies, then fails; C leads epoch 3 from offset 2. Both A and B, returning, truncate to 2:
    A because its epoch 1 runs past C's, B because C never had epoch 2."""
    c = Log()
    c.append(1, 2)
    c.append(3, 3)  # offsets 2-4 in epoch 3
    a = Log()
    a.append(1, 3)
    b = Log()
    b.append(1, 2)
    b.append(2, 2)
    assert reconcile(a, c, 3) == [EpochEndOffset(1, 2)]
    assert reconcile(b, c, 3) == [EpochEndOffset(1, 2)]


def test_kip279_a_follower_that_led_briefly_truncates_below_the_leaders_end_of_the_shared_epoch() -> None:
    """L led epoch 0 to offset 5; F had copied 0-2 when it led epoch 1 briefly (writing 3-5), then L
    came back as leader of epoch 2 at offset 5. L answers F with (0, 5), but F's own epoch 0 ends at
    3: truncating to 5 (before KIP-279) would keep F's epoch-1 records at 3-4 under L's epoch 0."""
    leader_log = Log()
    leader_log.append(0, 5)
    leader_log.append(2, 3)
    f = Log()
    f.append(0, 3)
    f.append(1, 3)
    assert reconcile(f, leader_log, 2) == [EpochEndOffset(0, 5)]
    assert f.end == leader_log.end


def test_a_follower_several_epochs_astray_walks_back_one_epoch_per_round_trip() -> None:
    """The follower skipped the leader's epochs 2 and 4 and wrote its own 3 and 5 (unclean
    elections): each answer names an epoch the follower lacks, so it truncates to its own earlier
    epoch's end and asks again."""
    leader_log = Log()
    for epoch in (0, 2, 4, 6):
        leader_log.append(epoch, 3)
    f = Log()
    f.append(0, 3)
    f.append(1, 1)
    f.append(3, 2)
    f.append(5, 2)
    answers = reconcile(f, leader_log, 6)
    assert answers[0] == EpochEndOffset(4, 9)
    assert answers[-1] == EpochEndOffset(0, 3)
    assert len(answers) == 3


def test_the_fetch_server_and_the_core_agree_on_divergence() -> None:
    cache = [(0, 0), (2, 5)]
    for last_epoch in range(-1, 4):
        for offset in range(0, 9):
            want = diverging_epoch(cache, 8, last_epoch, offset, leader_epoch=2)
            s = ReplicaState(
                node_id=1,
                topic_id=TID,
                partition=0,
                broker_epoch=7,
                record=record(leader_epoch=2),
                log_end_offset=8,
                high_watermark_checkpoint=0,
                now_ms=0,
            )
            out = s.on_follower_fetch(
                2,
                offset,
                current_leader_epoch=2,
                last_fetched_epoch=last_epoch,
                epoch_entries=cache,
                now_ms=0,
            )
            assert out.diverging_epoch == want


# ------------------------------------------------------------------ simulation


class Channel:
    """AlterPartition commands on their way to the controller, applied in any order, some resent.

    A resend is the very object the leader still holds as ``pending``, with its request id; a new
    proposal has a new request id even when it is otherwise equal to an old one. The real state
    machine answers every copy of a request with its first answer and never applies a copy of a
    refused one: the contract ``ReplicaState.on_alter_partition_answer`` relies on.
    """

    def __init__(self) -> None:
        self._in_flight: list[AlterPartition] = []

    def __bool__(self) -> bool:
        return bool(self._in_flight)

    def send(self, p: AlterPartition) -> None:
        assert p.request_id
        self._in_flight.append(p)

    def apply_one(self, rng: random.Random, metadata: ClusterMetadata) -> tuple[AlterPartition, Result]:
        """The controller applies one command in flight: ``(proposal, result)``."""
        p = self._in_flight.pop(rng.randrange(len(self._in_flight)))
        r = metadata.apply(p)
        metadata.check_invariants()
        return p, r


@dataclass
class Sim:
    """One leadership of partition 0 on node 1, followers copying its log, the real metadata state
    machine as the controller, a fake clock and a seeded RNG."""

    rng: random.Random
    replicas: tuple[int, ...]
    min_isr: int
    clock: Clock = field(default_factory=Clock)
    metadata: ClusterMetadata = field(default_factory=ClusterMetadata)
    broker_epochs: dict[int, int] = field(default_factory=dict)
    leader_leo: int = 0
    follower_leo: dict[int, int] = field(default_factory=dict)
    slow: set[int] = field(default_factory=set)
    in_flight: Channel = field(default_factory=Channel)
    answers: list[tuple[AlterPartition, int, tuple[int, ...], int, int]] = field(default_factory=list)
    next_waiter: int = 0
    # The leader's request ids: a new one per proposal.
    next_request: int = 0
    parked: dict[int, int] = field(default_factory=dict)
    acked: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for n in self.replicas:
            r = self.metadata.apply(RegisterNode(n, bytes([n]) * 16, "h", 9000 + n))
            assert r.ok
            self.broker_epochs[n] = r.broker_epoch
            assert self.metadata.apply(UnfenceNode(n, r.broker_epoch)).ok
        assert self.metadata.apply(CreateTopic("t", TID, (self.replicas,))).ok
        p = self.part()
        assert p.leader == 1
        self.follower_leo = {r: 0 for r in self.replicas if r != 1}
        self.s = ReplicaState(
            node_id=1,
            topic_id=TID,
            partition=0,
            broker_epoch=self.broker_epochs[1],
            record=p,
            log_end_offset=0,
            high_watermark_checkpoint=0,
            now_ms=self.clock.now_ms,
        )
        self.last_hw = 0

    def part(self) -> PartitionRecord:
        p = self.metadata.partition(TID, 0)
        assert p is not None
        return p

    def collect(self, out: tuple[AckRelease, ...]) -> None:
        offsets = [a.required_offset for a in out]
        assert offsets == sorted(offsets), out
        for a in out:
            assert self.parked.pop(a.waiter_id) == a.required_offset
            if a.error_code == OK:
                # Acknowledged: in every ISR member's log, as the controller holds the ISR now and
                # as the leader does.
                for m in set(self.part().isr) | set(self.s.isr):
                    leo = self.leader_leo if m == 1 else self.follower_leo[m]
                    assert a.required_offset <= leo, (a, m, leo, self.s)
                self.acked.append(a.required_offset)
            else:
                assert a.error_code == E.ERROR_CODE_NOT_ENOUGH_REPLICAS_AFTER_APPEND, a
                assert len(self.s.isr) < self.min_isr

    def step(self) -> None:
        rng, s = self.rng, self.s
        roll = rng.random()
        if roll < 0.25:  # a producer, acks=all
            if s.check_min_isr(self.min_isr)[0] != OK:
                assert len(s.isr) < self.min_isr
                return
            self.leader_leo += rng.randint(1, 4)
            self.collect(s.on_leader_append(self.leader_leo))
            self.next_waiter += 1
            self.parked[self.next_waiter] = self.leader_leo
            self.collect(s.add_ack_waiter(self.next_waiter, self.leader_leo, self.min_isr))
        elif roll < 0.6:  # a follower fetches, then copies part of what it was sent
            f = rng.choice(list(self.follower_leo))
            if f in self.slow and rng.random() < 0.9:
                return
            out = s.on_follower_fetch(
                f,
                self.follower_leo[f],
                current_leader_epoch=s.leader_epoch,
                last_fetched_epoch=s.leader_epoch if self.follower_leo[f] else UNDEFINED_EPOCH,
                epoch_entries=[(s.leader_epoch, 0)] if self.leader_leo else [],
                now_ms=self.clock.now_ms,
            )
            assert out.ok, out
            self.collect(out.released)
            self.follower_leo[f] = rng.randint(self.follower_leo[f], self.leader_leo)
        elif roll < 0.7:
            self.clock.advance(rng.choice([1, 100, 1_000, LAG_MS // 2, LAG_MS + 1]))
        elif roll < 0.75:
            f = rng.choice(list(self.follower_leo))
            self.slow.symmetric_difference_update({f})
        elif roll < 0.82:  # the leader proposes, leaving out nodes fenced (mostly: the image may lag)
            fenced = {n for n, rec in self.metadata.nodes.items() if rec.fenced and rng.random() < 0.8}
            p = s.propose_isr_change(
                self.clock.now_ms, LAG_MS, ineligible=fenced, request_id=self.request_id()
            )
            if p is not None:
                self.in_flight.send(p)
        elif roll < 0.88 and self.in_flight:  # the controller applies a proposal (or a resend)
            p, r = self.in_flight.apply_one(rng, self.metadata)
            if rng.random() < 0.8:  # some answers are lost
                self.answers.append((p, r.error_code, r.isr, r.leader_epoch, r.partition_epoch))
        elif roll < 0.92 and self.answers:
            p, code, isr, le, pe = self.answers.pop(rng.randrange(len(self.answers)))
            self.collect(s.on_alter_partition_answer(p, code, isr=isr, leader_epoch=le, partition_epoch=pe))
        elif roll < 0.96:  # the metadata reaches the leader
            self.collect(s.on_metadata(self.part(), self.clock.now_ms))
        elif roll < 0.98:  # the controller fences or unfences a follower
            f = rng.choice(list(self.follower_leo))
            n = self.metadata.nodes[f]
            cmd = UnfenceNode(f, n.broker_epoch) if n.fenced else FenceNode(f, n.broker_epoch)
            self.metadata.apply(cmd)
        elif s.pending is not None:  # the leader resends its pending proposal
            self.in_flight.send(s.pending)

    def request_id(self) -> str:
        self.next_request += 1
        return f"1-{self.next_request}"

    def check(self) -> None:
        s = self.s
        s.check_invariants()
        assert s.high_watermark >= self.last_hw, "the high watermark moved back"
        self.last_hw = s.high_watermark
        assert s.high_watermark <= self.leader_leo == s.log_end_offset
        # The controller's ISR never holds a member the leader does not count (KIP-497).
        assert set(self.part().isr) <= set(s.maximal_isr), (self.part(), s)
        for m in set(s.maximal_isr) | set(self.part().isr):
            leo = self.leader_leo if m == 1 else self.follower_leo[m]
            assert s.high_watermark <= leo, (m, leo, s)
        for required in self.parked.values():
            assert required > s.high_watermark


@pytest.mark.parametrize("seed", range(200))
def test_simulated_leadership_keeps_the_replication_invariants(seed: int) -> None:
    rng = random.Random(seed)
    replicas = tuple(range(1, rng.randint(2, 5) + 1))
    sim = Sim(rng, replicas, min_isr=rng.randint(1, len(replicas)))
    for _ in range(400):
        sim.step()
        sim.check()
    # Heal: everyone unfenced and fetching, the controller and the leader in step; all is acked.
    for f in sim.follower_leo:
        n = sim.metadata.nodes[f]
        if n.fenced:
            sim.metadata.apply(UnfenceNode(f, n.broker_epoch))
    sim.slow.clear()
    for _ in range(50):
        sim.collect(sim.s.on_metadata(sim.part(), sim.clock.now_ms))
        for f in sim.follower_leo:
            sim.follower_leo[f] = sim.leader_leo
            out = sim.s.on_follower_fetch(
                f,
                sim.leader_leo,
                current_leader_epoch=sim.s.leader_epoch,
                last_fetched_epoch=sim.s.leader_epoch if sim.leader_leo else UNDEFINED_EPOCH,
                epoch_entries=[(sim.s.leader_epoch, 0)] if sim.leader_leo else [],
                now_ms=sim.clock.now_ms,
            )
            sim.collect(out.released)
        # A pending proposal (its command or its answer lost) is resent, as the caller must.
        p = sim.s.pending or sim.s.propose_isr_change(sim.clock.now_ms, LAG_MS, request_id=sim.request_id())
        if p is not None:
            r = sim.metadata.apply(p)
            sim.collect(
                sim.s.on_alter_partition_answer(
                    p, r.error_code, isr=r.isr, leader_epoch=r.leader_epoch, partition_epoch=r.partition_epoch
                )
            )
        sim.check()
    assert sim.part().isr == replicas, (sim.part(), sim.s)
    assert sim.s.high_watermark == sim.leader_leo
    assert not sim.parked


# ------------------------------------------------------------------ leader changes, simulated


def epoch_cache(log: list[int]) -> list[tuple[int, int]]:
    """The epoch cache of a log given as the leader epoch of each record."""
    out: list[tuple[int, int]] = []
    for offset, epoch in enumerate(log):
        if not out or out[-1][0] != epoch:
            out.append((epoch, offset))
    return out


@dataclass
class Replica:
    """One node's copy of the partition: ``log[offset]`` is the leader epoch that wrote the record.
    It survives a restart (no unflushed loss here), as does ``high_watermark`` (its checkpoint);
    ``view`` (the metadata it has applied) and ``core`` (its leader state) do not."""

    node_id: int
    log: list[int] = field(default_factory=list)
    high_watermark: int = 0
    alive: bool = True
    view: PartitionRecord | None = None
    core: ReplicaState | None = None


class FailoverSim:
    """Leaders come and go (fenced, killed, restarted, preferred-leader elections) while the metadata
    reaches each node late, so a deposed leader keeps serving its stale followers for a while.
    Followers fetch from whoever they believe leads, truncate on a diverging answer and copy the
    rest; producers write acks=all to whoever believes it leads."""

    def __init__(self, rng: random.Random, n: int, min_isr: int) -> None:
        self.rng, self.min_isr = rng, min_isr
        self.clock = Clock()
        self.metadata = ClusterMetadata()
        self.replicas = tuple(range(1, n + 1))
        self.incarnations = dict.fromkeys(self.replicas, 0)
        for r in self.replicas:
            self.register(r)
        assert self.metadata.apply(CreateTopic("t", TID, (self.replicas,))).ok
        self.nodes = {r: Replica(r) for r in self.replicas}
        self.in_flight = Channel()
        # waiter id -> (node, required offset); acknowledged prefixes of the log.
        self.parked: dict[int, tuple[int, int]] = {}
        self.acked: list[tuple[int, ...]] = []
        self.next_waiter = 0
        # Request ids: one counter for every node, so no two proposals share one, across restarts too.
        self.next_request = 0
        self.stats: dict[str, int] = {}
        for r in self.replicas:
            self.learn(r)

    def request_id(self, r: int) -> str:
        self.next_request += 1
        return f"{r}-{self.next_request}"

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def register(self, r: int) -> None:
        self.incarnations[r] += 1
        res = self.metadata.apply(RegisterNode(r, bytes([r, self.incarnations[r]]) * 8, "h", 9000 + r))
        assert res.ok
        assert self.metadata.apply(UnfenceNode(r, res.broker_epoch)).ok

    def part(self) -> PartitionRecord:
        p = self.metadata.partition(TID, 0)
        assert p is not None
        return p

    def fenced(self) -> set[int]:
        return {r for r, n in self.metadata.nodes.items() if n.fenced}

    def learn(self, r: int) -> None:
        """Node ``r`` applies the metadata as it is now."""
        node, view = self.nodes[r], self.part()
        node.view = view
        if node.core is not None:
            self.collect(node.core.on_metadata(view, self.clock.now_ms))
            if node.core.resigned:
                node.core = None
        if view.leader == r and node.core is None:
            self.count("leaderships")
            node.core = ReplicaState(
                node_id=r,
                topic_id=TID,
                partition=0,
                broker_epoch=self.metadata.nodes[r].broker_epoch,
                record=view,
                log_end_offset=len(node.log),
                high_watermark_checkpoint=min(node.high_watermark, len(node.log)),
                now_ms=self.clock.now_ms,
            )

    def collect(self, out: tuple[AckRelease, ...]) -> None:
        for a in out:
            leader_id, required = self.parked.pop(a.waiter_id)
            assert required == a.required_offset
            if a.error_code != OK:
                continue
            self.count("acked")
            prefix = tuple(self.nodes[leader_id].log[:required])
            assert len(prefix) == required
            # Acknowledged: the same records in every ISR member's log, as the controller holds it.
            for m in self.part().isr:
                assert tuple(self.nodes[m].log[:required]) == prefix, (a, m, self.part())
            self.acked.append(prefix)

    def kill(self, r: int) -> None:
        node = self.nodes[r]
        node.alive, node.view, node.core = False, None, None
        # Its parked producers time out: the outcome is unknown to them, and nothing was acked.
        for w, (leader_id, _) in list(self.parked.items()):
            if leader_id == r:
                del self.parked[w]
        self.metadata.apply(FenceNode(r, self.metadata.nodes[r].broker_epoch))
        self.count("kills")

    def restart(self, r: int) -> None:
        self.nodes[r].alive = True
        self.register(r)
        self.learn(r)

    def fetch(self, r: int) -> None:
        node = self.nodes[r]
        view = node.view
        if view is None or view.leader in (r, -1) or not self.nodes[view.leader].alive:
            return
        leader = self.nodes[view.leader]
        if leader.core is None:
            return
        out = leader.core.on_follower_fetch(
            r,
            len(node.log),
            current_leader_epoch=view.leader_epoch,
            last_fetched_epoch=node.log[-1] if node.log else UNDEFINED_EPOCH,
            epoch_entries=epoch_cache(leader.log),
            now_ms=self.clock.now_ms,
        )
        self.collect(out.released)
        if out.diverging_epoch is not None:
            to = truncation_offset(
                epoch_cache(node.log), len(node.log), out.diverging_epoch, high_watermark=node.high_watermark
            )
            # Committed records are never truncated.
            assert to >= node.high_watermark, (r, to, node.high_watermark, out)
            del node.log[to:]
            self.count("truncations")
        elif out.ok:
            assert node.log == leader.log[: len(node.log)], "an accepted fetch from a diverged log"
            node.log.extend(leader.log[len(node.log) : len(node.log) + self.rng.randint(0, 4)])
            hw = min(leader.core.high_watermark, len(node.log))
            node.high_watermark = max(node.high_watermark, hw)

    def produce(self, r: int) -> None:
        node = self.nodes[r]
        if node.core is None or node.core.check_min_isr(self.min_isr)[0] != OK:
            return
        node.log.extend([node.core.leader_epoch] * self.rng.randint(1, 3))
        self.collect(node.core.on_leader_append(len(node.log)))
        node.high_watermark = node.core.high_watermark
        self.next_waiter += 1
        self.parked[self.next_waiter] = (r, len(node.log))
        self.collect(node.core.add_ack_waiter(self.next_waiter, len(node.log), self.min_isr))

    def controller(self) -> None:
        if not self.in_flight:
            return
        p, res = self.in_flight.apply_one(self.rng, self.metadata)
        node = self.nodes[p.leader_id]
        if node.core is not None and self.rng.random() < 0.7:
            self.collect(
                node.core.on_alter_partition_answer(
                    p,
                    res.error_code,
                    isr=res.isr,
                    leader_epoch=res.leader_epoch,
                    partition_epoch=res.partition_epoch,
                )
            )

    def step(self) -> None:
        rng = self.rng
        alive = [r for r in self.replicas if self.nodes[r].alive]
        r = rng.choice(alive)
        node = self.nodes[r]
        roll = rng.random()
        if roll < 0.4:
            self.fetch(r)
        elif roll < 0.6:
            self.produce(r)
        elif roll < 0.7:
            self.learn(r)
        elif roll < 0.75:
            self.clock.advance(rng.choice([100, LAG_MS // 2, LAG_MS + 1]))
        elif roll < 0.82:
            if node.core is not None:
                p = node.core.pending or node.core.propose_isr_change(
                    self.clock.now_ms, LAG_MS, ineligible=self.fenced(), request_id=self.request_id(r)
                )
                if p is not None:
                    self.in_flight.send(p)
        elif roll < 0.9:
            self.controller()
        elif roll < 0.93 and len(alive) > 1:
            self.kill(r)
        elif roll < 0.96:
            dead = [x for x in self.replicas if not self.nodes[x].alive]
            if dead:
                self.restart(rng.choice(dead))
        else:  # a preferred-leader election, or a move to a chosen ISR member
            p = self.part()
            target = rng.choice([-1, *p.isr])
            res = self.metadata.apply(ElectLeader(TID, 0, target, p.leader_epoch))
            if res.ok and res.leader_id != p.leader:
                self.count("elections")

    def check(self) -> None:
        p = self.part()
        for prefix in self.acked:
            for m in p.isr:
                assert tuple(self.nodes[m].log[: len(prefix)]) == prefix, ("acked write lost", m, p)
        for node in self.nodes.values():
            assert node.high_watermark <= len(node.log)
            if node.core is not None:
                node.core.check_invariants()
                assert node.core.log_end_offset == len(node.log)

    def heal(self) -> None:
        for r in self.replicas:
            if not self.nodes[r].alive:
                self.restart(r)
        for _ in range(100):
            for r in self.replicas:
                self.learn(r)
                for _ in range(3):
                    self.fetch(r)
            leader = self.part().leader
            core = self.nodes[leader].core if leader >= 0 else None
            if core is not None:
                p = core.pending or core.propose_isr_change(
                    self.clock.now_ms, LAG_MS, ineligible=self.fenced(), request_id=self.request_id(leader)
                )
                if p is not None:
                    self.in_flight.send(p)
            while self.in_flight:
                self.controller()
            self.check()
        leader = self.part().leader
        assert leader >= 0 and self.part().isr == self.replicas, self.part()
        final = self.nodes[leader].log
        for node in self.nodes.values():
            assert node.log == final
        for prefix in self.acked:
            assert tuple(final[: len(prefix)]) == prefix


@pytest.mark.parametrize("seed", range(200))
def test_acked_writes_survive_leader_changes(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([2, 3, 3, 4, 5])
    sim = FailoverSim(rng, n, min_isr=rng.choice([1, 2, min(3, n)]) if n > 2 else rng.choice([1, 2]))
    for _ in range(500):
        sim.step()
        sim.check()
    sim.heal()
