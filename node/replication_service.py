"""The leader side of ``ReplicationService.Replicate`` (replication.proto): followers read the log.

One stream per follower node. Its first request carries a node token for the follower's id with
scope ``replicate:<broker_epoch>`` (auth.py); the follower must be a registered, unfenced node of
the leader's metadata. Each request is answered once, partition by partition, with the checks of
replication.proto in its order, and otherwise with the stored batches from ``fetch_offset`` up to
the log end: a follower copies past the high watermark (that is how records get committed), while
a client's Fetch never reads past it. Batches go out as the stored bytes, never re-encoded
(``ReplicateResult``, as ``FetchResult`` does for Fetch).

Each accepted fetch is the follower's word that it holds every record below ``fetch_offset``: the
partition's ``ReplicaState`` (replica_state.py) counts it, which may move the high watermark and
release acks=all waiters, and a follower outside the ISR that fetched is a candidate to join it
(``isr.py`` proposes the change to the controller). A parked fetch is woken by the leader's appends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from headwater.node.auth import NodeAuth
from headwater.node.broker import Broker
from headwater.node.partition import Partition, compare_leader_epoch
from headwater.node.rpc import Malformed, add_service, next_unless_stopping
from headwater.storage import OffsetOutOfRangeError
from headwater.v1 import batch as batch_codec
from headwater.v1 import errors_pb2, replication_pb2

__all__ = ["ReplicateResult", "ReplicationServicer", "SERVICE_NAME", "add_replication_to_server"]

E = errors_pb2
R = replication_pb2
log = logging.getLogger("headwater.node.replication")
SERVICE_NAME = R.DESCRIPTOR.services_by_name["ReplicationService"].full_name


@dataclass
class ReplicateResult:
    """A Replicate answer whose batches stay the stored bytes.

    The partition headers are messages; each partition's batches are appended on the wire as
    entries of ``ReplicatePartitionResponse.batches`` (field 11, as in FetchPartitionResponse).
    """

    _BATCHES_TAG = bytes([(11 << 3) | 2])  # ReplicatePartitionResponse.batches = 11
    _PARTITIONS_TAG = bytes([(3 << 3) | 2])  # ReplicateResponse.partitions = 3

    header: R.ReplicateResponse = field(default_factory=R.ReplicateResponse)
    partitions: list[tuple[R.ReplicatePartitionResponse, list[bytes]]] = field(default_factory=list)
    # Bytes of record batches in the answer.
    batch_bytes: int = 0
    # Read-budget bytes this answer holds; the caller releases them once it has gone out.
    held: int = 0

    def to_bytes(self) -> bytes:
        """The serialized ``ReplicateResponse``, the stored batches copied once, by the final join."""
        v = batch_codec.encode_varint
        out: list[bytes] = [self.header.SerializeToString()]
        for pr, batches in self.partitions:
            head = pr.SerializeToString()
            size = len(head) + batch_codec.stored_batches_size(self._BATCHES_TAG, batches)
            out += (self._PARTITIONS_TAG, v(size), head)
            batch_codec.add_stored_batches(out, self._BATCHES_TAG, batches)
        return b"".join(out)

    def to_message(self) -> R.ReplicateResponse:
        message: R.ReplicateResponse = R.ReplicateResponse.FromString(self.to_bytes())
        return message


class ReplicationServicer:
    """Serves ``Replicate`` from this node's partition replicas (``broker.partitions``)."""

    def __init__(
        self, broker: Broker, auth: NodeAuth | None, *, on_sent: Callable[[int], None] | None = None
    ) -> None:
        self.broker = broker
        # Told the batch bytes of each answer (a metric).
        self.on_sent = on_sent
        # None: this node holds no cluster secret, so no follower can prove itself; every stream
        # is refused.
        self.auth = auth
        # Set when the node stops: open streams end instead of waiting for their next request.
        self._stopping = asyncio.Event()

    def close_streams(self) -> None:
        """The node is stopping: each Replicate stream ends after the request in hand, rather than
        holding the server's shutdown until its grace period runs out."""
        self._stopping.set()

    # ----------------------------------------------------------------- the stream

    async def Replicate(  # noqa: N802
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """One answer per request, in order (the follower sends the next once it has the last)."""
        reader = f"replicate:{context.peer() or ''}"
        identity: tuple[int, int] | None = None
        incoming = aiter(request_iterator)
        # The stream ends when the follower ends it, or when this node stops (close_streams).
        while (request := await next_unless_stopping(incoming, self._stopping)) is not None:
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable request: {request.error}")
            if identity is None or request.node_token:
                problem = self._token_problem(request)
                if problem:
                    log.debug("refused a Replicate stream from node %d: %s", request.replica_id, problem)
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
            if identity is None:
                identity = (request.replica_id, request.broker_epoch)
            elif identity != (request.replica_id, request.broker_epoch):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"replica_id and broker_epoch are fixed for a stream: it opened as {identity}",
                )
            if self.broker.closing:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the node is stopping")
            result = await self.replicate(request, reader)
            if self.on_sent is not None and result.batch_bytes:
                self.on_sent(result.batch_bytes)
            try:
                yield result.to_bytes()
            finally:
                # Released once gRPC has taken the answer, which it sends within its flow control.
                self.broker.read_budget.release(reader, result.held)

    def _token_problem(self, request: R.ReplicateRequest) -> str:
        if self.auth is None:
            return "this node holds no cluster secret, so it cannot check a node token"
        return self.auth.token_problem(request.node_token, request)

    # ----------------------------------------------------------------- one request

    def _follower_problem(self, request: R.ReplicateRequest) -> tuple[errors_pb2.ErrorCode, str]:
        """Whether the leader's metadata lets ``replica_id`` at ``broker_epoch`` fetch at all."""
        node = self.broker.image.nodes.get(request.replica_id)
        if node is None:
            return E.ERROR_CODE_NODE_NOT_AVAILABLE, f"node {request.replica_id} is not registered"
        if request.broker_epoch < node.broker_epoch:
            # KIP-903: a restarted follower must not be counted with the log of its previous life.
            return (
                E.ERROR_CODE_STALE_BROKER_EPOCH,
                f"broker epoch {request.broker_epoch} of node {request.replica_id} is older than "
                f"its registration's {node.broker_epoch}",
            )
        if node.fenced and request.broker_epoch == node.broker_epoch:
            return E.ERROR_CODE_NODE_NOT_AVAILABLE, f"node {request.replica_id} is fenced"
        # A newer broker epoch than the metadata knows: served (the metadata lags the registration).
        return E.ERROR_CODE_NONE, ""

    async def replicate(self, request: R.ReplicateRequest, reader: str) -> ReplicateResult:
        """Answer one request, parked until ``min_bytes`` of batches or ``max_wait_ms``. The answer's
        ``held`` bytes are the caller's to release (``read_budget.release(reader, result.held)``)."""
        code, why = self._follower_problem(request)
        if code != E.ERROR_CODE_NONE:
            return ReplicateResult(R.ReplicateResponse(error_code=code, error_message=why))
        broker, cfg = self.broker, self.broker.config
        max_wait_ms = max(0, min(request.max_wait_ms, cfg.fetch_max_wait_ms))
        max_bytes = (
            cfg.fetch_max_bytes if request.max_bytes <= 0 else min(request.max_bytes, cfg.fetch_max_bytes)
        )
        min_bytes = max(1, request.min_bytes)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_ms / 1000
        budget = broker.read_budget
        while True:
            # At least one batch's worth, so a follower always progresses; up to what it asked for.
            least = cfg.max_message_bytes
            granted = await budget.acquire(reader, max(max_bytes, least), least)
            try:
                result, touched, answer_now = self._read(request, min(max_bytes, granted))
            except BaseException:
                budget.release(reader, granted)
                raise
            result.held = min(result.batch_bytes, granted)
            budget.release(reader, granted - result.held)
            remaining = deadline - loop.time()
            if (
                result.batch_bytes >= min_bytes
                or answer_now
                or remaining <= 0
                or not touched
                or broker.closing
            ):
                return result
            budget.release(reader, result.held)  # parked: hold nothing while waiting
            fut: asyncio.Future[None] = loop.create_future()
            for p in touched:
                # Woken when the leader appends or the role changes.
                p.park_replica(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                pass
            finally:
                for p in touched:
                    p.unpark_replica(fut)

    def _read(
        self, request: R.ReplicateRequest, max_bytes: int
    ) -> tuple[ReplicateResult, list[Partition], bool]:
        """One pass over the request's partitions: the answer, the partitions served (to park on),
        and whether to answer at once (an error or a diverging epoch)."""
        result = ReplicateResult()
        touched: list[Partition] = []
        answer_now = False
        now_ms = self.broker.replicas.now_ms()
        for fp in request.partitions:
            pr = R.ReplicatePartitionResponse(
                topic_id=fp.topic_id,
                partition=fp.partition,
                high_watermark=-1,
                log_start_offset=-1,
                log_end_offset=-1,
            )
            batches: list[bytes] = []
            result.partitions.append((pr, batches))
            p, code, why = self._check(request.replica_id, fp)
            if p is None:
                pr.error_code, pr.error_message = code, why
                answer_now = True
                continue
            log_start, log_end = p.log.log_start_offset, p.log.log_end_offset
            pr.high_watermark, pr.log_start_offset, pr.log_end_offset = p.high_watermark, log_start, log_end
            # 4. The offset must not be below the leader's log start (retention moved it).
            if fp.fetch_offset < log_start:
                pr.error_code = E.ERROR_CODE_OFFSET_OUT_OF_RANGE
                pr.error_message = f"fetch offset {fp.fetch_offset} is below the log start {log_start}"
                answer_now = True
                continue
            # 5. The leader's replica state: divergence (KIP-320), the offset against the log end,
            # and, for an accepted fetch, the follower's progress (ISR and high watermark).
            outcome = p.on_follower_fetch(
                request.replica_id,
                fp.fetch_offset,
                current_leader_epoch=fp.current_leader_epoch,
                last_fetched_epoch=fp.last_fetched_epoch,
                now_ms=now_ms,
            )
            if outcome is None or outcome.error_code != E.ERROR_CODE_NONE:
                pr.error_code = cast(
                    errors_pb2.ErrorCode,
                    E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER if outcome is None else outcome.error_code,
                )
                pr.error_message = "this node no longer leads" if outcome is None else outcome.message
                answer_now = True
                continue
            if outcome.diverging_epoch is not None:
                answer_now = True
                diverged = outcome.diverging_epoch
                if diverged.epoch < 0:
                    pr.error_code = E.ERROR_CODE_OFFSET_OUT_OF_RANGE
                    pr.error_message = f"the leader's log has no end offset for epoch {fp.last_fetched_epoch}"
                else:
                    pr.diverging_epoch.epoch = diverged.epoch
                    pr.diverging_epoch.end_offset = diverged.end_offset
                continue
            pr.high_watermark = p.high_watermark
            if p.state is not None and request.replica_id not in p.state.isr:
                # A follower out of the ISR fetched: it may have caught up enough to join.
                self.broker.replicas.isr_check(p)
            # 6. The stored batches, up to the leader's counted log end: a follower reads past the
            # high watermark, but not past what the leader's own copy counts for (under
            # flush_policy=fsync, what is synced), so its next fetch offset is never beyond it.
            touched.append(p)
            room = max_bytes - result.batch_bytes
            if room <= 0 and result.batch_bytes > 0:
                continue
            counted = p.state.log_end_offset if p.state is not None else log_end
            try:
                raw = p.log.read(fp.fetch_offset, max(room, 1), counted)
            except OffsetOutOfRangeError as e:  # retention moved the log start since it was read
                pr.error_code, pr.error_message = E.ERROR_CODE_OFFSET_OUT_OF_RANGE, str(e)
                answer_now = True
                continue
            if result.batch_bytes > 0 and raw and len(raw[0]) > room:
                raw = []  # only the answer's first batch may exceed max_bytes (for progress)
            batches.extend(raw)
            result.batch_bytes += sum(map(len, raw))
        return result, touched, answer_now

    def _check(
        self, replica_id: int, fp: R.ReplicatePartitionRequest
    ) -> tuple[Partition | None, errors_pb2.ErrorCode, str]:
        """Checks 1 to 3 of replication.proto: this node's replica that may serve ``fp``, or why not."""
        record = self.broker.image.topics.get(fp.topic_id)
        if record is None:
            return None, E.ERROR_CODE_UNKNOWN_TOPIC_ID, f"no topic has id {fp.topic_id.hex()}"
        if not 0 <= fp.partition < len(record.partitions):
            return (
                None,
                E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION,
                f"{record.name} has no partition {fp.partition}",
            )
        p = self.broker.partitions.get((record.name, fp.partition))
        if p is not None and p.topic_id == fp.topic_id:
            check = p.check_replicate(replica_id, fp.current_leader_epoch)
            if check.error_code != E.ERROR_CODE_NONE:
                return None, check.error_code, check.message
            return p, E.ERROR_CODE_NONE, ""
        # No replica here: this node's epoch for the partition is its metadata's.
        rec = record.partitions[fp.partition]
        epoch = compare_leader_epoch(fp.current_leader_epoch, rec.leader_epoch)
        if epoch.error_code != E.ERROR_CODE_NONE:
            return None, epoch.error_code, epoch.message
        return (
            None,
            E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER,
            f"node {self.broker.config.node_id} holds no replica of {record.name}-{fp.partition}; "
            f"its leader is {rec.leader}",
        )


def add_replication_to_server(servicer: ReplicationServicer, server: grpc.aio.Server) -> None:
    add_service(servicer, server, replication_pb2, "ReplicationService")
