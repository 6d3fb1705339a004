"""Forwarded topic changes, made safe to resend (KIP-590's forwarding with an idempotence key).

A node forwards CreateTopics, DeleteTopics and AlterConfigs to the active controller and resends a
call whose answer does not come (a timeout, UNAVAILABLE, NOT_CONTROLLER). A topic change is not
safe to do twice: the resend of a create that committed would answer TOPIC_ALREADY_EXISTS, of a
delete UNKNOWN_TOPIC_OR_PARTITION. So:

- The forwarding node gives each forwarded request one id, ``new_request_id``, and every resend
  carries the same one (``ClusterLink.call_controller`` refuses to send a forwarded method without).
- The active controller keeps ``ForwardedAnswers``: request id -> the task handling it. A resend
  that arrives while the first is still being handled waits for the same task; one that arrives
  later gets its answer. The task is not tied to the call that started it, so a caller's timeout
  does not stop a change halfway. Bounded (``max_entries``, oldest forgotten first) and tied to one
  controller generation: a controller that lost and regained leadership starts afresh.
- The commands carry the id into the metadata log, where ``ClusterMetadata`` remembers each topic's
  first answer (``request_answer``). A controller that took over answers a resend from there, and
  a command proposed twice (the resend raced the first one's commit) changes the metadata once.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from typing import Any

from headwater.raft.metadata import MAX_REQUEST_ID_LENGTH

__all__ = ["ForwardedAnswers", "new_request_id", "FORWARDED_METHODS", "DEFAULT_MAX_FORWARDED_ANSWERS"]

# The ControllerService methods that carry a forwarded topic change and its request id.
FORWARDED_METHODS = frozenset({"CreateTopics", "DeleteTopics", "AlterConfigs"})
# Forwarded requests whose answers the active controller keeps in memory.
DEFAULT_MAX_FORWARDED_ANSWERS = 2048


def new_request_id(node_id: int) -> str:
    """A request id no other request gets: the forwarding node's id and a random UUID."""
    rid = f"{node_id}-{uuid.uuid4().hex}"
    assert len(rid) <= MAX_REQUEST_ID_LENGTH
    return rid


class ForwardedAnswers:
    """Request id -> the task that answers it, for one controller generation at a time."""

    def __init__(self, max_entries: int = DEFAULT_MAX_FORWARDED_ANSWERS) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._max_entries = max_entries
        self._generation = -1
        self._tasks: collections.OrderedDict[str, asyncio.Task[Any]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, request_id: str, generation: int) -> asyncio.Task[Any] | None:
        """The task answering ``request_id`` in this generation, unless it failed (then a resend
        is handled afresh; the metadata still holds the answers of whatever committed)."""
        self._start(generation)
        task = self._tasks.get(request_id)
        if task is not None and task.done() and (task.cancelled() or task.exception() is not None):
            del self._tasks[request_id]
            return None
        return task

    def put(self, request_id: str, generation: int, task: asyncio.Task[Any]) -> None:
        self._start(generation)
        self._tasks[request_id] = task
        while len(self._tasks) > self._max_entries:
            # An evicted task still runs to its end; a resend of it is answered from the metadata.
            self._tasks.popitem(last=False)

    def forget(self, request_id: str) -> None:
        self._tasks.pop(request_id, None)

    def _start(self, generation: int) -> None:
        if generation != self._generation:
            self._generation = generation
            self._tasks.clear()
