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
from headwater.node.rpc import Malformed, add_service
from headwater.v1 import batch as batch_codec
from headwater.v1 import client_pb2, client_pb2_grpc, errors_pb2, records_pb2
from headwater.v1 import client_pb2 as pb

__all__ = ["HeadwaterService", "add_to_server"]

log = logging.getLogger("headwater.node")
T = TypeVar("T")
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
        if self._producing >= self.broker.config.max_produce_requests:
            # A unary request is already in memory when it gets here: refuse past the bound rather
            # than let waiting requests pile up.
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the node handles max_produce_requests={self.broker.config.max_produce_requests} "
                "Produce requests at once; retry, or use ProduceStream",
            )
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
        incoming = aiter(requests)
        appended: asyncio.Queue[PendingProduce | BaseException | None] = asyncio.Queue()
        room = asyncio.Semaphore(_STREAM_IN_FLIGHT)

        async def append_in_order() -> None:
            try:
                while True:
                    await room.acquire()
                    message = await self._next_unless_stopping(incoming)
                    if message is None:
                        break
                    request = message if isinstance(message, Malformed) else message.request
                    async with self._produce_slots:
                        appended.put_nowait(await self._append("ProduceStream", request, context, refused))
            except BaseException as e:  # a refused call (abort) or a broken stream ends the answers too
                appended.put_nowait(e)
                raise
            appended.put_nowait(None)

        appender = asyncio.create_task(append_in_order())
        try:
            while (item := await appended.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                response = await item.settle()
                yield pb.ProduceStreamResponse(response=response)
                room.release()
        finally:
            appender.cancel()
            with contextlib.suppress(BaseException):
                await appender

    async def _next_unless_stopping(self, incoming: AsyncIterator[T]) -> T | None:
        """The stream's next message; None at its end, or once the node is stopping."""
        if self._stopping.is_set():
            return None
        message = asyncio.ensure_future(anext(incoming))
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait((message, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not message.done():
            message.cancel()
            return None
        try:
            return message.result()
        except StopAsyncIteration:
            return None

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
        resp = pending.response
        assert not isinstance(request, Malformed)
        appended = 0
        records = 0
        for t, tr in zip(request.topics, resp.topics, strict=True):
            for pd, pr in zip(t.partitions, tr.partitions, strict=True):
                if pr.error_code == E.ERROR_CODE_NONE:
                    appended += sum(b.ByteSize() for b in pd.batches)
                    records += sum(b.record_count for b in pd.batches)
        self.metrics.bytes_in.inc(appended)
        self.metrics.records_in.inc(records)
        return pending

    async def Fetch(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        # Answered as bytes: the stored batches go out as they are (see FetchResult).
        peer = context.peer() or ""
        result: FetchResult = await self._handle(
            "Fetch", request, context, lambda: self.broker.fetch(request, peer)
        )
        try:
            self.metrics.bytes_out.inc(result.batch_bytes)
            wire: bytes = result.to_bytes()
            return wire
        finally:
            # Released as the answer is handed to gRPC, which sends it within its flow control.
            self.broker.read_budget.release(peer, result.held)

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
        max_inflate = self.broker.config.max_decompressed_bytes
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
                for b in map(records_pb2.RecordBatch.FromString, raw):
                    try:
                        decoded = batch_codec.decode_records(b, max_inflate)
                    except Exception as e:  # a batch this node cannot inflate is reported, not fatal
                        out.error_code = E.ERROR_CODE_CORRUPT_MESSAGE
                        out.error_message = f"cannot decode batch at {b.base_offset}: {e}"
                        break
                    for r in decoded:
                        if r.offset < request.offset:
                            continue
                        cr = out.records.add(
                            offset=r.offset,
                            timestamp_ms=r.timestamp_ms,
                            leader_epoch=b.partition_leader_epoch,
                        )
                        if r.key is not None:
                            cr.key = r.key
                        if r.value is not None:
                            cr.value = r.value
                        for hk, hv in r.headers:
                            h = cr.headers.add(key=hk)
                            if hv is not None:
                                h.value = hv
                yield out
                if out.error_code != E.ERROR_CODE_NONE:
                    return
