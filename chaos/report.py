"""The report of a chaos run: what a person reads after the checker has judged the history.

``write_report(run_dir, ops, result, title=...)`` writes three files into ``run_dir``:

- ``results.json``: the checker's result (``CheckResult.to_json``) with the run's title;
- ``timeline.png``: acknowledged sends per second and the acks' latency (p50 and p99 per second, from
  invoke to ok) over the run, each fault window shaded from its start to its stop in a colour per
  kind (a window never stopped runs to the end of the history);
- ``report.md``: the verdict, the count of each anomaly class, their examples, the faults and the
  statistics, linking the two files above.

Time comes from the ops (``time_s``); a second is the bucket ``floor(time_s)`` of the ack.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from matplotlib.figure import Figure

from headwater.chaos.checker import ANOMALIES, CheckResult
from headwater.chaos.history import Op, pair_sends

__all__ = ["FaultWindow", "SecondStats", "fault_windows", "per_second", "write_report"]

RESULTS_FILE: Final = "results.json"
TIMELINE_FILE: Final = "timeline.png"
REPORT_FILE: Final = "report.md"

_VERDICT_WORDS: Final = {True: "valid", False: "INVALID", "unknown": "unknown"}


@dataclass(frozen=True, slots=True)
class FaultWindow:
    """One fault from its start to its stop (``stop_s`` is the history's end when it never stopped)."""

    kind: str
    nodes: list[int]
    start_s: float
    stop_s: float
    detail: str


@dataclass(frozen=True, slots=True)
class SecondStats:
    """Acks of one second of the run: how many, and their latency percentiles in milliseconds."""

    second: int
    acks: int
    p50_ms: float
    p99_ms: float


def fault_windows(ops: Sequence[Op]) -> list[FaultWindow]:
    """Pair each fault stop with the earliest open start of the same kind."""
    end_s = max((op.time_s for op in ops), default=0.0)
    open_starts: dict[str, list[Op]] = {}
    windows: list[FaultWindow] = []
    for op in ops:
        if op.f != "fault":
            continue
        kind = str(op.value.get("kind"))
        if op.value.get("phase") == "start":
            open_starts.setdefault(kind, []).append(op)
        elif open_starts.get(kind):
            windows.append(_window(open_starts[kind].pop(0), op.time_s))
    windows.extend(_window(start, end_s) for starts in open_starts.values() for start in starts)
    return sorted(windows, key=lambda window: window.start_s)


def _window(start: Op, stop_s: float) -> FaultWindow:
    nodes = [int(node) for node in start.value.get("nodes", [])]
    detail = str(start.value.get("detail", ""))
    return FaultWindow(str(start.value.get("kind")), nodes, start.time_s, stop_s, detail)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty sorted list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def per_second(ops: Sequence[Op]) -> list[SecondStats]:
    """Acknowledged sends and their latency, per second of the run (seconds without acks included)."""
    latencies_ms: dict[int, list[float]] = {}
    for send in pair_sends(ops).completed:
        if send.done.type == "ok":
            latencies_ms.setdefault(math.floor(send.done.time_s), []).append(send.latency_s * 1000.0)
    if not latencies_ms:
        return []
    seconds = []
    for second in range(min(latencies_ms), max(latencies_ms) + 1):
        values = sorted(latencies_ms.get(second, []))
        if values:
            seconds.append(
                SecondStats(second, len(values), _percentile(values, 0.5), _percentile(values, 0.99))
            )
        else:
            seconds.append(SecondStats(second, 0, math.nan, math.nan))
    return seconds


def _draw_timeline(path: Path, seconds: list[SecondStats], windows: list[FaultWindow], title: str) -> None:
    figure = Figure(figsize=(11, 6), layout="constrained")
    throughput, latency = figure.subplots(2, 1, sharex=True)
    # Each value holds for its whole second: steps from the second's start to the next one's.
    x = [stats.second for stats in seconds] + [seconds[-1].second + 1] if seconds else []

    def steps(values: list[float]) -> list[float]:
        return values + values[-1:]

    acks = steps([float(stats.acks) for stats in seconds])
    throughput.step(x, acks, where="post", color="black", linewidth=1, label="sends ok/s")
    throughput.set_ylim(bottom=0)
    throughput.set_ylabel("sends ok per second")
    p50 = steps([stats.p50_ms for stats in seconds])
    p99 = steps([stats.p99_ms for stats in seconds])
    latency.step(x, p50, where="post", color="tab:blue", linewidth=1, label="p50")
    latency.step(x, p99, where="post", color="tab:red", linewidth=1, label="p99")
    latency.set_ylabel("ack latency (ms)")
    latency.set_xlabel("time since start (s)")
    if any(stats.acks for stats in seconds):
        latency.set_yscale("log")
    _shade_faults([throughput, latency], windows)
    throughput.legend(loc="best", fontsize="small")
    latency.legend(loc="best", fontsize="small")
    throughput.set_title(title)
    figure.savefig(path, format="png", dpi=100)


def _shade_faults(axes: list[Any], windows: list[FaultWindow]) -> None:
    """Shade each window, one colour per kind, labelled once so each kind is in the legend once."""
    kinds = sorted({window.kind for window in windows})
    colours = {kind: f"C{n % 10}" for n, kind in enumerate(kinds)}
    for axis in axes:
        labelled: set[str] = set()
        for window in windows:
            label = None if window.kind in labelled else f"fault: {window.kind}"
            labelled.add(window.kind)
            axis.axvspan(window.start_s, window.stop_s, color=colours[window.kind], alpha=0.2, label=label)


def _markdown(ops: Sequence[Op], result: CheckResult, windows: list[FaultWindow], title: str) -> str:
    lines = [f"# {title}", "", f"**Verdict: {_VERDICT_WORDS[result.valid]}**", ""]
    lines += [f"Files: [{RESULTS_FILE}]({RESULTS_FILE}), [{TIMELINE_FILE}]({TIMELINE_FILE})", ""]
    lines += [f"![timeline]({TIMELINE_FILE})", "", "## Anomalies", "", "| anomaly | count |", "| --- | --- |"]
    lines += [f"| {kind} | {result.counts[kind]} |" for kind in ANOMALIES]
    lines += ["", *_incomplete_section(result), "## Examples", ""]
    lines += _examples_section(result)
    lines += ["## Faults", ""]
    lines += _faults_section(windows)
    lines += [
        "## Statistics",
        "",
        f"{len(ops)} ops.",
        "",
        "```json",
        json.dumps(result.stats, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def _incomplete_section(result: CheckResult) -> list[str]:
    if not result.incomplete_final_read:
        return []
    lines = ["## Final read missing or incomplete", ""]
    lines += [
        f"- {item['topic']}/{item['partition']}: {item['reason']}" for item in result.incomplete_final_read
    ]
    return [*lines, ""]


def _examples_section(result: CheckResult) -> list[str]:
    lines: list[str] = []
    for kind in ANOMALIES:
        if not result.examples[kind]:
            continue
        lines += [f"### {kind} ({result.counts[kind]})", ""]
        lines += [f"- `{json.dumps(example)}`" for example in result.examples[kind]]
        lines.append("")
    return lines or ["None.", ""]


def _faults_section(windows: list[FaultWindow]) -> list[str]:
    if not windows:
        return ["None.", ""]
    lines = ["| kind | nodes | start (s) | stop (s) | detail |", "| --- | --- | --- | --- | --- |"]
    for window in windows:
        nodes = ", ".join(str(node) for node in window.nodes)
        detail = window.detail.replace("|", "\\|")
        lines.append(f"| {window.kind} | {nodes} | {window.start_s:.3f} | {window.stop_s:.3f} | {detail} |")
    return [*lines, ""]


def write_report(run_dir: Path, ops: Sequence[Op], result: CheckResult, *, title: str) -> None:
    """Write ``results.json``, ``timeline.png`` and ``report.md`` into ``run_dir`` (created if needed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {"title": title} | result.to_json()
    (run_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    windows = fault_windows(ops)
    _draw_timeline(run_dir / TIMELINE_FILE, per_second(ops), windows, title)
    (run_dir / REPORT_FILE).write_text(_markdown(ops, result, windows, title), encoding="utf-8")
