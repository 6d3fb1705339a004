"""The chaos harness's network: namespaces joined by a bridge, cut apart with iptables and healed,
and nothing left behind. Needs root (``ip netns``); CI runs as root."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from headwater.chaos import net

WHY_NOT = net.available()
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=f"network namespaces unavailable: {WHY_NOT}")

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7000)); s.listen()
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hi"); c.close()
"""

CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], 7000), timeout=1.0)
    print(c.recv(2).decode())
except OSError:
    print("cut")
"""


@pytest.fixture
def network() -> Iterator[net.Network]:
    n = net.Network(3, uuid.uuid4().hex[:4])
    n.create()
    servers = []
    try:
        for i in (1, 2, 3):
            p = subprocess.Popen(
                ["ip", "netns", "exec", n.netns(i), sys.executable, "-c", SERVER, n.host(i)],
                stdout=subprocess.PIPE,
            )
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
            servers.append(p)
        yield n
    finally:
        for p in servers:
            p.kill()
            p.wait()
        n.destroy()


def reach_from_node(n: net.Network, src: int, dst: int) -> str:
    out = subprocess.run(
        ["ip", "netns", "exec", n.netns(src), sys.executable, "-c", CLIENT, n.host(dst)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return out.stdout.strip()


def reach_from_clients(n: net.Network, dst: int) -> str:
    try:
        with socket.create_connection((n.host(dst), 7000), timeout=1.0) as c:
            return c.recv(2).decode()
    except OSError:
        return "cut"


def test_nodes_reach_each_other_until_cut_and_again_once_healed(network: net.Network) -> None:
    n = network
    assert reach_from_node(n, 1, 2) == "hi" and reach_from_clients(n, 3) == "hi"
    # Node 1 isolated from the other nodes: both directions cut, the clients still reach it.
    n.split([[1], [2, 3]])
    assert reach_from_node(n, 1, 2) == "cut" and reach_from_node(n, 3, 1) == "cut"
    assert reach_from_node(n, 2, 3) == "hi"
    assert reach_from_clients(n, 1) == "hi"
    n.isolate_from_clients(1)
    assert reach_from_clients(n, 1) == "cut" and reach_from_clients(n, 2) == "hi"
    n.heal()
    assert reach_from_node(n, 1, 2) == "hi" and reach_from_node(n, 3, 1) == "hi"
    assert reach_from_clients(n, 1) == "hi"


def test_destroy_leaves_no_namespace_or_bridge() -> None:
    tag = uuid.uuid4().hex[:4]
    n = net.Network(2, tag)
    n.create()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert n.netns(1) in names and n.netns(2) in names
    n.destroy()
    time.sleep(0.1)
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert n.netns(1) not in names and n.netns(2) not in names and n.bridge not in links
    assert net.cleanup_stale(tag) == []
