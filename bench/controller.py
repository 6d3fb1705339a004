"""Controller benchmark: fail-over, leader movement and metadata commit rate on a local cluster.

Starts a cluster of voters on loopback (every node a metadata voter and a broker) and measures:

1. Controller fail-over. ``--kills`` times: SIGKILL the active controller, then time, from the
   signal, (a) until a survivor reports itself the active controller (DescribeCluster) and (b) until
   the next metadata command commits: a client sends a small AlterConfigs (a new ``retention_ms``
   each time) to the survivors in turn, each try bounded by ``--attempt-timeout-ms``, and the first
   success ends the clock. The killed node is restarted and serves again before the next kill.
2. A node's death to its partitions' new leaders. ``--node-kills`` times: create a fresh topic
   (``--partitions``, replication factor 3), SIGKILL the node that leads most of its partitions
   among those that are not the active controller, and time until a survivor's Metadata shows the
   node fenced and every partition led by a survivor. The controller only fences a node once its
   lease runs out, ``--session-timeout-ms`` after its last heartbeat, so this is bounded below by the
   session timeout less one ``--heartbeat-interval-ms``. A fresh topic each time, because followers
   copy logs but are not counted yet: a restarted node does not rejoin the ISRs it left.
3. Metadata commands committed per second: AlterConfigs over raw gRPC, one at a time from one
   client and from ``--threads`` clients at once, each for ``--rate-seconds``, sent to the active
   controller and to another voter (which forwards to the controller and answers once its own image
   has the change).

Prints each round on stderr and a table at the end (``--json``: one JSON object instead). Every node
is killed on the way out, whatever happened.

    python bench/controller.py [--voters 3] [--kills 20] [--node-kills 5] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from headwater import Admin, NewTopic
from headwater._health import EXITED, SERVING, wait_serving
from headwater.launcher import NodeProcess, NodeSpec
from headwater.v1 import client_pb2 as pb
from headwater.v1 import client_pb2_grpc, controller_pb2, controller_pb2_grpc, errors_pb2

# How often the measuring loops poll; small against the figures, large enough not to starve the
# nodes of the machine's cores.
POLL_S = 0.02
# How long one round may take before the benchmark gives up on it.
ROUND_TIMEOUT_S = 60.0
CONFIG_TOPIC = "bench-configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); NaN without samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class LocalCluster:
    """Voter processes on loopback ports (``headwater.launcher``), with the few calls the benchmark
    makes to them."""

    def __init__(self, root: Path, voters: int, heartbeat_interval_ms: int, session_timeout_ms: int) -> None:
        self.root = root
        self.secret_file = root / "cluster.secret"
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        ports = {i: (free_port(), free_port()) for i in range(1, voters + 1)}
        settings = {
            "voters": ",".join(f"{i}@127.0.0.1:{raft}" for i, (_, raft) in ports.items()),
            "controller_addresses": ",".join(f"127.0.0.1:{port}" for port, _ in ports.values()),
            "cluster_secret_file": str(self.secret_file),
            "log_level": "WARNING",
            "heartbeat_interval_ms": str(heartbeat_interval_ms),
            "session_timeout_ms": str(session_timeout_ms),
        }
        self.nodes = {
            i: NodeProcess(
                NodeSpec(
                    node_id=i,
                    port=port,
                    raft_port=raft,
                    data_dir=str(root / f"node-{i}"),
                    log_path=str(root / f"node-{i}.log"),
                    settings=settings,
                )
            )
            for i, (port, raft) in ports.items()
        }
        self._channels: dict[int, grpc.Channel] = {}

    @property
    def bootstrap(self) -> str:
        return ",".join(n.client for n in self.nodes.values() if n.alive())

    def launch(self, node_id: int) -> None:
        n = self.nodes[node_id]
        assert not n.alive(), f"node {node_id} is already running"
        n.start()

    def kill9(self, node_id: int) -> float:
        """SIGKILL a node; returns the monotonic time the signal was sent."""
        n = self.nodes[node_id]
        assert n.alive(), f"node {node_id} is not running"
        channel = self._channels.pop(node_id, None)
        if channel is not None:
            channel.close()
        killed_at = time.monotonic()
        n.kill()
        return killed_at

    def stop(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        for n in self.nodes.values():
            n.kill()

    def wait_serving(self, node_id: int, timeout_s: float = ROUND_TIMEOUT_S) -> None:
        """Until the node reports SERVING on the health service (registered and unfenced)."""
        n = self.nodes[node_id]
        outcome = wait_serving(
            n.client, time.monotonic() + timeout_s, exited=lambda: not n.alive(), interval_s=0.1
        )
        if outcome == EXITED:
            raise RuntimeError(f"node {node_id} exited; see {Path(n.spec.log_path).name}")
        if outcome != SERVING:
            raise RuntimeError(f"node {node_id} not serving after {timeout_s:.0f} s")

    def _channel(self, node_id: int) -> grpc.Channel:
        channel = self._channels.get(node_id)
        if channel is None:
            channel = self._channels[node_id] = grpc.insecure_channel(self.nodes[node_id].client)
        return channel

    def client_stub(self, node_id: int) -> client_pb2_grpc.HeadwaterServiceStub:
        return client_pb2_grpc.HeadwaterServiceStub(self._channel(node_id))

    def describe(self, node_id: int, timeout_s: float = 2.0) -> controller_pb2.DescribeClusterResponse:
        stub = controller_pb2_grpc.ControllerServiceStub(self._channel(node_id))
        return stub.DescribeCluster(controller_pb2.DescribeClusterRequest(), timeout=timeout_s)

    def metadata(self, node_id: int, topic: str, timeout_s: float = 2.0) -> pb.MetadataResponse:
        return self.client_stub(node_id).Metadata(pb.MetadataRequest(topics=[topic]), timeout=timeout_s)

    def alive_ids(self) -> list[int]:
        return [i for i, n in self.nodes.items() if n.alive()]

    def wait_stable(self, timeout_s: float = ROUND_TIMEOUT_S) -> int:
        """Until every running voter names the same active controller, which says so itself, and sees
        every node registered and unfenced. Returns the active controller's id."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                answers = [self.describe(i) for i in self.alive_ids()]
            except grpc.RpcError:
                answers = []
            if answers:
                controllers = {d.controller_id for d in answers}
                controller_id = controllers.pop() if len(controllers) == 1 else -1
                unfenced = all(
                    len(d.nodes) == len(self.nodes) and not any(n.fenced for n in d.nodes) for d in answers
                )
                if controller_id > 0 and unfenced:
                    own = next((d for d in answers if d.answered_by == controller_id), None)
                    if own is not None and own.controller_id == controller_id:
                        return controller_id
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not settle within {timeout_s:.0f} s")
            time.sleep(0.1)


def alter_retention(stub: client_pb2_grpc.HeadwaterServiceStub, retention_ms: int, timeout_s: float) -> bool:
    """One AlterConfigs of the benchmark topic's retention_ms; True once the change is committed (the
    node answers only then), False on any error or timeout."""
    request = pb.AlterConfigsRequest(
        resources=[
            pb.AlterConfigsResource(
                resource_type=pb.RESOURCE_TYPE_TOPIC,
                resource_name=CONFIG_TOPIC,
                configs=[
                    pb.AlterableConfig(
                        name="retention_ms", op=pb.ALTER_CONFIG_OP_SET, value=str(retention_ms)
                    )
                ],
            )
        ]
    )
    try:
        response = stub.AlterConfigs(request, timeout=timeout_s)
    except grpc.RpcError:
        return False
    return bool(response.results) and all(
        r.error_code == errors_pb2.ERROR_CODE_NONE for r in response.results
    )


class RetentionValues:
    """Distinct retention_ms values, so every successful AlterConfigs is a new committed change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 3_600_000

    def take(self) -> int:
        with self._lock:
            self._next += 1
            return self._next


# ---------------------------------------------------------------------------------------------- 1


def controller_failover(
    c: LocalCluster, values: RetentionValues, attempt_timeout_s: float
) -> tuple[float, float, int]:
    """Kill the active controller. Returns (seconds to a new active controller, seconds to the next
    committed command, the killed node's id). The killed node stays down."""
    victim = c.wait_stable()
    survivors = [i for i in c.alive_ids() if i != victim]
    stubs = {i: c.client_stub(i) for i in survivors}
    elected: list[float] = []

    def watch_controller(killed_at: float) -> None:
        while time.monotonic() < killed_at + ROUND_TIMEOUT_S:
            for i in survivors:
                try:
                    d = c.describe(i, timeout_s=0.5)
                except grpc.RpcError:
                    continue
                if d.controller_id == d.answered_by == i:
                    elected.append(time.monotonic() - killed_at)
                    return
            time.sleep(POLL_S)

    killed_at = c.kill9(victim)
    watcher = threading.Thread(target=watch_controller, args=(killed_at,), daemon=True)
    watcher.start()
    committed = math.nan
    attempt = 0
    while time.monotonic() < killed_at + ROUND_TIMEOUT_S:
        stub = stubs[survivors[attempt % len(survivors)]]
        attempt += 1
        if alter_retention(stub, values.take(), attempt_timeout_s):
            committed = time.monotonic() - killed_at
            break
        time.sleep(POLL_S)
    watcher.join()
    if math.isnan(committed) or not elected:
        raise RuntimeError(f"no fail-over within {ROUND_TIMEOUT_S:.0f} s after killing node {victim}")
    return elected[0], committed, victim


# ---------------------------------------------------------------------------------------------- 2


def leaders_after_node_death(c: LocalCluster, topic: str, partitions: int) -> tuple[float, int, int]:
    """Create ``topic``, kill the non-controller node leading most of its partitions. Returns (seconds
    until a survivor shows that node fenced and every partition led by a survivor, partitions the node
    led, its id). The killed node stays down."""
    controller_id = c.wait_stable()
    with Admin(c.bootstrap) as admin:
        admin.create_topics([NewTopic(topic, partitions=partitions, replication_factor=min(3, len(c.nodes)))])
    md = c.metadata(controller_id, topic)
    led = collections.Counter(p.leader_id for p in md.topics[0].partitions)
    victim = max((i for i in c.nodes if i != controller_id), key=lambda i: led[i])
    if led[victim] == 0:
        raise RuntimeError(f"no node but the controller leads a partition of {topic}: {dict(led)}")
    survivors = [i for i in c.alive_ids() if i != victim]

    def settled(md: pb.MetadataResponse) -> bool:
        fenced = {n.node_id for n in md.nodes if n.fenced}
        leaders = [p.leader_id for p in md.topics[0].partitions]
        return victim in fenced and len(leaders) == partitions and all(ld in survivors for ld in leaders)

    killed_at = c.kill9(victim)
    attempt = 0
    while time.monotonic() < killed_at + ROUND_TIMEOUT_S:
        node_id = survivors[attempt % len(survivors)]
        attempt += 1
        try:
            if settled(c.metadata(node_id, topic, timeout_s=1.0)):
                return time.monotonic() - killed_at, led[victim], victim
        except grpc.RpcError:
            pass
        time.sleep(POLL_S)
    raise RuntimeError(f"node {victim}'s partitions had no new leaders after {ROUND_TIMEOUT_S:.0f} s")


# ---------------------------------------------------------------------------------------------- 3


def commit_rate(
    address: str, threads: int, duration_s: float, values: RetentionValues, timeout_s: float
) -> dict[str, float]:
    """``threads`` clients, each sending AlterConfigs one at a time to ``address`` for ``duration_s``."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def client(t: int) -> None:
        with grpc.insecure_channel(address) as ch:
            stub = client_pb2_grpc.HeadwaterServiceStub(ch)
            alter_retention(stub, values.take(), timeout_s)  # connect before the clock starts
            start.wait()
            while not stop.is_set():
                sent = time.monotonic()
                if alter_retention(stub, values.take(), timeout_s):
                    latencies[t].append(time.monotonic() - sent)
                else:
                    errors[t] += 1

    workers = [threading.Thread(target=client, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    began = time.monotonic()
    time.sleep(duration_s)
    stop.set()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - began
    done = [x for xs in latencies for x in xs]
    return {
        "threads": threads,
        "commands": len(done),
        "commands_per_s": len(done) / elapsed,
        "latency_p50_ms": 1000 * percentile(done, 0.5),
        "latency_p99_ms": 1000 * percentile(done, 0.99),
        "errors": sum(errors),
    }


# ---------------------------------------------------------------------------------------------- main


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "n": len(samples),
        "p50_s": percentile(samples, 0.5),
        "p90_s": percentile(samples, 0.9),
        "max_s": max(samples, default=math.nan),
        "samples_s": [round(s, 4) for s in samples],
    }


def print_table(args: argparse.Namespace, results: dict[str, Any]) -> None:
    print(
        f"\nHeadwater controller, {args.voters} voters on loopback, {os.cpu_count()} cores shared by the "
        f"nodes and the client; heartbeat_interval_ms={args.heartbeat_interval_ms}, "
        f"session_timeout_ms={args.session_timeout_ms}\n"
    )
    print(f"{'after a SIGKILL':<52} {'n':>3} {'p50 s':>7} {'p90 s':>7} {'max s':>7}")
    rows: list[tuple[str, str]] = [
        ("active controller killed: a new one is reported", "controller_elected"),
        ("active controller killed: next command committed", "command_committed"),
        ("other node killed: fenced, its partitions led", "partitions_led"),
    ]
    for label, key in rows:
        s = results[key]
        print(f"{label:<52} {s['n']:>3} {s['p50_s']:>7.2f} {s['p90_s']:>7.2f} {s['max_s']:>7.2f}")
    lease_floor_s = (args.session_timeout_ms - args.heartbeat_interval_ms) / 1000
    print(
        f"  (the last is bounded below by the lease: session timeout {args.session_timeout_ms / 1000:.2f} s "
        f"from the last heartbeat, so at least {lease_floor_s:.2f} s; "
        f"{results['partitions_moved']} leaderships moved in all)"
    )
    print(
        f"\n{'metadata commands (AlterConfigs)':<34} {'sent to':<12} {'clients':>7} {'commands/s':>10} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6}"
    )
    for r in results["commit_rate"]:
        mode = "sequential" if r["threads"] == 1 else "concurrent"
        print(
            f"{mode:<34} {r['sent_to']:<12} {r['threads']:>7} {r['commands_per_s']:>10.0f} "
            f"{r['latency_p50_ms']:>7.1f} {r['latency_p99_ms']:>7.1f} {r['errors']:>6}"
        )


def run(args: argparse.Namespace, c: LocalCluster) -> dict[str, Any]:
    values = RetentionValues()
    attempt_timeout_s = args.attempt_timeout_ms / 1000
    for i in c.nodes:
        c.launch(i)
    for i in c.nodes:
        c.wait_serving(i)
    controller_id = c.wait_stable()
    with Admin(c.bootstrap) as admin:
        admin.create_topics([NewTopic(CONFIG_TOPIC, partitions=1, replication_factor=1)])
    progress(f"{len(c.nodes)} voters serving; node {controller_id} is the active controller")

    # 3 first, on a cluster no kill has disturbed yet.
    other_id = next(i for i in c.nodes if i != controller_id)
    rates = []
    for sent_to, node_id in (("controller", controller_id), ("other voter", other_id)):
        for threads in (1, args.threads):
            r = commit_rate(c.nodes[node_id].client, threads, args.rate_seconds, values, 10.0)
            rates.append({"sent_to": sent_to, **r})
            progress(f"commit rate, {threads} client(s) to the {sent_to}: {r['commands_per_s']:.0f}/s")

    led: list[float] = []
    moved = 0
    for k in range(args.node_kills):
        elapsed, count, victim = leaders_after_node_death(c, f"bench-leaders-{k}", args.partitions)
        led.append(elapsed)
        moved += count
        progress(f"node kill {k + 1}/{args.node_kills}: node {victim} ({count} leaderships) {elapsed:.2f} s")
        c.launch(victim)
        c.wait_serving(victim)

    elected: list[float] = []
    committed: list[float] = []
    for k in range(args.kills):
        to_elected, to_committed, victim = controller_failover(c, values, attempt_timeout_s)
        elected.append(to_elected)
        committed.append(to_committed)
        progress(
            f"controller kill {k + 1}/{args.kills}: node {victim}, new controller {to_elected:.2f} s, "
            f"command committed {to_committed:.2f} s"
        )
        c.launch(victim)
        c.wait_serving(victim)

    return {
        "voters": args.voters,
        "cores": os.cpu_count(),
        "heartbeat_interval_ms": args.heartbeat_interval_ms,
        "session_timeout_ms": args.session_timeout_ms,
        "attempt_timeout_ms": args.attempt_timeout_ms,
        "controller_elected": summary(elected),
        "command_committed": summary(committed),
        "partitions_led": summary(led),
        "partitions_moved": moved,
        "commit_rate": rates,
    }


def log_tails(c: LocalCluster, lines: int = 15) -> None:
    for n in c.nodes.values():
        log_path = Path(n.spec.log_path)
        if log_path.exists():
            tail = log_path.read_text(errors="replace").splitlines()[-lines:]
            progress(f"--- last lines of node {n.node_id}'s log\n" + "\n".join(tail))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voters", type=int, choices=(3, 5), default=3)
    ap.add_argument("--kills", type=int, default=20, help="active controller kills")
    ap.add_argument("--node-kills", type=int, default=5, help="kills of a node that is not the controller")
    ap.add_argument("--partitions", type=int, default=30, help="partitions of each leader-movement topic")
    ap.add_argument("--threads", type=int, default=8, help="clients of the concurrent commit rate")
    ap.add_argument("--rate-seconds", type=float, default=5.0, help="duration of each commit-rate run")
    ap.add_argument("--attempt-timeout-ms", type=int, default=500, help="bound of one try during fail-over")
    ap.add_argument("--heartbeat-interval-ms", type=int, default=500)
    ap.add_argument("--session-timeout-ms", type=int, default=3000)
    ap.add_argument("--data-dir", help="empty or new; kept afterwards. Default: a temporary one, removed")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    if args.kills < 1 or args.node_kills < 1 or args.threads < 1:
        ap.error("--kills, --node-kills and --threads must be at least 1")
    if args.data_dir and os.path.isdir(args.data_dir) and os.listdir(args.data_dir):
        ap.error(f"--data-dir {args.data_dir} is not empty")

    # SIGTERM unwinds like Ctrl-C, through the finally below that kills every node.
    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    root = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="headwater-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    c = LocalCluster(root, args.voters, args.heartbeat_interval_ms, args.session_timeout_ms)
    failed = False
    try:
        results = run(args, c)
    except Exception:
        failed = True
        raise
    finally:
        c.stop()
        if failed:  # not on Ctrl-C or SIGTERM
            log_tails(c)
        if not args.data_dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
