"""The chaos checker: a pure function from a history (``headwater.chaos.history``) to a verdict.

It knows nothing of processes, sockets or clocks; it reads ops in history order. The anomaly classes
follow Jepsen's Kafka analysis, each judged per topic:

- ``lost_write``: a send acknowledged (``ok``) whose value is nowhere in the final read of its topic.
- ``failed_write_present``: a send that definitely failed (``fail``) whose value is in the final read:
  a write refused to its client must not be stored.
- ``inconsistent_offsets``: one (partition, offset) seen holding different values by two observations
  (send acks, polls, final reads). Counted once per (partition, offset).
- ``non_monotonic_poll``: within one (process, assignment, partition), a polled offset not greater
  than the one polled before it there.
- ``poll_skip``: within one (process, assignment, partition), the next offset polled jumps over offsets
  that the final read holds (there are final records strictly between the two).
- ``lost_read``: a polled record whose value is nowhere in the final read of its topic (the reader
  saw something that was later lost). Counted once per polled (partition, offset, value).
- ``key_order``: one process's acknowledged sends of one key, taken in invoke order, must sit in the
  final read at increasing offsets of the partition (each value judged at its first occurrence).
- ``duplicate``: one value at two or more offsets of the final read. Producers are not idempotent, so
  a retry may store a record twice: counted, and invalid only with ``duplicates_invalid=True``.

An ``info`` send (outcome unknown) may be present or absent. A partition whose final read is missing,
or not complete, cannot prove a write or a read lost: such absences are counted in the stats as
unknown, the partition is listed in ``incomplete_final_read``, and the verdict is ``"unknown"``
unless an anomaly already makes it false. Anomalies with evidence (a skip over records the partial
read holds, a conflicting offset) count in any case.

The work is linear in the ops and records (dicts and one bisect per poll step), for histories of a
million ops.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from headwater.chaos.history import HistoryFormatError, Op, Send, pair_sends

__all__ = [
    "ANOMALIES",
    "DUPLICATE",
    "FAILED_WRITE_PRESENT",
    "INCONSISTENT_OFFSETS",
    "KEY_ORDER",
    "LOST_READ",
    "LOST_WRITE",
    "MAX_EXAMPLES",
    "NON_MONOTONIC_POLL",
    "POLL_SKIP",
    "CheckResult",
    "Verdict",
    "check",
]

LOST_WRITE: Final = "lost_write"
FAILED_WRITE_PRESENT: Final = "failed_write_present"
INCONSISTENT_OFFSETS: Final = "inconsistent_offsets"
NON_MONOTONIC_POLL: Final = "non_monotonic_poll"
POLL_SKIP: Final = "poll_skip"
LOST_READ: Final = "lost_read"
KEY_ORDER: Final = "key_order"
DUPLICATE: Final = "duplicate"
ANOMALIES: Final[tuple[str, ...]] = (
    LOST_WRITE,
    FAILED_WRITE_PRESENT,
    INCONSISTENT_OFFSETS,
    NON_MONOTONIC_POLL,
    POLL_SKIP,
    LOST_READ,
    KEY_ORDER,
    DUPLICATE,
)
MAX_EXAMPLES: Final = 5

Verdict = bool | Literal["unknown"]

_PartitionKey = tuple[str, int]  # (topic, partition)
_Position = tuple[int, int]  # (partition, offset)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The verdict, the count of each anomaly class (all present, 0 when none), at most
    ``MAX_EXAMPLES`` examples of each, the partitions whose final read was missing or incomplete,
    and statistics of the history."""

    valid: Verdict
    counts: dict[str, int]
    examples: dict[str, list[dict[str, Any]]]
    incomplete_final_read: list[dict[str, Any]]
    stats: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON object."""
        return {
            "valid": self.valid,
            "counts": self.counts,
            "examples": self.examples,
            "incomplete_final_read": self.incomplete_final_read,
            "stats": self.stats,
        }


class _Anomalies:
    """Counts per class, with the first few examples of each."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(ANOMALIES, 0)
        self.examples: dict[str, list[dict[str, Any]]] = {kind: [] for kind in ANOMALIES}

    def add(self, kind: str, example: dict[str, Any]) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < MAX_EXAMPLES:
            self.examples[kind].append(example)


class _FinalRead:
    """What the final read holds: per partition its offsets and values, where each value sits, and
    which partitions were read to their end."""

    def __init__(self) -> None:
        self.values: dict[_PartitionKey, dict[int, str]] = {}
        self.positions: dict[tuple[str, str], list[_Position]] = {}  # (topic, value) -> positions
        self.complete: dict[_PartitionKey, bool] = {}
        self.sorted_offsets: dict[_PartitionKey, list[int]] = {}

    def add_chunk(self, topic: str, partition: int, complete: bool) -> dict[int, str]:
        key = (topic, partition)
        self.complete[key] = self.complete.get(key, True) and complete
        return self.values.setdefault(key, {})

    def add_record(self, topic: str, partition: int, offset: int, value: str) -> None:
        """Record a value at a new offset (the caller checks the offset is new)."""
        self.values.setdefault((topic, partition), {})[offset] = value
        self.positions.setdefault((topic, value), []).append((partition, offset))

    def seal(self) -> None:
        self.sorted_offsets = {key: sorted(offsets) for key, offsets in self.values.items()}

    def is_complete(self, key: _PartitionKey) -> bool:
        return self.complete.get(key, False)

    def first_position(self, topic: str, value: str) -> _Position | None:
        positions = self.positions.get((topic, value))
        return min(positions) if positions else None

    def offsets_between(self, key: _PartitionKey, low: int, high: int) -> list[int]:
        """The final offsets strictly between ``low`` and ``high``."""
        offsets = self.sorted_offsets.get(key, [])
        return offsets[bisect.bisect_right(offsets, low) : bisect.bisect_left(offsets, high)]


class _Observations:
    """Every (partition, offset) -> value anyone saw; a second, different value is an inconsistency."""

    def __init__(self, anomalies: _Anomalies) -> None:
        self._anomalies = anomalies
        self._first: dict[tuple[str, int, int], tuple[str, int]] = {}  # -> (value, op index)
        self._reported: set[tuple[str, int, int]] = set()

    def observe(self, topic: str, partition: int, offset: int, value: str, op_index: int) -> bool:
        """Note an observation; True when the offset was not seen before."""
        key = (topic, partition, offset)
        first = self._first.get(key)
        if first is None:
            self._first[key] = (value, op_index)
            return True
        if first[0] != value and key not in self._reported:
            self._reported.add(key)
            example = {"topic": topic, "partition": partition, "offset": offset}
            example |= {"values": [first[0], value], "op_indexes": [first[1], op_index]}
            self._anomalies.add(INCONSISTENT_OFFSETS, example)
        return False


def _str(op: Op, name: str) -> str:
    value = op.value.get(name)
    if not isinstance(value, str):
        raise HistoryFormatError(f"op {op.index}: value field {name!r} must be a string, got {value!r}")
    return value


def _int(op: Op, name: str) -> int:
    value = op.value.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HistoryFormatError(f"op {op.index}: value field {name!r} must be an integer, got {value!r}")
    return value


def _records(op: Op) -> list[tuple[int, int, str, str]]:
    raw = op.value.get("records", [])
    if not isinstance(raw, list):
        raise HistoryFormatError(f"op {op.index}: 'records' must be a list")
    try:
        return [(int(p), int(o), str(k), str(v)) for p, o, k, v in raw]
    except (TypeError, ValueError) as exc:
        raise HistoryFormatError(f"op {op.index}: a record is not [partition, offset, key, value]") from exc


def _read_final(ops: Sequence[Op], observations: _Observations, final: _FinalRead) -> None:
    for op in ops:
        if op.f != "final-read" or op.type != "ok":
            continue
        topic, partition = _str(op, "topic"), _int(op, "partition")
        final.add_chunk(topic, partition, bool(op.value.get("complete", False)))
        for record_partition, offset, _key, value in _records(op):
            if observations.observe(topic, record_partition, offset, value, op.index):
                final.add_record(topic, record_partition, offset, value)
    final.seal()


def _send_example(send: Send) -> dict[str, Any]:
    value = send.done.value
    example = {"topic": value.get("topic"), "key": value.get("key"), "value": value.get("value")}
    if send.done.type == "ok":
        example |= {"partition": value.get("partition"), "offset": value.get("offset")}
    return example | {"process": send.done.process, "op_indexes": [send.invoke.index, send.done.index]}


def _check_sends(
    sends: list[Send], final: _FinalRead, observations: _Observations, anomalies: _Anomalies
) -> int:
    """Lost writes, failed writes present, and the acks' offsets; returns the count of acknowledged
    writes whose absence cannot be judged (their partition's final read is incomplete)."""
    unknown = 0
    for send in sends:
        topic, record_value = _str(send.done, "topic"), _str(send.done, "value")
        present = (topic, record_value) in final.positions
        if send.done.type == "fail" and present:
            anomalies.add(
                FAILED_WRITE_PRESENT,
                _send_example(send) | {"found_at": final.positions[(topic, record_value)]},
            )
        if send.done.type != "ok":
            continue
        partition, offset = _int(send.done, "partition"), _int(send.done, "offset")
        observations.observe(topic, partition, offset, record_value, send.done.index)
        if present:
            continue
        if final.is_complete((topic, partition)):
            anomalies.add(LOST_WRITE, _send_example(send))
        else:
            unknown += 1
    return unknown


def _check_key_order(sends: list[Send], final: _FinalRead, anomalies: _Anomalies) -> None:
    # One op at a time per process: its completion order is its invoke order.
    last: dict[tuple[int, str, str], tuple[int, int, Send]] = {}  # (process, topic, key) -> pos, send
    for send in sends:
        if send.done.type != "ok":
            continue
        value = send.done.value
        topic, key = _str(send.done, "topic"), _str(send.done, "key")
        position = final.first_position(topic, _str(send.done, "value"))
        if position is None:
            continue
        state_key = (send.done.process, topic, key)
        previous = last.get(state_key)
        if previous is not None and previous[0] == position[0] and position[1] < previous[1]:
            example = {"topic": topic, "key": key, "partition": position[0], "process": send.done.process}
            example |= {
                "values": [previous[2].done.value.get("value"), value.get("value")],
                "offsets": [previous[1], position[1]],
                "op_indexes": [previous[2].invoke.index, send.invoke.index],
            }
            anomalies.add(KEY_ORDER, example)
        last[state_key] = (position[0], position[1], send)


class _PollChecker:
    """Order, skips and lost reads over the polls, per (process, assignment, topic, partition)."""

    def __init__(self, final: _FinalRead, observations: _Observations, anomalies: _Anomalies) -> None:
        self._final = final
        self._observations = observations
        self._anomalies = anomalies
        self._last: dict[tuple[int, int, str, int], tuple[int, int]] = {}  # -> (offset, op index)
        self._lost_reported: set[tuple[str, int, int, str]] = set()
        self.unknown_reads = 0
        self.polls = 0
        self.records_polled = 0
        self.partitions: set[_PartitionKey] = set()

    def poll(self, op: Op) -> None:
        topic, assignment = _str(op, "topic"), _int(op, "assignment")
        self.polls += 1
        for partition, offset, _key, value in _records(op):
            self.records_polled += 1
            self.partitions.add((topic, partition))
            self._observations.observe(topic, partition, offset, value, op.index)
            self._check_order(op, assignment, topic, partition, offset)
            self._check_present(op, topic, partition, offset, value)

    def _check_order(self, op: Op, assignment: int, topic: str, partition: int, offset: int) -> None:
        stream = (op.process, assignment, topic, partition)
        previous = self._last.get(stream)
        self._last[stream] = (offset, op.index)
        if previous is None:
            return
        example = {"topic": topic, "partition": partition, "process": op.process, "assignment": assignment}
        example |= {"offsets": [previous[0], offset], "op_indexes": [previous[1], op.index]}
        if offset <= previous[0]:
            self._anomalies.add(NON_MONOTONIC_POLL, example)
            return
        skipped = self._final.offsets_between((topic, partition), previous[0], offset)
        if skipped:
            skipped_sample = skipped[:MAX_EXAMPLES]
            self._anomalies.add(
                POLL_SKIP, example | {"skipped": len(skipped), "skipped_offsets": skipped_sample}
            )

    def _check_present(self, op: Op, topic: str, partition: int, offset: int, value: str) -> None:
        if (topic, value) in self._final.positions:
            return
        if not self._final.is_complete((topic, partition)):
            self.unknown_reads += 1
            return
        record = (topic, partition, offset, value)
        if record in self._lost_reported:
            return
        self._lost_reported.add(record)
        example = {"topic": topic, "partition": partition, "offset": offset, "value": value}
        self._anomalies.add(LOST_READ, example | {"process": op.process, "op_indexes": [op.index]})


def _check_duplicates(final: _FinalRead, anomalies: _Anomalies) -> None:
    for (topic, value), positions in final.positions.items():
        if len(positions) > 1:
            example = {"topic": topic, "value": value, "positions": sorted(positions)}
            anomalies.add(DUPLICATE, example)


def _incomplete_partitions(
    sends: list[Send], polled: set[_PartitionKey], final: _FinalRead
) -> list[dict[str, Any]]:
    """Every partition the history mentions whose final read is missing or not complete."""
    mentioned: set[_PartitionKey] = set(final.complete) | polled
    for send in sends:
        if send.done.type == "ok":
            mentioned.add((_str(send.done, "topic"), _int(send.done, "partition")))
    incomplete = []
    for topic, partition in sorted(mentioned):
        if (topic, partition) not in final.complete:
            incomplete.append({"topic": topic, "partition": partition, "reason": "missing"})
        elif not final.complete[(topic, partition)]:
            incomplete.append({"topic": topic, "partition": partition, "reason": "incomplete"})
    return incomplete


def _op_counts(ops: Sequence[Op]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for op in ops:
        by_type = counts.setdefault(op.f, {})
        by_type[op.type] = by_type.get(op.type, 0) + 1
    return counts


def _fault_counts(ops: Sequence[Op]) -> dict[str, int]:
    """Fault windows started, by kind."""
    counts: dict[str, int] = {}
    for op in ops:
        if op.f == "fault" and op.value.get("phase") == "start":
            kind = str(op.value.get("kind"))
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _verdict(counts: dict[str, int], incomplete: list[dict[str, Any]], duplicates_invalid: bool) -> Verdict:
    invalid_kinds = [kind for kind in ANOMALIES if kind != DUPLICATE or duplicates_invalid]
    if any(counts[kind] for kind in invalid_kinds):
        return False
    return "unknown" if incomplete else True


def check(ops: Sequence[Op], *, duplicates_invalid: bool = False) -> CheckResult:
    """Judge a history, given in history order (see the module docstring for the classes)."""
    anomalies = _Anomalies()
    observations = _Observations(anomalies)
    final = _FinalRead()
    _read_final(ops, observations, final)
    pairs = pair_sends(ops)
    sends = pairs.completed
    unknown_writes = _check_sends(sends, final, observations, anomalies)
    _check_key_order(sends, final, anomalies)
    polls = _PollChecker(final, observations, anomalies)
    for op in ops:
        if op.f == "poll" and op.type == "ok":
            polls.poll(op)
    _check_duplicates(final, anomalies)
    incomplete = _incomplete_partitions(sends, polls.partitions, final)
    sends_by_type = {kind: 0 for kind in ("ok", "fail", "info")}
    for send in sends:
        sends_by_type[send.done.type] += 1
    stats: dict[str, Any] = {
        "ops": _op_counts(ops),
        "sends": sends_by_type | {"unfinished": len(pairs.unfinished)},
        "polls": polls.polls,
        "records_polled": polls.records_polled,
        "final_records": sum(len(values) for values in final.values.values()),
        "faults": _fault_counts(ops),
        "unknown_writes": unknown_writes,
        "unknown_reads": polls.unknown_reads,
    }
    return CheckResult(
        valid=_verdict(anomalies.counts, incomplete, duplicates_invalid),
        counts=anomalies.counts,
        examples=anomalies.examples,
        incomplete_final_read=incomplete,
        stats=stats,
    )
