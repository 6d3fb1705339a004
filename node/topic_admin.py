"""Topic changes on the active controller: CreateTopics, DeleteTopics and AlterConfigs requests.

Any node takes these requests from clients and forwards them to the active controller (KIP-590);
here the controller checks each topic against its node settings (bounds, defaults, a batch that
must fit a gRPC message), then commits one metadata command per topic. Each answer names the
metadata offset of the last command it committed, so the forwarding node can answer once its own
image has it.
"""

from __future__ import annotations

import logging
from typing import cast

from headwater.config import (
    REQUEST_OVERHEAD_BYTES,
    TOPIC_CONFIGS,
    ConfigError,
    NodeConfig,
    normalize_config_name,
    validate_topic_configs,
)
from headwater.node.controller import ControllerRuntime, Outcome
from headwater.raft.metadata import topic_name_problem
from headwater.v1 import client_pb2 as pb
from headwater.v1 import errors_pb2

__all__ = ["create_topics", "delete_topics", "alter_configs", "check_topic_configs"]

E = errors_pb2
log = logging.getLogger("headwater.node.controller")
# num_partitions and replication_factor values that ask for the node's default.
_DEFAULT = (0, -1)


def check_topic_configs(configs: dict[str, str], config: NodeConfig) -> dict[str, str]:
    """Topic configs valid on their own and on this cluster: a batch must fit in a gRPC message."""
    out = validate_topic_configs(configs)
    limit = config.max_request_bytes - REQUEST_OVERHEAD_BYTES
    if "max_message_bytes" in out and int(out["max_message_bytes"]) > limit:
        raise ConfigError(
            f"topic config max_message_bytes: {out['max_message_bytes']} is above {limit} "
            "(the node's max_request_bytes less room for the request around the batch)"
        )
    return out


def _warn_unclean(name: str, configs: dict[str, str]) -> None:
    if configs.get("unclean_leader_election_enable") == "true":
        log.warning(
            "topic %s allows UNCLEAN leader election: a replica that was not in sync may become leader "
            "and acknowledged records may be lost",
            name,
        )


_Answered = pb.CreatableTopicResult | pb.DeletableTopicResult | pb.AlterConfigsResult


def _offset(o: Outcome, last: int) -> int:
    return max(last, o.result.metadata_offset) if o.result is not None else last


def _shape(
    t: pb.CreatableTopic, config: NodeConfig, registered: int
) -> tuple[int, int, tuple[tuple[int, ...], ...] | None, str]:
    """Partition count, replication factor and explicit assignments of a topic, or why they are bad.

    0 (what proto3 sends for a field left out) and -1 both mean the node's default: no topic has 0
    partitions or 0 replicas (client.proto). The default replication factor is capped by the
    ``registered`` nodes, so a cluster smaller than the default still creates topics."""
    if t.replication_factor in _DEFAULT:
        rf = min(config.default_replication_factor, max(1, registered))
    else:
        rf = t.replication_factor
    if t.assignments:
        by_partition = {a.partition: tuple(a.replicas) for a in t.assignments}
        n = len(by_partition)
        if len(t.assignments) != n or set(by_partition) != set(range(n)):
            return n, rf, None, "assignments must name partitions 0..n-1 once each"
        if t.num_partitions not in (*_DEFAULT, n):
            return n, rf, None, f"num_partitions={t.num_partitions} disagrees with {n} assignments"
        return n, len(by_partition[0]), tuple(by_partition[i] for i in range(n)), ""
    partitions = config.default_num_partitions if t.num_partitions in _DEFAULT else t.num_partitions
    return partitions, rf, None, ""


def _first_answer(runtime: ControllerRuntime, request_id: str, name: str, r: _Answered) -> int | None:
    """A resend of a forwarded request: fill ``r`` with the first answer to topic ``name`` and
    return its metadata offset, or None when the metadata remembers none (forwarding.py)."""
    first = runtime.quorum.metadata.request_answer(request_id, name)
    if first is None:
        return None
    r.error_code, r.error_message = cast(errors_pb2.ErrorCode, first.error_code), first.message
    if first.topic_id and not isinstance(r, pb.AlterConfigsResult):
        r.topic_id = first.topic_id
    return first.metadata_offset


async def create_topics(
    runtime: ControllerRuntime, config: NodeConfig, req: pb.CreateTopicsRequest, *, request_id: str = ""
) -> tuple[pb.CreateTopicsResponse, int]:
    resp = pb.CreateTopicsResponse()
    last = -1
    seen: set[str] = set()
    # Partitions the request would create: topics whose own count is out of range are refused for
    # that alone, and do not count against the others.
    registered = len(runtime.quorum.metadata.nodes)
    counts = [_shape(t, config, registered)[0] for t in req.topics]
    requested = sum(n for n in counts if 1 <= n <= config.max_partitions_per_topic)
    for t in req.topics:
        r = resp.topics.add(name=t.name)
        partitions, rf, assignments, bad_assignment = _shape(t, config, registered)
        r.num_partitions, r.replication_factor = partitions, rf
        if (first := _first_answer(runtime, request_id, t.name, r)) is not None:
            last = max(last, first)
            continue
        code, msg = E.ERROR_CODE_NONE, ""
        problem = topic_name_problem(t.name)
        if problem:
            code, msg = E.ERROR_CODE_INVALID_TOPIC, problem
        elif t.name in seen:
            code, msg = E.ERROR_CODE_INVALID_REQUEST, f"topic {t.name} appears twice in the request"
        elif bad_assignment:
            code, msg = E.ERROR_CODE_INVALID_REPLICA_ASSIGNMENT, bad_assignment
        elif runtime.quorum.metadata.topic(t.name) is not None:
            code, msg = E.ERROR_CODE_TOPIC_ALREADY_EXISTS, f"topic {t.name} already exists"
        elif len(runtime.quorum.metadata.topics) >= config.max_topics:
            code, msg = E.ERROR_CODE_POLICY_VIOLATION, f"the cluster holds max_topics={config.max_topics}"
        elif not 1 <= partitions <= config.max_partitions_per_topic:
            code, msg = (
                E.ERROR_CODE_INVALID_PARTITIONS,
                f"partition count must be 1..{config.max_partitions_per_topic}, got {partitions}",
            )
        elif requested > config.max_partitions_per_request:
            code, msg = (
                E.ERROR_CODE_POLICY_VIOLATION,
                f"the request would create {requested} partitions; one request may create at most "
                f"max_partitions_per_request={config.max_partitions_per_request}",
            )
        elif rf < 1:
            code, msg = E.ERROR_CODE_INVALID_REPLICATION_FACTOR, f"replication factor must be >= 1, got {rf}"
        seen.add(t.name)
        configs: dict[str, str] = {}
        if code == E.ERROR_CODE_NONE:
            try:
                configs = check_topic_configs(dict(t.configs), config)
            except ConfigError as e:
                code, msg = E.ERROR_CODE_INVALID_CONFIG, str(e)
        if code == E.ERROR_CODE_NONE:
            o = await runtime.create_topic(
                t.name,
                partitions,
                rf,
                sorted(configs.items()),
                assignments=assignments,
                validate_only=req.validate_only,
                request_id=request_id,
            )
            code, msg = cast(errors_pb2.ErrorCode, o.error_code), o.message
            last = _offset(o, last)
            if o.ok and not req.validate_only:
                _warn_unclean(t.name, configs)
                record = runtime.quorum.metadata.topic(t.name)
                if record is not None:
                    r.topic_id = record.topic_id
        r.error_code, r.error_message = code, msg
    return resp, last


async def delete_topics(
    runtime: ControllerRuntime, req: pb.DeleteTopicsRequest, *, request_id: str = ""
) -> tuple[pb.DeleteTopicsResponse, int]:
    resp = pb.DeleteTopicsResponse()
    last = -1
    for name in req.names:
        r = resp.topics.add(name=name)
        if (first := _first_answer(runtime, request_id, name, r)) is not None:
            last = max(last, first)
            continue
        record = runtime.quorum.metadata.topic(name)
        if record is not None:
            r.topic_id = record.topic_id
        o = await runtime.delete_topic(name, request_id=request_id)
        last = _offset(o, last)
        r.error_code, r.error_message = o.error_code, o.message
    return resp, last


async def alter_configs(
    runtime: ControllerRuntime, config: NodeConfig, req: pb.AlterConfigsRequest, *, request_id: str = ""
) -> tuple[pb.AlterConfigsResponse, int]:
    resp = pb.AlterConfigsResponse()
    last = -1
    for res in req.resources:
        r = resp.results.add(resource_type=res.resource_type, resource_name=res.resource_name)
        if res.resource_type == pb.RESOURCE_TYPE_TOPIC and not req.validate_only:
            if (first := _first_answer(runtime, request_id, res.resource_name, r)) is not None:
                last = max(last, first)
                continue
        if res.resource_type != pb.RESOURCE_TYPE_TOPIC:
            r.error_code = E.ERROR_CODE_INVALID_REQUEST
            r.error_message = (
                "resource_type is required: RESOURCE_TYPE_TOPIC (only topic configs can be altered)"
                if res.resource_type == pb.RESOURCE_TYPE_UNKNOWN
                else "only topic configs can be altered; node settings come from its config"
            )
            continue
        record = runtime.quorum.metadata.topic(res.resource_name)
        if record is None:
            r.error_code = E.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
            r.error_message = f"topic {res.resource_name!r} does not exist"
            continue
        merged = dict(record.configs)
        set_: dict[str, str] = {}
        delete: list[str] = []
        try:
            for c in res.configs:
                name = normalize_config_name(c.name)
                if name not in TOPIC_CONFIGS:
                    raise ConfigError(f"unknown topic config {c.name!r}")
                if c.op == pb.ALTER_CONFIG_OP_DELETE:
                    merged.pop(name, None)
                    set_.pop(name, None)
                    delete.append(name)
                elif c.op == pb.ALTER_CONFIG_OP_SET:
                    merged[name] = c.value
                    set_[name] = c.value
                    if name in delete:
                        delete.remove(name)
                else:
                    raise ConfigError(f"unknown operation {c.op} for {c.name}")
            check_topic_configs(merged, config)
        except ConfigError as e:
            r.error_code, r.error_message = E.ERROR_CODE_INVALID_CONFIG, str(e)
            continue
        if req.validate_only:
            continue
        o = await runtime.alter_configs(
            record.name, sorted(set_.items()), sorted(set(delete)), request_id=request_id
        )
        last = _offset(o, last)
        if o.ok:
            _warn_unclean(record.name, set_)
        r.error_code, r.error_message = o.error_code, o.message
    return resp, last
