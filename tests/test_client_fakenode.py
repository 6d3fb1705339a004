"""An in-process fake node for client tests: one node, in-memory logs, injectable errors.

It implements just enough of ``HeadwaterService`` (Metadata, Produce, Fetch, ListOffsets, CreateTopics,
DeleteTopics, DescribeConfigs, AlterConfigs) to drive the client's retry, reset and error-mapping
paths without the real node. The tests that use it live in test_client_fake.py.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest

from headwater.v1 import client_pb2, client_pb2_grpc, errors_pb2, records_pb2
from headwater.v1.batch import crc_is_valid, decode_records

NONE = errors_pb2.ERROR_CODE_NONE


@dataclass
class FakePartition:
    batches: list[records_pb2.RecordBatch] = field(default_factory=list)
    log_start_offset: int = 0
    log_end_offset: int = 0


@dataclass
class FakeTopic:
    topic_id: bytes
    partitions: list[FakePartition]
    configs: dict[str, str] = field(default_factory=dict)


class FakeNode(client_pb2_grpc.HeadwaterServiceServicer):
    """Node 1 of a one-node cluster, kept in memory. Tests poke ``produce_errors`` and friends."""

    def __init__(self) -> None:
        self.port = 0
        self.lock = threading.Lock()
        self.topics: dict[str, FakeTopic] = {}
        self.calls: dict[str, int] = {}
        # Error codes answered to the next Produce partitions, one per partition response.
        self.produce_errors: deque[int] = deque()
        # Set to make Produce hang until cleared (for buffer-bound tests).
        self.produce_gate = threading.Event()
        self.produce_gate.set()
        self.abort_with: grpc.StatusCode | None = None
        self.leader_id = 1
        self.streams = 0  # ProduceStream calls opened

    def _count(self, name: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1
        if self.abort_with is not None:
            context.abort(self.abort_with, "refused by the fake node")

    def add_topic(self, name: str, partitions: int = 1) -> None:
        with self.lock:
            self.topics[name] = FakeTopic(uuid.uuid4().bytes, [FakePartition() for _ in range(partitions)])

    # ------------------------------------------------------------------ RPCs

    def Metadata(self, request, context):  # noqa: N802
        self._count("Metadata", context)
        resp = client_pb2.MetadataResponse(cluster_id="fake", controller_id=1)
        resp.nodes.add(node_id=1, host="127.0.0.1", port=self.port)
        names = list(request.topics) or sorted(self.topics)
        with self.lock:
            for name in names:
                t = self.topics.get(name)
                if t is None:
                    resp.topics.add(name=name, error_code=errors_pb2.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION)
                    continue
                tm = resp.topics.add(name=name, topic_id=t.topic_id)
                for i in range(len(t.partitions)):
                    tm.partitions.add(
                        partition=i, leader_id=self.leader_id, leader_epoch=0, replicas=[1], isr=[1]
                    )
        return resp

    def Produce(self, request, context):  # noqa: N802
        self._count("Produce", context)
        return self._produce(request, None)

    def ProduceStream(self, requests, context):  # noqa: N802
        """As the real node: in order, and a partition refused once stays refused in the stream."""
        refused: set[tuple[str, int]] = set()
        with self.lock:
            self.streams += 1
        for message in requests:
            self._count("Produce", context)
            yield client_pb2.ProduceStreamResponse(response=self._produce(message.request, refused))

    def _refusal(self, topic, pd, refused_before):
        """Lock held: why this partition's batches are refused, or NONE to append them."""
        if refused_before:
            return errors_pb2.ERROR_CODE_OUT_OF_ORDER_SEQUENCE
        if self.produce_errors:
            return self.produce_errors.popleft()
        t = self.topics.get(topic)
        if t is None or pd.partition >= len(t.partitions):
            return errors_pb2.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
        if not all(crc_is_valid(b) for b in pd.batches):
            return errors_pb2.ERROR_CODE_CORRUPT_MESSAGE
        return NONE

    def _produce(self, request, refused):
        self.produce_gate.wait()
        resp = client_pb2.ProduceResponse()
        with self.lock:
            for td in request.topics:
                tr = resp.topics.add(topic=td.topic)
                for pd in td.partitions:
                    pr = tr.partitions.add(partition=pd.partition, leader_id=-1)
                    key = (td.topic, pd.partition)
                    pr.error_code = self._refusal(td.topic, pd, refused is not None and key in refused)
                    if pr.error_code != NONE:
                        if refused is not None:
                            refused.add(key)
                        continue
                    t = self.topics[td.topic]
                    part = t.partitions[pd.partition]
                    pr.base_offset = part.log_end_offset
                    for b in pd.batches:
                        stored = records_pb2.RecordBatch()
                        stored.CopyFrom(b)
                        stored.base_offset = part.log_end_offset
                        part.batches.append(stored)
                        part.log_end_offset += b.last_offset_delta + 1
        return resp

    def Fetch(self, request, context):  # noqa: N802
        self._count("Fetch", context)
        deadline = time.monotonic() + min(request.max_wait_ms, 200) / 1000
        while True:
            resp, found = self._fetch_once(request)
            if found or time.monotonic() >= deadline or not context.is_active():
                return resp
            time.sleep(0.01)

    def _fetch_once(self, request):
        resp = client_pb2.FetchResponse()
        found = False
        with self.lock:
            for ft in request.topics:
                tr = resp.topics.add(topic=ft.topic)
                for fp in ft.partitions:
                    pr = tr.partitions.add(partition=fp.partition)
                    t = self.topics.get(ft.topic)
                    if t is None or fp.partition >= len(t.partitions):
                        pr.error_code = errors_pb2.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
                        found = True
                        continue
                    part = t.partitions[fp.partition]
                    pr.high_watermark = pr.log_end_offset = part.log_end_offset
                    pr.log_start_offset = part.log_start_offset
                    if not part.log_start_offset <= fp.fetch_offset <= part.log_end_offset:
                        pr.error_code = errors_pb2.ERROR_CODE_OFFSET_OUT_OF_RANGE
                        found = True
                        continue
                    size = 0
                    for b in part.batches:
                        if b.base_offset + b.last_offset_delta < fp.fetch_offset:
                            continue
                        if size and size + len(b.records) > fp.partition_max_bytes:
                            break
                        pr.batches.append(b)
                        size += len(b.records)
                        found = True
        return resp, found

    def ListOffsets(self, request, context):  # noqa: N802
        self._count("ListOffsets", context)
        resp = client_pb2.ListOffsetsResponse()
        with self.lock:
            for lt in request.topics:
                tr = resp.topics.add(topic=lt.topic)
                for lp in lt.partitions:
                    pr = tr.partitions.add(partition=lp.partition, offset=-1, timestamp_ms=-1)
                    t = self.topics.get(lt.topic)
                    if t is None or lp.partition >= len(t.partitions):
                        pr.error_code = errors_pb2.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
                        continue
                    part = t.partitions[lp.partition]
                    if lp.timestamp_ms == -2:
                        pr.offset = part.log_start_offset
                    elif lp.timestamp_ms == -1:
                        pr.offset = part.log_end_offset
                    else:
                        for b in part.batches:
                            hit = next(
                                (r for r in decode_records(b) if r.timestamp_ms >= lp.timestamp_ms), None
                            )
                            if hit is not None and hit.offset >= part.log_start_offset:
                                pr.offset, pr.timestamp_ms = hit.offset, hit.timestamp_ms
                                break
        return resp

    def CreateTopics(self, request, context):  # noqa: N802
        self._count("CreateTopics", context)
        resp = client_pb2.CreateTopicsResponse()
        for ct in request.topics:
            r = resp.topics.add(name=ct.name)
            if not ct.name or len(ct.name) > 249 or ct.name in (".", ".."):
                r.error_code = errors_pb2.ERROR_CODE_INVALID_TOPIC
            elif ct.name in self.topics:
                r.error_code, r.error_message = errors_pb2.ERROR_CODE_TOPIC_ALREADY_EXISTS, "exists"
            elif ct.num_partitions == 0 or ct.num_partitions < -1:
                r.error_code = errors_pb2.ERROR_CODE_INVALID_PARTITIONS
            elif any(k not in ("retention_ms", "max_message_bytes") for k in ct.configs):
                r.error_code = errors_pb2.ERROR_CODE_INVALID_CONFIG
            elif not request.validate_only:
                self.add_topic(ct.name, max(ct.num_partitions, 1))
                self.topics[ct.name].configs.update(ct.configs)
                r.topic_id = self.topics[ct.name].topic_id
                r.num_partitions = max(ct.num_partitions, 1)
        return resp

    def DeleteTopics(self, request, context):  # noqa: N802
        self._count("DeleteTopics", context)
        resp = client_pb2.DeleteTopicsResponse()
        with self.lock:
            for name in request.names:
                r = resp.topics.add(name=name)
                if self.topics.pop(name, None) is None:
                    r.error_code = errors_pb2.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
        return resp

    def DescribeConfigs(self, request, context):  # noqa: N802
        self._count("DescribeConfigs", context)
        resp = client_pb2.DescribeConfigsResponse()
        for res in request.resources:
            r = resp.results.add(resource_type=res.resource_type, resource_name=res.resource_name)
            t = self.topics.get(res.resource_name)
            if t is None:
                r.error_code = errors_pb2.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
                continue
            r.entries.add(
                name="retention_ms",
                value=t.configs.get("retention_ms", "604800000"),
                source=client_pb2.CONFIG_SOURCE_TOPIC
                if "retention_ms" in t.configs
                else client_pb2.CONFIG_SOURCE_DEFAULT,
            )
        return resp

    def AlterConfigs(self, request, context):  # noqa: N802
        self._count("AlterConfigs", context)
        resp = client_pb2.AlterConfigsResponse()
        for res in request.resources:
            r = resp.results.add(resource_type=res.resource_type, resource_name=res.resource_name)
            t = self.topics.get(res.resource_name)
            if t is None:
                r.error_code = errors_pb2.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
                continue
            for c in res.configs:
                if c.name != "retention_ms":
                    r.error_code = errors_pb2.ERROR_CODE_INVALID_CONFIG
                elif c.op == client_pb2.ALTER_CONFIG_OP_DELETE:
                    t.configs.pop(c.name, None)
                else:
                    t.configs[c.name] = c.value
        return resp


@pytest.fixture(name="fake_node")
def fake_node_fixture() -> Iterator[FakeNode]:
    """A FakeNode served on a free loopback port; stopped, with its threads, after the test."""
    node = FakeNode()
    executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fake-node")
    server = grpc.server(executor)
    client_pb2_grpc.add_HeadwaterServiceServicer_to_server(node, server)
    node.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield node
    finally:
        node.produce_gate.set()
        server.stop(grace=None).wait()
        executor.shutdown(wait=True)
