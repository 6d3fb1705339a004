"""Publish: plain records through any node (client.proto, ``Publish`` and ``PublishStream``).

The node does for the caller what a client library does for a producer: it picks each record's
partition (Kafka's rule, ``headwater.v1.partitioner``), builds the batches, sends each partition's
batches to its leader (itself, or another node over the cluster's client channels), retries what a
leader change or a short ISR refuses until the request's deadline, and answers each record with its
partition and offset, or its own error.

``plan`` is the pure part (which record goes where, in which batch, and which are refused before
anything is sent); ``Publisher`` does the sending.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from headwater.node.broker import Broker
from headwater.node.cluster import ClusterLink
from headwater.node.produce_checks import ProduceRules, timestamp_problem
from headwater.v1 import batch as batch_codec
from headwater.v1 import client_pb2 as pb
from headwater.v1 import client_pb2_grpc, errors_pb2, records_pb2
from headwater.v1.partitioner import partition_for_key

__all__ = ["Publisher", "PublishPlan", "plan", "build_batches", "RETRIABLE", "DEFAULT_ACKS"]

log = logging.getLogger("headwater.node")
E = errors_pb2

# What an absent PublishRequest.acks means: all in-sync replicas (Kafka's producers' default).
DEFAULT_ACKS = -1
# Refusals a later attempt can get past: the leader moved or is being elected, the ISR is short,
# the leader has not seen the topic yet, or its disk failed and leadership will move. A refusal
# after the append (NOT_ENOUGH_REPLICAS_AFTER_APPEND) is not retried: the records are in the
# leader's log, and a resend would store them twice.
RETRIABLE = frozenset(
    {
        E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER,
        E.ERROR_CODE_LEADER_NOT_AVAILABLE,
        E.ERROR_CODE_NOT_ENOUGH_REPLICAS,
        E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION,
        E.ERROR_CODE_FENCED_LEADER_EPOCH,
        E.ERROR_CODE_UNKNOWN_LEADER_EPOCH,
        E.ERROR_CODE_STORAGE_ERROR,
        E.ERROR_CODE_NODE_NOT_AVAILABLE,
    }
)
# Room left in a batch for its header fields and each record's framing, beyond keys, values and headers.
_BATCH_OVERHEAD = 128
_RECORD_OVERHEAD = 32
# Requests with more records than this have their batches encoded off the event loop.
_BUILD_ON_LOOP_RECORDS = 2000
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 0.5


@dataclass
class PublishPlan:
    """Where each record of a request goes, before anything is sent.

    ``partitions[i]`` is record i's partition (-1 when none could be chosen); ``refused`` maps a
    record to the error that refuses it on its own; ``batches`` maps a partition to its batches, each
    a list of record indexes in request order (the records a partition's leader appends together,
    all or none).
    """

    partitions: list[int]
    refused: dict[int, tuple[int, str]] = field(default_factory=dict)
    batches: dict[int, list[list[int]]] = field(default_factory=dict)


def record_size(r: pb.PublishRecord) -> int:
    """An upper bound of what a record takes in an uncompressed batch."""
    size = _RECORD_OVERHEAD + len(r.key) + len(r.value)
    for h in r.headers:
        size += len(h.key.encode()) + len(h.value) + 8
    return size


def plan(
    records: Sequence[pb.PublishRecord],
    num_partitions: int,
    keyless_partition: int,
    *,
    max_batch_bytes: int,
    max_batch_records: int,
    timestamp_problem_of: Callable[[int], str] = lambda ts: "",
) -> PublishPlan:
    """Choose each record's partition and cut each partition's records into batches.

    A record names its partition, or has a key (``partition_for_key``), or goes to
    ``keyless_partition`` with the request's other keyless records. A record alone too large for a
    batch, naming a partition the topic lacks, or with a timestamp the topic refuses
    (``timestamp_problem_of``, given the record's timestamp or 0 for "the node's clock") is refused
    by itself; the others go on. Batches hold at most ``max_batch_bytes`` (by ``record_size``) and
    ``max_batch_records`` records, in request order.
    """
    out = PublishPlan(partitions=[-1] * len(records))
    open_size: dict[int, int] = {}
    for i, r in enumerate(records):
        if r.HasField("partition"):
            p = r.partition
            if not 0 <= p < num_partitions:
                out.refused[i] = (
                    E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION,
                    f"partition {p} does not exist: the topic has partitions 0..{num_partitions - 1}",
                )
                continue
        elif r.HasField("key"):
            p = partition_for_key(r.key, num_partitions)
        else:
            p = keyless_partition
        out.partitions[i] = p
        size = record_size(r)
        if size + _BATCH_OVERHEAD > max_batch_bytes:
            out.refused[i] = (
                E.ERROR_CODE_RECORD_TOO_LARGE,
                f"the record takes about {size + _BATCH_OVERHEAD} bytes in a batch, more than the "
                f"topic's max_message_bytes={max_batch_bytes}",
            )
            continue
        why = timestamp_problem_of(r.timestamp_ms)
        if why:
            out.refused[i] = (E.ERROR_CODE_INVALID_TIMESTAMP, why)
            continue
        batches = out.batches.setdefault(p, [])
        if not batches or open_size[p] + size > max_batch_bytes or len(batches[-1]) >= max_batch_records:
            batches.append([])
            open_size[p] = _BATCH_OVERHEAD
        batches[-1].append(i)
        open_size[p] += size
    return out


def build_batches(
    req: pb.PublishRequest, the_plan: PublishPlan, now_ms: int
) -> dict[int, list[records_pb2.RecordBatch]]:
    """The batches of each partition of ``the_plan``, compressed as the request says; a record
    without a timestamp gets ``now_ms``."""
    out: dict[int, list[records_pb2.RecordBatch]] = {}
    for p, batches in the_plan.batches.items():
        built = out[p] = []
        for members in batches:
            tuples = []
            for i in members:
                r = req.records[i]
                headers = [(h.key, h.value if h.HasField("value") else None) for h in r.headers]
                key = r.key if r.HasField("key") else None
                value = r.value if r.HasField("value") else None
                tuples.append((key, value, headers, r.timestamp_ms or now_ms))
            built.append(batch_codec.build_batch(tuples, req.compression))
    return out


class Publisher:
    """Sends Publish requests' records to their partitions' leaders (see the module docstring).

    ``count_local(request, response)`` is told of each Produce this node answers itself (the leader
    counts what is forwarded to it), for the node's bytes and records in.
    """

    def __init__(
        self,
        broker: Broker,
        link: ClusterLink,
        count_local: Callable[[pb.ProduceRequest, pb.ProduceResponse], None],
    ) -> None:
        self.broker = broker
        self.link = link
        self._count_local = count_local
        # Per topic: the turn of the next request's keyless records (KIP-480's sticky choice, moved
        # on once per request).
        self._turns: dict[str, int] = {}

    async def publish(self, req: pb.PublishRequest) -> pb.PublishResponse:
        resp = pb.PublishResponse()
        results = [resp.results.add(partition=-1, offset=-1, timestamp_ms=-1) for _ in req.records]

        def refuse_all(code: int, why: str) -> pb.PublishResponse:
            for res in results:
                res.error_code, res.error_message = code, why
            return resp

        acks = req.acks if req.HasField("acks") else DEFAULT_ACKS
        if acks not in (-1, 0, 1):
            return refuse_all(
                E.ERROR_CODE_INVALID_REQUIRED_ACKS, f"acks must be -1 (all), 1 or 0, got {acks}"
            )
        if req.compression not in batch_codec.COMPRESSION_BY_NAME.values():
            return refuse_all(E.ERROR_CODE_INVALID_REQUEST, f"unknown compression {req.compression}")
        topic = req.topic
        record = self.broker.catalog.record(topic)
        if record is None:
            return refuse_all(E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION, f"topic {topic!r} does not exist")
        if not req.records:
            return resp
        num_partitions = len(record.partitions)
        cfg = self.broker.topic_config(topic)
        rules = ProduceRules.of_topic(
            cfg, self.broker.config.max_decompressed_bytes, self.broker.config.max_batch_records
        )
        now_ms = self.broker.clock_ms()

        def ts_problem(ts: int) -> str:
            if ts < 0:
                return f"timestamp_ms {ts} is negative: give milliseconds since the Unix epoch, or 0 for now"
            if rules.log_append_time:
                return ""
            return timestamp_problem(ts or now_ms, ts or now_ms, now_ms, rules)

        keyless = self._keyless_partition(topic, [rec.leader for rec in record.partitions])
        the_plan = plan(
            req.records,
            num_partitions,
            keyless,
            max_batch_bytes=rules.max_message_bytes,
            max_batch_records=rules.max_batch_records,
            timestamp_problem_of=ts_problem,
        )
        for i, p in enumerate(the_plan.partitions):
            results[i].partition = p
        for i, (code, why) in the_plan.refused.items():
            results[i].error_code, results[i].error_message = code, why
        timeout_s = req.timeout_ms / 1000 if req.timeout_ms > 0 else 30.0
        deadline = asyncio.get_running_loop().time() + timeout_s
        for i in range(len(req.records)):
            if i not in the_plan.refused:
                results[i].timestamp_ms = req.records[i].timestamp_ms or now_ms
        if len(req.records) > _BUILD_ON_LOOP_RECORDS:
            # A large request's batches are encoded on a worker thread, so that the event loop (and
            # with it the node's lease) is not held for the whole encoding.
            built = await asyncio.to_thread(build_batches, req, the_plan, now_ms)
        else:
            built = build_batches(req, the_plan, now_ms)
        sends = [
            self._send(
                topic, p, built[p], [results[i] for b in the_plan.batches[p] for i in b], acks, deadline
            )
            for p in the_plan.batches
        ]
        await asyncio.gather(*sends)
        return resp

    def _keyless_partition(self, topic: str, leaders: list[int]) -> int:
        """The partition of this request's keyless records: the topic's next in turn among those
        with a leader (any, when none has)."""
        turn = self._turns.get(topic, -1) + 1
        self._turns[topic] = turn
        led = [p for p, leader in enumerate(leaders) if leader >= 0] or list(range(len(leaders)))
        return led[turn % len(led)]

    async def _send(
        self,
        topic: str,
        partition: int,
        batches: list[records_pb2.RecordBatch],
        results: list[pb.PublishResult],
        acks: int,
        deadline: float,
    ) -> None:
        """Append one partition's batches on its leader, retrying what can pass later until
        ``deadline``; write each record's offset (or the error) into ``results``."""
        loop = asyncio.get_running_loop()
        backoff = _FIRST_BACKOFF_S
        code, why = E.ERROR_CODE_REQUEST_TIMED_OUT, "no attempt was made before the request's timeout"
        data = pb.ProducePartitionData(partition=partition, batches=batches)
        while (remaining := deadline - loop.time()) > 0:
            request = pb.ProduceRequest(
                acks=acks or 1,
                timeout_ms=max(1, int(remaining * 1000)),
                topics=[pb.ProduceTopicData(topic=topic, partitions=[data])],
            )
            pr = await self._produce_on_leader(topic, partition, request, remaining)
            code, why = pr.error_code, pr.error_message
            if code == E.ERROR_CODE_NONE:
                for n, res in enumerate(results):
                    res.offset = pr.base_offset + n
                    if pr.log_append_time_ms >= 0:
                        res.timestamp_ms = pr.log_append_time_ms
                return
            if code not in RETRIABLE:
                break
            await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
        else:
            if code != E.ERROR_CODE_REQUEST_TIMED_OUT:
                why = f"not appended within the request's timeout; last refusal: {why}"
                code = E.ERROR_CODE_REQUEST_TIMED_OUT
        for res in results:
            res.error_code, res.error_message = code, why

    async def _produce_on_leader(
        self, topic: str, partition: int, request: pb.ProduceRequest, remaining_s: float
    ) -> pb.ProducePartitionResponse:
        """The leader's answer for the one partition of ``request``: this node's own when it leads
        (or knows no other leader, whose refusal is then the answer), else the leader's over gRPC."""
        address = self.broker.leader_address(topic, partition)
        if address is None:
            response = await self.broker.produce(request)
            self._count_local(request, response)
            answer: pb.ProducePartitionResponse = response.topics[0].partitions[0]
            return answer
        stub = client_pb2_grpc.HeadwaterServiceStub(self.link.channel(address))  # type: ignore[no-untyped-call]
        try:
            response = await stub.Produce(request, timeout=remaining_s)
        except grpc.aio.AioRpcError as e:
            status = e.code()
            if status == grpc.StatusCode.DEADLINE_EXCEEDED:
                code = E.ERROR_CODE_REQUEST_TIMED_OUT
            elif status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                code = E.ERROR_CODE_NODE_NOT_AVAILABLE
            else:
                code = E.ERROR_CODE_UNKNOWN_SERVER_ERROR
            return pb.ProducePartitionResponse(
                partition=partition,
                error_code=code,
                error_message=f"the leader at {address}: {status.name}: {e.details()}",
                base_offset=-1,
                log_append_time_ms=-1,
            )
        answer = response.topics[0].partitions[0]
        return answer
