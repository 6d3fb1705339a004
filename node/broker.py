"""The node's request logic: topics, produce, fetch, offsets and configs over the local logs.

gRPC stays out of this module (``service.py`` adapts it); RocksDB stays behind ``headwater.storage``.
Every answer that acknowledges a write says which write it follows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

from headwater.config import (
    SECRET_SETTINGS,
    TOPIC_CONFIGS,
    NodeConfig,
    effective_topic_config,
    normalize_config_name,
)
from headwater.node.catalog import TopicCatalog, add_topic_metadata, node_infos
from headwater.node.flow import ReadBudget
from headwater.node.group_commit import GroupCommit
from headwater.node.partition import Partition
from headwater.node.produce_checks import ProduceRules, check_header, check_payload
from headwater.node.replicas import Replicas
from headwater.raft.commands import NO_LEADER
from headwater.raft.metadata import ClusterMetadata
from headwater.storage import (
    CorruptRecordError,
    LogStore,
    LogWriteError,
    OffsetOutOfRangeError,
    StorageError,
)
from headwater.v1 import batch as batch_codec
from headwater.v1 import client_pb2 as pb
from headwater.v1 import errors_pb2, records_pb2

__all__ = ["Broker", "FetchResult", "PendingProduce", "EARLIEST", "LATEST", "MAX_TIMESTAMP"]

E = errors_pb2
log = logging.getLogger("headwater.node")

EARLIEST = -2
LATEST = -1
MAX_TIMESTAMP = -3
COMPRESSION_NONE = records_pb2.COMPRESSION_TYPE_NONE


class PendingProduce:
    """A Produce request's answer, appended but perhaps not yet acknowledged: ``waits`` pairs each
    acks=all partition answer with the future of its commit (``Partition.wait_for_commit``)."""

    def __init__(
        self,
        response: pb.ProduceResponse,
        timeout_s: float,
        observe_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.response = response
        self.timeout_s = timeout_s
        self.waits: list[tuple[pb.ProducePartitionResponse, asyncio.Future[int]]] = []
        # Told how long an acks=all request waited for its replicas (a metric).
        self._observe_wait = observe_wait

    async def settle(self) -> pb.ProduceResponse:
        """The answer, once every acks=all partition is committed, failed, or out of time (then
        REQUEST_TIMED_OUT: the records are in the leader's log, not yet in every in-sync replica's)."""
        if self.waits:
            started = time.monotonic()
            await asyncio.wait([f for _, f in self.waits], timeout=self.timeout_s)
            if self._observe_wait is not None:
                self._observe_wait(time.monotonic() - started)
        for pr, fut in self.waits:
            if not fut.done():
                fut.cancel()
                pr.error_code = E.ERROR_CODE_REQUEST_TIMED_OUT
                pr.error_message = (
                    f"not in every in-sync replica within timeout_ms={self.timeout_s * 1000:.0f}; "
                    "the records are in the leader's log and may still be committed"
                )
            elif fut.result() == E.ERROR_CODE_NOT_ENOUGH_REPLICAS_AFTER_APPEND:
                pr.error_code = E.ERROR_CODE_NOT_ENOUGH_REPLICAS_AFTER_APPEND
                pr.error_message = (
                    "the ISR fell below min_insync_replicas before the records reached every in-sync "
                    "replica; they are in the log and readable, so a retry may duplicate them"
                )
            elif fut.result() != E.ERROR_CODE_NONE:
                pr.error_code = cast(errors_pb2.ErrorCode, fut.result())
                pr.error_message = "the leadership changed before the records were in every in-sync replica"
        self.waits = []
        return self.response


@dataclass(slots=True)
class _InflateBudget:
    """Bytes the batches of one Produce request may still inflate to while they are checked."""

    left: int


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _next_offset(stored: bytes) -> int:
    """The offset after a stored batch, from its first fields alone (the records stay unparsed):
    fields are serialized in number order, and ``base_offset`` (1), ``partition_leader_epoch`` (2)
    and ``last_offset_delta`` (3) are non-negative varints with one-byte tags (0 is left out)."""
    base = delta = 0
    i, n = 0, len(stored)
    while i < n:
        field, wire = stored[i] >> 3, stored[i] & 7
        if field > 3 or wire != 0:
            break
        i += 1
        value = shift = 0
        while i < n:
            b = stored[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        if field == 1:
            base = value
        elif field == 3:
            delta = value
    return base + delta + 1


def _expected_epoch(part: pb.FetchPartition | pb.ListOffsetsPartition) -> int:
    """The leader epoch a request expects, -1 for none. The field is optional (client.proto): absent
    skips the check, as -1 does, while 0 is the first leader epoch and is checked like any other."""
    return part.current_leader_epoch if part.HasField("current_leader_epoch") else -1


class FetchResult:
    """A Fetch answer whose record batches stay the stored bytes.

    Partition headers (offsets, error codes) are messages; the batches are the leader's stored bytes,
    appended on the wire as entries of ``FetchPartitionResponse.batches`` (a repeated message field
    is just its entries one after another). So the node never parses or re-serializes the batches it
    serves: no copy beyond the read itself.
    """

    _BATCHES_TAG = bytes([(11 << 3) | 2])  # FetchPartitionResponse.batches = 11, length-delimited
    _PARTITIONS_TAG = bytes([(2 << 3) | 2])  # FetchTopicResponse.partitions = 2
    _TOPICS_TAG = bytes([(1 << 3) | 2])  # FetchResponse.topics = 1

    def __init__(self) -> None:
        self.topics: list[tuple[str, list[tuple[pb.FetchPartitionResponse, list[bytes]]]]] = []
        # Bytes of record batches in the answer (for the node's bytes-out metric).
        self.batch_bytes = 0
        # Offsets the answer takes each topic's readers past (for the records-out metric).
        self.records: dict[str, int] = {}
        # Read-budget bytes this answer holds (``Broker.fetch``); the caller releases them once sent.
        self.held = 0

    def add_topic(self, topic: str) -> list[tuple[pb.FetchPartitionResponse, list[bytes]]]:
        partitions: list[tuple[pb.FetchPartitionResponse, list[bytes]]] = []
        self.topics.append((topic, partitions))
        return partitions

    def add_partition(
        self, topic: list[tuple[pb.FetchPartitionResponse, list[bytes]]], **fields: Any
    ) -> tuple[pb.FetchPartitionResponse, list[bytes]]:
        entry: tuple[pb.FetchPartitionResponse, list[bytes]] = (pb.FetchPartitionResponse(**fields), [])
        topic.append(entry)
        return entry

    def to_bytes(self) -> bytes:
        """The serialized ``FetchResponse``.

        Sizes are summed from the inside out first, so the stored batches are copied once, by the
        final join: joining each level in turn copied a full answer three times, over half of the
        node's time under a consumer reading at full speed.
        """
        v = batch_codec.encode_varint
        plan: list[tuple[bytes, int, list[tuple[bytes, int, list[bytes]]]]] = []
        for name, partitions in self.topics:
            topic_head = pb.FetchTopicResponse(topic=name).SerializeToString()
            topic_size = len(topic_head)
            parts = []
            for header, batches in partitions:
                head = header.SerializeToString()
                size = len(head) + batch_codec.stored_batches_size(self._BATCHES_TAG, batches)
                parts.append((head, size, batches))
                topic_size += 1 + len(v(size)) + size
            plan.append((topic_head, topic_size, parts))
        out: list[bytes] = []
        for topic_head, topic_size, parts in plan:
            out += (self._TOPICS_TAG, v(topic_size), topic_head)
            for head, size, batches in parts:
                out += (self._PARTITIONS_TAG, v(size), head)
                batch_codec.add_stored_batches(out, self._BATCHES_TAG, batches)
        return b"".join(out)

    def to_message(self) -> pb.FetchResponse:
        message: pb.FetchResponse = pb.FetchResponse.FromString(self.to_bytes())
        return message


class Broker:
    """Topics and partition replicas on this node, and the requests that read and write them."""

    def __init__(
        self,
        config: NodeConfig,
        store: LogStore,
        *,
        cluster_id: str = "",
        clock_ms: Callable[[], int] = _wall_clock_ms,
    ) -> None:
        self.config = config
        self.store = store
        self.clock_ms = clock_ms
        # The metadata image this node serves; replaced by ``apply_image`` as the quorum moves on.
        self.catalog = TopicCatalog(ClusterMetadata(), cluster_id)
        # The active controller as this node last heard of it (-1: unknown).
        self.controller_id = NO_LEADER
        # Offset of the newest image applied; an older one is never served again.
        self._applied_offset = -1
        # This node's replicas, opened, moved and dropped as images say (replicas.py).
        self.replicas = Replicas(config, store)
        self._parked = 0
        self._closing = False
        self._topic_config_cache: dict[str, dict[str, Any]] = {}
        self._validator = ThreadPoolExecutor(1, thread_name_prefix="headwater-validate")
        # One write-ahead-log sync for all the fsync-policy appends made meanwhile.
        self._group_commit = GroupCommit(store.sync_wal)
        # Told how long each acks=all request waited for its replicas (a metric).
        self.on_ack_wait: Callable[[float], None] | None = None
        # Told the topic, batch bytes and offsets of each Subscribe answer read (a metric).
        self.on_subscribe_read: Callable[[str, int, int], None] | None = None
        # The bytes Subscribe streams and Fetch answers hold between reading the log and sending.
        self.read_budget = ReadBudget(config.read_buffer_bytes, config.read_buffer_bytes_per_connection)

    # ----------------------------------------------------------------- metadata image

    @property
    def image(self) -> ClusterMetadata:
        return self.catalog.image

    def apply_image(self, image: ClusterMetadata, *, caught_up: bool = False) -> None:
        """Serve ``image``: open the replicas it places here, set each one's role and epochs, and
        (once caught up) remove the data of replicas it no longer has (deleted topics)."""
        if image.metadata_offset < self._applied_offset:
            # An older image (a lagging voter's snapshot after a reconnect): serving it would undo
            # what this node already saw, down to deleting data. Wait until it catches up.
            log.debug(
                "ignoring metadata at offset %d, behind %d", image.metadata_offset, self._applied_offset
            )
            return
        self._applied_offset = image.metadata_offset
        previous = self.catalog.image
        self.catalog = TopicCatalog(image, self.catalog.cluster_id)
        self._topic_config_cache.clear()
        self.replicas.apply(image, previous, caught_up=caught_up)

    @property
    def partitions(self) -> dict[tuple[str, int], Partition]:
        """This node's replicas by ``(topic, partition)`` (``Replicas.by_key``)."""
        return self.replicas.by_key

    @property
    def caught_up(self) -> bool:
        return self.replicas.caught_up

    @property
    def needs_reconcile(self) -> bool:
        return self.replicas.needs_reconcile

    @needs_reconcile.setter
    def needs_reconcile(self, value: bool) -> None:
        self.replicas.needs_reconcile = value

    @property
    def closing(self) -> bool:
        """The node is stopping: parked readers answer at once and park no more."""
        return self._closing

    def close(self) -> None:
        """Wake every parked reader so in-flight fetches answer before the store closes."""
        self._closing = True
        self.replicas.close()
        self._group_commit.close()
        self._validator.shutdown(wait=False, cancel_futures=True)

    def topic_config(self, name: str) -> dict[str, Any]:
        cached = self._topic_config_cache.get(name)
        if cached is None:
            info = self.catalog.get(name)
            assert info is not None
            cached = self._topic_config_cache[name] = effective_topic_config(info.configs, self.config)
        return cached

    # ----------------------------------------------------------------- metadata

    def metadata(self, req: pb.MetadataRequest) -> pb.MetadataResponse:
        image = self.image
        resp = pb.MetadataResponse(
            cluster_id=self.catalog.cluster_id,
            controller_id=self.controller_id,
            metadata_offset=image.metadata_offset,
        )
        resp.nodes.extend(node_infos(image))
        add_topic_metadata(resp, image, req.topics if req.topics else sorted(image.topic_ids))
        return resp

    # ----------------------------------------------------------------- produce

    def _lookup(self, topic: str, index: int) -> tuple[Partition | None, errors_pb2.ErrorCode, str]:
        """This node's replica of a partition, or the error code and message for the caller."""
        p = self.partitions.get((topic, index))
        if p is not None:
            return p, E.ERROR_CODE_NONE, ""
        record = self.catalog.record(topic)
        if record is None:
            return None, E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION, f"topic {topic!r} does not exist"
        if not 0 <= index < len(record.partitions):
            return None, E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION, f"topic {topic!r} has no partition {index}"
        rec = record.partitions[index]
        return (
            None,
            E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER,
            f"node {self.config.node_id} holds no replica of {topic}-{index}; its leader is {rec.leader}",
        )

    def leader_address(self, topic: str, index: int) -> str | None:
        """The client address of a partition's leader when that is another registered, unfenced node;
        None when this node leads it, holds it as leader-to-be, or there is no such leader."""
        p = self.partitions.get((topic, index))
        if p is not None and p.leader_id == self.config.node_id:
            return None
        leader, _ = self._leader_of(topic, index)
        node = self.image.nodes.get(leader)
        if leader == self.config.node_id or node is None or node.fenced:
            return None
        return f"{node.host}:{node.port}"

    def _leader_of(self, topic: str, index: int) -> tuple[int, int]:
        """The image's leader id and leader epoch of a partition ((-1, -1) when unknown)."""
        record = self.catalog.record(topic)
        if record is None or not 0 <= index < len(record.partitions):
            return NO_LEADER, -1
        rec = record.partitions[index]
        return rec.leader, rec.leader_epoch

    async def produce(
        self, req: pb.ProduceRequest, refused: set[tuple[str, int]] | None = None
    ) -> pb.ProduceResponse:
        """Append a request's batches and answer once they meet its ``acks`` (``append``, then
        ``PendingProduce.settle``)."""
        pending = await self.append(req, refused)
        return await pending.settle()

    async def append(
        self, req: pb.ProduceRequest, refused: set[tuple[str, int]] | None = None
    ) -> PendingProduce:
        """Append a request's batches, partition by partition, and return its pending answer: with
        acks=all, each appended partition's answer waits until the high watermark passes it. A
        ProduceStream appends its requests in order with this and settles them concurrently.

        ``refused`` is a ProduceStream's memory: partitions refused earlier in the stream, whose later
        batches are refused too (OUT_OF_ORDER_SEQUENCE) so that the stream never stores a batch after
        one it refused. Every partition refused here joins it.
        """
        pending = PendingProduce(
            pb.ProduceResponse(), req.timeout_ms / 1000 if req.timeout_ms > 0 else 30.0, self.on_ack_wait
        )
        resp = pending.response
        now_ms = self.clock_ms()
        # What all the request's batches may inflate to together while they are checked: a request
        # costs the node a bounded amount of work and memory, however well its payloads compress.
        budget = _InflateBudget(self.config.max_decompressed_bytes)
        seen: set[tuple[str, int]] = set()
        for t in req.topics:
            tr = resp.topics.add(topic=t.topic)
            for pd in t.partitions:
                pr = tr.partitions.add(
                    partition=pd.partition,
                    base_offset=-1,
                    log_append_time_ms=-1,
                    leader_id=-1,
                )
                key = (t.topic, pd.partition)
                code: int
                if key in seen:
                    code, msg = (
                        E.ERROR_CODE_INVALID_REQUEST,
                        f"{t.topic}-{pd.partition} is listed more than once in this request; send all "
                        "of a partition's batches in one entry",
                    )
                elif refused is not None and key in refused:
                    code, msg = (
                        E.ERROR_CODE_OUT_OF_ORDER_SEQUENCE,
                        f"an earlier batch of {t.topic}-{pd.partition} was refused in this stream; "
                        "nothing was stored: resend on a new stream",
                    )
                else:
                    code, msg = await self._produce_partition(
                        req.acks, t.topic, pd, pr, now_ms, budget, pending
                    )
                seen.add(key)
                if code != E.ERROR_CODE_NONE:
                    pr.error_code, pr.error_message = code, msg
                    if refused is not None:
                        refused.add(key)
        return pending

    async def _produce_partition(
        self,
        acks: int,
        topic: str,
        pd: pb.ProducePartitionData,
        pr: pb.ProducePartitionResponse,
        now_ms: int,
        budget: _InflateBudget,
        pending: PendingProduce,
    ) -> tuple[int, str]:
        if acks not in (0, 1, -1):
            return E.ERROR_CODE_INVALID_REQUIRED_ACKS, f"acks must be 0, 1 or -1 (all), got {acks}"
        p, code, why = self._lookup(topic, pd.partition)
        if p is None:
            pr.leader_id, pr.leader_epoch = self._leader_of(topic, pd.partition)
            return code, why
        check = p.check_leader(-1)
        if check.error_code != E.ERROR_CODE_NONE:
            pr.leader_id, pr.leader_epoch = p.leader_id, p.leader_epoch
            return check.error_code, check.message
        if not pd.batches:
            return (
                E.ERROR_CODE_INVALID_REQUEST,
                "batches is empty, expected at least one RecordBatch for this partition",
            )
        cfg = self.topic_config(topic)
        rules = ProduceRules.of_topic(cfg, self.config.max_decompressed_bytes, self.config.max_batch_records)
        checked_off_loop = False
        # Validate every batch before appending any, so a bad batch leaves the partition untouched;
        # the answer names the batch that failed, so the producer can resend the others. The cheap
        # checks (sizes, counts, header, CRC) come first; the records are inflated and parsed last,
        # bounded by the request's inflate budget, and a compressed payload is checked on the
        # validation thread, so no request holds the event loop (and the node's lease) for long.
        for i, b in enumerate(pd.batches):
            pr.error_batch_index = i
            records = b.records  # read once: each read of the field copies it
            code, why = check_header(b, rules, records)
            if code != E.ERROR_CODE_NONE:
                return code, f"batch {i}: {why}"
            left = budget.left
            if b.compression == COMPRESSION_NONE:
                code, why, inflated = check_payload(b, rules, now_ms, left, records)
            else:
                code, why, inflated = await self._check_off_loop(b, rules, now_ms, left, records)
                checked_off_loop = True
            budget.left -= inflated
            if inflated > left and left < self.config.max_decompressed_bytes:
                return (
                    E.ERROR_CODE_RECORD_LIST_TOO_LARGE,
                    "this request's batches inflate past max_decompressed_bytes="
                    f"{self.config.max_decompressed_bytes} together; nothing was stored: send fewer",
                )
            if code != E.ERROR_CODE_NONE:
                return code, f"batch {i}: {why}"
        pr.ClearField("error_batch_index")
        if checked_off_loop:
            # Leadership may have moved while the records were checked off the loop.
            check = p.check_leader(-1)
            if check.error_code != E.ERROR_CODE_NONE:
                pr.leader_id, pr.leader_epoch = p.leader_id, p.leader_epoch
                return check.error_code, check.message
        min_isr = 0
        if acks == -1:
            min_isr = self.min_insync_replicas(topic, cfg, p)
            if p.state is None:  # not the leader any more: answered above, but be sure
                return E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER, "this node no longer leads the partition"
            refusal, why = p.state.check_min_isr(min_isr)
            if refusal != E.ERROR_CODE_NONE:
                pr.leader_id, pr.leader_epoch = p.leader_id, p.leader_epoch
                return refusal, why + "; nothing was stored"
        log_append_time = rules.log_append_time
        sync = cfg["flush_policy"] == "fsync"
        batches = list(pd.batches)
        try:
            results = p.log.append_many(
                batches, p.leader_epoch, now_ms=now_ms, log_append_time=log_append_time
            )
            end_offset = p.log.log_end_offset
            if sync:
                # fsync policy: the append counts once the write-ahead log is synced, by one sync
                # shared with every append made meanwhile (group commit, off the event loop).
                await self._group_commit.sync()
        except CorruptRecordError as e:
            return E.ERROR_CODE_CORRUPT_MESSAGE, str(e)
        except LogWriteError as e:
            log.warning("append to %s-%d failed: %s", topic, pd.partition, e)
            self._maybe_recover_store()
            return E.ERROR_CODE_STORAGE_ERROR, f"the node could not write or sync its log: {e}"
        except StorageError as e:  # e.g. the topic was deleted meanwhile
            return E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION, f"{topic}-{pd.partition} is gone: {e}"
        # The leader's own copy counts from now (RocksDB's write-ahead log, all of this partition's
        # batches in one write; synced first under flush_policy=fsync): parked followers wake to
        # copy it, and the high watermark moves once every member of the ISR has it too.
        p.on_append(end_offset)
        first = results[0]
        if acks == -1:
            # Answered once every in-sync replica holds it: when the high watermark passes it.
            pending.waits.append((pr, p.wait_for_commit(end_offset, min_isr)))
        pr.base_offset = first.base_offset
        pr.log_start_offset = p.log.log_start_offset
        if log_append_time:
            pr.log_append_time_ms = now_ms
        return E.ERROR_CODE_NONE, ""

    async def _check_off_loop(
        self,
        batch: records_pb2.RecordBatch,
        rules: ProduceRules,
        now_ms: int,
        max_inflated: int,
        records: bytes,
    ) -> tuple[errors_pb2.ErrorCode, str, int]:
        """``check_payload`` on the validation thread: one at a time, so a flood of compressed
        batches queues there instead of taking every core, and the event loop stays free."""
        return await asyncio.get_running_loop().run_in_executor(
            self._validator, check_payload, batch, rules, now_ms, max_inflated, records
        )

    def min_insync_replicas(self, topic: str, cfg: dict[str, Any], p: Partition) -> int:
        """The topic's min_insync_replicas; the node default is capped by the replica count (a
        topic created on a smaller cluster than the default assumes still takes acks=all)."""
        record = self.catalog.record(topic)
        if record is not None and record.config("min_insync_replicas") is not None:
            return int(cfg["min_insync_replicas"])
        return min(int(cfg["min_insync_replicas"]), len(p.replicas))

    async def sync_wal(self) -> None:
        """Sync the write-ahead log, one sync shared by every caller meanwhile (group commit)."""
        await self._group_commit.sync()

    def _maybe_recover_store(self) -> None:
        recover = getattr(self.store, "recover", None)
        if recover is not None:
            try:
                recover()
            except Exception as e:  # still no space: the next write tries again
                log.warning("store not recovered yet: %s", e)

    # ----------------------------------------------------------------- fetch

    async def fetch(self, req: pb.FetchRequest, reader: str = "") -> FetchResult:
        """Answer a Fetch, parked until ``min_bytes`` arrive or ``max_wait_ms`` passes. Each read
        takes bytes from the read budget under ``reader``; the answer's ``held`` bytes are the
        caller's to release (``read_budget.release(reader, result.held)``) once it has gone out."""
        cfg = self.config
        max_wait_ms = max(0, min(req.max_wait_ms, cfg.fetch_max_wait_ms))
        max_bytes = cfg.fetch_max_bytes if req.max_bytes <= 0 else min(req.max_bytes, cfg.fetch_max_bytes)
        min_bytes = max(0, req.min_bytes)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_ms / 1000
        budget = self.read_budget
        while True:
            # At least one batch's worth, so a reader always progresses; up to what it asked for.
            least = cfg.max_message_bytes
            granted = await budget.acquire(reader, max(max_bytes, least), least)
            try:
                resp, total, touched, errored = self._read_fetch(req, min(max_bytes, granted))
            except BaseException:
                budget.release(reader, granted)
                raise
            resp.held = min(total, granted)
            budget.release(reader, granted - resp.held)
            remaining = deadline - loop.time()
            if total >= min_bytes or errored or remaining <= 0 or not touched or self._closing:
                return resp
            budget.release(reader, resp.held)  # parked: hold nothing while waiting
            if self._parked >= cfg.max_fetch_waiters:
                resp.held = 0
                return resp  # bound reached: answer now rather than park another waiter
            fut: asyncio.Future[None] = loop.create_future()
            for p in touched:
                p.park(fut)
            self._parked += 1
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                pass
            finally:
                self._parked -= 1
                for p in touched:
                    p.unpark(fut)

    def _read_fetch(
        self, req: pb.FetchRequest, max_bytes: int
    ) -> tuple[FetchResult, int, list[Partition], bool]:
        resp = FetchResult()
        total = 0
        touched: list[Partition] = []
        errored = False
        for t in req.topics:
            tr = resp.add_topic(t.topic)
            for fp in t.partitions:
                pr, batches = resp.add_partition(
                    tr,
                    partition=fp.partition,
                    high_watermark=-1,
                    last_stable_offset=-1,
                    log_start_offset=-1,
                    log_end_offset=-1,
                    leader_id=-1,
                )
                p, code, why = self._lookup(t.topic, fp.partition)
                if p is None:
                    pr.error_code, pr.error_message = code, why
                    pr.leader_id, pr.leader_epoch = self._leader_of(t.topic, fp.partition)
                    errored = True
                    continue
                check = p.check_leader(_expected_epoch(fp))
                pr.leader_id, pr.leader_epoch = p.leader_id, p.leader_epoch
                if check.error_code != E.ERROR_CODE_NONE:
                    pr.error_code, pr.error_message = check.error_code, check.message
                    errored = True
                    continue
                hw = p.high_watermark
                pr.high_watermark = hw
                pr.last_stable_offset = hw
                pr.log_start_offset = p.log.log_start_offset
                pr.log_end_offset = p.log.log_end_offset
                touched.append(p)
                part_max = self.config.max_partition_fetch_bytes
                if fp.partition_max_bytes > 0:
                    part_max = min(part_max, fp.partition_max_bytes)
                budget = min(part_max, max_bytes - total)
                if budget <= 0 and total > 0:
                    continue
                try:
                    # A client never reads past the high watermark, whatever replica_id it sends:
                    # replicas will read through the authenticated replication service.
                    raw = p.log.read(fp.fetch_offset, max(budget, 1), hw)
                except OffsetOutOfRangeError as e:
                    pr.error_code = E.ERROR_CODE_OFFSET_OUT_OF_RANGE
                    pr.error_message = str(e)
                    errored = True
                    continue
                if total > 0 and raw and len(raw[0]) > budget:
                    raw = []  # only a response's first batch may exceed the budget (for progress)
                batches.extend(raw)
                total += sum(map(len, raw))
                if raw:
                    moved = _next_offset(raw[-1]) - fp.fetch_offset
                    resp.records[t.topic] = resp.records.get(t.topic, 0) + moved
        resp.batch_bytes = total
        return resp, total, touched, errored

    # ----------------------------------------------------------------- subscribe

    def _still_serving(self, topic: str, index: int, p: Partition) -> bool:
        """Whether ``p`` is still this node's replica of the partition (not deleted or recreated)."""
        return self.partitions.get((topic, index)) is p

    async def subscribe_batches(
        self, topic: str, index: int, offset: int, max_bytes: int, reader: str = ""
    ) -> AsyncGenerator[tuple[errors_pb2.ErrorCode, str, int, list[bytes]], None]:
        """Yield ``(error_code, error_message, high_watermark, [stored batch bytes])`` from
        ``offset`` on, waiting for new data; ends after an error.

        Each read takes its bytes from the read budget under ``reader`` (the client connection)
        and gives them back when the consumer of this generator asks for the next answer, that is,
        once the last one has gone out: a stream whose reader does not read holds one answer."""
        p, code, why = self._lookup(topic, index)
        if p is None:
            yield code, why, -1, []
            return
        if offset == EARLIEST:
            offset = p.log.log_start_offset
        elif offset == LATEST:
            offset = p.high_watermark
        cap = min(self.config.subscribe_max_bytes, self.config.max_partition_fetch_bytes)
        max_bytes = cap if max_bytes <= 0 else min(max_bytes, cap)
        loop = asyncio.get_running_loop()
        budget = self.read_budget
        while not self._closing:
            assert p is not None
            if not self._still_serving(topic, index, p):
                yield E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION, f"topic {topic!r} was deleted", -1, []
                return
            check = p.check_leader(-1)
            if check.error_code != E.ERROR_CODE_NONE:
                yield check.error_code, check.message, -1, []
                return
            # The whole answer's worth: a stream holds at most one answer between read and write.
            granted = held = await budget.acquire(reader, max(max_bytes, self.config.max_message_bytes))
            try:
                try:
                    raw = p.log.read(offset, min(max_bytes, granted), p.high_watermark)
                except OffsetOutOfRangeError as e:
                    budget.release(reader, held)
                    held = 0
                    yield E.ERROR_CODE_OFFSET_OUT_OF_RANGE, str(e), p.high_watermark, []
                    return
                if raw:
                    used = min(granted, sum(len(b) for b in raw))
                    budget.release(reader, granted - used)
                    held = used
                    last = records_pb2.RecordBatch.FromString(raw[-1])
                    read_from, offset = offset, last.base_offset + last.last_offset_delta + 1
                    if self.on_subscribe_read is not None:
                        self.on_subscribe_read(topic, sum(map(len, raw)), offset - read_from)
                    yield E.ERROR_CODE_NONE, "", p.high_watermark, raw
                    continue
            finally:
                budget.release(reader, held)
            fut: asyncio.Future[None] = loop.create_future()
            p.park(fut)
            try:
                await asyncio.wait_for(fut, 1.0)
            except TimeoutError:
                pass
            finally:
                p.unpark(fut)

    # ----------------------------------------------------------------- list offsets

    def list_offsets(self, req: pb.ListOffsetsRequest) -> pb.ListOffsetsResponse:
        resp = pb.ListOffsetsResponse()
        for t in req.topics:
            tr = resp.topics.add(topic=t.topic)
            for lp in t.partitions:
                pr = tr.partitions.add(partition=lp.partition, offset=-1, timestamp_ms=-1, leader_epoch=-1)
                p, code, why = self._lookup(t.topic, lp.partition)
                if p is None:
                    pr.error_code, pr.error_message = code, why
                    continue
                check = p.check_leader(_expected_epoch(lp))
                if check.error_code != E.ERROR_CODE_NONE:
                    pr.error_code, pr.error_message = check.error_code, check.message
                    continue
                pr.leader_epoch = p.leader_epoch
                ts = lp.timestamp_ms
                if ts == EARLIEST:
                    pr.offset = p.log.log_start_offset
                elif ts == LATEST:
                    pr.offset = p.high_watermark
                elif ts == MAX_TIMESTAMP:
                    found = p.log.max_timestamp()
                    if found is not None:
                        pr.offset, pr.timestamp_ms = found
                elif ts >= 0:
                    found = p.log.offset_for_timestamp(ts)
                    if found is not None and found[0] < p.high_watermark:
                        pr.offset, pr.timestamp_ms = found
                else:
                    pr.error_code = E.ERROR_CODE_INVALID_REQUEST
                    pr.error_message = f"timestamp_ms must be -3, -2, -1 or >= 0, got {ts}"
        return resp

    # ----------------------------------------------------------------- configs

    def describe_replicas(self, req: pb.DescribeReplicasRequest) -> pb.DescribeReplicasResponse:
        """The replicas of the partitions this node leads, as their replica states see them."""
        resp = pb.DescribeReplicasResponse(node_id=self.config.node_id)
        wanted = set(req.topics)
        now_ms = self.replicas.now_ms()
        for (topic, index), p in sorted(self.partitions.items()):
            state = p.state
            if state is None or (wanted and topic not in wanted):
                continue
            pr = resp.partitions.add(
                topic=topic,
                partition=index,
                leader_id=p.node_id,
                leader_epoch=p.leader_epoch,
                high_watermark=p.high_watermark,
                log_start_offset=p.log.log_start_offset,
                log_end_offset=p.log.log_end_offset,
            )
            pr.replicas.add(node_id=p.node_id, log_end_offset=p.log.log_end_offset, in_isr=True)
            for r in state.replicas:
                if r == p.node_id:
                    continue
                records, ms = state.lag(r, now_ms)
                pr.replicas.add(
                    node_id=r,
                    log_end_offset=state.follower(r).log_end_offset,
                    lag_records=records,
                    caught_up_ms_ago=ms,
                    in_isr=r in state.isr,
                )
        return resp

    def describe_configs(self, req: pb.DescribeConfigsRequest) -> pb.DescribeConfigsResponse:
        resp = pb.DescribeConfigsResponse()
        for res in req.resources:
            r = resp.results.add(resource_type=res.resource_type, resource_name=res.resource_name)
            wanted = {normalize_config_name(n) for n in res.config_names}
            if res.resource_type == pb.RESOURCE_TYPE_TOPIC:
                info = self.catalog.get(res.resource_name)
                if info is None:
                    r.error_code = E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
                    r.error_message = f"topic {res.resource_name!r} does not exist"
                    continue
                effective = self.topic_config(info.name)
                for name, spec in TOPIC_CONFIGS.items():
                    if wanted and name not in wanted:
                        continue
                    source = (
                        pb.CONFIG_SOURCE_TOPIC
                        if name in info.configs
                        else pb.CONFIG_SOURCE_NODE
                        if spec.node_default
                        else pb.CONFIG_SOURCE_DEFAULT
                    )
                    r.entries.add(
                        name=name, value=str(effective[name]), source=source, documentation=spec.doc
                    )
            elif res.resource_type == pb.RESOURCE_TYPE_NODE:
                if res.resource_name not in ("", str(self.config.node_id)):
                    r.error_code = E.ERROR_CODE_RESOURCE_NOT_FOUND
                    r.error_message = f"node {res.resource_name!r} is not this node ({self.config.node_id})"
                    continue
                for name, value in sorted(vars(self.config).items()):
                    if (wanted and name not in wanted) or name in SECRET_SETTINGS:
                        continue
                    r.entries.add(name=name, value=str(value), source=pb.CONFIG_SOURCE_NODE, read_only=True)
            else:
                r.error_code = E.ERROR_CODE_INVALID_REQUEST
                r.error_message = (
                    "resource_type is required: RESOURCE_TYPE_TOPIC or RESOURCE_TYPE_NODE"
                    if res.resource_type == pb.RESOURCE_TYPE_UNKNOWN
                    else f"unsupported resource type {res.resource_type}"
                )
        return resp

    # ----------------------------------------------------------------- retention

    def checkpoint_high_watermarks(self, *, sync: bool = False) -> int:
        """Write every replica's high watermark to its checkpoint; returns how many failed."""
        failed = 0
        for (topic, index), p in list(self.partitions.items()):
            try:
                p.checkpoint_high_watermark(sync=sync)
            except (StorageError, ValueError) as e:
                failed += 1
                log.debug("high watermark of %s-%d not checkpointed: %s", topic, index, e)
        return failed

    def apply_retention(self) -> int:
        """One pass of time and size retention over every partition; returns batches deleted."""
        now_ms = self.clock_ms()
        deleted = 0
        for (topic, _), p in list(self.partitions.items()):
            if self.catalog.get(topic) is None:
                continue
            cfg = self.topic_config(topic)
            if cfg["cleanup_policy"] != "delete":
                continue
            try:
                n = p.log.apply_retention(now_ms, cfg["retention_ms"], cfg["retention_bytes"])
            except LogWriteError as e:
                log.warning("retention on %s-%d failed: %s", topic, p.index, e)
                continue
            if n:
                p.on_log_changed()
                deleted += n
        return deleted
