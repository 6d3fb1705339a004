"""The chaos history: what the clients and the nemesis did, one JSON object a line.

The runner writes it, the checker and the report read it; nothing else passes between them (Jepsen's
split: client, nemesis, generator, checker). The contract, one line per operation:

    {"index": 0, "time_s": 1.234, "process": 3, "type": "invoke", "f": "send", "value": {...}}

- ``index``: the op's position in the history, 0, 1, 2, ... in file order.
- ``time_s``: seconds since the run started (float), read from the runner's clock.
- ``process``: the client that did it; the nemesis is process ``-1`` (``NEMESIS_PROCESS``).
- ``type``: ``invoke`` (the op starts), ``ok`` (it happened), ``fail`` (it definitely did not happen),
  ``info`` (unknown: a timeout or a broken connection).
- ``f``, with its ``value``:

  ``send``: a producer writes one record with acks=all. The invoke value is
  ``{"topic": str, "key": str, "value": str}``; ``ok`` adds ``"partition": int, "offset": int``;
  ``fail`` and ``info`` repeat the invoke value. A process has one op at a time, so each
  ``ok``/``fail``/``info`` send completes the latest ``invoke`` send of the same process. Record values
  are unique within a topic: the checker finds a write by its value.

  ``poll``: a consumer read. The invoke value is ``{"topic": str, "assignment": int}``; the ok value
  adds ``"records": [[partition, offset, key, value], ...]`` in the order they were delivered.
  ``assignment`` counts per process: a consumer that restarts from the beginning, or is re-assigned,
  takes a new number, and order is only judged within one (process, assignment, partition).

  ``final-read``: ``ok`` ops only, one or several per partition (a chunk each), with value
  ``{"topic": str, "partition": int, "records": [[partition, offset, key, value], ...],
  "complete": bool}``: the read of a partition from its beginning once every fault has healed.
  ``complete`` is true on every chunk of a read that reached the partition's end; a chunk saying
  false marks the whole partition's final read as incomplete.

  ``fault``: the nemesis, type ``info``, value ``{"kind": str, "phase": "start" | "stop",
  "nodes": [int], "detail": str}`` with kinds such as ``kill``, ``pause``, ``partition``.

A crash of the runner can leave the last line cut short: ``read_history`` skips such a line and says
so; a bad line anywhere else is an error.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, cast

__all__ = [
    "NEMESIS_PROCESS",
    "OP_FS",
    "OP_TYPES",
    "HistoryFormatError",
    "HistoryWriter",
    "LoadedHistory",
    "Op",
    "OpF",
    "OpType",
    "Send",
    "SendPairs",
    "pair_sends",
    "read_history",
    "write_history",
]

OpType = Literal["invoke", "ok", "fail", "info"]
OpF = Literal["send", "poll", "final-read", "fault"]

OP_TYPES: Final[frozenset[str]] = frozenset(("invoke", "ok", "fail", "info"))
OP_FS: Final[frozenset[str]] = frozenset(("send", "poll", "final-read", "fault"))
NEMESIS_PROCESS: Final = -1


class HistoryFormatError(ValueError):
    """A history line or a sequence of ops that breaks the contract above."""


def _int_field(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HistoryFormatError(f"op field {name!r} must be an integer, got {value!r}")
    return value


def _float_field(obj: dict[str, Any], name: str) -> float:
    value = obj.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise HistoryFormatError(f"op field {name!r} must be a number, got {value!r}")
    return float(value)


def _choice_field(obj: dict[str, Any], name: str, allowed: frozenset[str]) -> str:
    value = obj.get(name)
    if value not in allowed:
        raise HistoryFormatError(f"op field {name!r} must be one of {sorted(allowed)}, got {value!r}")
    return cast(str, value)


@dataclass(frozen=True, slots=True)
class Op:
    """One line of the history (see the module docstring for the meaning of each field)."""

    index: int
    time_s: float
    process: int
    type: OpType
    f: OpF
    value: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The op as a JSON object (a dict of plain values)."""
        return {
            "index": self.index,
            "time_s": self.time_s,
            "process": self.process,
            "type": self.type,
            "f": self.f,
            "value": self.value,
        }

    @classmethod
    def from_json(cls, obj: object) -> Op:
        """The op a JSON object describes; raises ``HistoryFormatError`` on a malformed one."""
        if not isinstance(obj, dict):
            raise HistoryFormatError(f"an op must be a JSON object, got {type(obj).__name__}")
        value = obj.get("value")
        if not isinstance(value, dict):
            raise HistoryFormatError(f"op field 'value' must be an object, got {value!r}")
        return cls(
            index=_int_field(obj, "index"),
            time_s=_float_field(obj, "time_s"),
            process=_int_field(obj, "process"),
            type=cast(OpType, _choice_field(obj, "type", OP_TYPES)),
            f=cast(OpF, _choice_field(obj, "f", OP_FS)),
            value=value,
        )


def _line(op: Op) -> str:
    return json.dumps(op.to_json(), separators=(",", ":")) + "\n"


def write_history(path: Path, ops: Iterable[Op]) -> None:
    """Write ``ops`` to ``path`` as JSON lines, replacing the file."""
    with path.open("w", encoding="utf-8") as out:
        for op in ops:
            out.write(_line(op))


@dataclass(frozen=True, slots=True)
class LoadedHistory:
    """The ops of a history file, and the cut-short last line that was skipped (None when whole)."""

    ops: list[Op]
    skipped_last_line: str | None


def read_history(path: Path) -> LoadedHistory:
    """Read a history file. A last line without its newline that does not parse is skipped and
    returned in ``skipped_last_line`` (the runner died while writing it); any other bad line, or
    an index that is not the line's position, raises ``HistoryFormatError``."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    ops = [_parse_line(line, len_before) for len_before, line in enumerate(lines)]
    skipped: str | None = None
    if tail:
        try:
            ops.append(_parse_line(tail, len(ops)))
        except HistoryFormatError:
            skipped = tail
    return LoadedHistory(ops=ops, skipped_last_line=skipped)


def _parse_line(line: str, position: int) -> Op:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise HistoryFormatError(f"line {position + 1} is not JSON: {exc}") from exc
    op = Op.from_json(obj)
    if op.index != position:
        raise HistoryFormatError(f"line {position + 1} holds index {op.index}, expected {position}")
    return op


class HistoryWriter:
    """Appends ops to a history file as they happen, one flushed line each, safe across threads.

    ``record`` gives each op the next index under the writer's lock, so the indexes follow file order
    whichever thread calls. The caller passes the time (its clock, not ours)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._file = path.open("w", encoding="utf-8")
        self._next_index = 0  # guarded by _lock; equals the number of lines written

    def record(self, *, time_s: float, process: int, type: OpType, f: OpF, value: dict[str, Any]) -> Op:
        """Build the next op, write and flush its line, and return it."""
        with self._lock:
            op = Op(index=self._next_index, time_s=time_s, process=process, type=type, f=f, value=value)
            self._write(op)
            return op

    def append(self, op: Op) -> None:
        """Write an op built by the caller; its index must be the next one."""
        with self._lock:
            if op.index != self._next_index:
                raise HistoryFormatError(f"op index {op.index} appended where {self._next_index} is next")
            self._write(op)

    def _write(self, op: Op) -> None:
        self._file.write(_line(op))
        self._file.flush()
        self._next_index += 1

    def close(self) -> None:
        """Flush and close the file."""
        with self._lock:
            self._file.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Send:
    """One send from its invoke to its completion (``done`` is the ok, fail or info op)."""

    invoke: Op
    done: Op

    @property
    def latency_s(self) -> float:
        """Seconds from invoke to completion."""
        return self.done.time_s - self.invoke.time_s


@dataclass(frozen=True, slots=True)
class SendPairs:
    """The completed sends in completion order, and the invokes that never completed."""

    completed: list[Send]
    unfinished: list[Op]


def pair_sends(ops: Iterable[Op]) -> SendPairs:
    """Match each send completion with the latest send invoke of its process.

    Raises ``HistoryFormatError`` when a process invokes a send while one is in flight, or completes
    one it never invoked."""
    pending: dict[int, Op] = {}
    completed: list[Send] = []
    for op in ops:
        if op.f != "send":
            continue
        if op.type == "invoke":
            if op.process in pending:
                raise HistoryFormatError(f"op {op.index}: process {op.process} invokes a second send")
            pending[op.process] = op
            continue
        invoke = pending.pop(op.process, None)
        if invoke is None:
            raise HistoryFormatError(f"op {op.index}: process {op.process} completes a send never invoked")
        completed.append(Send(invoke=invoke, done=op))
    return SendPairs(completed=completed, unfinished=sorted(pending.values(), key=lambda op: op.index))
