"""Nemeses: the faults the chaos harness injects, each started and stopped as one ``Fault``.

A nemesis acts only through processes (signals to node pids, restarts with the same data dir) and
the network (``net.Network``), and learns whom to hit only from the public client (which node
leads a partition, which is the active controller). Its interface is three methods, so later
faults (lose unsynced writes, disk full, clock skew, a pod kill) plug in without the runner or the
checker changing:

- ``start(rng) -> Fault | None``: inject one fault (None: nothing to do now, e.g. no target);
- ``stop(fault)``: undo it (restart, resume, heal);
- ``heal()``: undo anything still in effect (at the end of a run, on Ctrl-C, on error).

Targets (``Targets.pick``): a random node, the leader of a random partition, or the active
controller, drawn with the run's seeded RNG.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from headwater.chaos.net import Network
from headwater.launcher import NodeProcess

__all__ = [
    "Fault",
    "Nemesis",
    "Targets",
    "KillNemesis",
    "PauseNemesis",
    "PartitionNemesis",
    "NEMESES",
]


@dataclass
class Fault:
    kind: str
    nodes: list[int]
    detail: str
    # What ``stop`` needs to undo it (e.g. the nodes paused).
    undo: dict[str, object] = field(default_factory=dict)


class Nemesis(Protocol):
    kind: str

    def start(self, rng: random.Random) -> Fault | None: ...

    def stop(self, fault: Fault) -> None: ...

    def heal(self) -> None: ...


class Targets:
    """Whom a fault hits, learnt through the public client: ``leader_of(topic, partition)`` and
    ``controller()`` are the cluster's answers (-1: unknown)."""

    def __init__(
        self,
        nodes: dict[int, NodeProcess],
        *,
        topic: str,
        partitions: int,
        leader_of: Callable[[str, int], int],
        controller: Callable[[], int],
    ) -> None:
        self.nodes = nodes
        self.topic = topic
        self.partitions = partitions
        self._leader_of = leader_of
        self._controller = controller

    def pick(self, rng: random.Random, among: Sequence[int] | None = None) -> tuple[int, str]:
        """A node to hit and why: a random one, a partition's leader, or the active controller."""
        live = [i for i in (among if among is not None else self.nodes) if self.nodes[i].alive()]
        if not live:
            return -1, "no live node"
        how = rng.choice(["random", "leader", "controller"])
        if how == "leader":
            p = rng.randrange(self.partitions)
            node = self._leader_of(self.topic, p)
            if node in live:
                return node, f"leader of {self.topic}-{p}"
        elif how == "controller":
            node = self._controller()
            if node in live:
                return node, "active controller"
        return rng.choice(sorted(live)), "random node"


class KillNemesis:
    """kill -9 of one node (random, a leader or the active controller); restarted with the same
    data dir when the fault stops."""

    kind = "kill"

    def __init__(self, targets: Targets) -> None:
        self.targets = targets
        self.killed: set[int] = set()

    def start(self, rng: random.Random) -> Fault | None:
        node, why = self.targets.pick(rng)
        if node < 0:
            return None
        self.targets.nodes[node].kill()
        self.killed.add(node)
        return Fault(self.kind, [node], f"kill -9 node {node} ({why})")

    def stop(self, fault: Fault) -> None:
        for node in fault.nodes:
            if node in self.killed:
                self.targets.nodes[node].restart()
                self.killed.discard(node)

    def heal(self) -> None:
        for node in list(self.killed):
            self.targets.nodes[node].restart()
        self.killed.clear()


class PauseNemesis:
    """SIGSTOP of one node (random, a leader or the active controller) until the fault stops: a
    process that wakes up believing it still leads is the classic source of lost writes."""

    kind = "pause"

    def __init__(self, targets: Targets) -> None:
        self.targets = targets
        self.paused: set[int] = set()

    def start(self, rng: random.Random) -> Fault | None:
        node, why = self.targets.pick(rng)
        if node < 0:
            return None
        self.targets.nodes[node].pause()
        self.paused.add(node)
        return Fault(self.kind, [node], f"SIGSTOP node {node} ({why})")

    def stop(self, fault: Fault) -> None:
        for node in fault.nodes:
            self.targets.nodes[node].resume()
            self.paused.discard(node)

    def heal(self) -> None:
        for node in list(self.paused):
            self.targets.nodes[node].resume()
        self.paused.clear()


class PartitionNemesis:
    """Cut nodes apart: one node isolated, a majority/minority split, the active controller
    isolated, or a partition's leader cut from its followers while clients still reach it."""

    kind = "partition"

    def __init__(self, targets: Targets, network: Network) -> None:
        self.targets = targets
        self.network = network

    def start(self, rng: random.Random) -> Fault | None:
        ids = sorted(self.targets.nodes)
        mode = rng.choice(["isolate", "split", "controller", "leader"])
        if mode == "split" and len(ids) >= 3:
            shuffled = ids[:]
            rng.shuffle(shuffled)
            minority = shuffled[: (len(ids) - 1) // 2]
            majority = shuffled[len(minority) :]
            self.network.split([minority, majority])
            return Fault(self.kind, minority, f"split {minority} | {majority}")
        if mode == "controller":
            node = self.targets._controller()
            if node in ids:
                self.network.split([[node], [i for i in ids if i != node]])
                return Fault(self.kind, [node], f"active controller {node} isolated from the nodes")
        if mode == "leader":
            p = rng.randrange(self.targets.partitions)
            node = self.targets._leader_of(self.targets.topic, p)
            if node in ids:
                self.network.split([[node], [i for i in ids if i != node]])
                return Fault(
                    self.kind,
                    [node],
                    f"leader {node} of {self.targets.topic}-{p} cut from its followers (clients reach it)",
                )
        node = rng.choice(ids)
        self.network.split([[node], [i for i in ids if i != node]])
        return Fault(self.kind, [node], f"node {node} isolated from the other nodes")

    def stop(self, fault: Fault) -> None:
        self.network.heal()

    def heal(self) -> None:
        self.network.heal()


NEMESES = ("kill", "pause", "partition")


def wait_until(pred: Callable[[], bool], timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(poll_s)
    return pred()
