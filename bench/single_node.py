"""Single-node throughput: `headwater perf` against one node on this machine.

Starts a node in a temporary directory, then runs, one after another: a producer with acks=1, a
producer with acks=all (1 KiB records each), and a consumer reading the acks=all topic from the
beginning, each on a quiet node (the previous workload's flushes and compactions are over).
Prints each figure, the ratios to the floors this project holds itself to, and the
acks=all / acks=1 ratio from the same run. With --profile, samples the node and the client with
py-spy and prints where the time goes.

    python bench/single_node.py [--num-records 300000] [--record-size 1024] [--repeat 2] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from profiling import profile_summary, spy

from headwater.launcher import NodeProcess, NodeSpec

FLOORS_MB_S = {"produce acks=1": 80.0, "produce acks=all": 80.0, "consume": 200.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_node(bootstrap: str, proc: NodeProcess, timeout_s: float = 30) -> None:
    from headwater._health import EXITED, SERVING, wait_serving

    outcome = wait_serving(bootstrap, time.monotonic() + timeout_s, exited=lambda: not proc.alive())
    if outcome == EXITED:
        raise SystemExit(f"node exited with {proc.exit_code()}")
    if outcome != SERVING:
        raise SystemExit("node did not start")


def cli(bootstrap: str, *args: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "headwater", *args, "--format", "json"],
        env={**os.environ, "HEADWATER_BOOTSTRAP": bootstrap},
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def wait_quiet(pid: int, max_wait_s: float = 30.0) -> None:
    """Wait until the node's background work (RocksDB flushes, compactions) has settled, so each
    workload starts on a quiet node and is not charged for the previous one's writes."""
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_s() -> float:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    deadline = time.monotonic() + max_wait_s
    last = cpu_s()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_s()
        if now - last < 0.05:  # under 10% of a core
            return
        last = now


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-records", type=int, default=300_000)
    ap.add_argument("--record-size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="sample node and client with py-spy")
    args = ap.parse_args()
    if args.profile and shutil.which("py-spy") is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")

    data = tempfile.mkdtemp(prefix="headwater-bench-")
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    node = NodeProcess(
        NodeSpec(
            node_id=1,
            port=port,
            data_dir=os.path.join(data, "node"),
            log_path=os.path.join(data, "node.log"),
            settings={"log_level": "WARNING"},
        )
    )
    node.start()
    spies: list[tuple[str, subprocess.Popen[bytes], str]] = []
    try:
        wait_node(bootstrap, node)
        if args.profile:
            path = os.path.join(data, "node.prof")
            spies.append(("node", spy(node.pid, path), path))
        results: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
        n, size = str(args.num_records), str(args.record_size)
        for run in range(args.repeat):
            for acks in ("1", "all"):
                topic = f"bench-{acks}-{run}"
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "headwater",
                        "topic",
                        "create",
                        topic,
                        "--partitions",
                        "1",
                        "--bootstrap",
                        bootstrap,
                    ],
                    check=True,
                    capture_output=True,
                )
                wait_quiet(node.pid)
                results[f"produce acks={acks}"].append(
                    cli(
                        bootstrap,
                        "perf",
                        "produce",
                        topic,
                        "--num-records",
                        n,
                        "--record-size",
                        size,
                        "--acks",
                        acks,
                    )
                )
            wait_quiet(node.pid)
            results["consume"].append(
                cli(bootstrap, "perf", "consume", f"bench-all-{run}", "--num-records", n)
            )
    finally:
        for _, sampler, _ in spies:
            sampler.send_signal(signal.SIGINT)
            sampler.wait(30)
        node.stop(30)

    print(
        f"\nHeadwater single node, {args.num_records} records of {args.record_size} B, "
        f"{os.cpu_count()} cores shared by client and node\n"
    )
    print(
        f"{'workload':<18} {'records/s':>11} {'MB/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
        f" {'vs floor':>9}"
    )
    best: dict[str, float] = {}
    for name, runs in results.items():
        for r in runs:
            ratio = r["mb_per_s"] / FLOORS_MB_S[name]
            p50 = r.get("latency_p50_ms", float("nan"))
            p99 = r.get("latency_p99_ms", float("nan"))
            mx = r.get("latency_max_ms", float("nan"))
            print(
                f"{name:<18} {r['records_per_s']:>11.0f} {r['mb_per_s']:>8.1f} {p50:>8.1f} {p99:>8.1f} "
                f"{mx:>8.1f} {ratio:>8.2f}x"
            )
            best[name] = max(best.get(name, 0.0), r["mb_per_s"])
    if "produce acks=1" in best and "produce acks=all" in best:
        print(f"\nacks=all / acks=1 throughput: {best['produce acks=all'] / best['produce acks=1']:.2f}")
    for label, _, path in spies:
        if os.path.exists(path):
            print(f"\nwhere the {label} spends its time (self samples):")
            for pct, frame in profile_summary(path):
                print(f"  {pct:5.1f}%  {frame}")
    shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
