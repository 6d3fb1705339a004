"""Replication benchmark: three Headwater nodes against NATS JetStream with three replicas, side by side.

Both run on this machine, one after the other in one invocation, with the same record size and
count, from one producer process each:

1. Headwater (``headwater local up``, three nodes, a topic of ``--partitions`` partitions):
   RF 3 acks=all, RF 3 acks=1 and RF 1 acks=1 at full load (``headwater perf produce``, which keeps
   many requests in flight), then each at half the rate it reached; RF 3 acks=all with
   ``flush_policy=fsync``.
2. NATS JetStream, three ``nats-server`` processes in one cluster, a file stream with 3 replicas,
   published with ``nats-py``'s async publish (``--nats-in-flight`` acks outstanding), at full load.
3. Ack latency of both at the same offered load (``--fixed-rate`` records/s), where queueing does not
   hide it.
4. Catch-up: one follower stopped while ``--catchup-mib`` MiB are written with acks=1 (the ISR
   shrinks, acks=all would wait), then restarted; the time until its log end reaches the leader's,
   as MB/s, and that as a fraction of the produce MB/s.

Prints a table, the ratio Headwater RF3 acks=all / NATS R3 (records/s), the largest lease heartbeat
gap any node saw (``headwater_lease_heartbeat_gap_max_seconds``), and with ``--profile`` where the
time of the leader, a follower and the client went (py-spy).

    python bench/replication.py [--num-records 200000] [--record-size 1024] [--catchup-mib 1024]

NATS needs ``nats-server`` (Debian: ``apt-get install nats-server``) and ``pip install nats-py``;
without them ``--skip-nats`` runs Headwater alone (no ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from profiling import profile_summary, spy

from headwater.launcher import NodeProcess, NodeSpec, free_port_block

MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_quiet(pids: list[int], max_wait_s: float = 60.0) -> None:
    """Wait until the processes' background work (RocksDB flushes and compactions, followers
    finishing their copies) has settled, so each workload starts on quiet nodes."""
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_s() -> float:
        total = 0.0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks
        return total

    deadline = time.monotonic() + max_wait_s
    last = cpu_s()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_s()
        if now - last < 0.05 * len(pids):  # under 10% of a core each
            return
        last = now


# ------------------------------------------------------------------ Headwater


class Headwater:
    """A three-node cluster started with ``headwater local up`` in a temporary directory."""

    def __init__(self, root: Path, nodes: int = 3) -> None:
        self.root = root
        port = free_port_block(nodes)
        if port is None:
            raise SystemExit("no free block of ports")
        self.port = port
        self.nodes = nodes
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "headwater",
                "local",
                "up",
                "--nodes",
                str(nodes),
                "--data-dir",
                str(root),
                "--port",
                str(self.port),
                "--replication-factor",
                "3",
                "--min-insync-replicas",
                "2",
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            process_group=0,
        )
        self.bootstrap = ",".join(f"127.0.0.1:{self.port + i}" for i in range(nodes))
        deadline = time.monotonic() + 90
        while not (root / "local.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("headwater local up did not start")
            time.sleep(0.2)
        self.state = json.loads((root / "local.json").read_text())

    def node(self, node_id: int) -> dict[str, Any]:
        return next(n for n in self.state["nodes"] if n["node_id"] == node_id)

    def metrics_port(self, node_id: int) -> int:
        return self.port + 100 + node_id - 1

    def metric(self, node_id: int, name: str, labels: str = "") -> float | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port(node_id)}/metrics", timeout=5
            ) as r:
                text = r.read().decode()
        except OSError:
            return None
        prefix = f"{name}{labels} "
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix) :])
        return None

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "headwater", *args],
            env={**os.environ, "HEADWATER_BOOTSTRAP": self.bootstrap},
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout

    def create(self, topic: str, partitions: int, rf: int, *configs: str) -> None:
        extra = [a for c in configs for a in ("--config", c)]
        self.cli(
            "topic", "create", topic, "--partitions", str(partitions), "--replication-factor", str(rf), *extra
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            described = json.loads(self.cli("topic", "describe", topic, "--format", "json", "--no-offsets"))
            parts = described[0]["partitions"]
            if all(p["leader"] >= 0 and len(p["isr"]) == rf for p in parts):
                return
            time.sleep(0.2)
        raise SystemExit(f"topic {topic} did not get a full ISR")

    def leaders(self, topic: str) -> list[int]:
        described = json.loads(self.cli("topic", "describe", topic, "--format", "json", "--no-offsets"))
        return [p["leader"] for p in described[0]["partitions"]]

    def perf(
        self, topic: str, n: int, size: int, acks: str, throughput: int = -1, linger_ms: int = 5
    ) -> dict[str, float]:
        wait_quiet([node["pid"] for node in self.state["nodes"]])
        out = self.cli(
            "perf", "produce", topic,
            "--num-records", str(n), "--record-size", str(size), "--acks", acks,
            "--throughput", str(throughput), "--linger-ms", str(linger_ms), "--format", "json",
        )  # fmt: skip
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def kill_node(self, node_id: int) -> None:
        os.kill(self.node(node_id)["pid"], signal.SIGKILL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def restart_node(hw: Headwater, node_id: int) -> NodeProcess:
    """Start a killed node again, with the settings ``local up`` gave it (from its local.json)."""
    n = hw.node(node_id)
    voters = [m for m in hw.state["nodes"] if m["voter"]]
    spec = NodeSpec(
        node_id=node_id,
        port=int(n["client"].rsplit(":", 1)[1]),
        data_dir=n["data_dir"],
        log_path=n["log"],
        metrics_port=hw.metrics_port(node_id),
        settings={
            "voters": ",".join(f"{m['node_id']}@{m['raft']}" for m in voters),
            "controller_addresses": ",".join(m["client"] for m in voters),
            "cluster_secret_file": str(hw.root / "cluster.secret"),
            "default_replication_factor": "3",
            "min_insync_replicas": "2",
            "log_level": "WARNING",
        },
    )
    node = NodeProcess(spec)
    node.start()
    return node


# ------------------------------------------------------------------ NATS


class Nats:
    """Three nats-server processes in one JetStream cluster."""

    def __init__(self, root: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.client_ports = [free_port() for _ in range(3)]
        routes = [free_port() for _ in range(3)]
        for i in range(3):
            d = root / f"nats-{i}"
            d.mkdir(parents=True)
            conf = d / "server.conf"
            others = ", ".join(f"nats://127.0.0.1:{routes[j]}" for j in range(3) if j != i)
            conf.write_text(
                f"server_name: n{i}\nlisten: 127.0.0.1:{self.client_ports[i]}\n"
                f'jetstream {{ store_dir: "{d}" }}\n'
                f"cluster {{ name: bench, listen: 127.0.0.1:{routes[i]}, routes: [{others}] }}\n"
            )
            self.procs.append(
                subprocess.Popen(
                    ["nats-server", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        self.servers = [f"nats://127.0.0.1:{p}" for p in self.client_ports]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


async def nats_publish(
    servers: list[str], stream: str, n: int, size: int, in_flight: int, rate: int = -1
) -> dict[str, float]:
    """Publish ``n`` records of ``size`` bytes to a new R3 file stream; ack latency per record."""
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(servers=servers)
    try:
        js = nc.jetstream(publish_async_max_pending=in_flight)
        deadline = time.monotonic() + 30
        while True:
            try:
                await js.add_stream(
                    StreamConfig(name=stream, subjects=[stream], num_replicas=3, storage=StorageType.FILE)
                )
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        payload = os.urandom(size)
        latencies: list[float] = []
        loop = asyncio.get_running_loop()

        def done(started: float) -> Any:
            def cb(fut: asyncio.Future[Any]) -> None:
                if not fut.cancelled() and fut.exception() is None:
                    latencies.append(loop.time() - started)

            return cb

        start = loop.time()
        futures = []
        for i in range(n):
            if rate > 0:
                due = start + i / rate
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
            fut = await js.publish_async(stream, payload)
            fut.add_done_callback(done(loop.time()))
            futures.append(fut)
        await asyncio.gather(*futures, return_exceptions=True)
        elapsed = loop.time() - start
        ordered = sorted(latencies)
        return {
            "records": len(ordered),
            "errors": n - len(ordered),
            "records_per_s": len(ordered) / elapsed,
            "mb_per_s": len(ordered) * size / elapsed / MB,
            "latency_p50_ms": percentile(ordered, 0.5) * 1000,
            "latency_p99_ms": percentile(ordered, 0.99) * 1000,
        }
    finally:
        await nc.close()


# ------------------------------------------------------------------ profile


# ------------------------------------------------------------------ main


def row(name: str, r: dict[str, float]) -> str:
    return (
        f"{name:<34} {r['records_per_s']:>11,.0f} {r['mb_per_s']:>8.1f} "
        f"{r['latency_p50_ms']:>8.2f} {r['latency_p99_ms']:>8.2f} {int(r.get('errors', 0)):>6}"
    )


def catch_up(hw: Headwater, args: argparse.Namespace) -> dict[str, float]:
    """Stop a follower, write --catchup-mib with acks=1, restart it, time its catch-up."""
    topic = "catchup"
    hw.create(topic, 1, 3)
    leader = hw.leaders(topic)[0]
    follower = next(i for i in (1, 2, 3) if i != leader)
    hw.kill_node(follower)
    n = max(1, args.catchup_mib * MB // args.record_size)
    progress(f"catch-up: node {follower} killed; writing {args.catchup_mib} MiB to the leader {leader}")
    produced = hw.perf(topic, n, args.record_size, "1")
    labels = f'{{partition="0",topic="{topic}"}}'
    target = hw.metric(leader, "headwater_log_end_offset", labels)
    node = restart_node(hw, follower)
    started = time.monotonic()
    catch_spy = spy(node.pid, str(hw.root / "catchup.prof")) if args.profile else None
    first: float | None = None  # the restarted node serves the replica (its metrics show it)
    try:
        while True:
            end = hw.metric(follower, "headwater_log_end_offset", labels)
            if end is not None and first is None:
                first = time.monotonic()
            if end is not None and target is not None and end >= target:
                break
            if time.monotonic() - started > 900:
                raise SystemExit("the follower did not catch up within 15 minutes")
            time.sleep(0.05)
        done = time.monotonic()
    finally:
        if catch_spy is not None:
            catch_spy.send_signal(signal.SIGINT)
            catch_spy.wait(30)
        node.stop(60)
    assert first is not None
    elapsed = done - first
    mb = n * args.record_size / MB
    return {
        "produce_mb_per_s": produced["mb_per_s"],
        "catchup_mb_per_s": mb / elapsed,
        "catchup_s": elapsed,
        "restart_s": first - started,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-records", type=int, default=200_000)
    ap.add_argument("--record-size", type=int, default=1024)
    ap.add_argument("--partitions", type=int, default=1, help="partitions of the Headwater topics")
    ap.add_argument("--fixed-rate", type=int, default=10_000, help="offered load of the latency runs")
    ap.add_argument("--catchup-mib", type=int, default=1024, help="0 skips the catch-up run")
    ap.add_argument("--nats-in-flight", type=int, default=2000)
    ap.add_argument("--skip-nats", action="store_true")
    ap.add_argument("--skip-half", action="store_true", help="skip the half-load runs")
    ap.add_argument("--profile", action="store_true", help="sample leader, follower and client with py-spy")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not args.skip_nats and shutil.which("nats-server") is None:
        raise SystemExit("nats-server is missing (apt-get install nats-server), or pass --skip-nats")
    if args.profile and shutil.which("py-spy") is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    root = Path(tempfile.mkdtemp(prefix="headwater-repl-bench-"))
    results: dict[str, dict[str, float]] = {}
    extra: dict[str, Any] = {}
    n, size = args.num_records, args.record_size
    hw: Headwater | None = None
    nats_cluster: Nats | None = None
    try:
        hw = Headwater(root / "headwater")
        hw.create("rf3", args.partitions, 3)
        hw.create("rf3b", args.partitions, 3)
        hw.create("rf1", args.partitions, 1)
        hw.create("rf3fsync", args.partitions, 3, "flush_policy=fsync")
        hw.create("rf3lat", args.partitions, 3)
        spies: list[tuple[str, subprocess.Popen[bytes], str]] = []
        if args.profile:
            leader = hw.leaders("rf3")[0]
            follower = next(i for i in (1, 2, 3) if i != leader)
            for name, node_id in (("leader", leader), ("follower", follower)):
                path = str(root / f"{name}.prof")
                spies.append((name, spy(hw.node(node_id)["pid"], path), path))
        plan = [
            ("Headwater RF3 acks=all", "rf3", "all"),
            ("Headwater RF3 acks=1", "rf3b", "1"),
            ("Headwater RF1 acks=1", "rf1", "1"),
        ]
        for name, topic, acks in plan:
            progress(f"{name}: {n} records of {size} B")
            results[name] = hw.perf(topic, n, size, acks)
            progress(row(name, results[name]))
        for s in spies:
            s[1].send_signal(signal.SIGINT)
            s[1].wait(30)
        if not args.skip_half:
            for name, topic, acks in plan:
                rate = int(results[name]["records_per_s"] / 2)
                half = f"{name} @ {rate:,}/s"
                results[half] = hw.perf(topic, n // 2, size, acks, rate)
                progress(row(half, results[half]))
        name = "Headwater RF3 acks=all fsync"
        results[name] = hw.perf("rf3fsync", n, size, "all")
        progress(row(name, results[name]))
        name = f"Headwater RF3 acks=all @ {args.fixed_rate:,}/s"
        # The producer's default linger (5 ms) is part of what a user's record waits.
        results[name] = hw.perf("rf3lat", min(n, args.fixed_rate * 10), size, "all", args.fixed_rate)
        progress(row(name, results[name]))
        extra["heartbeat_gap_max_s"] = max(
            hw.metric(i, "headwater_lease_heartbeat_gap_max_seconds") or 0.0 for i in (1, 2, 3)
        )
        if args.catchup_mib > 0:
            extra["catchup"] = catch_up(hw, args)
            if args.profile:
                spies.append(
                    ("catching-up follower", subprocess.Popen(["true"]), str(hw.root / "catchup.prof"))
                )
        hw.stop()
        if args.profile:
            extra["profile"] = {name: profile_summary(path) for name, _, path in spies}
        if not args.skip_nats:
            nats_cluster = Nats(root / "nats")
            name = "NATS JetStream R3"
            progress(f"{name}: {n} records of {size} B, {args.nats_in_flight} in flight")
            results[name] = asyncio.run(
                nats_publish(nats_cluster.servers, "bench", n, size, args.nats_in_flight)
            )
            progress(row(name, results[name]))
            name = f"NATS JetStream R3 @ {args.fixed_rate:,}/s"
            results[name] = asyncio.run(
                nats_publish(
                    nats_cluster.servers,
                    "benchlat",
                    min(n, args.fixed_rate * 10),
                    size,
                    args.nats_in_flight,
                    args.fixed_rate,
                )  # fmt: skip
            )
            progress(row(name, results[name]))
    finally:
        if hw is not None:
            hw.stop()
        if nats_cluster is not None:
            nats_cluster.stop()
        shutil.rmtree(root, ignore_errors=True)

    hw_all = results["Headwater RF3 acks=all"]["records_per_s"]
    if "NATS JetStream R3" in results:
        extra["ratio_rf3_acks_all_vs_nats_r3"] = hw_all / results["NATS JetStream R3"]["records_per_s"]
    if args.json:
        print(json.dumps({"results": results, **extra}, indent=2))
        return 0
    print(f"\n{n} records of {size} B, {os.cpu_count()} cores shared by every process\n")
    print(f"{'workload':<34} {'records/s':>11} {'MB/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for name, r in results.items():
        print(row(name, r))
    if "ratio_rf3_acks_all_vs_nats_r3" in extra:
        print(f"\nHeadwater RF3 acks=all / NATS R3: {extra['ratio_rf3_acks_all_vs_nats_r3']:.2f}")
    print(f"largest lease heartbeat gap on any node: {extra['heartbeat_gap_max_s']:.3f} s")
    if "catchup" in extra:
        c = extra["catchup"]
        print(
            f"follower catch-up: {c['catchup_mb_per_s']:.1f} MB/s in {c['catchup_s']:.1f} s "
            f"(after {c['restart_s']:.1f} s to restart), "
            f"{c['catchup_mb_per_s'] / c['produce_mb_per_s']:.2f} of the produce rate "
            f"({c['produce_mb_per_s']:.1f} MB/s)"
        )
    for name, top in extra.get("profile", {}).items():
        print(f"\n{name}: self time")
        for pct, frame in top:
            print(f"  {pct:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
