"""Network namespaces for the chaos harness: each node in its own, cut apart with iptables.

``Network(nodes, tag)`` makes, for node ``i``, a namespace ``hw<tag>n<i>`` with one veth pair: the
namespace's end (``eth0``) holds ``10.<x>.<y>.<i>/24`` and the other end is a port of a bridge
``hw<tag>br`` in this namespace, which holds ``.254``: the harness's clients reach every node through
the bridge, and the nodes reach each other through it. Nothing else is routed: all traffic stays on
the namespaces and the bridge made here, and ``destroy`` removes them (deleting a namespace deletes
its veth pair; the bridge goes last). ``tag`` keeps the names of concurrent runs apart and lets a
later ``cleanup_stale`` find what a killed run left.

A cut is iptables DROP rules in the namespaces of both sides (INPUT from and OUTPUT to the other's
address), so it holds in both directions; ``isolate_from_clients`` also drops the bridge's address.
``heal`` flushes every namespace's rules. Needs root and the ``ip`` and ``iptables`` commands;
``available()`` says whether this machine can do it, and why not.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterable, Sequence

__all__ = ["Network", "NetworkError", "available", "cleanup_stale"]

PREFIX = "hw"


class NetworkError(Exception):
    """A namespace, link or rule could not be made; the message names the command and its error."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def available() -> str:
    """ "" when namespaces, veth pairs, a bridge and iptables work here; else why not."""
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"the {tool} command is missing (apt-get install iproute2 iptables)"
    probe = f"{PREFIX}probe"
    try:
        _run("ip", "netns", "add", probe)
    except (NetworkError, OSError) as e:
        return f"cannot make a network namespace (root is needed): {e}"
    try:
        _run("ip", "netns", "exec", probe, "iptables", "-L", "-n")
    except NetworkError as e:
        return f"iptables does not work in a namespace: {e}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return ""


def cleanup_stale(tag: str = "") -> list[str]:
    """Remove namespaces and bridges a previous run left (all of the harness's, or one tag's)."""
    removed = []
    listed = _run("ip", "netns", "list", check=False).stdout.split()
    for name in listed:
        if name.startswith(PREFIX + tag) and name != f"{PREFIX}probe" and name[len(PREFIX) :][:1].isalnum():
            if _run("ip", "netns", "del", name, check=False).returncode == 0:
                removed.append(name)
    links = _run("ip", "-o", "link", "show", "type", "bridge", check=False).stdout.splitlines()
    for line in links:
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(PREFIX + tag) and name.endswith("br"):
            if _run("ip", "link", "del", name, check=False).returncode == 0:
                removed.append(name)
    return removed


class Network:
    """See the module docstring. ``create`` then ``host(i)`` and ``netns(i)`` for node ``i``."""

    def __init__(self, nodes: int, tag: str, subnet: tuple[int, int] = (10, 211)) -> None:
        if not 1 <= nodes <= 200:
            raise ValueError("1..200 nodes")
        if len(PREFIX + tag + "br") > 15 or len(PREFIX + tag + f"v{nodes}") > 15:
            raise ValueError(f"tag {tag!r} too long for an interface name")
        self.nodes = nodes
        self.tag = tag
        self.subnet = subnet
        self.bridge = f"{PREFIX}{tag}br"
        self.created = False
        # The cuts in place: pairs of node ids (a < b); 0 stands for the clients (the bridge).
        self.cuts: set[tuple[int, int]] = set()

    def host(self, node_id: int) -> str:
        return f"{self.subnet[0]}.{self.subnet[1]}.0.{node_id}"

    @property
    def gateway(self) -> str:
        """The bridge's address: where the clients' traffic comes from."""
        return f"{self.subnet[0]}.{self.subnet[1]}.0.254"

    def netns(self, node_id: int) -> str:
        return f"{PREFIX}{self.tag}n{node_id}"

    def create(self) -> None:
        """Make the bridge and every node's namespace; on a failure, remove what was made."""
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            self.created = True
            _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for i in range(1, self.nodes + 1):
                ns, veth = self.netns(i), f"{PREFIX}{self.tag}v{i}"
                _run("ip", "netns", "add", ns)
                _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _run("ip", "link", "set", veth, "master", self.bridge)
                _run("ip", "link", "set", veth, "up")
                _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.host(i)}/24", "dev", "eth0")
                _run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
                _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        except (NetworkError, OSError):
            self.destroy()
            raise

    def destroy(self) -> None:
        """Remove every namespace and the bridge (idempotent; never raises)."""
        for i in range(1, self.nodes + 1):
            _run("ip", "netns", "del", self.netns(i), check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        self.created = False
        self.cuts.clear()

    # ----------------------------------------------------------------- cuts

    def _address(self, node_id: int) -> str:
        return self.gateway if node_id == 0 else self.host(node_id)

    def _drop(self, node_id: int, peer: int) -> None:
        ns, address = self.netns(node_id), self._address(peer)
        _run("ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-s", address, "-j", "DROP")
        _run("ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-d", address, "-j", "DROP")

    def cut(self, a: int, b: int) -> None:
        """Drop every packet between nodes ``a`` and ``b``, both ways."""
        if a == b or (min(a, b), max(a, b)) in self.cuts:
            return
        for side, other in ((a, b), (b, a)):
            if side != 0:
                self._drop(side, other)
        self.cuts.add((min(a, b), max(a, b)))

    def split(self, groups: Sequence[Iterable[int]]) -> None:
        """Cut every node from every node of the other groups (clients reach all of them)."""
        sets = [set(g) for g in groups]
        for i, g in enumerate(sets):
            for h in sets[i + 1 :]:
                for a in g:
                    for b in h:
                        self.cut(a, b)

    def isolate_from_clients(self, node_id: int) -> None:
        self.cut(node_id, 0)

    def heal(self) -> None:
        """Remove every cut."""
        for i in range(1, self.nodes + 1):
            with contextlib.suppress(NetworkError):
                _run("ip", "netns", "exec", self.netns(i), "iptables", "-F")
        self.cuts.clear()
