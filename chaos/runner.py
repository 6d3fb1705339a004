"""``headwater chaos run``: start a cluster, run the workload under faults, heal, read, check, report.

The run, in order:

1. A cluster of ``nodes`` in a fresh directory (``launcher.LocalCluster``), each node in its own
   network namespace when the ``partition`` nemesis is asked for (``net.Network``; without root it
   says why and leaves that nemesis out); or, with ``bootstrap`` and ``state`` (a ``local.json``),
   a cluster already running, whose processes it may kill, pause and restart (no partitions there).
2. A topic of ``partitions`` partitions, replication factor ``min(3, nodes)`` and
   ``min_insync_replicas`` 2, so the checker judges replication, not one node.
3. Producers and consumers (workload.py) for ``time_limit_s`` while the generator alternates a quiet
   spell and one fault at a time (each of bounded length, drawn from the seeded RNG), with a
   progress line every few seconds.
4. Every fault healed (killed nodes restarted, paused ones resumed, the network healed); the
   cluster settles (every node serving, every partition's ISR whole, or a bound passes); the
   producers' last answers come in; the final read of every partition.
5. The checker's verdict (checker.py) and the report (report.py) in ``out/<run id>/`` with the
   history and the node logs. Exit code 0: valid; 1: an anomaly; 2: the run could not be made.

Ctrl-C or an error at any point still heals every fault, stops the nodes and removes the
namespaces. ``seed`` fixes the schedule of faults and the workload's keys; the timing of real
processes is not reproducible.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from headwater.chaos import net
from headwater.chaos.checker import CheckResult, check
from headwater.chaos.history import NEMESIS_PROCESS, HistoryWriter, read_history
from headwater.chaos.nemesis import Fault, KillNemesis, Nemesis, PartitionNemesis, PauseNemesis, Targets
from headwater.chaos.report import write_report
from headwater.chaos.workload import Consumers, Counters, Producers, final_read
from headwater.launcher import LaunchError, LocalCluster, NodeProcess, NodeSpec, free_port_block, pid_alive

__all__ = ["RunConfig", "run", "recheck", "EXIT_VALID", "EXIT_ANOMALY", "EXIT_CANNOT_RUN", "RunError"]

EXIT_VALID, EXIT_ANOMALY, EXIT_CANNOT_RUN = 0, 1, 2
TOPIC = "chaos"
# Settings of the harness's own cluster: faults are found fast, so a run sees many of them.
NODE_SETTINGS = {
    "heartbeat_interval_ms": "250",
    "session_timeout_ms": "2000",
    "replica_lag_time_max_ms": "3000",
    "default_replication_factor": "3",
    "min_insync_replicas": "2",
    "log_level": "INFO",
}


class RunError(Exception):
    """The run could not be made (exit code 2); the message says why."""


@dataclass
class RunConfig:
    nodes: int = 3
    time_limit_s: float = 300.0
    nemeses: tuple[str, ...] = ("kill", "pause", "partition")
    rate: float = 500.0
    seed: int = 0
    out: str = "chaos-runs"
    partitions: int = 4
    consumers: int = 2
    fault_min_s: float = 3.0
    fault_max_s: float = 15.0
    quiet_min_s: float = 3.0
    quiet_max_s: float = 10.0
    settle_s: float = 60.0
    bootstrap: str = ""
    state: str = ""
    keep_data: bool = False
    notes: list[str] = field(default_factory=list)


class _Attached(NodeProcess):
    """A node of a cluster the harness did not start (from a ``local.json``): signals go to its pid,
    and a restart runs its command line again, read from ``/proc`` before it was killed."""

    def __init__(self, node_id: int, pid: int, client: str, log_path: str) -> None:
        super().__init__(
            NodeSpec(node_id=node_id, port=int(client.rsplit(":", 1)[1]), data_dir="", log_path=log_path)
        )
        self.spec.host = client.rsplit(":", 1)[0]
        self._pid = pid
        self._argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        self._cwd = os.readlink(f"/proc/{pid}/cwd")

    @property
    def pid(self) -> int:
        return self._pid if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None if self.proc is not None else pid_alive(self._pid)

    def _signal(self, sig: int) -> bool:
        if not self.alive():
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        return True

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        else:
            deadline = time.monotonic() + 10
            while pid_alive(self._pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.paused = False

    def start(self) -> None:
        import subprocess

        with open(self.spec.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [a.decode() for a in self._argv], cwd=self._cwd, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, process_group=0,
            )  # fmt: skip
        self.paused = False


class _Run:
    """One run's moving parts; ``execute`` does it all and always cleans up."""

    def __init__(self, cfg: RunConfig, out: TextIO) -> None:
        self.cfg = cfg
        self.out = out
        self.rng = random.Random(cfg.seed)
        self.run_id = time.strftime("%Y%m%d-%H%M%S") + f"-seed{cfg.seed}"
        self.run_dir = Path(cfg.out) / self.run_id
        self.data_dir = Path(tempfile.mkdtemp(prefix="headwater-chaos-"))
        self.network: net.Network | None = None
        self.cluster: LocalCluster | None = None
        self.nodes: dict[int, NodeProcess] = {}
        self.bootstrap = cfg.bootstrap
        self.started = time.monotonic()
        self.history: HistoryWriter | None = None
        self.counters = Counters()
        self.current: tuple[Nemesis, Fault] | None = None
        self.nemeses: list[Nemesis] = []
        self.stop = threading.Event()
        self.producers: Producers | None = None
        self.consumers: Consumers | None = None

    def clock(self) -> float:
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    # ----------------------------------------------------------------- setup

    def start_cluster(self) -> None:
        cfg = self.cfg
        if cfg.state:
            self._attach()
            return
        wanted_partition = "partition" in cfg.nemeses
        why = net.available() if wanted_partition else ""
        if wanted_partition and why:
            cfg.nemeses = tuple(n for n in cfg.nemeses if n != "partition")
            cfg.notes.append(f"partition nemesis left out: {why}")
            self.say(f"note: partition nemesis left out: {why}")
        hosts: list[str] | None = None
        netns: dict[int, str] | None = None
        port = 9192
        if "partition" in cfg.nemeses:
            self.network = net.Network(cfg.nodes, uuid.uuid4().hex[:4])
            self.network.create()
            hosts = [self.network.host(i) for i in range(1, cfg.nodes + 1)]
            netns = {i: self.network.netns(i) for i in range(1, cfg.nodes + 1)}
        else:
            found = free_port_block(cfg.nodes)
            if found is None:
                raise RunError("no free block of ports on 127.0.0.1")
            port = found
        self.cluster = LocalCluster(
            str(self.data_dir / "cluster"),
            cfg.nodes,
            port=port,
            metrics_port=port + 100,
            raft_port=port + 200,
            hosts=hosts,
            settings=NODE_SETTINGS,
            netns=netns,
        )
        self.nodes = self.cluster.nodes
        self.bootstrap = self.cluster.bootstrap
        try:
            self.cluster.start(90.0, stopping=self.stop.is_set)
        except LaunchError as e:
            raise RunError(f"the cluster did not start: {e}") from None

    def _attach(self) -> None:
        state = json.loads(Path(self.cfg.state).read_text())
        for n in state["nodes"]:
            self.nodes[n["node_id"]] = _Attached(n["node_id"], n["pid"], n["client"], n["log"])
        self.bootstrap = self.cfg.bootstrap or state["bootstrap"]
        self.cfg.nemeses = tuple(n for n in self.cfg.nemeses if n != "partition")
        self.cfg.notes.append("attached to a running cluster: partition nemesis left out")

    def create_topic(self) -> None:
        from headwater.client import Admin, NewTopic, TopicAlreadyExistsError

        rf = min(3, len(self.nodes))
        configs = {"min_insync_replicas": "2"} if rf >= 2 else {}
        with Admin(self.bootstrap) as admin:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([NewTopic(TOPIC, self.cfg.partitions, rf, configs)])
        if not self._settled(60.0):
            raise RunError(f"topic {TOPIC} did not get a leader and a whole ISR for every partition")

    def _describe(self) -> list[Any]:
        from headwater.client import Admin

        with Admin(self.bootstrap, request_timeout_ms=3_000) as admin:
            return list(admin.describe_topics([TOPIC])[0].partitions)

    def leader_of(self, topic: str, partition: int) -> int:
        try:
            return int(self._describe()[partition].leader)
        except Exception:
            return -1

    def controller(self) -> int:
        from headwater.client import Admin

        try:
            with Admin(self.bootstrap, request_timeout_ms=3_000) as admin:
                return int(admin.describe_cluster().controller_id)
        except Exception:
            return -1

    def _settled(self, timeout_s: float) -> bool:
        """Every partition led and its ISR whole, within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                parts = self._describe()
                if parts and all(p.leader >= 0 and len(p.isr) == len(p.replicas) for p in parts):
                    return True
            except Exception:
                pass
            time.sleep(0.5)
        return False

    # ----------------------------------------------------------------- faults

    def make_nemeses(self) -> None:
        targets = Targets(
            self.nodes,
            topic=TOPIC,
            partitions=self.cfg.partitions,
            leader_of=self.leader_of,
            controller=self.controller,
        )
        for kind in self.cfg.nemeses:
            if kind == "kill":
                self.nemeses.append(KillNemesis(targets))
            elif kind == "pause":
                self.nemeses.append(PauseNemesis(targets))
            elif kind == "partition" and self.network is not None:
                self.nemeses.append(PartitionNemesis(targets, self.network))

    def _fault_op(self, fault: Fault, phase: str) -> None:
        assert self.history is not None
        self.history.record(
            time_s=self.clock(),
            process=NEMESIS_PROCESS,
            type="info",
            f="fault",
            value={"kind": fault.kind, "phase": phase, "nodes": fault.nodes, "detail": fault.detail},
        )

    def generator(self, until_s: float) -> None:
        """Quiet spell, one fault, quiet spell, ... until ``until_s`` (run time); a fault that would
        outlast the run is cut short."""
        cfg = self.cfg
        while not self.stop.is_set():
            quiet = self.rng.uniform(cfg.quiet_min_s, cfg.quiet_max_s)
            if self.stop.wait(quiet) or self.clock() >= until_s or not self.nemeses:
                return
            nemesis = self.rng.choice(self.nemeses)
            length = self.rng.uniform(cfg.fault_min_s, cfg.fault_max_s)
            fault = nemesis.start(self.rng)
            if fault is None:
                continue
            self.current = (nemesis, fault)
            self._fault_op(fault, "start")
            self.stop.wait(max(0.0, min(length, until_s - self.clock())))
            nemesis.stop(fault)
            self._fault_op(fault, "stop")
            self.current = None

    def heal(self) -> None:
        if self.current is not None:
            nemesis, fault = self.current
            with contextlib.suppress(Exception):
                nemesis.stop(fault)
            if self.history is not None:
                self._fault_op(fault, "stop")
            self.current = None
        for n in self.nemeses:
            with contextlib.suppress(Exception):
                n.heal()
        if self.network is not None:
            self.network.heal()
        for node in self.nodes.values():
            if node.paused:
                node.resume()
            if not node.alive() and self.cluster is not None:
                with contextlib.suppress(Exception):
                    node.restart()

    # ----------------------------------------------------------------- the run

    def progress(self) -> None:
        c = self.counters.snapshot()
        fault = self.current[1].detail if self.current is not None else "none"
        self.say(
            f"[{self.clock():6.0f}s] sends ok {c['ok']} failed {c['fail']} unknown {c['info']}; "
            f"polls {c['polls']} ({c['read']} records); fault: {fault}"
        )

    def execute(self) -> int:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"chaos run {self.run_id}: {cfg.nodes} nodes, {cfg.time_limit_s:.0f} s, nemeses "
                 f"{','.join(cfg.nemeses) or 'none'}, {cfg.rate:.0f} records/s, seed {cfg.seed}")  # fmt: skip
        try:
            self.start_cluster()
            self.create_topic()
            self.make_nemeses()
            self.started = time.monotonic()
            history_path = self.run_dir / "history.jsonl"
            self.history = HistoryWriter(history_path)
            self.producers = producers = Producers(
                self.history, self.clock, self.counters, bootstrap=self.bootstrap, topic=TOPIC,
                rate=cfg.rate, seed=self.rng.randrange(2**31),
            )  # fmt: skip
            self.consumers = consumers = Consumers(
                self.history, self.clock, self.counters, bootstrap=self.bootstrap, topic=TOPIC,
                partitions=cfg.partitions, count=cfg.consumers, seed=self.rng.randrange(2**31),
                first_process=1_000, restart_mean_s=min(300.0, cfg.time_limit_s / 3),
            )  # fmt: skip
            producers.start()
            consumers.start()
            gen = threading.Thread(target=self.generator, args=(cfg.time_limit_s,), daemon=True)
            gen.start()
            next_progress = 5.0
            while self.clock() < cfg.time_limit_s and not self.stop.is_set():
                time.sleep(0.2)
                if self.clock() >= next_progress:
                    self.progress()
                    next_progress += 5.0
            self.stop.set()
            gen.join(60)
            self.say("healing every fault and letting the cluster settle")
            self.heal()
            if not self._settled(cfg.settle_s):
                cfg.notes.append(f"the cluster did not settle (whole ISRs) within {cfg.settle_s:.0f} s")
            producers.stop(40.0)
            consumers.stop()
            self.producers = self.consumers = None
            self.say("final read of every partition")
            incomplete = final_read(
                self.history, self.clock, bootstrap=self.bootstrap, topic=TOPIC,
                partitions=cfg.partitions, timeout_s=60.0,
            )  # fmt: skip
            if incomplete:
                cfg.notes.append(f"final read incomplete for partitions {incomplete}")
            self.history.close()
            self.history = None
            return self.finish(history_path)
        except KeyboardInterrupt:
            self.say("interrupted: healing and stopping")
            return EXIT_CANNOT_RUN
        finally:
            self.stop.set()
            self.cleanup()

    def finish(self, history_path: Path) -> int:
        loaded = read_history(history_path)
        result = check(loaded.ops)
        write_report(self.run_dir, loaded.ops, result, title=f"Headwater chaos run {self.run_id}")
        (self.run_dir / "run.json").write_text(
            json.dumps({**asdict(self.cfg), "run_id": self.run_id}, indent=2)
        )
        self.say(verdict_text(result, self.cfg.notes))
        self.say(f"report: {self.run_dir / 'report.md'}")
        return EXIT_VALID if result.valid is True else EXIT_ANOMALY

    def cleanup(self) -> None:
        # The clients first (interrupted: their history is cut short), then faults, nodes, network.
        if self.producers is not None:
            with contextlib.suppress(Exception):
                self.producers.stop(5.0)
        if self.consumers is not None:
            with contextlib.suppress(Exception):
                self.consumers.stop()
        with contextlib.suppress(Exception):
            self.heal()
        if self.history is not None:
            with contextlib.suppress(Exception):
                self.history.close()
        if self.cluster is not None:
            self.cluster.stop(grace_s=20.0)
            logs = self.run_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            for node in self.cluster.nodes.values():
                with contextlib.suppress(OSError):
                    shutil.copy(node.spec.log_path, logs / f"node-{node.node_id}.log")
        if self.network is not None:
            self.network.destroy()
        if not self.cfg.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        else:
            self.say(f"data kept in {self.data_dir}")


def verdict_text(result: CheckResult, notes: Sequence[str] = ()) -> str:
    """The verdict and each anomaly class with its count."""
    word = "VALID" if result.valid is True else "INVALID" if result.valid is False else "UNKNOWN"
    lines = [f"verdict: {word}"]
    for name, count in sorted(result.counts.items()):
        lines.append(f"  {name:<24} {count}")
    sends = result.stats.get("sends", {}) if isinstance(result.stats, dict) else {}
    if sends:
        lines.append("  sends: " + ", ".join(f"{k} {v}" for k, v in sorted(sends.items())))
    for note in notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def run(cfg: RunConfig, out: TextIO = sys.stdout) -> int:
    """Make a run; returns the exit code (0 valid, 1 anomaly, 2 could not run)."""
    r = _Run(cfg, out)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        return r.execute()
    except (RunError, LaunchError, net.NetworkError, OSError) as e:
        print(f"chaos run failed: {e}", file=out, flush=True)
        return EXIT_CANNOT_RUN
    finally:
        signal.signal(signal.SIGTERM, previous)


def recheck(run_dir: str, out: TextIO = sys.stdout) -> int:
    """Check a saved history again and print the same verdict (report files rewritten)."""
    path = Path(run_dir) / "history.jsonl"
    if not path.exists():
        print(f"no history at {path}", file=out)
        return EXIT_CANNOT_RUN
    loaded = read_history(path)
    result = check(loaded.ops)
    write_report(
        Path(run_dir), loaded.ops, result, title=f"Headwater chaos run {Path(run_dir).name} (checked again)"
    )
    print(verdict_text(result), file=out, flush=True)
    return EXIT_VALID if result.valid is True else EXIT_ANOMALY
