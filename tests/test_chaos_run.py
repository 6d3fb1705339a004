"""``headwater chaos run`` end to end, short: its own cluster, faults, a valid verdict, the report
files, ``chaos check`` agreeing, and nothing left behind (processes, namespaces)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

from headwater.chaos import net
from headwater.chaos.history import read_history


def _node_processes(marker: str) -> list[int]:
    """Pids of node processes whose command line holds ``marker`` (read whole from /proc: ps cuts
    long command lines short when its output is not a terminal)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if "headwater.node" in args and marker in args:
            pids.append(int(entry.name))
    return pids


def test_a_short_run_under_faults_is_valid_and_leaves_nothing_behind(tmp_path: Path) -> None:
    out_dir = tmp_path / "runs"
    nemeses = "kill,pause,partition" if not net.available() else "kill,pause"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "headwater",
            "chaos",
            "run",
            "--time-limit",
            "30",
            "--nemesis",
            nemeses,
            "--rate",
            "200",
            "--seed",
            "11",
            "--out",
            str(out_dir),
            "--fault-max-s",
            "6",
            "--partitions",
            "3",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict: VALID" in done.stdout
    [run_dir] = list(out_dir.iterdir())
    result = json.loads((run_dir / "results.json").read_text())
    assert result["valid"] is True and sum(result["counts"].values()) == result["counts"].get("duplicate", 0)
    for name in ("history.jsonl", "timeline.png", "report.md", "run.json"):
        assert (run_dir / name).stat().st_size > 0, name
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["node-1.log", "node-2.log", "node-3.log"]
    ops = read_history(run_dir / "history.jsonl").ops
    sends_ok = [op for op in ops if op.f == "send" and op.type == "ok"]
    faults = [op for op in ops if op.f == "fault" and op.value["phase"] == "start"]
    finals = [op for op in ops if op.f == "final-read"]
    assert len(sends_ok) > 1000 and faults and finals
    # Every fault started was stopped.
    assert len([op for op in ops if op.f == "fault" and op.value["phase"] == "stop"]) == len(faults)
    # The saved history checks the same again.
    again = subprocess.run(
        [sys.executable, "-m", "headwater", "chaos", "check", str(run_dir)], capture_output=True, text=True
    )
    assert again.returncode == 0 and "verdict: VALID" in again.stdout
    # Nothing left: node processes of the run, or its namespaces.
    assert not _node_processes("headwater-chaos-")
    assert net.cleanup_stale() == []


def test_a_run_on_a_cluster_that_local_up_started(tmp_path: Path) -> None:
    """``--state local.json``: the harness kills, pauses and restarts the nodes of a running cluster
    it did not start (by pid and command line), and the history is valid."""
    import os
    import signal
    import time

    from conftest import free_port

    data_dir = tmp_path / "cluster"
    port = free_port()
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "headwater",
            "local",
            "up",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--raft-port",
            str(free_port()),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = data_dir / "local.json"
    before: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not state.exists():
            assert up.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        before = {n["pid"] for n in json.loads(state.read_text())["nodes"]}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "headwater",
                "chaos",
                "run",
                "--state",
                str(state),
                "--time-limit",
                "25",
                "--nemesis",
                "kill,pause",
                "--rate",
                "150",
                "--seed",
                "5",
                "--out",
                str(tmp_path / "runs"),
                "--fault-max-s",
                "5",
                "--partitions",
                "2",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "verdict: VALID" in done.stdout and "partition nemesis left out" in done.stdout
        [run_dir] = list((tmp_path / "runs").iterdir())
        ops = read_history(run_dir / "history.jsonl").ops
        kinds = {op.value["kind"] for op in ops if op.f == "fault"}
        assert kinds and kinds <= {"kill", "pause"}
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
        # Nodes the harness restarted run on, as processes of their own (local up no longer
        # supervises them): found by their data dir, and stopped here.
        restarted = [pid for pid in _node_processes(str(data_dir)) if pid not in before]
        for pid in restarted:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # SIGKILL is delivered, and the orphans reaped, a moment later.
    deadline = time.monotonic() + 10
    while _node_processes(str(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _node_processes(str(data_dir))
