"""Shared fixtures: real node processes on free loopback ports, always stopped after the test."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from headwater import launcher
from headwater.v1 import client_pb2 as pb
from headwater.v1 import client_pb2_grpc, controller_pb2, controller_pb2_grpc


@contextlib.contextmanager
def mounted_tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A small tmpfs: a disk that fills. Mounting needs root (CI runs as root); when it is impossible
    the test fails, it never skips."""
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def fill_disk(path: Path) -> None:
    """Write zeros to ``path`` until the file system refuses more."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def metric(port: int, name: str, labels: str = "") -> float | None:
    """A sample from a node's metrics port: ``name`` with ``labels`` exactly as exposed (for
    instance ``{partition="0",topic="t"}``), or None when the node does not expose it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    prefix = f"{name}{labels} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeProcess(launcher.NodeProcess):
    """A ``python -m headwater.node`` child process with its own data dir and port, started with the
    project's launcher (``headwater.launcher``); ``extra_args`` are its flags."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> None:
        super().__init__(
            launcher.NodeSpec(
                node_id=1,
                port=port,
                data_dir=str(data_dir),
                log_path=str(data_dir.parent / f"node-{port}.log"),
                extra_args=list(extra_args or []),
                env=dict(env or {}),
            )
        )
        self.data_dir = data_dir
        self.proc = proc  # a process started elsewhere, watched here

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def extra_args(self) -> list[str]:
        return self.spec.extra_args

    @extra_args.setter
    def extra_args(self, value: list[str]) -> None:
        self.spec.extra_args = list(value)

    @property
    def log_path(self) -> Path:
        return Path(self.spec.log_path)

    @log_path.setter
    def log_path(self, value: Path) -> None:
        self.spec.log_path = str(value)

    @property
    def bootstrap(self) -> str:
        return self.spec.client

    def start(self, timeout_s: float = 20.0) -> NodeProcess:  # type: ignore[override]
        self.launch()
        self.wait_serving(timeout_s)
        return self

    def launch(self) -> NodeProcess:
        """Start the process without waiting (a cluster's nodes serve once a quorum is up)."""
        assert not self.alive(), "node already running"
        launcher.NodeProcess.start(self)
        return self

    def wait_serving(self, timeout_s: float) -> None:  # type: ignore[override]
        try:
            launcher.NodeProcess.wait_serving(self, time.monotonic() + timeout_s)
        except launcher.LaunchError as e:
            if self.exit_code() is not None:
                raise RuntimeError(f"node exited with {self.exit_code()}:\n{self.log()}") from None
            raise TimeoutError(f"node not serving after {timeout_s}s:\n{self.log()}") from e

    def wait_serving_within(self, timeout_s: float) -> bool:
        """Whether the node reports SERVING within ``timeout_s`` (False, not an error, when not)."""
        try:
            self.wait_serving(timeout_s)
        except TimeoutError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> int:  # type: ignore[override]
        """SIGTERM and wait (a graceful shutdown); SIGKILL if it hangs. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"node ignored SIGTERM for {timeout_s}s:\n{self.log()}") from None
        return int(self.proc.returncode)

    def kill9(self) -> None:
        assert self.proc is not None
        self.kill()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[type[NodeProcess] | object]:
    """Make nodes with ``node_factory(extra_args=[...])``; every one is stopped at teardown."""
    made: list[NodeProcess] = []

    def make(
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        data_dir: Path | None = None,
        start: bool = True,
    ) -> NodeProcess:
        n = NodeProcess(
            data_dir or tmp_path / f"node{len(made)}", free_port(), list(extra_args or []), dict(env or {})
        )
        made.append(n)
        return n.start() if start else n

    yield make
    for n in made:
        if n.alive():
            assert n.proc is not None
            n.proc.kill()
            n.proc.wait()


@pytest.fixture
def node(node_factory: object) -> NodeProcess:
    """One running node with default settings."""
    return node_factory()  # type: ignore[operator, no-any-return]


# ------------------------------------------------------------------ clusters of node processes

SECRET = "cluster-test-secret-0123456789abcdef"
FAST = ["--heartbeat-interval-ms", "200", "--session-timeout-ms", "1500"]


class Cluster:
    def __init__(self, root: Path, voters: int, secret: str = SECRET) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.secret_file = root / "cluster.secret"
        self.secret_file.write_text(secret + "\n")
        self.secret_file.chmod(0o600)
        ports = {i: free_port() for i in range(1, voters + 1)}
        raft = {i: free_port() for i in range(1, voters + 1)}
        self.voters = ",".join(f"{i}@127.0.0.1:{raft[i]}" for i in ports)
        self.controllers = ",".join(f"127.0.0.1:{p}" for p in ports.values())
        self.nodes = {i: NodeProcess(root / f"node-{i}", ports[i], self.args(i)) for i in ports}

    def args(self, node_id: int, secret_file: Path | None = None) -> list[str]:
        return [
            "--node-id", str(node_id),
            "--voters", self.voters,
            "--controller-addresses", self.controllers,
            "--cluster-secret-file", str(secret_file or self.secret_file),
            *FAST,
        ]  # fmt: skip

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes.values())

    def start(self, ids: list[int] | None = None, timeout_s: float = 30.0) -> None:
        chosen = [self.nodes[i] for i in (ids or list(self.nodes))]
        for n in chosen:
            n.launch()
        for n in chosen:
            n.wait_serving(timeout_s)

    def describe(self, node_id: int) -> controller_pb2.DescribeClusterResponse:
        with grpc.insecure_channel(self.nodes[node_id].bootstrap) as ch:
            stub = controller_pb2_grpc.ControllerServiceStub(ch)
            return stub.DescribeCluster(controller_pb2.DescribeClusterRequest(), timeout=5)

    def metadata(self, node_id: int, topics: list[str] | None = None) -> pb.MetadataResponse:
        with grpc.insecure_channel(self.nodes[node_id].bootstrap) as ch:
            return client_pb2_grpc.HeadwaterServiceStub(ch).Metadata(
                pb.MetadataRequest(topics=topics or []), timeout=5
            )

    def active_controller(self, among: list[int] | None = None, timeout_s: float = 15.0) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            for i in among or list(self.nodes):
                if not self.nodes[i].alive():
                    continue
                try:
                    d = self.describe(i)
                except grpc.RpcError:
                    continue
                if d.controller_id == d.answered_by == i:
                    return i
            assert time.monotonic() < deadline, "no active controller"
            time.sleep(0.05)

    def stop(self) -> None:
        for n in self.nodes.values():
            if n.alive():
                assert n.proc is not None
                n.proc.kill()
                n.proc.wait()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(voters: int, secret: str = SECRET) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", voters, secret)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def eventually(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def leaders(md: pb.MetadataResponse, topic: str) -> list[int]:
    t = next(t for t in md.topics if t.name == topic)
    return [p.leader_id for p in sorted(t.partitions, key=lambda p: p.partition)]
