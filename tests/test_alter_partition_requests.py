"""AlterPartition is safe to resend: the metadata remembers each request id's first answer per
partition, so a copy that arrives later (a resend after a lost answer, a refusal or a controller
change) gets that answer and changes nothing. A leader drops a refused ISR change (as Kafka does);
that is safe only because no copy of the refused request can be applied afterwards.
Plain data: the state machine and the command encoding, no threads.
"""

from __future__ import annotations

import json
from dataclasses import replace

from headwater.raft.commands import (
    AlterPartition,
    Command,
    CreateTopic,
    FenceNode,
    RegisterNode,
    UnfenceNode,
    decode_command,
    encode_command,
)
from headwater.raft.metadata import (
    MAX_RECENT_REQUESTS,
    MAX_REQUEST_ID_LENGTH,
    ClusterMetadata,
    PartitionRecord,
    Result,
)
from headwater.v1 import errors_pb2 as E

TID = bytes(range(1, 17))
RID = "1-0c9b1f0e2a3d4c5b6a7980f1e2d3c4b5"


def started(nodes: int = 3) -> tuple[ClusterMetadata, dict[int, int]]:
    m = ClusterMetadata()
    epochs: dict[int, int] = {}
    for n in range(1, nodes + 1):
        r = m.apply(RegisterNode(n, bytes([n]) * 16, "127.0.0.1", 9000 + n))
        epochs[n] = r.broker_epoch
        assert m.apply(UnfenceNode(n, r.broker_epoch)).ok
    assert m.apply(CreateTopic("t", TID, ((1, 2, 3), (2, 3, 1)))).ok
    return m, epochs


def apply(m: ClusterMetadata, cmd: Command) -> Result:
    r = m.apply(cmd)
    m.check_invariants()
    return r


def part(m: ClusterMetadata, index: int = 0) -> PartitionRecord:
    p = m.partition(TID, index)
    assert p is not None
    return p


def alter(
    m: ClusterMetadata, epochs: dict[int, int], new_isr: tuple[int, ...], request_id: str = RID
) -> AlterPartition:
    """The leader of partition 0's compare-and-set on the epochs it holds now."""
    p = part(m)
    return AlterPartition(
        TID, 0, p.leader, epochs[p.leader], p.leader_epoch, p.partition_epoch, new_isr, request_id
    )


def unchanged_but_offset(before: bytes, m: ClusterMetadata) -> bool:
    doc, now = json.loads(before), json.loads(m.to_snapshot())
    doc["metadata_offset"] = now["metadata_offset"]
    return bool(doc == now)


def test_a_refused_isr_change_resent_after_the_epochs_would_allow_it_is_still_refused() -> None:
    m, epochs = started()
    assert apply(m, alter(m, epochs, (1, 3), request_id="1-shrink")).ok  # 2 leaves
    assert apply(m, FenceNode(2, epochs[2])).ok
    # The leader asks to take 2 back while 2 is fenced: refused, and the leader drops the change.
    grow = alter(m, epochs, (1, 2, 3))
    refused = apply(m, grow)
    assert refused.error_code == E.ERROR_CODE_INELIGIBLE_REPLICA, refused
    # 2 is unfenced again; the refused command's epochs still match the partition.
    assert apply(m, UnfenceNode(2, epochs[2])).ok
    p = part(m)
    assert (p.leader_epoch, p.partition_epoch, p.isr) == (grow.leader_epoch, grow.partition_epoch, (1, 3))
    # The same change under another request id would be applied now ...
    assert m.copy().apply(replace(grow, request_id="1-another")).isr == (1, 2, 3)
    # ... but a copy of the refused request still answers the refusal and changes nothing.
    before = m.to_snapshot()
    again = apply(m, grow)
    assert (again.ok, again.error_code, again.message) == (False, refused.error_code, refused.message)
    assert unchanged_but_offset(before, m)
    assert part(m).isr == (1, 3)


def test_an_accepted_isr_change_resent_answers_success_and_applies_once() -> None:
    m, epochs = started()
    shrink = alter(m, epochs, (1, 3))
    first = apply(m, shrink)
    assert first.ok and first.isr == (1, 3) and first.partition_epoch == 1, first
    # The leader takes 2 back meanwhile (a new request); then the lost answer's resend lands.
    assert apply(m, alter(m, epochs, (1, 2, 3), request_id="1-grow")).ok
    before = m.to_snapshot()
    again = apply(m, shrink)
    assert again.ok and again.error_code == E.ERROR_CODE_NONE, again
    # The first answer, partition state included: what that change made, not what is there now.
    assert (again.isr, again.leader_id, again.leader_epoch, again.partition_epoch) == (
        first.isr,
        first.leader_id,
        first.leader_epoch,
        first.partition_epoch,
    )
    assert unchanged_but_offset(before, m)
    assert part(m).isr == (1, 2, 3) and part(m).partition_epoch == 2


def test_without_a_request_id_a_copy_is_evaluated_afresh() -> None:
    m, epochs = started()
    cmd = alter(m, epochs, (1, 3), request_id="")
    assert apply(m, cmd).ok
    assert apply(m, cmd).error_code == E.ERROR_CODE_INVALID_UPDATE_VERSION
    assert m.partition_request_answer("", TID, 0) is None
    assert not m.recent_requests


def test_every_first_answer_is_remembered_per_partition() -> None:
    m, epochs = started()
    stale = replace(alter(m, epochs, (1, 3)), leader_epoch=5)
    assert apply(m, stale).error_code == E.ERROR_CODE_FENCED_LEADER_EPOCH
    answer = m.partition_request_answer(RID, TID, 0)
    assert answer is not None and answer.error_code == E.ERROR_CODE_FENCED_LEADER_EPOCH
    # The same request id for partition 1 is another question with its own answer.
    p1 = part(m, 1)
    other = AlterPartition(
        TID, 1, p1.leader, epochs[p1.leader], p1.leader_epoch, p1.partition_epoch, (2, 3), RID
    )
    assert apply(m, other).ok
    assert m.partition_request_answer(RID, TID, 1) is not None
    assert m.partition_request_answer(RID, TID, 0) == answer


def test_partition_answers_never_meet_topic_answers() -> None:
    m, epochs = started()
    assert apply(m, alter(m, epochs, (1, 3))).ok
    assert m.partition_request_answer(RID, TID, 0) is not None
    # A topic change of the same request id is not taken for the partition's answer, nor the reverse.
    assert m.request_answer(RID, "t") is None
    assert apply(m, CreateTopic("u", bytes(range(3, 19)), ((1,),), request_id=RID)).ok
    assert m.topic("u") is not None


def test_partition_answers_share_the_bound_oldest_forgotten_first() -> None:
    m, epochs = started()
    first = alter(m, epochs, (1, 3), request_id="first")
    assert apply(m, first).ok
    for i in range(MAX_RECENT_REQUESTS):
        apply(m, alter(m, epochs, (1, 3), request_id=f"r{i}"))  # each an "ISR unchanged" answer
    assert len(m.recent_requests) == MAX_RECENT_REQUESTS
    assert m.partition_request_answer("first", TID, 0) is None


def test_a_request_id_longer_than_the_bound_is_refused_and_not_remembered() -> None:
    m, epochs = started()
    r = apply(m, alter(m, epochs, (1, 3), request_id="x" * (MAX_REQUEST_ID_LENGTH + 1)))
    assert r.error_code == E.ERROR_CODE_INVALID_REQUEST
    assert part(m).isr == (1, 2, 3) and not m.recent_requests


def test_remembered_partition_answers_are_part_of_the_snapshot_and_of_equality() -> None:
    m, epochs = started()
    assert apply(m, CreateTopic("u", bytes(range(3, 19)), ((1,),), request_id="topic")).ok
    assert apply(m, alter(m, epochs, (1, 3), request_id="shrink")).ok
    assert apply(m, FenceNode(2, epochs[2])).ok
    assert not apply(m, alter(m, epochs, (1, 2, 3), request_id="grow")).ok
    copy = ClusterMetadata.from_snapshot(m.to_snapshot())
    assert copy == m
    assert copy.to_snapshot() == m.to_snapshot()
    assert list(copy.recent_requests.items()) == list(m.recent_requests.items())
    # A voter restored from the snapshot answers the resends the same way.
    assert apply(copy, UnfenceNode(2, epochs[2])).ok and apply(m, UnfenceNode(2, epochs[2])).ok
    for rid, isr in (("shrink", (1, 3)), ("grow", (1, 2, 3))):
        cmd = replace(alter(m, epochs, isr, request_id=rid), partition_epoch=1)
        assert apply(copy, cmd) == apply(m, cmd)
    assert copy == m and part(copy).isr == (1, 3)
    # Equality sees the remembered answers.
    other = ClusterMetadata.from_snapshot(m.to_snapshot())
    other.recent_requests.popitem()
    assert other != m


def test_a_snapshot_of_topic_answers_alone_keeps_its_old_form() -> None:
    m, _ = started()
    assert apply(m, CreateTopic("u", bytes(range(3, 19)), ((1,),), request_id="topic")).ok
    (row,) = json.loads(m.to_snapshot())["requests"]
    assert len(row) == 6


def test_alter_partition_logged_before_request_ids_still_decodes() -> None:
    cmd = AlterPartition(TID, 0, 1, 7, 0, 0, (1, 3), RID)
    assert decode_command(encode_command(cmd)) == cmd
    doc = json.loads(encode_command(cmd))
    del doc["fields"]["request_id"]
    assert decode_command(json.dumps(doc).encode()) == AlterPartition(TID, 0, 1, 7, 0, 0, (1, 3))
