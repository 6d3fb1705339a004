"""Smoke test of an installed wheel, run from outside the source tree: start a node with the installed
console script, then create a topic, produce and consume with the installed client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import headwater
from headwater import Admin, Consumer, NewTopic, Producer, TopicPartition

assert "site-packages" in headwater.__file__, f"headwater imported from {headwater.__file__}, not the wheel"
for mod in ("headwater.node.server", "headwater.storage", "headwater.client", "headwater.v1.client_pb2"):
    __import__(mod)

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
bootstrap = f"127.0.0.1:{port}"
exe = os.path.join(os.path.dirname(sys.executable), "headwater")

with tempfile.TemporaryDirectory() as data:
    node = subprocess.Popen([exe, "node", "--port", str(port), "--data-dir", data])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with Admin(bootstrap=bootstrap) as admin:
                    admin.create_topics([NewTopic("smoke", partitions=2)])
                break
            except Exception:
                if time.monotonic() > deadline or node.poll() is not None:
                    raise
                time.sleep(0.2)
        with Producer(bootstrap=bootstrap) as producer:
            futures = [producer.send("smoke", f"v{i}".encode(), key=f"k{i}".encode()) for i in range(100)]
            producer.flush()
            assert all(f.result().offset >= 0 for f in futures)
        with Consumer(bootstrap=bootstrap, auto_offset_reset="earliest") as consumer:
            consumer.assign([TopicPartition("smoke", 0), TopicPartition("smoke", 1)])
            seen: set[bytes] = set()
            deadline = time.monotonic() + 30
            while len(seen) < 100 and time.monotonic() < deadline:
                seen.update(r.value for r in consumer.poll(1.0))
        assert len(seen) == 100, len(seen)
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(30) == 0
print("wheel smoke test passed")
