"""The chaos checker on fabricated histories: each anomaly class found in a history that holds it,
and not in a close one that does not; the history file format; speed on a large history."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from headwater.chaos.checker import (
    ANOMALIES,
    DUPLICATE,
    FAILED_WRITE_PRESENT,
    INCONSISTENT_OFFSETS,
    KEY_ORDER,
    LOST_READ,
    LOST_WRITE,
    NON_MONOTONIC_POLL,
    POLL_SKIP,
    CheckResult,
    check,
)
from headwater.chaos.history import (
    HistoryFormatError,
    HistoryWriter,
    Op,
    OpF,
    OpType,
    pair_sends,
    read_history,
    write_history,
)

TOPIC = "t"


class History:
    """Builds a history op by op, 10 ms apart."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def op(self, process: int, type: OpType, f: OpF, value: dict[str, Any]) -> Op:
        op = Op(
            index=len(self.ops), time_s=len(self.ops) * 0.01, process=process, type=type, f=f, value=value
        )
        self.ops.append(op)
        return op

    def send(self, process: int, value: str, outcome: OpType = "ok", *, key: str = "k", at: int = 0) -> None:
        """A send of ``value``; acknowledged at (partition 0, offset ``at``) when ``outcome`` is ok."""
        invoke = {"topic": TOPIC, "key": key, "value": value}
        self.op(process, "invoke", "send", invoke)
        done = invoke | {"partition": 0, "offset": at} if outcome == "ok" else invoke
        self.op(process, outcome, "send", done)

    def poll(self, process: int, offsets_values: list[tuple[int, str]], *, assignment: int = 0) -> None:
        records = [[0, offset, "k", value] for offset, value in offsets_values]
        self.op(process, "invoke", "poll", {"topic": TOPIC, "assignment": assignment})
        self.op(process, "ok", "poll", {"topic": TOPIC, "assignment": assignment, "records": records})

    def final(
        self, offsets_values: list[tuple[int, str]], *, partition: int = 0, complete: bool = True
    ) -> None:
        records = [[partition, offset, "k", value] for offset, value in offsets_values]
        value = {"topic": TOPIC, "partition": partition, "records": records, "complete": complete}
        self.op(0, "ok", "final-read", value)

    def fault(self, kind: str, phase: str) -> None:
        self.op(-1, "info", "fault", {"kind": kind, "phase": phase, "nodes": [1], "detail": ""})


def three_acked_sends_polled_in_order() -> History:
    """Process 0 writes v0, v1, v2 (key k) at offsets 0, 1, 2; process 1 polls them in two polls."""
    history = History()
    for offset in range(3):
        history.send(0, f"v{offset}", at=offset)
    history.poll(1, [(0, "v0"), (1, "v1")])
    history.poll(1, [(2, "v2")])
    return history


def only(result: CheckResult, kind: str, count: int = 1) -> dict[str, Any]:
    """Assert ``kind`` is the one anomaly found, ``count`` times; return its first example."""
    assert result.counts == {name: (count if name == kind else 0) for name in ANOMALIES}
    assert len(result.examples[kind]) == min(count, 5)
    return result.examples[kind][0]


def assert_valid(result: CheckResult) -> None:
    assert result.valid is True
    assert result.counts == dict.fromkeys(ANOMALIES, 0)
    assert result.incomplete_final_read == []


def test_history_whose_reads_and_acks_agree_with_the_final_read_is_valid() -> None:
    history = three_acked_sends_polled_in_order()
    history.final([(0, "v0"), (1, "v1"), (2, "v2")])
    result = check(history.ops)
    assert_valid(result)
    assert result.stats["sends"] == {"ok": 3, "fail": 0, "info": 0, "unfinished": 0}
    assert result.stats["polls"] == 2
    assert result.stats["records_polled"] == 3
    assert result.stats["final_records"] == 3
    assert result.stats["ops"]["send"] == {"invoke": 3, "ok": 3}


def test_acked_write_missing_from_the_final_read_is_lost() -> None:
    history = three_acked_sends_polled_in_order()
    history.send(0, "v3", at=3)
    history.final([(0, "v0"), (1, "v1"), (2, "v2")])
    result = check(history.ops)
    assert result.valid is False
    example = only(result, LOST_WRITE)
    assert (example["value"], example["partition"], example["offset"], example["process"]) == ("v3", 0, 3, 0)
    assert example["op_indexes"] == [10, 11]


def test_acked_write_present_in_the_final_read_is_not_lost() -> None:
    history = three_acked_sends_polled_in_order()
    history.send(0, "v3", at=3)
    history.final([(0, "v0"), (1, "v1"), (2, "v2"), (3, "v3")])
    assert_valid(check(history.ops))


def test_unknown_send_may_be_absent_or_present() -> None:
    absent = three_acked_sends_polled_in_order()
    absent.send(0, "v3", "info")
    absent.final([(0, "v0"), (1, "v1"), (2, "v2")])
    assert_valid(check(absent.ops))
    present = three_acked_sends_polled_in_order()
    present.send(0, "v3", "info")
    present.final([(0, "v0"), (1, "v1"), (2, "v2"), (3, "v3")])
    result = check(present.ops)
    assert_valid(result)
    assert result.stats["sends"]["info"] == 1


def test_failed_write_present_in_the_final_read_is_invalid() -> None:
    history = three_acked_sends_polled_in_order()
    history.send(0, "v3", "fail")
    history.final([(0, "v0"), (1, "v1"), (2, "v2"), (3, "v3")])
    result = check(history.ops)
    assert result.valid is False
    example = only(result, FAILED_WRITE_PRESENT)
    assert (example["value"], example["found_at"], example["op_indexes"]) == ("v3", [(0, 3)], [10, 11])


def test_failed_write_absent_from_the_final_read_is_valid() -> None:
    history = three_acked_sends_polled_in_order()
    history.send(0, "v3", "fail")
    history.final([(0, "v0"), (1, "v1"), (2, "v2")])
    assert_valid(check(history.ops))


def test_two_acks_for_one_offset_are_inconsistent() -> None:
    history = History()
    history.send(0, "v0", at=0)
    history.send(1, "v1", at=1)
    history.send(2, "v2", at=1)  # the log holds v2 at 2, yet its ack says 1
    history.final([(0, "v0"), (1, "v1"), (2, "v2")])
    result = check(history.ops)
    assert result.valid is False
    example = only(result, INCONSISTENT_OFFSETS)
    assert (example["partition"], example["offset"], example["values"]) == (0, 1, ["v1", "v2"])
    assert example["op_indexes"] == [6, 5]  # the final read, then the ack that disagrees


def test_acks_at_their_final_offsets_are_consistent() -> None:
    history = History()
    history.send(0, "v0", at=0)
    history.send(1, "v1", at=1)
    history.send(2, "v2", at=2)
    history.final([(0, "v0"), (1, "v1"), (2, "v2")])
    assert_valid(check(history.ops))


def test_poll_going_back_within_one_assignment_is_non_monotonic() -> None:
    history = three_acked_sends_polled_in_order()
    history.poll(1, [(1, "v1"), (2, "v2")])  # same assignment: offset 1 after offset 2
    history.final([(0, "v0"), (1, "v1"), (2, "v2")])
    result = check(history.ops)
    assert result.valid is False
    example = only(result, NON_MONOTONIC_POLL)
    assert (example["process"], example["assignment"], example["offsets"]) == (1, 0, [2, 1])
    assert example["op_indexes"] == [9, 11]


def test_consumer_reading_again_under_a_new_assignment_is_monotonic() -> None:
    history = three_acked_sends_polled_in_order()
    history.poll(1, [(0, "v0"), (1, "v1"), (2, "v2")], assignment=1)
    history.final([(0, "v0"), (1, "v1"), (2, "v2")])
    assert_valid(check(history.ops))


def test_poll_jumping_over_a_stored_record_is_a_skip() -> None:
    history = History()
    for offset in range(3):
        history.send(0, f"v{offset}", at=offset)
    history.poll(1, [(0, "v0")])
    history.poll(1, [(2, "v2")])
    history.final([(0, "v0"), (1, "v1"), (2, "v2")])
    result = check(history.ops)
    assert result.valid is False
    example = only(result, POLL_SKIP)
    assert (example["offsets"], example["skipped"], example["skipped_offsets"]) == ([0, 2], 1, [1])
    assert example["op_indexes"] == [7, 9]


def test_poll_over_a_gap_in_the_log_is_no_skip() -> None:
    history = History()
    history.send(0, "v0", at=0)
    history.send(0, "v2", at=2)  # offset 1 holds nothing a reader can see (a gap, as compaction leaves)
    history.poll(1, [(0, "v0")])
    history.poll(1, [(2, "v2")])
    history.final([(0, "v0"), (2, "v2")])
    assert_valid(check(history.ops))


def test_polled_record_missing_from_the_final_read_is_a_lost_read() -> None:
    history = three_acked_sends_polled_in_order()
    history.poll(2, [(3, "v3")])  # a record read, later gone (its write never completed)
    history.poll(3, [(3, "v3")])  # a second reader of it: still one lost record
    history.final([(0, "v0"), (1, "v1"), (2, "v2")])
    result = check(history.ops)
    assert result.valid is False
    example = only(result, LOST_READ)
    assert (example["offset"], example["value"], example["process"], example["op_indexes"]) == (
        3,
        "v3",
        2,
        [11],
    )


def test_polled_record_present_in_the_final_read_is_no_lost_read() -> None:
    history = three_acked_sends_polled_in_order()
    history.poll(2, [(3, "v3")])
    history.final([(0, "v0"), (1, "v1"), (2, "v2"), (3, "v3")])
    assert_valid(check(history.ops))


def test_one_process_key_stored_out_of_send_order_breaks_key_order() -> None:
    history = History()
    history.send(0, "a", at=1)
    history.send(0, "b", at=0)  # sent after a, stored before it
    history.final([(0, "b"), (1, "a")])
    result = check(history.ops)
    assert result.valid is False
    example = only(result, KEY_ORDER)
    assert (example["process"], example["key"], example["values"], example["offsets"]) == (
        0,
        "k",
        ["a", "b"],
        [1, 0],
    )
    assert example["op_indexes"] == [0, 2]


@pytest.mark.parametrize(("second_process", "second_key"), [(0, "k2"), (1, "k")])
def test_different_keys_or_processes_impose_no_order(second_process: int, second_key: str) -> None:
    history = History()
    history.send(0, "a", at=1)
    history.send(second_process, "b", key=second_key, at=0)
    history.final([(0, "b"), (1, "a")])
    assert_valid(check(history.ops))


def test_value_stored_twice_is_a_duplicate_counted_but_valid_by_default() -> None:
    history = three_acked_sends_polled_in_order()
    history.final([(0, "v0"), (1, "v1"), (2, "v2"), (3, "v1")])  # a producer retry stored v1 again
    result = check(history.ops)
    assert result.valid is True
    example = only(result, DUPLICATE)
    assert (example["value"], example["positions"]) == ("v1", [(0, 1), (0, 3)])
    assert check(history.ops, duplicates_invalid=True).valid is False


def test_missing_final_read_makes_absences_unknown() -> None:
    history = three_acked_sends_polled_in_order()
    history.op(0, "invoke", "send", {"topic": TOPIC, "key": "k", "value": "w"})
    history.op(0, "ok", "send", {"topic": TOPIC, "key": "k", "value": "w", "partition": 1, "offset": 0})
    history.final([(0, "v0"), (1, "v1"), (2, "v2")])  # partition 1 never read at the end
    result = check(history.ops)
    assert result.valid == "unknown"
    assert result.counts == dict.fromkeys(ANOMALIES, 0)
    assert result.incomplete_final_read == [{"topic": TOPIC, "partition": 1, "reason": "missing"}]
    assert result.stats["unknown_writes"] == 1


def test_incomplete_final_read_makes_absences_unknown_but_anomalies_still_count() -> None:
    history = three_acked_sends_polled_in_order()
    history.send(0, "v3", at=3)
    history.final([(0, "v0"), (1, "v1")], complete=False)
    history.final([(2, "v2")])
    result = check(history.ops)
    assert result.valid == "unknown"
    assert result.incomplete_final_read == [{"topic": TOPIC, "partition": 0, "reason": "incomplete"}]
    assert result.stats["unknown_writes"] == 1
    history.poll(1, [(1, "v1")])  # evidence needs no complete read
    assert check(history.ops).valid is False


def test_faults_and_unfinished_sends_are_counted() -> None:
    history = three_acked_sends_polled_in_order()
    history.fault("kill", "start")
    history.fault("kill", "stop")
    history.op(0, "invoke", "send", {"topic": TOPIC, "key": "k", "value": "v3"})
    history.final([(0, "v0"), (1, "v1"), (2, "v2")])
    result = check(history.ops)
    assert_valid(result)
    assert result.stats["faults"] == {"kill": 1}
    assert result.stats["sends"]["unfinished"] == 1


def test_send_completed_without_invoke_is_a_format_error() -> None:
    history = History()
    history.op(0, "ok", "send", {"topic": TOPIC, "key": "k", "value": "v", "partition": 0, "offset": 0})
    with pytest.raises(HistoryFormatError, match="never invoked"):
        pair_sends(history.ops)


def test_history_round_trip_skips_a_cut_short_last_line(tmp_path: Path) -> None:
    history = three_acked_sends_polled_in_order()
    history.final([(0, "v0"), (1, "v1"), (2, "v2")])
    path = tmp_path / "history.jsonl"
    write_history(path, history.ops)
    loaded = read_history(path)
    assert loaded.ops == history.ops
    assert loaded.skipped_last_line is None
    with path.open("a", encoding="utf-8") as out:
        out.write('{"index": 11, "time_s": 0.1, "proc')
    loaded = read_history(path)
    assert loaded.ops == history.ops
    assert loaded.skipped_last_line == '{"index": 11, "time_s": 0.1, "proc'


def test_send_ack_without_its_offset_is_a_format_error() -> None:
    history = History()
    history.op(0, "invoke", "send", {"topic": TOPIC, "key": "k", "value": "v"})
    history.op(0, "ok", "send", {"topic": TOPIC, "key": "k", "value": "v", "partition": 0})
    with pytest.raises(HistoryFormatError, match="'offset'"):
        check(history.ops)


def test_bad_line_inside_the_history_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text('{"index": 0, "value": {}}\n{"index": 1}\n', encoding="utf-8")
    with pytest.raises(HistoryFormatError, match="'time_s'"):
        read_history(path)


def test_writer_gives_indexes_in_file_order_across_threads(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"

    def produce(writer: HistoryWriter, process: int) -> None:
        for n in range(200):
            writer.record(time_s=0.0, process=process, type="info", f="fault", value={"n": n})

    with HistoryWriter(path) as writer:
        threads = [threading.Thread(target=produce, args=(writer, process)) for process in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    ops = read_history(path).ops  # read_history checks each index is its line's position
    assert len(ops) == 800
    for process in range(4):
        assert [op.value["n"] for op in ops if op.process == process] == list(range(200))


def large_valid_history(sends: int, partitions: int, processes: int, seed: int) -> list[Op]:
    """Sends spread over partitions, each partition polled in order in chunks, then the final read."""
    rng = random.Random(seed)
    history = History()
    logs: list[list[str]] = [[] for _ in range(partitions)]
    for n in range(sends):
        process, partition = rng.randrange(processes), rng.randrange(partitions)
        value = f"v{n}"
        invoke = {"topic": TOPIC, "key": f"k{partition}", "value": value}
        history.op(process, "invoke", "send", invoke)
        history.op(process, "ok", "send", invoke | {"partition": partition, "offset": len(logs[partition])})
        logs[partition].append(value)
    for partition, log in enumerate(logs):
        for start in range(0, len(log), 100):
            records = [
                [partition, offset, f"k{partition}", log[offset]]
                for offset in range(start, min(start + 100, len(log)))
            ]
            polled = {"topic": TOPIC, "assignment": 0, "records": records}
            history.op(processes, "ok", "poll", polled)
        records = [[partition, offset, f"k{partition}", value] for offset, value in enumerate(log)]
        history.op(
            0,
            "ok",
            "final-read",
            {"topic": TOPIC, "partition": partition, "records": records, "complete": True},
        )
    return history.ops


def test_large_valid_history_checks_valid_quickly() -> None:
    ops = large_valid_history(sends=50_000, partitions=3, processes=10, seed=7)
    started = time.perf_counter()
    result = check(ops)
    elapsed_s = time.perf_counter() - started
    assert_valid(result)
    assert result.stats["records_polled"] == 50_000
    assert result.stats["final_records"] == 50_000
    assert elapsed_s < 3.0
