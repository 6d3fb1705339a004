"""The chaos report: from a fabricated history with a fault window, the results, the timeline and
the markdown summary a person reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from headwater.chaos.checker import ANOMALIES, check
from headwater.chaos.history import Op, OpF, OpType
from headwater.chaos.report import fault_windows, per_second, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def history_with_a_kill() -> list[Op]:
    """Two processes send for 6 s, 20 ms per ack, 80 ms while node 2 is killed (2 s to 4 s);
    one acknowledged write is missing from the final read."""
    ops: list[Op] = []

    def op(time_s: float, process: int, type: OpType, f: OpF, value: dict[str, Any]) -> None:
        ops.append(Op(len(ops), time_s, process, type, f, value))

    records = []
    for n in range(120):
        time_s = n * 0.05
        latency_s = 0.08 if 2.0 <= time_s < 4.0 else 0.02
        if n == 40:
            op(
                time_s,
                -1,
                "info",
                "fault",
                {"kind": "kill", "phase": "start", "nodes": [2], "detail": "kill -9"},
            )
        if n == 80:
            op(
                time_s,
                -1,
                "info",
                "fault",
                {"kind": "kill", "phase": "stop", "nodes": [2], "detail": "restart"},
            )
        send = {"topic": "t", "key": f"k{n % 2}", "value": f"v{n}"}
        op(time_s, n % 2, "invoke", "send", send)
        op(time_s + latency_s, n % 2, "ok", "send", send | {"partition": 0, "offset": n})
        if n != 60:
            records.append([0, n, f"k{n % 2}", f"v{n}"])
    op(7.0, 0, "ok", "final-read", {"topic": "t", "partition": 0, "records": records, "complete": True})
    return ops


def test_fault_window_and_per_second_acks() -> None:
    ops = history_with_a_kill()
    [window] = fault_windows(ops)
    assert (window.kind, window.nodes, window.start_s, window.stop_s) == ("kill", [2], 2.0, 4.0)
    seconds = per_second(ops)
    assert [stats.second for stats in seconds] == [0, 1, 2, 3, 4, 5]
    assert sum(stats.acks for stats in seconds) == 120
    assert round(seconds[0].p99_ms) == 20
    assert round(seconds[2].p50_ms) == 80


def test_report_writes_results_timeline_and_summary(tmp_path: Path) -> None:
    ops = history_with_a_kill()
    result = check(ops)
    assert result.valid is False
    run_dir = tmp_path / "run"
    write_report(run_dir, ops, result, title="kill a follower")

    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert results["title"] == "kill a follower"
    assert results["valid"] is False
    assert results["counts"]["lost_write"] == 1

    assert (run_dir / "timeline.png").read_bytes()[:8] == PNG_MAGIC

    summary = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "**Verdict: INVALID**" in summary
    assert "(results.json)" in summary and "(timeline.png)" in summary
    for kind in ANOMALIES:
        assert f"| {kind} | {result.counts[kind]} |" in summary
    assert '"value": "v60"' in summary
    assert "| kill | 2 | 2.000 | 4.000 | kill -9 |" in summary


def test_report_of_a_run_without_final_read_says_unknown(tmp_path: Path) -> None:
    ops = [op for op in history_with_a_kill() if op.f != "fault" and op.f != "final-read"]
    result = check(ops)
    assert result.valid == "unknown"  # no final read: absences cannot be judged
    write_report(tmp_path, ops, result, title="no final read")
    summary = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "**Verdict: unknown**" in summary
    assert "- t/0: missing" in summary
    assert (tmp_path / "timeline.png").read_bytes()[:8] == PNG_MAGIC


def test_report_of_an_empty_history(tmp_path: Path) -> None:
    write_report(tmp_path, [], check([]), title="nothing ran")
    assert (tmp_path / "timeline.png").read_bytes()[:8] == PNG_MAGIC
    assert "**Verdict: valid**" in (tmp_path / "report.md").read_text(encoding="utf-8")
