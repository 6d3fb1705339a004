"""The leader's ISR changes sent to the controller (Kafka's ``AlterPartitionManager``).

A partition's ``ReplicaState`` decides when its ISR should shrink (a follower that has not caught
up within ``replica_lag_time_max_ms``) or grow (a follower that reached the high watermark in this
leader epoch); ``IsrSender`` asks it and carries the proposal to the active controller as an
``AlterPartition``, then hands the answer back to the same state:

- Shrinks are found by a scan of this node's leader replicas every ``replica_lag_time_max_ms / 2``
  (Kafka's ``isr-expiration`` task); an expansion is looked for as soon as a follower outside the
  ISR fetches (``check``), so a follower that caught up joins without waiting for the scan.
- Each proposal gets a new request id (``new_request_id``) and keeps it on every resend, so the
  controller answers every copy with its first answer and a refused proposal is never applied later
  (the rule of ``ReplicaState.on_alter_partition_answer``).
- An answer goes to the replica state only if that state still leads and the proposal is still its
  pending one; newer metadata may have settled it first (``Partition.follow``).

Every committed ISR change is logged, with who left or joined, and counted (``shrinks``,
``expands``) for the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from headwater.node.forwarding import new_request_id
from headwater.node.partition import Partition
from headwater.node.replica_state import ReplicaState
from headwater.node.replicas import Replicas
from headwater.raft.commands import AlterPartition
from headwater.raft.metadata import ClusterMetadata
from headwater.v1 import controller_pb2 as cpb
from headwater.v1 import errors_pb2

__all__ = ["IsrSender"]

E = errors_pb2
log = logging.getLogger("headwater.node.isr")

# How long one AlterPartition may take, resends to other controllers included, before it is sent
# again (same request id) while the proposal is still pending.
_CALL_TIMEOUT_S = 10.0
# Pause before resending a proposal no controller answered.
_RESEND_S = 0.5

ControllerCall = Callable[[str, Any, float], Awaitable[Any]]


class IsrSender:
    """Proposes and sends the ISR changes of this node's leader replicas; see the module docstring."""

    def __init__(
        self,
        node_id: int,
        replicas: Replicas,
        *,
        image: Callable[[], ClusterMetadata],
        call_controller: ControllerCall,
        broker_epoch: Callable[[], int],
        replica_lag_time_max_ms: int,
    ) -> None:
        self.node_id = node_id
        self.replicas = replicas
        self._image = image
        self._call = call_controller
        self._broker_epoch = broker_epoch
        self.lag_ms = replica_lag_time_max_ms
        self.shrinks = 0
        self.expands = 0
        self._due: set[Partition] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def check(self, p: Partition) -> None:
        """A follower outside ``p``'s ISR fetched: look for an expansion soon."""
        self._due.add(p)
        self._wake.set()

    def start(self) -> None:
        self.replicas.isr_check = self.check
        self._task = asyncio.get_running_loop().create_task(self._run(), name="isr-sender")

    async def close(self) -> None:
        self.replicas.isr_check = lambda p: None
        tasks = [t for t in (self._task, *self._sending) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # ----------------------------------------------------------------- proposing

    async def _run(self) -> None:
        interval_s = max(0.05, self.lag_ms / 2000)
        loop = asyncio.get_running_loop()
        next_scan = loop.time() + interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_scan - loop.time()))
            self._wake.clear()
            if loop.time() >= next_scan:
                due = list(self.replicas.by_key.values())
                next_scan = loop.time() + interval_s
            else:
                due = list(self._due)
            self._due.clear()
            try:
                self.propose(due)
            except Exception:  # a bug here must not end ISR management for the node
                log.exception("proposing ISR changes failed")

    def propose(self, partitions: list[Partition]) -> None:
        """Ask each leader replica's state for a change and send any it proposes."""
        now_ms = self.replicas.now_ms()
        ineligible = self._ineligible()
        epoch = self._broker_epoch()
        if epoch < 0:
            return
        for p in partitions:
            state = p.state
            if state is None or state.resigned or state.pending is not None:
                continue
            state.broker_epoch = epoch
            proposal = state.propose_isr_change(
                now_ms, self.lag_ms, ineligible=ineligible, request_id=new_request_id(self.node_id)
            )
            if proposal is not None:
                out = [r for r in state.isr if r not in proposal.new_isr]
                add = [r for r in proposal.new_isr if r not in state.isr]
                log.info(
                    "%s-%d: proposing ISR %s (was %s%s%s)",
                    p.topic,
                    p.index,
                    list(proposal.new_isr),
                    list(state.isr),
                    f"; {out} not caught up within {self.lag_ms} ms" if out else "",
                    f"; {add} caught up" if add else "",
                )
                task = asyncio.get_running_loop().create_task(self._send(p, state, proposal))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    def _ineligible(self) -> set[int]:
        """Nodes the metadata says may not join an ISR: fenced (a node not registered has no fetch
        accepted, so never qualifies)."""
        return {n for n, info in self._image().nodes.items() if info.fenced}

    # ----------------------------------------------------------------- sending

    async def _send(self, p: Partition, state: ReplicaState, proposal: AlterPartition) -> None:
        request = cpb.AlterPartitionRequest(
            topic_id=proposal.topic_id,
            partition=proposal.partition,
            leader_id=proposal.leader_id,
            broker_epoch=proposal.broker_epoch,
            leader_epoch=proposal.leader_epoch,
            partition_epoch=proposal.partition_epoch,
            new_isr=list(proposal.new_isr),
            request_id=proposal.request_id,
        )
        before = state.isr
        try:
            while p.state is state and state.pending is proposal:
                resp = await self._call("AlterPartition", request, _CALL_TIMEOUT_S)
                if p.state is not state or state.pending is not proposal:
                    return  # newer metadata settled it, or the leadership ended
                if resp is None:
                    await asyncio.sleep(_RESEND_S)
                    continue
                p.settle(
                    state.on_alter_partition_answer(
                        proposal,
                        resp.error_code,
                        isr=tuple(resp.isr),
                        leader_epoch=resp.leader_epoch,
                        partition_epoch=resp.partition_epoch,
                    )
                )
                if resp.error_code != E.ERROR_CODE_NONE:
                    log.info(
                        "%s-%d: ISR change to %s refused: %s (%s)",
                        p.topic,
                        p.index,
                        list(proposal.new_isr),
                        E.ErrorCode.Name(resp.error_code),
                        resp.error_message,
                    )
                return
        finally:
            if p.state is state and state.isr != before:
                self._committed(p, before, state.isr)

    def _committed(self, p: Partition, before: tuple[int, ...], after: tuple[int, ...]) -> None:
        out = [r for r in before if r not in after]
        add = [r for r in after if r not in before]
        if out:
            self.shrinks += 1
        if add:
            self.expands += 1
        log.info(
            "%s-%d: ISR %s -> %s%s%s",
            p.topic,
            p.index,
            list(before),
            list(after),
            f" (shrank: {out} out)" if out else "",
            f" (expanded: {add} in)" if add else "",
        )
