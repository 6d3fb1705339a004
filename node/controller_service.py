"""The gRPC face of the controller: adapts ``ControllerService`` calls to a ``ControllerRuntime``.

A voter that is not the active controller answers ``NOT_CONTROLLER`` with a ``ControllerHint``
naming the one it knows of. Whole-request failures use gRPC status codes (an undecodable body is
INVALID_ARGUMENT); everything else is an ``ErrorCode`` in the response.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any

import grpc

from headwater._ratelog import RateLimitedLog
from headwater.config import NodeConfig
from headwater.node import topic_admin
from headwater.node.auth import NodeAuth
from headwater.node.catalog import node_infos
from headwater.node.controller import ControllerRuntime, FeedEntry, Outcome
from headwater.node.forwarding import ForwardedAnswers
from headwater.node.rpc import Malformed, add_service
from headwater.raft.commands import AlterPartition
from headwater.raft.metadata import MAX_REQUEST_ID_LENGTH, ClusterMetadata
from headwater.v1 import controller_pb2, errors_pb2

pb: Any = controller_pb2

__all__ = ["ControllerServiceServicer", "BrokerControllerService", "add_controller_to_server", "SERVICE_NAME"]

log = logging.getLogger("headwater.node.controller")
E = errors_pb2
SERVICE_NAME = controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name


def add_controller_to_server(
    servicer: ControllerServiceServicer | BrokerControllerService, server: grpc.aio.Server
) -> None:
    add_service(servicer, server, controller_pb2, "ControllerService")


async def _refuse_malformed(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request does not decode: {request.error}")


class ControllerServiceServicer:
    """``ControllerService`` over a ``ControllerRuntime``."""

    def __init__(
        self, runtime: ControllerRuntime, config: NodeConfig | None = None, auth: NodeAuth | None = None
    ) -> None:
        self.runtime = runtime
        # Bounds and defaults for forwarded topic changes.
        self.config = config or NodeConfig()
        # When set, RegisterNode, NodeHeartbeat and AlterPartition need a node token (auth.py).
        self.auth = auth
        # Refusals are logged at a bounded rate: anyone who reaches the port can cause them.
        self._refusals = RateLimitedLog(log, self.config.log_repeat_interval_ms / 1000)
        # Forwarded requests being or lately answered, by request id (forwarding.py).
        self.forwarded = ForwardedAnswers()

    async def _authenticate(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self.auth is None:
            return
        problem = self.auth.problem(context.invocation_metadata(), request)
        if problem:
            kind = type(request).__name__
            self._refusals.warning(kind, "refused a controller request (%s): %s", kind, problem)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    def _hint(self) -> Any:
        controller_id, address = self.runtime.controller_hint()
        return pb.ControllerHint(controller_id=controller_id, controller_address=address)

    def _hint_if_refused(self, code: int) -> Any:
        return self._hint() if code == E.ERROR_CODE_NOT_CONTROLLER else None

    async def RegisterNode(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        await self._authenticate(request, context)
        o: Outcome = await self.runtime.register(
            request.node_id, request.incarnation_id, request.host, request.port, request.rack
        )
        epoch = o.result.broker_epoch if o.ok and o.result is not None else -1
        return pb.RegisterNodeResponse(
            error_code=o.error_code,
            error_message=o.message,
            broker_epoch=epoch,
            controller=self._hint_if_refused(o.error_code),
        )

    async def NodeHeartbeat(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        await self._authenticate(request, context)
        o = await self.runtime.heartbeat(
            request.node_id, request.broker_epoch, request.want_fence, request.want_shutdown
        )
        return pb.NodeHeartbeatResponse(
            error_code=o.error_code,
            error_message=o.message,
            is_fenced=o.is_fenced,
            shutdown_ready=o.shutdown_ready,
            metadata_offset=o.metadata_offset,
            controller=self._hint_if_refused(o.error_code),
        )

    async def AlterPartition(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        await self._authenticate(request, context)
        cmd = AlterPartition(
            topic_id=request.topic_id,
            partition=request.partition,
            leader_id=request.leader_id,
            broker_epoch=request.broker_epoch,
            leader_epoch=request.leader_epoch,
            partition_epoch=request.partition_epoch,
            new_isr=tuple(request.new_isr),
            request_id=request.request_id,
        )
        o = await self.runtime.alter_partition(cmd)
        r = o.result
        if not o.ok or r is None:
            return pb.AlterPartitionResponse(
                error_code=o.error_code,
                error_message=o.message,
                leader_id=-1,
                leader_epoch=-1,
                partition_epoch=-1,
                controller=self._hint_if_refused(o.error_code),
            )
        return pb.AlterPartitionResponse(
            error_code=E.ERROR_CODE_NONE,
            error_message=r.message,
            leader_id=r.leader_id,
            leader_epoch=r.leader_epoch,
            partition_epoch=r.partition_epoch,
            isr=list(r.isr),
        )

    async def ElectLeaders(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        wanted = [(tp.topic_id, tp.partition) for tp in request.partitions] or None
        out = await self.runtime.elect_leaders(wanted, request.preferred)
        if isinstance(out, Outcome):
            return pb.ElectLeadersResponse(
                error_code=out.error_code,
                error_message=out.message,
                controller=self._hint_if_refused(out.error_code),
            )
        return pb.ElectLeadersResponse(
            error_code=E.ERROR_CODE_NONE,
            results=[
                pb.ElectLeadersResult(
                    topic_id=e.topic_id,
                    partition=e.partition,
                    error_code=e.error_code,
                    error_message=e.message,
                    leader_id=e.leader_id,
                    leader_epoch=e.leader_epoch,
                )
                for e in out
            ],
        )

    async def DescribeCluster(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        d: Any = self.runtime.describe()
        return pb.DescribeClusterResponse(
            error_code=E.ERROR_CODE_NONE,
            nodes=node_infos(self.runtime.quorum.metadata),
            controller_id=int(d["controller_id"]),
            answered_by=int(d["answered_by"]),
            raft_term=int(d["raft_term"]),
            commit_index=int(d["commit_index"]),
            metadata_offset=int(d["metadata_offset"]),
            voters={int(k): str(v) for k, v in d["voters"].items()},
            controller=self._hint(),
            cluster_id=str(d["cluster_id"]),
        )

    async def WatchMetadata(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await _refuse_malformed(request, context)
        async for event in self.runtime.watch(request.from_offset):
            if isinstance(event, FeedEntry):
                yield pb.WatchMetadataResponse(
                    delta=pb.MetadataDelta(
                        metadata_offset=event.metadata_offset,
                        command=event.command,
                        error_code=event.error_code,
                        error_message=event.error_message,
                    )
                )
            else:
                yield pb.WatchMetadataResponse(
                    snapshot=pb.MetadataSnapshot(
                        metadata_offset=event.metadata_offset, data=event.to_snapshot()
                    )
                )

    # ---------------------------------------------------------------- forwarded topic changes

    async def _forwarded(
        self,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        response_type: Any,
        handle: Callable[[Any, str], Coroutine[Any, Any, tuple[Any, int]]],
        results: Callable[[Any], Iterable[Any]],
    ) -> Any:
        """A topic change another node forwarded: NOT_CONTROLLER with a hint off the Raft leader,
        else ``handle``'s per-topic answer (see ``_answer``). A request with a request id is
        handled once: a resend waits for, or gets, the first one's answer (forwarding.py)."""
        await _refuse_malformed(request, context)
        rid = request.request_id
        if len(rid) > MAX_REQUEST_ID_LENGTH:
            return response_type(
                error_code=E.ERROR_CODE_INVALID_REQUEST,
                error_message=f"request id is longer than {MAX_REQUEST_ID_LENGTH} characters",
                metadata_offset=-1,
            )
        if not (self.runtime.active or self.runtime.quorum.is_leader):
            return response_type(
                error_code=E.ERROR_CODE_NOT_CONTROLLER,
                error_message="this voter is not the active controller",
                controller=self._hint(),
                metadata_offset=-1,
            )
        if not rid:
            resp, offset = await handle(request.request, "")
        else:
            generation = self.runtime.generation
            task = self.forwarded.get(rid, generation)
            if task is None:
                task = asyncio.get_running_loop().create_task(handle(request.request, rid))
                self.forwarded.put(rid, generation, task)
            # Shielded: a caller that gives up (its deadline) does not stop the change halfway;
            # its resend waits for this same task.
            resp, offset = await asyncio.shield(task)
        codes = [r.error_code for r in results(resp)]
        answer = self._answer(response_type, resp, codes, offset, resend_safe=bool(rid))
        if rid and answer.error_code == E.ERROR_CODE_NOT_CONTROLLER:
            # Not an answer to keep: a resend here, once this voter leads again, is done afresh.
            self.forwarded.forget(rid)
        return answer

    async def CreateTopics(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._forwarded(
            request,
            context,
            pb.ControllerServiceCreateTopicsResponse,
            lambda req, rid: topic_admin.create_topics(self.runtime, self.config, req, request_id=rid),
            lambda resp: resp.topics,
        )

    async def DeleteTopics(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._forwarded(
            request,
            context,
            pb.ControllerServiceDeleteTopicsResponse,
            lambda req, rid: topic_admin.delete_topics(self.runtime, req, request_id=rid),
            lambda resp: resp.topics,
        )

    async def AlterConfigs(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._forwarded(
            request,
            context,
            pb.ControllerServiceAlterConfigsResponse,
            lambda req, rid: topic_admin.alter_configs(self.runtime, self.config, req, request_id=rid),
            lambda resp: resp.results,
        )

    def _answer(
        self, response_type: Any, resp: Any, codes: list[int], offset: int, *, resend_safe: bool
    ) -> Any:
        """The whole request is NOT_CONTROLLER when leadership was lost midway (the caller then
        goes to the new controller); otherwise the per-topic results stand. With a request id the
        resend is safe, so one topic lost midway is enough: the new controller answers the topics
        that committed from the metadata and does the rest. Without one, only when every topic
        was lost, as a resend would answer TOPIC_ALREADY_EXISTS for those that committed."""
        lost = [c == E.ERROR_CODE_NOT_CONTROLLER for c in codes]
        if codes and (any(lost) if resend_safe else all(lost)):
            return response_type(
                error_code=E.ERROR_CODE_NOT_CONTROLLER,
                error_message="this voter stopped being the active controller",
                controller=self._hint(),
                metadata_offset=offset,
            )
        return response_type(error_code=E.ERROR_CODE_NONE, response=resp, metadata_offset=offset)


class BrokerControllerService:
    """``ControllerService`` on a node that is not a voter: DescribeCluster from its metadata image
    (no Raft state: term and commit index are -1), and NOT_CONTROLLER with the active controller it
    last heard of for everything the controller alone does."""

    def __init__(
        self,
        node_id: int,
        image: Callable[[], ClusterMetadata],
        hint: Callable[[], tuple[int, str]],
        voters: dict[int, str],
        cluster_id: Callable[[], str],
    ) -> None:
        self._node_id = node_id
        self._image = image
        self._hint_of = hint
        self._voters = dict(voters)
        self._cluster_id = cluster_id

    def _hint(self) -> Any:
        controller_id, address = self._hint_of()
        return pb.ControllerHint(controller_id=controller_id, controller_address=address)

    def _refusal(self, response_type: Any, **fields: Any) -> Any:
        return response_type(
            error_code=E.ERROR_CODE_NOT_CONTROLLER,
            error_message=f"node {self._node_id} is not a voter of the metadata quorum",
            controller=self._hint(),
            **fields,
        )

    async def RegisterNode(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        return self._refusal(pb.RegisterNodeResponse, broker_epoch=-1)

    async def NodeHeartbeat(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        return self._refusal(pb.NodeHeartbeatResponse, is_fenced=True, metadata_offset=-1)

    async def AlterPartition(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        return self._refusal(pb.AlterPartitionResponse, leader_id=-1, leader_epoch=-1, partition_epoch=-1)

    async def ElectLeaders(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        return self._refusal(pb.ElectLeadersResponse)

    async def CreateTopics(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        return self._refusal(pb.ControllerServiceCreateTopicsResponse, metadata_offset=-1)

    async def DeleteTopics(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        return self._refusal(pb.ControllerServiceDeleteTopicsResponse, metadata_offset=-1)

    async def AlterConfigs(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        return self._refusal(pb.ControllerServiceAlterConfigsResponse, metadata_offset=-1)

    async def WatchMetadata(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await _refuse_malformed(request, context)
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"node {self._node_id} is not a voter; watch the metadata on a voter {sorted(self._voters)}",
        )
        yield  # pragma: no cover (abort raises); makes this an async generator

    async def DescribeCluster(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        image = self._image()
        controller_id, _ = self._hint_of()
        return pb.DescribeClusterResponse(
            error_code=E.ERROR_CODE_NONE,
            nodes=node_infos(image),
            controller_id=controller_id,
            answered_by=self._node_id,
            raft_term=-1,
            commit_index=-1,
            metadata_offset=image.metadata_offset,
            voters=self._voters,
            controller=self._hint(),
            cluster_id=self._cluster_id(),
        )
