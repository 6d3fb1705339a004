"""Storage benchmark: what an fsync costs an append, and what group commit saves.

Appends ``--appends`` small batches (``--records`` records of ``--record-size`` bytes each) to one
partition log in a fresh database in ``--dir`` (a temporary folder on the same disk by default), in
three ways, and prints the time per append:

1. ``none``: ``sync=False``, never synced (the default durability: in every ISR member's log);
2. ``per-append``: ``sync=True`` on every append (one fsync each);
3. ``group``: ``sync=False`` appends, and ``LogStore.sync_wal()`` once per ``--group`` appends (what
   ``flush_policy=fsync`` needs: one fsync for everything appended meanwhile), and the time one
   ``sync_wal()`` takes.

Run it on the disk the data will live on: an fsync's cost is the disk's (and its cache's), not
Python's. ``--repeat`` runs each mode that many times and prints the median.

    python bench/storage_sync.py [--appends 2000] [--group 64] [--repeat 3] [--json]

Measured on a 2-core virtual machine (virtio disk), 2000-3000 appends of one batch each, medians
of 3, over two runs (the second with other work on the machine):

    batch            unsynced    synced each   group of 8    group of 64   group of 256
    10 x 100 B       24-27 us    258-305 us    68-105 us     31-34 us      30 us
    1 x 10 B         14 us       325 us                      28 us

One ``sync_wal()`` took 230-470 us after 1 to 8 appends, 340-440 us after 64 and 940 us after 256
(it writes out what the group appended): a synced append costs an unsynced one plus one such sync.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from headwater.storage import LogStore
from headwater.v1.batch import build_batch

TOPIC = uuid.UUID(int=0x5CED).bytes


def run(path: Path, mode: str, appends: int, group: int, records: int, record_size: int) -> dict[str, float]:
    """One run in a fresh database: seconds per append, and per ``sync_wal`` call in ``group`` mode."""
    shutil.rmtree(path, ignore_errors=True)
    value = b"x" * record_size
    batches = [build_batch([(None, value, None, 1_000 + i)] * records) for i in range(appends)]
    sync_s: list[float] = []
    with LogStore(str(path)) as store:
        log = store.open_partition(TOPIC, 0)
        store.sync_wal()  # the partition's creation is not synced: keep it out of the figures
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            log.append(b, 0, now_ms=0, sync=mode == "per-append")
            if mode == "group" and (i + 1) % group == 0:
                s0 = time.perf_counter()
                store.sync_wal()
                sync_s.append(time.perf_counter() - s0)
        if mode == "group" and appends % group:
            s0 = time.perf_counter()
            store.sync_wal()
            sync_s.append(time.perf_counter() - s0)
        elapsed = time.perf_counter() - t0
    shutil.rmtree(path, ignore_errors=True)
    out = {"append_us": elapsed / appends * 1e6}
    if sync_s:
        out["sync_wal_us"] = statistics.median(sync_s) * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--group", type=int, default=64, help="appends per sync_wal() in group mode")
    parser.add_argument("--records", type=int, default=10, help="records per batch")
    parser.add_argument("--record-size", type=int, default=100, help="bytes per record value")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the database goes (default: a temp folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="headwater-sync-bench-"))
    results: dict[str, dict[str, float]] = {}
    try:
        for mode in ("none", "per-append", "group"):
            runs = [
                run(base / "db", mode, args.appends, args.group, args.records, args.record_size)
                for _ in range(args.repeat)
            ]
            results[mode] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)

    if args.json:
        print(json.dumps({"args": vars(args), "results": results}))
        return
    print(f"{args.appends} appends of {args.records} x {args.record_size} B, median of {args.repeat} runs")
    print(f"{'mode':<12} {'per append':>12} {'per sync_wal()':>16}")
    for mode, r in results.items():
        sync = f"{r['sync_wal_us']:.0f} us" if "sync_wal_us" in r else "-"
        print(f"{mode:<12} {r['append_us']:>9.1f} us {sync:>16}")


if __name__ == "__main__":
    main()
