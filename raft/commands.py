"""The metadata quorum's commands: small, plain, deterministic records that carry the epochs they expect.

Each command is one entry of the metadata log (Kafka's metadata records, KIP-631). They hold only
ints, strings, bytes, bools and tuples of those, so every voter applies the same value, and
``encode_command``/``decode_command`` give a versioned JSON form for the log that never pickles a
live object. ``ClusterMetadata.apply`` still checks each field's type: a malformed command is refused
(``INVALID_REQUEST``), never a crash on every voter at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "Command",
    "RegisterNode",
    "FenceNode",
    "UnfenceNode",
    "CreateTopic",
    "DeleteTopic",
    "AlterPartition",
    "ElectLeader",
    "AlterConfigs",
    "AllocateProducerIds",
    "COMMAND_TYPES",
    "COMMAND_ENCODING_VERSION",
    "encode_command",
    "decode_command",
    "malformed_reason",
    "NO_LEADER",
]

# Leader id of a partition with no leader (offline), and "the controller's choice" in ElectLeader.
NO_LEADER = -1


@dataclass(frozen=True, slots=True)
class RegisterNode:
    """A node (re)starts. A new ``incarnation_id`` gets a new ``broker_epoch``; the node starts fenced."""

    node_id: int
    incarnation_id: bytes
    host: str
    port: int
    rack: str = ""


@dataclass(frozen=True, slots=True)
class FenceNode:
    """The controller fences a node whose lease ran out (or that asked to stop), for this broker epoch."""

    node_id: int
    broker_epoch: int


@dataclass(frozen=True, slots=True)
class UnfenceNode:
    """A registered node has caught up with the metadata and may lead and join ISRs again."""

    node_id: int
    broker_epoch: int


@dataclass(frozen=True, slots=True)
class CreateTopic:
    """A topic with its replica assignment already decided (``assignments[p]`` = replicas of p)."""

    name: str
    topic_id: bytes
    assignments: tuple[tuple[int, ...], ...]
    configs: tuple[tuple[str, str], ...] = ()
    # The forwarded request this came from ("" for none): a resend gets the first answer.
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class DeleteTopic:
    """Delete a topic; the id guards against deleting a newer topic of the same name."""

    name: str
    topic_id: bytes
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class AlterPartition:
    """A partition leader's compare-and-set of its ISR (Kafka's AlterPartition, KIP-497/KIP-841)."""

    topic_id: bytes
    partition: int
    leader_id: int
    broker_epoch: int
    leader_epoch: int
    partition_epoch: int
    new_isr: tuple[int, ...]
    # The leader's id for this proposal ("" for none), kept on every resend of it: a copy that
    # reaches the controller later gets the first answer and changes nothing, so a leader may drop
    # a refused change (``ClusterMetadata``'s remembered answers).
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class ElectLeader:
    """Move leadership to ``new_leader``, or to the controller's choice (preferred first) when -1."""

    topic_id: bytes
    partition: int
    new_leader: int
    expected_leader_epoch: int
    allow_unclean: bool = False


@dataclass(frozen=True, slots=True)
class AlterConfigs:
    """Set and delete topic configs (incremental, like Kafka's IncrementalAlterConfigs)."""

    name: str
    set: tuple[tuple[str, str], ...] = ()
    delete: tuple[str, ...] = ()
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class AllocateProducerIds:
    """Hand a node the next block of producer ids (KIP-730)."""

    node_id: int
    broker_epoch: int
    block_size: int


Command = (
    RegisterNode
    | FenceNode
    | UnfenceNode
    | CreateTopic
    | DeleteTopic
    | AlterPartition
    | ElectLeader
    | AlterConfigs
    | AllocateProducerIds
)

COMMAND_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        RegisterNode,
        FenceNode,
        UnfenceNode,
        CreateTopic,
        DeleteTopic,
        AlterPartition,
        ElectLeader,
        AlterConfigs,
        AllocateProducerIds,
    )
}

# The kind of each field; checked on apply and used by the JSON encoding.
_SHAPES: dict[type[Any], dict[str, str]] = {
    RegisterNode: {"node_id": "int", "incarnation_id": "bytes", "host": "str", "port": "int", "rack": "str"},
    FenceNode: {"node_id": "int", "broker_epoch": "int"},
    UnfenceNode: {"node_id": "int", "broker_epoch": "int"},
    CreateTopic: {
        "name": "str",
        "topic_id": "bytes",
        "assignments": "intss",
        "configs": "pairs",
        "request_id": "str",
    },
    DeleteTopic: {"name": "str", "topic_id": "bytes", "request_id": "str"},
    AlterPartition: {
        "topic_id": "bytes",
        "partition": "int",
        "leader_id": "int",
        "broker_epoch": "int",
        "leader_epoch": "int",
        "partition_epoch": "int",
        "new_isr": "ints",
        "request_id": "str",
    },
    ElectLeader: {
        "topic_id": "bytes",
        "partition": "int",
        "new_leader": "int",
        "expected_leader_epoch": "int",
        "allow_unclean": "bool",
    },
    AlterConfigs: {"name": "str", "set": "pairs", "delete": "strs", "request_id": "str"},
    AllocateProducerIds: {"node_id": "int", "broker_epoch": "int", "block_size": "int"},
}

# Fields added after commands were first logged: an entry written before them decodes to the default.
_ADDED_LATER: dict[type[Any], dict[str, Any]] = {
    CreateTopic: {"request_id": ""},
    DeleteTopic: {"request_id": ""},
    AlterConfigs: {"request_id": ""},
    AlterPartition: {"request_id": ""},
}

# Plain ints in the metadata stay within a signed 64-bit range, as they will on the wire.
_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1


def _is_int(v: object) -> bool:
    return type(v) is int and _INT_MIN <= v <= _INT_MAX


def _kind_ok(kind: str, v: object) -> bool:
    if kind == "int":
        return _is_int(v)
    if kind == "bool":
        return type(v) is bool
    if kind == "str":
        return type(v) is str
    if kind == "bytes":
        return type(v) is bytes
    if kind == "ints":
        return type(v) is tuple and all(_is_int(x) for x in v)
    if kind == "intss":
        return type(v) is tuple and all(_kind_ok("ints", x) for x in v)
    if kind == "strs":
        return type(v) is tuple and all(type(x) is str for x in v)
    if kind == "pairs":
        return type(v) is tuple and all(
            type(x) is tuple and len(x) == 2 and type(x[0]) is str and type(x[1]) is str for x in v
        )
    raise AssertionError(f"unknown field kind {kind}")


def malformed_reason(cmd: object) -> str:
    """Why ``cmd`` is not a well-formed command, or ``""`` when it is."""
    shape = _SHAPES.get(type(cmd))
    if shape is None:
        return f"unknown command type {type(cmd).__name__}"
    for name, kind in shape.items():
        if not _kind_ok(kind, getattr(cmd, name)):
            return f"{type(cmd).__name__}.{name} is not a valid {kind}"
    return ""


COMMAND_ENCODING_VERSION = 1


def _to_json(kind: str, v: Any) -> Any:
    if kind == "bytes":
        return v.hex()
    if kind in ("ints", "strs"):
        return list(v)
    if kind in ("intss", "pairs"):
        return [list(x) for x in v]
    return v


def _from_json(kind: str, v: Any) -> Any:
    if kind == "bytes":
        if type(v) is not str:
            raise ValueError("bytes field is not a hex string")
        return bytes.fromhex(v)
    if kind in ("ints", "strs"):
        if type(v) is not list:
            raise ValueError("list field is not a list")
        return tuple(v)
    if kind in ("intss", "pairs"):
        if type(v) is not list or not all(type(x) is list for x in v):
            raise ValueError("nested list field is not a list of lists")
        return tuple(tuple(x) for x in v)
    return v


def encode_command(cmd: Command) -> bytes:
    """Compact, versioned JSON of one command, for the metadata log."""
    reason = malformed_reason(cmd)
    if reason:
        raise ValueError(reason)
    shape = _SHAPES[type(cmd)]
    body = {name: _to_json(kind, getattr(cmd, name)) for name, kind in shape.items()}
    doc = {"v": COMMAND_ENCODING_VERSION, "type": type(cmd).__name__, "fields": body}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode_command(raw: bytes) -> Command:
    """The command ``encode_command`` wrote; raises ValueError on anything else."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"command is not JSON: {e}") from None
    if type(doc) is not dict or doc.get("v") != COMMAND_ENCODING_VERSION:
        raise ValueError("command has no known encoding version")
    cls = COMMAND_TYPES.get(doc.get("type"))  # type: ignore[arg-type]
    body = doc.get("fields")
    if cls is None or type(body) is not dict:
        raise ValueError("command has no known type")
    shape = _SHAPES[cls]
    added = _ADDED_LATER.get(cls, {})
    if not set(shape) - set(added) <= set(body) <= set(shape):
        raise ValueError(f"{cls.__name__} fields are {sorted(shape)}, got {sorted(body)}")
    values = {name: added[name] for name in shape if name not in body}
    values.update({name: _from_json(kind, body[name]) for name, kind in shape.items() if name in body})
    cmd = cls(**values)
    reason = malformed_reason(cmd)
    if reason:
        raise ValueError(reason)
    assert [f.name for f in fields(cls)] == list(shape)
    return cmd  # type: ignore[no-any-return]
