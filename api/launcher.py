"""Node processes on this machine: start, watch, stop, kill, pause, resume and restart them.

One module for everything that runs Headwater nodes as child processes: ``headwater local up``,
the benchmarks and the chaos harness. A ``NodeProcess`` is one node: its settings (``NodeSpec``),
its pid, ports, data dir and log, and the signals a harness sends it. A ``LocalCluster`` is a set of
them sharing one quorum (the first 1, 3 or 5 are voters), one cluster secret and one state file
(``local.json``: each node's id, pid, addresses, data dir and log, for scripts).

A node may run inside a network namespace (``NodeSpec.netns``): it is started with
``ip netns exec NS``, which execs the node in place, so the pid is the node's own. The namespaces
themselves are the caller's (the chaos harness makes and removes them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from headwater._health import EXITED, TIMED_OUT, wait_serving

__all__ = [
    "NodeSpec",
    "NodeProcess",
    "LocalCluster",
    "LaunchError",
    "voter_count",
    "port_free",
    "free_port_block",
    "pid_alive",
    "log_tail",
]


class LaunchError(Exception):
    """A node could not be started, or did not serve in time; the message says which and why."""


def voter_count(nodes: int) -> int:
    """Voters of a cluster of ``nodes``: 1, 3 or 5 (an odd quorum); the others are brokers only."""
    return 1 if nodes < 3 else 3 if nodes < 5 else 5


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR as the node's server sets it: a port in TIME_WAIT is free for it, a listened
        # one is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(count: int, host: str = "127.0.0.1") -> int | None:
    """A first port ``p`` with ports ``p .. p+count-1`` free, and the same at ``p+100`` and
    ``p+200`` (client, metrics and Raft ports, as ``local up`` lays them out); None if none found."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            base = int(s.getsockname()[1])
        if base + 200 + count < 65536 and all(
            port_free(base + k + i, host) for k in (0, 100, 200) for i in range(count)
        ):
            return base
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


# Run before the node, in the child: ask the kernel for SIGTERM when the launcher dies (Linux's
# parent-death signal, kept across exec), and exit at once if it died already. Done by a small
# program the child execs, not by a preexec_fn: that would force a plain fork of a launcher whose
# gRPC threads are running (gRPC's fork handlers complain then), where this lets the launcher spawn.
_EXIT_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


# Linux sends the parent-death signal when the *thread* that started the child ends, so every node
# is started from this one thread, which lives as long as the launcher's process (named apart from the
# client library's "headwater-" threads, which tests count).
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="node-launcher")


def _exit_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so that the process gets SIGTERM when this one dies (Linux; else unchanged)."""
    if not sys.platform.startswith("linux"):
        return argv
    program = argv[0] if os.path.isabs(argv[0]) else (shutil.which(argv[0]) or argv[0])
    return [sys.executable, "-c", _EXIT_WITH_PARENT, str(os.getpid()), program, *argv[1:]]


@dataclass
class NodeSpec:
    """How to run one node. ``settings`` are node settings as flags (``{"session_timeout_ms":
    "1500"}`` becomes ``--session-timeout-ms 1500``), after the ones this spec sets itself."""

    node_id: int
    port: int
    data_dir: str
    log_path: str
    host: str = "127.0.0.1"
    metrics_port: int = 0
    # Its Raft port when it is a voter, else 0.
    raft_port: int = 0
    settings: dict[str, str] = field(default_factory=dict)
    # Flags appended as given (after ``settings``; a later flag wins), and environment variables
    # added to this process's.
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # A network namespace to run in ("": this one).
    netns: str = ""

    @property
    def client(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def raft(self) -> str | None:
        return f"{self.host}:{self.raft_port}" if self.raft_port else None

    def argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "headwater.node",
            "--node-id", str(self.node_id),
            "--host", self.host,
            "--port", str(self.port),
            "--data-dir", self.data_dir,
            "--metrics-port", str(self.metrics_port),
        ]  # fmt: skip
        for name, value in self.settings.items():
            argv += ["--" + name.replace("_", "-"), str(value)]
        argv += self.extra_args
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv


class NodeProcess:
    """One node as a child process: start it, wait for it to serve, and send it what a harness
    sends (SIGTERM, SIGKILL, SIGSTOP, SIGCONT). Restarting keeps its data dir and log."""

    def __init__(self, spec: NodeSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def node_id(self) -> int:
        return self.spec.node_id

    @property
    def client(self) -> str:
        return self.spec.client

    @property
    def pid(self) -> int:
        return -1 if self.proc is None else self.proc.pid

    def start(self) -> None:
        """Start the process (without waiting for it to serve). Its own process group: a Ctrl-C
        reaches the launcher alone, which then stops the nodes in order; the parent-death signal
        stops a node should the launcher itself be killed."""
        if self.alive():
            raise LaunchError(f"node {self.node_id} is already running (pid {self.pid})")
        os.makedirs(self.spec.data_dir, exist_ok=True)
        with open(self.spec.log_path, "ab") as log:
            self.proc = _SPAWNER.submit(
                subprocess.Popen,
                _exit_with_parent(self.spec.argv()),
                env={**os.environ, **self.spec.env} if self.spec.env else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
            ).result()
        self.paused = False

    def wait_serving(self, deadline: float, stopping: Callable[[], bool] | None = None) -> None:
        """Until the node's health service says SERVING (registered, caught up, unfenced); raises
        LaunchError if it exits or ``deadline`` (monotonic) passes first."""
        outcome = wait_serving(
            self.client,
            deadline,
            exited=lambda: self.exit_code() is not None,
            stopping=stopping or (lambda: False),
        )
        if outcome == EXITED:
            raise LaunchError(self.describe_exit())
        if outcome == TIMED_OUT:
            raise LaunchError(
                f"node {self.node_id} is not serving on {self.client} yet; see {self.spec.log_path}"
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def describe_exit(self) -> str:
        code = self.exit_code()
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        tail = log_tail(self.spec.log_path)
        return f"node {self.node_id} (pid {self.pid}) {how}; its log is {self.spec.log_path}" + (
            f":\n{tail}" if tail else ""
        )

    def _signal(self, sig: int) -> bool:
        if not self.alive():
            return False
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        return True

    def terminate(self) -> None:
        """SIGTERM: the node moves its leaderships away and stops (see ``stop``)."""
        if self.paused:
            self.resume()
        self._signal(signal.SIGTERM)

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL after ``grace_s``. Returns the exit code (None: never ran)."""
        if self.proc is None:
            return None
        self.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (kill -9) and reap."""
        if self._signal(signal.SIGKILL):
            assert self.proc is not None
            self.proc.wait()
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets and state and does nothing until ``resume``."""
        if self._signal(signal.SIGSTOP):
            self.paused = True

    def resume(self) -> None:
        """SIGCONT."""
        self._signal(signal.SIGCONT)
        self.paused = False

    def restart(self) -> None:
        """Start again with the same settings, data dir and log (after a kill or a stop)."""
        if self.alive():
            self.kill()
        self.start()


class LocalCluster:
    """Nodes of one cluster on this machine: node ``i`` (1-based) gets ``port + i - 1`` (and the
    same offset from ``metrics_port`` and ``raft_port``), its data in ``root/node-i`` and its log in
    ``root/node-i.log``; the first ``voter_count(nodes)`` are voters. ``hosts`` gives each node its
    own address (for namespaces), else every node is on ``127.0.0.1``. ``settings`` go to every
    node; ``netns`` maps a node id to the namespace it runs in."""

    def __init__(
        self,
        root: str,
        nodes: int,
        *,
        port: int,
        metrics_port: int = 0,
        raft_port: int = 0,
        hosts: Sequence[str] | None = None,
        settings: Mapping[str, str] | None = None,
        netns: Mapping[int, str] | None = None,
    ) -> None:
        if not raft_port:
            raise ValueError("a cluster needs a first raft_port for its voters")
        self.root = os.path.abspath(root)
        self.state_path = os.path.join(self.root, "local.json")
        voters = voter_count(nodes)
        self.nodes: dict[int, NodeProcess] = {}
        for i in range(1, nodes + 1):
            host = hosts[i - 1] if hosts else "127.0.0.1"
            spec = NodeSpec(
                node_id=i,
                host=host,
                port=port + i - 1,
                metrics_port=metrics_port + i - 1 if metrics_port else 0,
                raft_port=raft_port + i - 1 if i <= voters else 0,
                data_dir=os.path.join(self.root, f"node-{i}"),
                log_path=os.path.join(self.root, f"node-{i}.log"),
                netns=(netns or {}).get(i, ""),
            )
            self.nodes[i] = NodeProcess(spec)
        self.secret_file = os.path.join(self.root, "cluster.secret")
        shared = {
            "voters": ",".join(f"{n.node_id}@{n.spec.raft}" for n in self.nodes.values() if n.spec.raft_port),
            "controller_addresses": ",".join(n.client for n in self.nodes.values() if n.spec.raft_port),
            "cluster_secret_file": self.secret_file,
            **(settings or {}),
        }
        for n in self.nodes.values():
            n.spec.settings = dict(shared)

    @property
    def bootstrap(self) -> str:
        return ",".join(n.client for n in self.nodes.values())

    def busy_ports(self) -> list[str]:
        """What stops the cluster from starting: ports already taken, as messages."""
        out = []
        for n in self.nodes.values():
            s = n.spec
            for what, port, flag in (
                ("port", s.port, "--port"),
                ("metrics port", s.metrics_port, "--metrics-port (0 disables metrics)"),
                ("raft port", s.raft_port, "--raft-port"),
            ):
                if port and not s.netns and not port_free(port, s.host):
                    out.append(f"{what} {port} on {s.host} is already in use; choose another with {flag}")
        return out

    def prepare(self) -> None:
        """Make the root (this user's alone) and the cluster secret (once; never printed)."""
        from headwater.config import write_secret_file

        os.makedirs(self.root, exist_ok=True)
        if not os.path.exists(self.secret_file):
            write_secret_file(self.secret_file)

    def start(self, timeout_s: float = 60.0, stopping: Callable[[], bool] | None = None) -> None:
        """Start every node, then wait for each to serve (a quorum forms once enough run)."""
        self.prepare()
        for n in self.nodes.values():
            n.start()
        deadline = time.monotonic() + timeout_s
        for n in self.nodes.values():
            n.wait_serving(deadline, stopping)

    def alive(self) -> list[NodeProcess]:
        return [n for n in self.nodes.values() if n.alive()]

    def stop(self, grace_s: float = 30.0, nodes: Iterable[NodeProcess] | None = None) -> list[NodeProcess]:
        """SIGTERM every running node and wait; SIGKILL any still running after ``grace_s``.
        Returns the nodes that did not stop cleanly (non-zero exit or killed)."""
        running = [n for n in (nodes if nodes is not None else self.nodes.values()) if n.alive()]
        for n in running:
            n.terminate()
        deadline = time.monotonic() + grace_s
        unclean = []
        for n in running:
            assert n.proc is not None
            try:
                n.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.kill()
            if n.proc.returncode != 0:
                unclean.append(n)
        return unclean

    def kill_all(self) -> None:
        for n in self.nodes.values():
            n.kill()

    def write_state(self) -> None:
        """``local.json``: each node's id, pid, addresses, data dir and log (replaced atomically)."""
        state = {
            "bootstrap": self.bootstrap,
            "nodes": [
                {
                    "node_id": n.node_id,
                    "pid": n.pid,
                    "client": n.client,
                    "raft": n.spec.raft,
                    "voter": bool(n.spec.raft_port),
                    "metrics": f"{n.spec.host}:{n.spec.metrics_port}" if n.spec.metrics_port else None,
                    "log": n.spec.log_path,
                    "data_dir": n.spec.data_dir,
                    "netns": n.spec.netns or None,
                }
                for n in self.nodes.values()
            ],
        }
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(state, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, self.state_path)

    def remove_state(self) -> None:
        with contextlib.suppress(OSError):
            os.remove(self.state_path)


def running_pids(state_path: str) -> list[int]:
    """Pids of the nodes a ``local.json`` names that still run."""
    try:
        with open(state_path) as fh:
            state = json.load(fh)
        return [int(n["pid"]) for n in state.get("nodes", []) if pid_alive(int(n["pid"]))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
