"""Shared fixtures: real node processes on free loopback ports, always stopped after the test."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from headwater._health import EXITED, SERVING, wait_serving


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NodeProcess:
    """A ``python -m headwater.node`` child process with its own data dir and port."""

    data_dir: Path
    port: int
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> NodeProcess:
        self.launch()
        self.wait_serving(timeout_s)
        return self

    def launch(self) -> NodeProcess:
        """Start the process without waiting (a cluster's nodes serve once a quorum is up)."""
        assert self.proc is None or self.proc.poll() is not None, "node already running"
        self.log_path = self.data_dir.parent / f"node-{self.port}.log"
        args = [
            sys.executable,
            "-m",
            "headwater.node",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            *self.extra_args,
        ]
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_serving(self, timeout_s: float) -> None:
        proc = self.proc
        assert proc is not None
        outcome = wait_serving(
            self.bootstrap, time.monotonic() + timeout_s, exited=lambda: proc.poll() is not None
        )
        if outcome == EXITED:
            raise RuntimeError(f"node exited with {proc.returncode}:\n{self.log()}")
        if outcome != SERVING:
            raise TimeoutError(f"node not serving after {timeout_s}s:\n{self.log()}")

    def wait_serving_within(self, timeout_s: float) -> bool:
        """Whether the node reports SERVING within ``timeout_s`` (False, not an error, when not)."""
        try:
            self.wait_serving(timeout_s)
        except TimeoutError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int:
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
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


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
