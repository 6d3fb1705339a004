"""One ``ProduceStream`` call to one node: the producer's ordered pipe to it.

Requests go out in the order they are registered and the node answers them in that order (see
``client.proto``), so the producer can keep several requests in flight, for the same partitions,
and still have each partition's batches appended in the order they were made.

Ownership of a request's batches is the whole design: the sender thread registers a ``Pending``
(under the producer's lock) before it builds and writes the request; whoever then *takes* it, under
the same lock, owns its outcome. The reader thread takes the oldest one for each answer; when the
stream ends or fails it takes every one left and hands them to ``on_failure``. Only the sender
thread registers, writes and ends streams, so nothing is written to a stream it has ended.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from headwater.client.errors import (
    ClientClosedError,
    HeadwaterError,
    NodeNotAvailableError,
    RequestTimedOutError,
    error_for_rpc,
)
from headwater.v1 import client_pb2

if TYPE_CHECKING:
    from headwater.client._accumulator import ProducerBatch

__all__ = ["Pending", "ProduceStream"]

_log = logging.getLogger("headwater.client.producer")


class Pending:
    """One request registered on a stream.

    ``batches`` are the ones drained for it (their partitions stay in flight until it is over);
    ``sendable`` those it carries, once written (None before: all of them); ``taken`` is set by
    whoever owns its outcome.
    """

    __slots__ = ("batches", "sendable", "sent_at", "taken")

    def __init__(self, batches: list[ProducerBatch], now: float) -> None:
        self.batches = batches
        self.sendable: list[ProducerBatch] | None = None
        self.sent_at = now
        self.taken = False

    @property
    def carried(self) -> list[ProducerBatch]:
        return self.batches if self.sendable is None else self.sendable


class ProduceStream:
    """A ProduceStream call to ``node`` with a reader thread; every mutable field is guarded by ``lock``."""

    def __init__(
        self,
        node: int,
        open_call: Callable[[Iterator[bytes]], Any],
        lock: threading.Lock,
        on_answer: Callable[[ProduceStream, Pending, client_pb2.ProduceResponse], None],
        on_failure: Callable[[ProduceStream, list[Pending], HeadwaterError], None],
    ) -> None:
        self.node = node
        self.pending: deque[Pending] = deque()
        # No new requests once an answer carried an error: the node refuses the rest of the refused
        # partitions' batches in this stream, so the sender ends it when drained and starts another.
        self.retiring = False
        self.ended = False  # the reader is done: no answer will come
        self.cancelled = False  # the producer gave up waiting (set by it, under the lock)
        self._lock = lock
        self._on_answer = on_answer
        self._on_failure = on_failure
        self._timed_out = False
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._call = open_call(iter(self._requests.get, None))
        self._reader = threading.Thread(
            target=self._read, name=f"headwater-producer-stream-{node}", daemon=True
        )
        self._reader.start()

    # ------------------------------------------------------------------ the sender thread's side

    def register(self, batches: list[ProducerBatch]) -> Pending:
        """Lock held: reserve the next answer for these batches; a ``write`` must follow, as answers
        are matched to requests by their order."""
        entry = Pending(batches, time.monotonic())
        self.pending.append(entry)
        return entry

    def write(self, request: bytes) -> None:
        """Send a serialized ProduceStreamRequest (``_wire.produce_stream_request``)."""
        self._requests.put(request)

    def end(self) -> None:
        """No more requests: the node answers what it has, then closes the stream."""
        self._requests.put(None)

    def oldest_sent_at(self) -> float | None:
        """Lock held: when the oldest unanswered request was registered."""
        return self.pending[0].sent_at if self.pending else None

    def cancel(self, *, timed_out: bool) -> None:
        """Break the stream: every unanswered request fails (with a timeout, when ``timed_out``)."""
        self._timed_out = timed_out
        self._call.cancel()

    def join(self, timeout_s: float | None = None) -> None:
        self._reader.join(timeout_s)

    # ------------------------------------------------------------------ the reader thread

    def _read(self) -> None:
        error: HeadwaterError | None = None
        try:
            for message in self._call:
                with self._lock:
                    if not self.pending:
                        error = NodeNotAvailableError(f"node {self.node} answered a request never sent")
                        self._call.cancel()
                        break
                    entry = self.pending.popleft()
                    entry.taken = True
                self._on_answer(self, entry, message.response)
        except grpc.RpcError as exc:
            if self._timed_out:
                error = RequestTimedOutError(
                    f"Produce to node {self.node}: no answer within the request timeout"
                )
            else:
                error = error_for_rpc(exc, f"Produce to node {self.node}")
                if isinstance(error, ClientClosedError):
                    # CANCELLED: by the node going away, or by the producer closing, which its own
                    # retry rule turns into ClientClosedError. Either way not the records' fault.
                    error = NodeNotAvailableError(str(error))
        except ValueError as exc:  # the channel was closed under the call
            error = NodeNotAvailableError(f"Produce to node {self.node}: {exc}")
        if error is None:
            error = NodeNotAvailableError(f"node {self.node} ended the produce stream")
        with self._lock:
            self.ended = True
            self.retiring = True
            left = list(self.pending)
            self.pending.clear()
            for entry in left:
                entry.taken = True
        if left:
            try:
                self._on_failure(self, left, error)
            except Exception:  # a bug: say so loudly rather than end the thread in silence
                _log.exception("handling the end of the produce stream to node %d failed", self.node)
