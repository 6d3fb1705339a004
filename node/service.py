"""The gRPC face of a node: adapts ``HeadwaterService`` calls to the ``Broker``.

Whole-request failures use gRPC status codes; everything else is a per-partition ``ErrorCode``.
An unexpected exception fails that one request with INTERNAL and is logged; the node stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from headwater._ratelog import RateLimitedLog
from headwater.node.broker import Broker, FetchResult, PendingProduce
from headwater.node.cluster import ClusterLink, timeout_of
from headwater.node.metrics import NodeMetrics
from headwater.node.publish import Publisher
from headwater.node.rpc import Malformed, add_service, next_unless_stopping
from headwater.v1 import batch as batch_codec
from headwater.v1 import client_pb2, client_pb2_grpc, errors_pb2, records_pb2
from headwater.v1 import client_pb2 as pb

__all__ = ["HeadwaterService", "add_to_server"]

log = logging.getLogger("headwater.node")
T = TypeVar("T")
R = TypeVar("R")
# What gives a stream request's answer once it is started (see HeadwaterService._answer_in_order).
Answer = Callable[[], Awaitable[R]]
E = errors_pb2
# Call metadata on a Subscribe that a node relays to the partition's leader.
_RELAYED = "headwater-relayed"
# SubscribeResponse.batches: field 4, length-delimited (answers joined around the stored bytes).
_SUBSCRIBE_BATCHES_TAG = bytes([(4 << 3) | 2])
# ProduceStream requests appended and waiting for their acks at once, per stream.
_STREAM_IN_FLIGHT = 16
# How long a relayed Subscribe waits to connect to the leader before answering NOT_LEADER_OR_FOLLOWER.
_RELAY_CONNECT_S = 5.0


def _fail_create(req: pb.CreateTopicsRequest, why: str) -> pb.CreateTopicsResponse:
    resp = pb.CreateTopicsResponse()
    for t in req.topics:
        resp.topics.add(name=t.name, error_code=E.ERROR_CODE_REQUEST_TIMED_OUT, error_message=why)
    return resp


def _fail_delete(req: pb.DeleteTopicsRequest, why: str) -> pb.DeleteTopicsResponse:
    resp = pb.DeleteTopicsResponse()
    for name in req.names:
        resp.topics.add(name=name, error_code=E.ERROR_CODE_REQUEST_TIMED_OUT, error_message=why)
    return resp


def _fail_alter(req: pb.AlterConfigsRequest, why: str) -> pb.AlterConfigsResponse:
    resp = pb.AlterConfigsResponse()
    for r in req.resources:
        resp.results.add(
            resource_type=r.resource_type,
            resource_name=r.resource_name,
            error_code=E.ERROR_CODE_REQUEST_TIMED_OUT,
            error_message=why,
        )
    return resp


def _empty_copy(request: pb.FetchRequest) -> pb.FetchRequest:
    """``request`` without its topics."""
    copy = pb.FetchRequest()
    copy.CopyFrom(request)
    del copy.topics[:]
    return copy


def _add_decoded(into: Any, raw: list[bytes], from_offset: int, config: Any, max_bytes: int = 1 << 62) -> str:
    """Decode stored batches into ConsumerRecords added to ``into`` (a repeated field), those from
    ``from_offset`` on, until they take ``max_bytes`` (at least one record goes in). Returns "", or
    why a batch could not be decoded (the records before it are kept)."""
    size = 0
    for b in map(records_pb2.RecordBatch.FromString, raw):
        try:
            decoded = batch_codec.decode_records(b, config.max_decompressed_bytes)
        except Exception as e:  # a batch this node cannot inflate is reported, not fatal
            return f"cannot decode the batch at offset {b.base_offset}: {e}"
        for r in decoded:
            if r.offset < from_offset:
                continue
            if size >= max_bytes and len(into):
                return ""
            cr = into.add(offset=r.offset, timestamp_ms=r.timestamp_ms, leader_epoch=b.partition_leader_epoch)
            if r.key is not None:
                cr.key = r.key
            if r.value is not None:
                cr.value = r.value
            for hk, hv in r.headers:
                h = cr.headers.add(key=hk)
                if hv is not None:
                    h.value = hv
            size += cr.ByteSize()
    return ""


def add_to_server(servicer: HeadwaterService, server: grpc.aio.Server) -> None:
    add_service(servicer, server, client_pb2, "HeadwaterService")


class HeadwaterService(client_pb2_grpc.HeadwaterServiceServicer):
    def __init__(self, broker: Broker, metrics: NodeMetrics, link: ClusterLink) -> None:
        self.broker = broker
        self.metrics = metrics
        # Topic changes go to the active controller through the node's link.
        self.link = link
        self._streams = 0
        # Produce requests being handled (unary and streamed); see max_produce_requests.
        self._producing = 0
        self._produce_slots = asyncio.Semaphore(broker.config.max_produce_requests)
        self._peer_streams: dict[str, int] = {}
        # Set when the node stops: open ProduceStreams end after the request in hand (close_streams).
        self._stopping = asyncio.Event()
        # A request that fails on the node is logged with its traceback at a bounded rate per RPC: a
        # caller who found a request that fails could otherwise fill the disk with tracebacks.
        self._failures = RateLimitedLog(log, broker.config.log_repeat_interval_ms / 1000)
        self.publisher = Publisher(broker, link, self._count_appended)

    def close_streams(self) -> None:
        """The node is stopping: each ProduceStream ends after its request in hand, so that an idle
        producer does not hold the shutdown for the whole grace period (it resends elsewhere)."""
        self._stopping.set()

    async def _handle(
        self,
        rpc: str,
        request: object,
        context: grpc.aio.ServicerContext,
        call: Callable[[], Awaitable[T] | T],
    ) -> T:
        started = time.perf_counter()
        outcome = "ok"
        try:
            if isinstance(request, Malformed):
                outcome = "invalid"
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{rpc}: malformed request: {request.error}"
                )
            result = call()
            if isinstance(result, Awaitable):
                result = await result
            return result
        except grpc.aio.AbortError:
            raise
        except Exception:
            outcome = "error"
            self._failures.exception(rpc, "%s failed", rpc)
            await context.abort(grpc.StatusCode.INTERNAL, f"{rpc} failed on the node; see its log")
            raise  # unreachable: abort raises
        finally:
            self.metrics.requests.labels(rpc, outcome).inc()
            self.metrics.request_latency.labels(rpc).observe(time.perf_counter() - started)

    async def CreateTopics(
        self, request: pb.CreateTopicsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTopicsResponse:  # noqa: N802,E501
        return await self._handle(
            "CreateTopics", request, context, lambda: self._forward("CreateTopics", request, _fail_create)
        )

    async def DeleteTopics(
        self, request: pb.DeleteTopicsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteTopicsResponse:  # noqa: N802,E501
        return await self._handle(
            "DeleteTopics", request, context, lambda: self._forward("DeleteTopics", request, _fail_delete)
        )

    async def Metadata(
        self, request: pb.MetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.MetadataResponse:  # noqa: N802,E501
        return await self._handle("Metadata", request, context, lambda: self.broker.metadata(request))

    async def Produce(
        self, request: pb.ProduceRequest, context: grpc.aio.ServicerContext
    ) -> pb.ProduceResponse:  # noqa: N802,E501
        await self._admit_unary("Produce", context)
        pending = await self._append("Produce", request, context)
        return await pending.settle()

    async def ProduceStream(  # noqa: N802
        self, requests: AsyncIterator[pb.ProduceStreamRequest | Malformed], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProduceStreamResponse]:
        # Requests are appended one at a time, in arrival order (that order is the stream's promise),
        # and up to _STREAM_IN_FLIGHT of them wait for their acks together; answers go out in order.
        # The partitions refused so far in this stream refuse their later batches too (client.proto).
        # Past max_produce_requests a stream waits for its turn with the one request it has read, and
        # reads no further, so flow control holds its sender back (an idle stream holds no turn).
        refused: set[tuple[str, int]] = set()

        async def append(
            request: pb.ProduceRequest | Malformed,
        ) -> Callable[[], Awaitable[pb.ProduceResponse]]:
            async with self._produce_slots:
                pending = await self._append("ProduceStream", request, context, refused)
            return pending.settle

        async for response in self._answer_in_order(requests, append):
            yield pb.ProduceStreamResponse(response=response)

    async def _answer_in_order(
        self,
        requests: AsyncIterator[Any],
        start: Callable[[Any], Awaitable[Answer[R]]],
    ) -> AsyncIterator[R]:
        """The answers of a stream of requests, in the order the requests came.

        Each request (the message's ``request``, or the Malformed stand-in) is started by ``start``
        in arrival order, one at a time; ``start`` returns once it may take the next, with what
        gives the request's answer. At most _STREAM_IN_FLIGHT requests are read and not yet
        answered: past that the stream is not read, so flow control holds its sender back. A
        failure (a refused call's abort, a broken stream) ends the answers too.
        """
        incoming = aiter(requests)
        started: asyncio.Queue[Answer[R] | BaseException | None] = asyncio.Queue()
        room = asyncio.Semaphore(_STREAM_IN_FLIGHT)

        async def read() -> None:
            try:
                while True:
                    await room.acquire()
                    message = await next_unless_stopping(incoming, self._stopping)
                    if message is None:
                        break
                    request = message if isinstance(message, Malformed) else message.request
                    started.put_nowait(await start(request))
            except BaseException as e:
                started.put_nowait(e)
                raise
            started.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await started.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield await item()
                room.release()
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def Publish(
        self, request: pb.PublishRequest, context: grpc.aio.ServicerContext
    ) -> pb.PublishResponse:  # noqa: N802,E501
        await self._admit_unary("Publish", context)
        return await self._publish("Publish", request, context)

    async def PublishStream(  # noqa: N802
        self, requests: AsyncIterator[pb.PublishStreamRequest | Malformed], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PublishStreamResponse]:
        # Up to _STREAM_IN_FLIGHT requests of a stream are published at once, answered in order.
        tasks: set[asyncio.Task[pb.PublishResponse]] = set()

        async def publish(request: pb.PublishRequest | Malformed) -> pb.PublishResponse:
            async with self._produce_slots:
                return await self._publish("PublishStream", request, context)

        async def begin(
            request: pb.PublishRequest | Malformed,
        ) -> Callable[[], Awaitable[pb.PublishResponse]]:
            task = asyncio.ensure_future(publish(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return lambda: task

        try:
            async for response in self._answer_in_order(requests, begin):
                yield pb.PublishStreamResponse(response=response)
        finally:
            for task in tasks:
                task.cancel()

    async def _publish(
        self, rpc: str, request: pb.PublishRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> pb.PublishResponse:
        """One Publish request, counted among the produce requests being handled."""
        self._producing += 1
        try:
            response: pb.PublishResponse = await self._handle(
                rpc,
                request,
                context,
                lambda: self.publisher.publish(request),  # type: ignore[arg-type]
            )
            return response
        finally:
            self._producing -= 1

    async def _admit_unary(self, rpc: str, context: grpc.aio.ServicerContext) -> None:
        """Refuse a unary produce past max_produce_requests: it is already in memory, so waiting
        requests would pile up."""
        bound = self.broker.config.max_produce_requests
        if self._producing >= bound:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the node handles max_produce_requests={bound} {rpc} requests at once; retry, or "
                f"use {rpc}Stream",
            )

    async def _append(
        self,
        rpc: str,
        request: pb.ProduceRequest | Malformed,
        context: grpc.aio.ServicerContext,
        refused: set[tuple[str, int]] | None = None,
    ) -> PendingProduce:
        self._producing += 1
        try:
            return await self._append_counted(rpc, request, context, refused)
        finally:
            self._producing -= 1

    async def _append_counted(
        self,
        rpc: str,
        request: pb.ProduceRequest | Malformed,
        context: grpc.aio.ServicerContext,
        refused: set[tuple[str, int]] | None,
    ) -> PendingProduce:
        def append() -> Awaitable[PendingProduce]:
            assert not isinstance(request, Malformed)  # _handle aborts a malformed call first
            return self.broker.append(request, refused)

        pending: PendingProduce = await self._handle(rpc, request, context, append)
        assert not isinstance(request, Malformed)
        self._count_appended(request, pending.response, rpc)
        return pending

    def _count_appended(
        self, request: pb.ProduceRequest, resp: pb.ProduceResponse, rpc: str = "Publish"
    ) -> None:
        """Count what a Produce appended into the topics' bytes and records in, and the partitions it
        refused by error code."""
        for t, tr in zip(request.topics, resp.topics, strict=True):
            appended = records = 0
            for pd, pr in zip(t.partitions, tr.partitions, strict=True):
                if pr.error_code == E.ERROR_CODE_NONE:
                    appended += sum(b.ByteSize() for b in pd.batches)
                    records += sum(b.record_count for b in pd.batches)
                else:
                    self.metrics.count_error(rpc, pr.error_code)
            if appended:
                self.metrics.count_in(t.topic, appended, records)

    async def Fetch(  # noqa: N802
        self, request: pb.FetchRequest, context: grpc.aio.ServicerContext
    ) -> bytes | pb.FetchResponse:
        peer = context.peer() or ""
        if not isinstance(request, Malformed) and request.decode:
            relayed = any(k == _RELAYED for k, _ in context.invocation_metadata() or ())
            return await self._handle(
                "Fetch", request, context, lambda: self._fetch_decoded(request, peer, relayed)
            )
        # Answered as bytes: the stored batches go out as they are (see FetchResult).
        result: FetchResult = await self._handle(
            "Fetch", request, context, lambda: self.broker.fetch(request, peer)
        )
        try:
            self.metrics.count_fetch(result)
            wire: bytes = result.to_bytes()
            return wire
        finally:
            # Released as the answer is handed to gRPC, which sends it within its flow control.
            self.broker.read_budget.release(peer, result.held)

    async def _fetch_decoded(self, request: pb.FetchRequest, peer: str, relayed: bool) -> pb.FetchResponse:
        """A Fetch with ``decode``: this node reads the partitions it leads (or knows no other
        leader of) and asks the other partitions' leaders, once, for theirs (a relayed request is
        never relayed again); the answers come back in the request's order, records decoded."""
        local = _empty_copy(request)
        remote: dict[str, pb.FetchRequest] = {}
        for t in request.topics:
            for fp in t.partitions:
                address = None if relayed else self.broker.leader_address(t.topic, fp.partition)
                target = local
                if address is not None:
                    target = remote.get(address) or remote.setdefault(address, _empty_copy(request))
                entry = target.topics[-1] if target.topics and target.topics[-1].topic == t.topic else None
                if entry is None:
                    entry = target.topics.add(topic=t.topic)
                entry.partitions.append(fp)
        calls = [self._fetch_decoded_here(local, peer)] if local.topics else []
        calls += [self._fetch_relayed(address, sub) for address, sub in remote.items()]
        answers: dict[tuple[str, int], list[pb.FetchPartitionResponse]] = {}
        for part in await asyncio.gather(*calls):
            for tr in part.topics:
                for pr in tr.partitions:
                    answers.setdefault((tr.topic, pr.partition), []).append(pr)
        out = pb.FetchResponse()
        for t in request.topics:
            tr = out.topics.add(topic=t.topic)
            for fp in t.partitions:
                tr.partitions.append(answers[(t.topic, fp.partition)].pop(0))
        return out

    async def _fetch_decoded_here(self, request: pb.FetchRequest, peer: str) -> pb.FetchResponse:
        result = await self.broker.fetch(request, peer)
        try:
            self.metrics.count_fetch(result)
            response = result.to_message()
        finally:
            self.broker.read_budget.release(peer, result.held)
        cfg = self.broker.config
        limit = cfg.fetch_max_bytes if request.max_bytes <= 0 else min(request.max_bytes, cfg.fetch_max_bytes)
        offsets = {(t.topic, fp.partition): fp.fetch_offset for t in request.topics for fp in t.partitions}
        for tr in response.topics:
            for pr in tr.partitions:
                raw = [b.SerializeToString() for b in pr.batches]
                pr.ClearField("batches")
                why = _add_decoded(pr.records, raw, offsets[(tr.topic, pr.partition)], cfg, limit)
                limit -= pr.ByteSize()
                if why and not pr.records:
                    pr.error_code, pr.error_message = E.ERROR_CODE_CORRUPT_MESSAGE, why
        return response

    async def _fetch_relayed(self, address: str, request: pb.FetchRequest) -> pb.FetchResponse:
        """The leader at ``address``'s decoded answer; NOT_LEADER_OR_FOLLOWER for each partition
        when it cannot be reached (the caller retries, as after a leader change)."""
        stub = client_pb2_grpc.HeadwaterServiceStub(self.link.channel(address))  # type: ignore[no-untyped-call]
        wait_s = request.max_wait_ms / 1000 + _RELAY_CONNECT_S
        try:
            response: pb.FetchResponse = await stub.Fetch(
                request, metadata=((_RELAYED, "1"),), timeout=wait_s
            )
            return response
        except grpc.aio.AioRpcError as e:
            failed = pb.FetchResponse()
            for t in request.topics:
                tr = failed.topics.add(topic=t.topic)
                for fp in t.partitions:
                    tr.partitions.add(
                        partition=fp.partition,
                        error_code=E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER,
                        error_message=f"the leader at {address} did not answer: {e.code().name}: "
                        f"{e.details()}",
                        high_watermark=-1,
                        last_stable_offset=-1,
                        log_start_offset=-1,
                        log_end_offset=-1,
                        leader_id=-1,
                    )
            return failed

    async def ListOffsets(
        self, request: pb.ListOffsetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOffsetsResponse:  # noqa: N802,E501
        return await self._handle("ListOffsets", request, context, lambda: self.broker.list_offsets(request))

    async def DescribeReplicas(
        self, request: pb.DescribeReplicasRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeReplicasResponse:  # noqa: N802,E501
        return await self._handle(
            "DescribeReplicas", request, context, lambda: self.broker.describe_replicas(request)
        )

    async def DescribeConfigs(
        self, request: pb.DescribeConfigsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeConfigsResponse:  # noqa: N802,E501
        return await self._handle(
            "DescribeConfigs", request, context, lambda: self.broker.describe_configs(request)
        )

    async def AlterConfigs(
        self, request: pb.AlterConfigsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AlterConfigsResponse:  # noqa: N802,E501
        return await self._handle(
            "AlterConfigs", request, context, lambda: self._forward("AlterConfigs", request, _fail_alter)
        )

    async def _forward(self, method: str, request: T, fail: Callable[[T, str], Any]) -> Any:
        response, why = await self.link.forward(method, request, timeout_of(request))
        return response if response is not None else fail(request, why)

    async def Subscribe(  # noqa: N802
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> None:
        cfg = self.broker.config
        if isinstance(request, Malformed):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"Subscribe: malformed request: {request.error}"
            )
        if self._streams >= cfg.max_subscribe_streams:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the node serves max_subscribe_streams={cfg.max_subscribe_streams} streams",
            )
        peer = context.peer() or ""
        if self._peer_streams.get(peer, 0) >= cfg.max_subscribe_streams_per_connection:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this connection has max_subscribe_streams_per_connection="
                f"{cfg.max_subscribe_streams_per_connection} streams open",
            )
        self._streams += 1
        self._peer_streams[peer] = self._peer_streams.get(peer, 0) + 1
        self.metrics.requests.labels("Subscribe", "ok").inc()
        # A node that does not lead the partition relays the leader's stream, so a caller needs no
        # leader lookup to read. A relayed call is never relayed again: two nodes whose images
        # disagree about the leader answer NOT_LEADER_OR_FOLLOWER instead of passing it in a loop.
        relayed = any(k == _RELAYED for k, _ in context.invocation_metadata() or ())
        address = None if relayed else self.broker.leader_address(request.topic, request.partition)
        stall_s = cfg.subscribe_stall_timeout_ms / 1000
        try:
            source: AsyncGenerator[pb.SubscribeResponse | bytes, None]
            if address:
                source = self._subscribe_relayed(request, address, context)
            else:
                source = self._subscribe(request, peer)
            # Each answer is written before the next is read from the log (the read budget is
            # held until then), and a reader that takes no answer for stall_s loses the stream.
            async with contextlib.aclosing(source):
                async for out in source:
                    try:
                        await asyncio.wait_for(context.write(out), stall_s)
                    except TimeoutError:
                        await context.abort(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the reader accepted no data for subscribe_stall_timeout_ms="
                            f"{cfg.subscribe_stall_timeout_ms}; stream closed",
                        )
        except asyncio.CancelledError:
            # The subscriber went away (it cancelled, its deadline passed, or its connection closed):
            # the usual end of a stream, not a failure of the node.
            log.debug("Subscribe to %s-%d cancelled by its caller", request.topic, request.partition)
            raise
        finally:
            self._streams -= 1
            left = self._peer_streams[peer] - 1
            if left:
                self._peer_streams[peer] = left
            else:
                del self._peer_streams[peer]

    async def _subscribe_relayed(
        self, request: pb.SubscribeRequest, address: str, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.SubscribeResponse | bytes, None]:
        """The leader's Subscribe answers, passed on as they come. The stream ends as the leader's
        does: after an error (a leader change is NOT_LEADER_OR_FOLLOWER, as when asked directly)."""
        channel = self.link.channel(address)
        try:
            # A channel that failed before (the leader started after this node) waits out its
            # reconnect backoff here, briefly, instead of failing the call at once.
            await asyncio.wait_for(channel.channel_ready(), _RELAY_CONNECT_S)
        except TimeoutError:
            yield pb.SubscribeResponse(
                error_code=E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER,
                error_message=f"the leader at {address} cannot be reached within {_RELAY_CONNECT_S:g} s",
                high_watermark=-1,
            )
            return
        stub = client_pb2_grpc.HeadwaterServiceStub(channel)  # type: ignore[no-untyped-call]
        call = stub.Subscribe(request, metadata=((_RELAYED, "1"),))
        try:
            async for out in call:
                yield out
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                yield pb.SubscribeResponse(
                    error_code=E.ERROR_CODE_NOT_LEADER_OR_FOLLOWER,
                    error_message=f"the leader at {address} cannot be reached: {e.details()}",
                    high_watermark=-1,
                )
            else:
                await context.abort(e.code(), f"Subscribe, relayed to the leader at {address}: {e.details()}")
        finally:
            call.cancel()

    async def _subscribe(
        self, request: pb.SubscribeRequest, peer: str
    ) -> AsyncGenerator[pb.SubscribeResponse | bytes, None]:
        """Serve a Subscribe from this node's own replica. Undecoded answers go out as wire bytes
        around the stored batches (as Fetch answers do): no batch is parsed or copied again."""
        gen = self.broker.subscribe_batches(
            request.topic, request.partition, request.offset, request.max_bytes, peer
        )
        async with contextlib.aclosing(gen):
            async for code, message, hw, raw in gen:
                out = pb.SubscribeResponse(error_code=code, error_message=message, high_watermark=hw)
                if code != E.ERROR_CODE_NONE:
                    yield out
                    return
                if not request.decode:
                    parts = [out.SerializeToString()]
                    batch_codec.add_stored_batches(parts, _SUBSCRIBE_BATCHES_TAG, raw)
                    del raw
                    yield b"".join(parts)
                    continue
                why = _add_decoded(out.records, raw, request.offset, self.broker.config)
                if why:
                    out.error_code, out.error_message = E.ERROR_CODE_CORRUPT_MESSAGE, why
                yield out
                if out.error_code != E.ERROR_CODE_NONE:
                    return
