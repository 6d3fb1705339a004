"""``headwater perf produce|consume``: throughput and latency, reported as Kafka's perf tools do.

Produce latency is from ``send()`` to the record's future completing, recorded by a done-callback
(no thread per record) into a flat array of floats. The payload is built once and reused. MB means
2^20 bytes, as in ``kafka-producer-perf-test``. ``--format json`` prints the final figures as one
JSON object on stdout (periodic lines then go to stderr); the keys are listed in ``PRODUCE_KEYS`` and
``CONSUME_KEYS``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, TextIO

from headwater._alloc import keep_large_buffers

__all__ = ["produce", "consume", "PRODUCE_KEYS", "CONSUME_KEYS", "percentile"]

PRODUCE_KEYS = (
    "records", "errors", "record_size", "elapsed_s", "records_per_s", "mb_per_s",
    "latency_avg_ms", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_p999_ms",
    "latency_max_ms", "acks", "compression",
)  # fmt: skip
CONSUME_KEYS = ("records", "bytes", "elapsed_s", "records_per_s", "mb_per_s")

_MB = 1024 * 1024
# How often the progress bar moves and how often the main loop looks at the clock for it.
_TICK_S = 0.1


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The value at fraction ``p`` of a sorted sequence (nearest rank, as Kafka's perf test does)."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def _payload(size: int) -> bytes:
    # Random capital letters, as kafka-producer-perf-test sends: compressible about as much as text.
    rng = random.Random(0)
    return bytes(rng.choices(range(65, 91), k=size))


class _Reporter:
    """Periodic Kafka-style lines plus, on a terminal, a rich progress bar."""

    def __init__(self, total: int, label: str, interval_s: float, as_json: bool) -> None:
        self.interval_s = interval_s
        self.out: TextIO = sys.stderr if as_json else sys.stdout
        self.progress: Any = None
        self.task: Any = None
        if not as_json and sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=True,
            )
            self.task = self.progress.add_task(label, total=total, rate="")
            self.progress.start()

    def line(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)
        else:
            print(text, file=self.out, flush=True)

    def update(self, completed: int, rate: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, rate=f"{rate:,.0f} rec/s")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def tune_gc() -> None:
    """Tune the collector for a throughput run, as Kafka's perf scripts pick JVM heap and GC flags.

    A producer under load keeps tens of thousands of records, futures and callbacks alive for about
    a second; with the default thresholds, the collector traverses them again and again (a quarter
    of the GIL time in a profile). Moving start-up objects out of its sight (``gc.freeze``) and
    collecting the young generation less often removes most of that. Applications with the same
    load can do the same; the library itself never changes the collector.

    The C allocator is tuned too, to keep megabyte buffers for reuse (see ``headwater._alloc``).
    """
    keep_large_buffers()
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def produce(args: argparse.Namespace) -> int:
    """Send ``--num-records`` records of ``--record-size`` bytes; report throughput and latency."""
    from headwater.client import Producer

    tune_gc()
    n = args.num_records
    size = args.record_size
    throughput = args.throughput
    topic = args.topic
    options: dict[str, Any] = {
        "acks": "all" if args.acks in ("all", "-1") else int(args.acks),
        "compression": args.compression,
        "batch_size_bytes": args.batch_size_bytes,
        "linger_ms": args.linger_ms,
    }
    as_json = args.format == "json"
    payload = _payload(size)
    latencies = array("d")  # seconds, one per acknowledged record, in completion order
    failures: list[BaseException] = []
    now = time.perf_counter
    append = latencies.append
    fail = failures.append

    producer = Producer(bootstrap=args.bootstrap, **options)
    reporter = _Reporter(n, f"produce {topic}", args.report_interval_s, as_json)
    window = _Window(now())
    try:
        send = producer.send
        start = now()
        next_tick = start + _TICK_S
        for i in range(n):
            t0 = now()

            def done(future: Any, t0: float = t0) -> None:
                error = future.exception()
                if error is None:
                    append(now() - t0)
                else:
                    fail(error)

            send(topic, payload).add_done_callback(done)
            if throughput > 0:
                # Stay on the schedule start + i/throughput; sleeping below a millisecond is noise.
                ahead_s = start + (i + 1) / throughput - now()
                if ahead_s > 0.001:
                    time.sleep(ahead_s)
            if t0 >= next_tick:
                next_tick = t0 + _TICK_S
                window.tick(reporter, latencies, len(failures), size, t0)
            if failures:
                break
        # Wait for the acknowledgements while still reporting; flush() then settles the rest.
        sent = i + 1
        while len(latencies) + len(failures) < sent and not failures:
            time.sleep(_TICK_S / 2)
            window.tick(reporter, latencies, len(failures), size, now())
        producer.flush()
        while len(latencies) + len(failures) < sent and not failures:
            time.sleep(0.001)  # the last callbacks run just after flush() returns
        end = now()
        window.tick(reporter, latencies, len(failures), size, end, final=True)
    finally:
        reporter.close()
        producer.close()

    ok = len(latencies)
    elapsed_s = max(end - start, 1e-9)
    ordered = sorted(latencies)
    ms = 1000.0
    figures = {
        "records": ok,
        "errors": len(failures),
        "record_size": size,
        "elapsed_s": round(elapsed_s, 6),
        "records_per_s": round(ok / elapsed_s, 2),
        "mb_per_s": round(ok * size / elapsed_s / _MB, 3),
        "latency_avg_ms": round(sum(ordered) / ok * ms, 3) if ok else 0.0,
        "latency_p50_ms": round(percentile(ordered, 0.50) * ms, 3),
        "latency_p95_ms": round(percentile(ordered, 0.95) * ms, 3),
        "latency_p99_ms": round(percentile(ordered, 0.99) * ms, 3),
        "latency_p999_ms": round(percentile(ordered, 0.999) * ms, 3),
        "latency_max_ms": round(ordered[-1] * ms, 3) if ok else 0.0,
        "acks": args.acks,
        "compression": args.compression,
    }
    if as_json:
        print(json.dumps(figures), flush=True)
    else:
        print(
            f"{ok} records sent, {figures['records_per_s']:.1f} records/sec "
            f"({figures['mb_per_s']:.2f} MB/sec), {figures['latency_avg_ms']:.2f} ms avg latency, "
            f"{figures['latency_max_ms']:.2f} ms max latency, {figures['latency_p50_ms']:.2f} ms 50th, "
            f"{figures['latency_p95_ms']:.2f} ms 95th, {figures['latency_p99_ms']:.2f} ms 99th, "
            f"{figures['latency_p999_ms']:.2f} ms 99.9th.",
            flush=True,
        )
    if failures:
        from headwater.cli import CliError, _describe_exception

        first = failures[0]
        raise CliError(f"{len(failures)} record(s) failed: {_describe_exception(first) or repr(first)}")
    return 0


class _Window:
    """The records acknowledged since the last periodic line, for Kafka's 5-second report."""

    def __init__(self, t: float) -> None:
        self.start_t = t
        self.start_index = 0
        self.last_print_t = t

    def tick(
        self,
        reporter: _Reporter,
        latencies: array[float],
        errors: int,
        size: int,
        t: float,
        final: bool = False,
    ) -> None:
        done = len(latencies)
        elapsed = max(t - self.start_t, 1e-9)
        reporter.update(done + errors, (done - self.start_index) / elapsed)
        if final or t - self.last_print_t < reporter.interval_s:
            return
        window = latencies[self.start_index : done]
        count = len(window)
        if count:
            reporter.line(
                f"{count} records sent, {count / elapsed:.1f} records/sec "
                f"({count * size / elapsed / _MB:.2f} MB/sec), {sum(window) / count * 1000:.1f} ms avg "
                f"latency, {max(window) * 1000:.1f} ms max latency."
            )
        self.start_t = t
        self.start_index = done
        self.last_print_t = t


def consume(args: argparse.Namespace) -> int:
    """Read ``--num-records`` records from the beginning of every partition; report throughput."""
    from headwater.cli import CliError, _check_topic
    from headwater.client import Consumer, ConsumerRecord, TopicPartition

    partitions = _check_topic(args.bootstrap, args.topic)
    n = args.num_records
    idle_s = args.timeout_ms / 1000
    as_json = args.format == "json"
    tps = [TopicPartition(args.topic, p) for p in partitions]
    tune_gc()
    consumer = Consumer(bootstrap=args.bootstrap, auto_offset_reset="earliest")
    reporter = _Reporter(n, f"consume {args.topic}", 5.0, as_json)
    count = 0
    n_bytes = 0
    now = time.perf_counter
    # Index access on the record tuples: several times cheaper than attribute access per record.
    value_of = itemgetter(ConsumerRecord._fields.index("value"))
    key_of = itemgetter(ConsumerRecord._fields.index("key"))
    try:
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        start = last_record = next_tick = now()
        poll: Callable[[float], list[Any]] = consumer.poll
        while count < n:
            records = poll(0.2)
            t = now()
            if records:
                if count + len(records) > n:
                    records = records[: n - count]
                count += len(records)
                n_bytes += sum(map(len, filter(None, map(value_of, records))))
                n_bytes += sum(map(len, filter(None, map(key_of, records))))
                last_record = t
            elif t - last_record > idle_s:
                break
            if t >= next_tick:
                next_tick = t + _TICK_S
                reporter.update(count, count / max(t - start, 1e-9))
        end = last_record
    finally:
        reporter.close()
        consumer.close()
    elapsed_s = max(end - start, 1e-9)
    figures = {
        "records": count,
        "bytes": n_bytes,
        "elapsed_s": round(elapsed_s, 6),
        "records_per_s": round(count / elapsed_s, 2),
        "mb_per_s": round(n_bytes / elapsed_s / _MB, 3),
    }
    if as_json:
        print(json.dumps(figures), flush=True)
    else:
        print(
            f"{count} records consumed ({n_bytes / _MB:.2f} MB) in {elapsed_s:.3f} s, "
            f"{figures['records_per_s']:.1f} records/sec ({figures['mb_per_s']:.2f} MB/sec).",
            flush=True,
        )
    if count < n:
        raise CliError(
            f"consumed only {count} of {n} records: nothing arrived for {args.timeout_ms} ms "
            f"(topic {args.topic} has fewer records?)"
        )
    return 0
