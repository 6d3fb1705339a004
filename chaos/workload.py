"""The chaos workload: producers and consumers that use the public client and record a history.

- ``Producers``: one ``Producer`` (acks=all, retries) sending unique values ``"<process>-<seq>"``
  under keys drawn from a small key space, at ``rate`` records/s in all. A history process has one
  operation at a time (history.py), so the producer's many in-flight records are spread over
  ``slots`` logical processes: a slot sends its next record only once its last one is answered. Each
  send is recorded as ``invoke``, then ``ok`` (partition, offset), or ``info`` (unknown: any error
  after the record was handed to the client, since a retried batch may have been stored), or
  ``fail`` (refused before it left: the client's buffer was full or closed).
- ``Consumers``: threads that poll every partition from the beginning and record each poll with the
  records it returned; now and then (on average every ``restart_mean_s``) one restarts from the
  beginning (a new ``assignment``).
- ``final_read``: every partition read from its beginning to its end offset once faults healed, in
  chunks, each chunk marked ``complete`` when the read reached the end.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from headwater.chaos.history import HistoryWriter
from headwater.client import Consumer, Producer, TopicPartition
from headwater.client.errors import BufferFullError, ClientClosedError

__all__ = ["Producers", "Consumers", "final_read", "Counters"]

FINAL_READ_PROCESS = 10_000
FINAL_CHUNK = 2_000


class Counters:
    """Live counts for the progress line (thread safe enough: ints updated under one lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {"ok": 0, "fail": 0, "info": 0, "polls": 0, "read": 0, "poll_errors": 0}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class Producers:
    """See the module docstring. ``start()``, then ``stop(timeout_s)`` waits for what is in flight."""

    def __init__(
        self,
        history: HistoryWriter,
        clock: Callable[[], float],
        counters: Counters,
        *,
        bootstrap: str,
        topic: str,
        rate: float,
        seed: int,
        slots: int = 64,
        keys: int = 32,
        first_process: int = 0,
    ) -> None:
        self.history = history
        self.clock = clock
        self.counters = counters
        self.topic = topic
        self.rate = rate
        self.rng = random.Random(seed)
        self.keys = [f"k{i}" for i in range(keys)]
        self.processes = list(range(first_process, first_process + slots))
        self.producer = Producer(
            bootstrap=bootstrap,
            acks="all",
            linger_ms=2,
            request_timeout_ms=10_000,
            delivery_timeout_ms=30_000,
        )
        self._free: queue.Queue[int] = queue.Queue()
        for p in self.processes:
            self._free.put(p)
        self._seq = dict.fromkeys(self.processes, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-producer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _record(self, process: int, type_: str, value: dict[str, Any]) -> None:
        self.history.record(time_s=self.clock(), process=process, type=type_, f="send", value=value)  # type: ignore[arg-type]

    def _run(self) -> None:
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                process = self._free.get(timeout=0.2)
            except queue.Empty:
                continue
            if interval:
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    self._free.put(process)
                    break
                next_at = max(next_at + interval, time.monotonic() - 1.0)
            self._send(process)

    def _send(self, process: int) -> None:
        self._seq[process] += 1
        value = {
            "topic": self.topic,
            "key": self.rng.choice(self.keys),
            "value": f"{process}-{self._seq[process]}",
        }
        self._record(process, "invoke", value)
        try:
            fut = self.producer.send(self.topic, value["value"].encode(), key=value["key"].encode())
        except (BufferFullError, ClientClosedError):
            self._record(process, "fail", value)
            self.counters.add("fail")
            self._free.put(process)
            return
        except Exception:
            self._record(process, "info", value)
            self.counters.add("info")
            self._free.put(process)
            return

        def done(f: Any) -> None:
            try:
                md = f.result()
            except BaseException:
                self._record(process, "info", value)
                self.counters.add("info")
            else:
                self._record(process, "ok", {**value, "partition": md.partition, "offset": md.offset})
                self.counters.add("ok")
            self._free.put(process)

        fut.add_done_callback(done)

    def stop(self, timeout_s: float) -> None:
        """Stop sending, wait up to ``timeout_s`` for every answer, then close the producer (what
        is still out is recorded ``info`` by its callback)."""
        self._stop.set()
        self._thread.join(10)
        deadline = time.monotonic() + timeout_s
        while self._free.qsize() < len(self.processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.producer.close(timeout_s=5)


class Consumers:
    """``count`` consumer threads polling every partition; each restarts from the beginning after an
    exponentially distributed time of mean ``restart_mean_s``."""

    def __init__(
        self,
        history: HistoryWriter,
        clock: Callable[[], float],
        counters: Counters,
        *,
        bootstrap: str,
        topic: str,
        partitions: int,
        count: int,
        seed: int,
        first_process: int,
        restart_mean_s: float = 300.0,
    ) -> None:
        self.history = history
        self.clock = clock
        self.counters = counters
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.restart_mean_s = restart_mean_s
        self.rng = random.Random(seed)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._run, args=(first_process + i, self.rng.randrange(2**31)), daemon=True
            )
            for i in range(count)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _consumer(self) -> Consumer:
        c = Consumer(bootstrap=self.bootstrap, auto_offset_reset="earliest", request_timeout_ms=10_000)
        c.assign([TopicPartition(self.topic, p) for p in range(self.partitions)])
        return c

    def _run(self, process: int, seed: int) -> None:
        rng = random.Random(seed)
        assignment = 0
        consumer: Consumer | None = None
        restart_at = time.monotonic() + rng.expovariate(1 / self.restart_mean_s)
        while not self._stop.is_set():
            if consumer is None:
                try:
                    consumer = self._consumer()
                except Exception:
                    self.counters.add("poll_errors")
                    self._stop.wait(0.5)
                    continue
            invoke = {"topic": self.topic, "assignment": assignment}
            self.history.record(time_s=self.clock(), process=process, type="invoke", f="poll", value=invoke)
            try:
                records = consumer.poll(0.5)
            except Exception:
                self.history.record(time_s=self.clock(), process=process, type="fail", f="poll", value=invoke)
                self.counters.add("poll_errors")
                self._stop.wait(0.2)
                continue
            got = [[r.partition, r.offset, _text(r.key), _text(r.value)] for r in records]
            self.history.record(
                time_s=self.clock(), process=process, type="ok", f="poll", value={**invoke, "records": got}
            )
            self.counters.add("polls")
            self.counters.add("read", len(got))
            if time.monotonic() >= restart_at:
                consumer.close()
                consumer = None
                assignment += 1
                restart_at = time.monotonic() + rng.expovariate(1 / self.restart_mean_s)
        if consumer is not None:
            consumer.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", "replace")


def final_read(
    history: HistoryWriter,
    clock: Callable[[], float],
    *,
    bootstrap: str,
    topic: str,
    partitions: int,
    timeout_s: float,
) -> list[int]:
    """Read every partition from its beginning to its end offset; returns the partitions whose read
    did not reach the end within ``timeout_s`` (their last chunk says ``complete: false``)."""
    incomplete = []
    consumer = Consumer(bootstrap=bootstrap, auto_offset_reset="earliest", request_timeout_ms=10_000)
    try:
        for p in range(partitions):
            tp = TopicPartition(topic, p)
            deadline = time.monotonic() + timeout_s
            end = -1
            while end < 0 and time.monotonic() < deadline:
                try:
                    end = consumer.end_offsets([tp])[tp]
                except Exception:
                    time.sleep(0.5)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            chunk: list[list[Any]] = []
            last = -1
            while last + 1 < end and time.monotonic() < deadline:
                try:
                    records = consumer.poll(1.0)
                except Exception:
                    time.sleep(0.5)
                    continue
                for r in records:
                    chunk.append([r.partition, r.offset, _text(r.key), _text(r.value)])
                    last = r.offset
                    if len(chunk) >= FINAL_CHUNK:
                        _final_chunk(history, clock, topic, p, chunk, True)
                        chunk = []
            complete = end >= 0 and last + 1 >= end
            _final_chunk(history, clock, topic, p, chunk, complete)
            if not complete:
                incomplete.append(p)
    finally:
        consumer.close()
    return incomplete


def _final_chunk(
    history: HistoryWriter,
    clock: Callable[[], float],
    topic: str,
    p: int,
    chunk: list[list[Any]],
    complete: bool,
) -> None:
    history.record(
        time_s=clock(),
        process=FINAL_READ_PROCESS,
        type="ok",
        f="final-read",
        value={"topic": topic, "partition": p, "records": chunk, "complete": complete},
    )
