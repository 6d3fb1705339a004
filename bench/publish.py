"""Publish benchmark: the simple path (plain records through any node) against the native path and
NATS JetStream, side by side in one invocation.

1. Headwater, three nodes (``headwater local up``), a topic of ``--partitions`` partitions with 3
   replicas, acks=all:
   - native: the Python producer (``headwater perf produce``) builds batches and sends them to
     each partition's leader;
   - Publish: a plain gRPC client (no Headwater client code) sends ``PublishStream`` requests of
     ``--records-per-request`` keyed records, ``--in-flight`` requests outstanding, all to node 1;
     node 1 partitions them, builds the batches and forwards to the other leaders.
2. NATS JetStream, three servers, an R3 file stream, nats-py async publish (``--nats-in-flight``).

Prints records/s, MB/s and per-record ack latency (p50/p99: a Publish record waits for its whole
request), and the ratios Publish / native and Publish / NATS.

    python bench/publish.py [--num-records 100000] [--record-size 1024] [--partitions 6]

NATS needs ``nats-server`` (``apt-get install nats-server``) and ``pip install nats-py``; without
them ``--skip-nats`` runs Headwater alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import grpc
from replication import MB, Headwater, Nats, nats_publish, percentile, progress, row, wait_quiet

from headwater.v1 import client_pb2 as pb
from headwater.v1 import client_pb2_grpc


async def publish_stream(
    address: str, topic: str, n: int, size: int, per_request: int, in_flight: int
) -> dict[str, float]:
    """Send ``n`` keyed records of ``size`` bytes with PublishStream; acks=all (the default)."""
    payload = os.urandom(size)
    requests = [
        pb.PublishStreamRequest(
            request=pb.PublishRequest(
                topic=topic,
                records=[
                    pb.PublishRecord(key=f"key-{(i + j) % 1000}".encode(), value=payload)
                    for j in range(min(per_request, n - i))
                ],
            )
        )
        for i in range(0, n, per_request)
    ]
    latencies: list[float] = []
    errors = 0
    sent_at: list[float] = []
    room = asyncio.Semaphore(in_flight)
    async with grpc.aio.insecure_channel(
        address,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    ) as channel:
        stub = client_pb2_grpc.HeadwaterServiceStub(channel)  # type: ignore[no-untyped-call]

        async def outgoing():  # type: ignore[no-untyped-def]
            for r in requests:
                await room.acquire()
                sent_at.append(time.perf_counter())
                yield r

        start = time.perf_counter()
        call = stub.PublishStream(outgoing())
        k = 0
        async for answer in call:
            now = time.perf_counter()
            results = answer.response.results
            bad = sum(1 for r in results if r.error_code != 0)
            errors += bad
            latencies.extend([now - sent_at[k]] * (len(results) - bad))
            k += 1
            room.release()
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "records": len(ordered),
        "errors": errors,
        "records_per_s": len(ordered) / elapsed,
        "mb_per_s": len(ordered) * size / elapsed / MB,
        "latency_p50_ms": percentile(ordered, 0.5) * 1000,
        "latency_p99_ms": percentile(ordered, 0.99) * 1000,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-records", type=int, default=100_000)
    ap.add_argument("--record-size", type=int, default=1024)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--records-per-request", type=int, default=200)
    ap.add_argument("--in-flight", type=int, default=16, help="PublishStream requests outstanding")
    ap.add_argument("--nats-in-flight", type=int, default=2000)
    ap.add_argument("--skip-nats", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not args.skip_nats and shutil.which("nats-server") is None:
        raise SystemExit("nats-server is missing (apt-get install nats-server), or pass --skip-nats")
    root = Path(tempfile.mkdtemp(prefix="headwater-publish-bench-"))
    n, size = args.num_records, args.record_size
    results: dict[str, dict[str, float]] = {}
    hw: Headwater | None = None
    nats_cluster: Nats | None = None
    try:
        hw = Headwater(root / "headwater")
        hw.create("native", args.partitions, 3)
        hw.create("published", args.partitions, 3)
        name = "Headwater native (Python producer)"
        progress(f"{name}: {n} records of {size} B, acks=all")
        results[name] = hw.perf("native", n, size, "all")
        progress(row(name, results[name]))
        name = f"Headwater Publish ({args.records_per_request}/request)"
        progress(f"{name}: {n} records of {size} B, acks=all, all sent to node 1")
        wait_quiet([node["pid"] for node in hw.state["nodes"]])
        results[name] = asyncio.run(
            publish_stream(
                f"127.0.0.1:{hw.port}", "published", n, size, args.records_per_request, args.in_flight
            )
        )
        progress(row(name, results[name]))
        hw.stop()
        if not args.skip_nats:
            nats_cluster = Nats(root / "nats")
            name = "NATS JetStream R3"
            progress(f"{name}: {n} records of {size} B, {args.nats_in_flight} in flight")
            results[name] = asyncio.run(
                nats_publish(nats_cluster.servers, "bench", n, size, args.nats_in_flight)
            )
            progress(row(name, results[name]))
    finally:
        if hw is not None:
            hw.stop()
        if nats_cluster is not None:
            nats_cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"\n{'run':<34} {'records/s':>11} {'MB/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for name, r in results.items():
        print(row(name, r))
    publish = next(r for k, r in results.items() if k.startswith("Headwater Publish"))
    native = results["Headwater native (Python producer)"]
    print(f"\nPublish / native: {publish['records_per_s'] / native['records_per_s']:.2f}")
    if "NATS JetStream R3" in results:
        print(
            "Publish / NATS JetStream R3: "
            f"{publish['records_per_s'] / results['NATS JetStream R3']['records_per_s']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
