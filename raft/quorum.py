"""The quorum binding: ``ClusterMetadata`` replicated by pysyncobj (Raft) across the voters.

``MetadataQuorum`` runs one voter. Its Raft log holds encoded commands (``encode_command``: versioned
JSON, plain data, never a pickle of a live object); every voter applies each committed entry to its
own ``ClusterMetadata``, so all voters hold the same state at the same metadata offset.

Rules of this binding:

- **Secret and address.** pysyncobj unpickles what it reads from its port, so it always runs with the
  cluster secret (its ``password``: every message is Fernet-encrypted, a message that does not
  decrypt closes the connection before anything is unpickled) and binds only this voter's own Raft
  address, never ``0.0.0.0``. The secret is handed to pysyncobj and dropped: it is not kept on this
  object, in its ``repr``, its ``status()`` or any log line.
- **A bounded Raft port.** pysyncobj runs on ``transport.BoundedTransport``: same wire format, but a
  stranger's frame may announce a few KiB at most, one connection is read a bounded amount per poll
  event, and a connection that does not authenticate within ``auth_timeout_s`` or goes idle is
  closed on the tick. A stranger cannot freeze the tick thread that runs Raft.
- **Leader only.** ``propose`` raises ``NotLeaderError(leader_id)`` on a voter that is not the Raft
  leader instead of letting pysyncobj forward the command: the active controller is the Raft
  leader, and a voter that is not must not act (KIP-631). A leadership change in the ~50 ms between
  that check and pysyncobj's tick can still forward one queued command to the new leader; commands
  carry the epochs they expect, so the state machine refuses a stale decision either way.
- **Threads.** pysyncobj applies entries, runs the dump serializer and calls every callback on its
  own tick thread. ``metadata`` is copy-on-write: each apply works on a shallow copy (the records
  inside are frozen) and then publishes it with one reference swap, so a reader on any thread gets
  a consistent ``ClusterMetadata`` that never changes under it, without a lock. Treat it as
  read-only. ``on_applied`` and ``on_snapshot_loaded`` run on the tick thread: keep them short and
  hand work to your own thread or loop (``loop.call_soon_threadsafe``). An exception they raise is
  logged and swallowed, because pysyncobj would re-apply an entry whose callback raised.
- **Persistence.** Every entry goes to ``<data_dir>/raft.wal`` (``journal.SyncedJournal``: written
  with ``pwrite`` into preallocated space and fdatasynced before the entry is acknowledged), with
  term, vote and commit index in ``raft.wal.meta`` (two checksummed slots, synced before a vote).
  Log compaction writes ``raft.dump``: this module's own JSON (``ClusterMetadata.to_snapshot`` plus
  the two log entries pysyncobj keeps beside it), fsynced, and its rename made durable before the
  journal forgets the entries it covers. A restart loads the dump, then replays the journal (the
  entries after the dump are kept even when the process died before compacting). Followers that
  fall behind the compacted log receive the same dump from the leader, synced before it is used.
- **Outcomes.** ``propose`` returns the ``Result`` of the committed command (rejected commands are
  committed too; ``Result.ok`` says which). ``NotLeaderError`` means the command was not appended;
  ``QuorumTimeoutError`` and ``OutcomeUnknownError`` mean it may or may not commit later (a Jepsen
  ``info``): re-read the metadata before retrying.

Errors (``code`` is the proto ``ErrorCode``; ``retriable`` whether the same call can succeed later)::

    QuorumError(message, code, retriable)
    +-- NotLeaderError(leader_id)     this voter is not the leader; not appended (NOT_CONTROLLER)
    +-- QuorumTimeoutError            no outcome within timeout_s; may still commit (REQUEST_TIMED_OUT)
    +-- OutcomeUnknownError           leadership changed while in flight; may have committed
    +-- QuorumBusyError               max_pending_proposals reached; not appended
    +-- QuorumClosedError             close() was called (not retriable on this object)
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import pysyncobj.syncobj as _pysyncobj_module
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.journal import MemoryJournal

from headwater.v1 import errors_pb2

from .commands import Command, decode_command, encode_command
from .journal import SyncedJournal, fsync_dir
from .metadata import ClusterMetadata, Result
from .transport import TransportLimits, bounded_transport_class

__all__ = [
    "MetadataQuorum",
    "QuorumSettings",
    "QuorumError",
    "NotLeaderError",
    "QuorumTimeoutError",
    "OutcomeUnknownError",
    "QuorumBusyError",
    "QuorumClosedError",
    "parse_voters",
    "DUMP_FORMAT",
    "DUMP_VERSION",
]

logger = logging.getLogger(__name__)

E = errors_pb2
DUMP_FORMAT = "headwater-raft-dump"
DUMP_VERSION = 1
JOURNAL_FILE = "raft.wal"
# Free space below which the active controller refuses new commands (the journal keeps its own
# reserve on top, so entries already accepted still land).
MIN_FREE_BYTES = 4 * 1024 * 1024
DUMP_FILE = "raft.dump"
LOCK_FILE = "raft.lock"


# ---------------------------------------------------------------------------------------- errors


class QuorumError(Exception):
    """Root of the quorum binding's errors; ``code`` is a proto ``ErrorCode``."""

    def __init__(self, message: str, code: int = E.ERROR_CODE_UNKNOWN_SERVER_ERROR, retriable: bool = False):
        super().__init__(message)
        self.code = code
        self.retriable = retriable


class NotLeaderError(QuorumError):
    """This voter is not the Raft leader; ``leader_id`` is the one it knows of, or None."""

    def __init__(self, leader_id: int | None):
        where = "no leader is known" if leader_id is None else f"the leader is node {leader_id}"
        super().__init__(
            f"this voter is not the active controller; {where}", E.ERROR_CODE_NOT_CONTROLLER, True
        )
        self.leader_id = leader_id


class QuorumTimeoutError(QuorumError):
    """No outcome within the timeout. The command may still commit later."""

    def __init__(self, timeout_s: float):
        super().__init__(
            f"no outcome within {timeout_s}s; the command may still commit",
            E.ERROR_CODE_REQUEST_TIMED_OUT,
            True,
        )


class OutcomeUnknownError(QuorumError):
    """Leadership changed while the command was in flight; it may or may not have committed."""

    def __init__(self, detail: str):
        super().__init__(f"outcome unknown: {detail}", E.ERROR_CODE_NOT_CONTROLLER, True)


class QuorumBusyError(QuorumError):
    """Too many proposals are waiting for their outcome; nothing was appended."""

    def __init__(self, limit: int):
        super().__init__(f"{limit} proposals already in flight", E.ERROR_CODE_REQUEST_TIMED_OUT, True)


class QuorumClosedError(QuorumError):
    """The quorum binding was closed."""

    def __init__(self) -> None:
        super().__init__("the metadata quorum is closed", E.ERROR_CODE_NOT_CONTROLLER, False)


# -------------------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class QuorumSettings:
    """Raft timing and bounds. pysyncobj requires ``raft_min_timeout_s > 3 * append_entries_period_s``
    and ``connection_timeout_s >= raft_max_timeout_s``."""

    # A follower that hears no leader for a random time in [min, max] starts an election.
    raft_min_timeout_s: float = 0.4
    raft_max_timeout_s: float = 1.4
    # Leader heartbeat (empty append_entries) period.
    append_entries_period_s: float = 0.1
    # A peer connection that reads nothing for this long is dropped (checked on every tick).
    connection_timeout_s: float = 3.5
    # How often to redial a voter that is down (pysyncobj's default of 5 s slows a rejoin).
    connection_retry_s: float = 1.0
    # A leader that hears from no majority for this long steps down (pysyncobj's default is 30 s,
    # which would leave a partitioned controller believing it leads for half a minute).
    leader_fallback_timeout_s: float = 2.0
    # Compact the log into raft.dump past this many entries, or this long after the last dump.
    log_compaction_min_entries: int = 5000
    log_compaction_min_time_s: float = 300.0
    # Proposals waiting for an outcome on this voter (and the size of pysyncobj's command queue).
    max_pending_proposals: int = 1024
    # False: send each command to the followers at once (lower latency, what metadata wants);
    # True: let pysyncobj batch them every append_entries_period_s.
    append_entries_use_batch: bool = False
    # Bind attempts, one a second, before the constructor gives up on a busy port.
    bind_attempts: int = 5
    # The Raft port's bounds (transport.py). "Authenticated": a message on the connection decrypted
    # with the cluster secret and carried this side's handshake key.
    # A connection that is not authenticated this long after it opened is closed.
    auth_timeout_s: float = 3.0
    # Accepted connections waiting to authenticate; one more closes the oldest of them.
    max_unauthenticated_connections: int = 64
    raft_listen_backlog: int = 128
    # Largest frame before authentication: the handshake's frames are ~230-340 bytes framed.
    max_frame_bytes_before_auth: int = 4 * 1024
    # Largest frame after it. pysyncobj (appendEntriesBatchSizeBytes, logCompactionBatchSize) sends
    # append_entries batches of 64 KiB of entries plus the entry that crosses that mark, and a lone
    # entry of 64 KiB or more, like a dump transfer, in 64 KiB chunks (~104 KiB a frame once
    # pickled, compressed and encrypted). The largest command, a CreateTopic of 100 000 partitions
    # of five replicas, is ~2.7 MB of JSON (~0.5 MB framed). 16 MiB is far above all of them.
    max_frame_bytes: int = 16 * 1024 * 1024
    # Bytes read from one connection per poll event before the tick thread moves on.
    max_read_bytes_per_event: int = 256 * 1024
    # At most one warning per this interval for connections closed for breaking a bound.
    bound_warning_interval_s: float = 10.0

    def transport_limits(self) -> TransportLimits:
        """The bounds above, for the transport."""
        return TransportLimits(
            max_frame_bytes_before_auth=self.max_frame_bytes_before_auth,
            max_frame_bytes=self.max_frame_bytes,
            max_read_bytes_per_event=self.max_read_bytes_per_event,
            auth_timeout_s=self.auth_timeout_s,
            idle_timeout_s=self.connection_timeout_s,
            max_unauthenticated_connections=self.max_unauthenticated_connections,
            listen_backlog=self.raft_listen_backlog,
            warning_interval_s=self.bound_warning_interval_s,
        )


# ------------------------------------------------------------------------------------ voters


def _check_address(address: str) -> str:
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"raft address {address!r} is not host:port")
    if "[" in host or ":" in host:
        raise ValueError(f"raft address {address!r}: IPv6 literals are not supported, use a host name")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"raft address {address!r}: port must be 1-65535")
    return f"{host}:{int(port_text)}"


def parse_voters(text: str) -> dict[int, str]:
    """``"1@10.0.0.1:9201,2@10.0.0.2:9201"`` -> ``{1: "10.0.0.1:9201", 2: "10.0.0.2:9201"}``.

    Raises ValueError naming the bad entry: no ``@``, an id that is not a non-negative integer, an
    address that is not ``host:port``, or a repeated id or address.
    """
    voters: dict[int, str] = {}
    entries = [e.strip() for e in text.split(",")]
    if not text.strip():
        raise ValueError("voters is empty; expected id@host:port[,id@host:port...]")
    for entry in entries:
        id_text, sep, address = entry.partition("@")
        if not sep:
            raise ValueError(f"voter {entry!r} is not id@host:port")
        id_text = id_text.strip()
        if not id_text.isdigit():
            raise ValueError(f"voter {entry!r}: id must be a non-negative integer")
        node_id = int(id_text)
        if node_id in voters:
            raise ValueError(f"voter id {node_id} appears twice")
        address = _check_address(address.strip())
        if address in voters.values():
            raise ValueError(f"raft address {address} appears twice")
        voters[node_id] = address
    return voters


# ------------------------------------------------------------------------- the SyncObj inside


# pysyncobj builds its journal with a module-level factory; ours writes with pwrite and syncs
# (see journal.py). The journals it builds are kept here by path until their voter takes them.
_JOURNALS: dict[str, SyncedJournal] = {}
_JOURNALS_LOCK = threading.Lock()


def _create_journal(path: str | None = None) -> Any:
    if path is None:
        return MemoryJournal()
    journal = SyncedJournal(path)
    with _JOURNALS_LOCK:
        _JOURNALS[path] = journal
    return journal


_pysyncobj_module.createJournal = _create_journal


class _DropMatchedTruncationNotice(logging.Filter):
    """pysyncobj logs CRITICAL "truncating already-applied log entries" whenever an append overlaps
    entries a follower holds; our journal keeps matching entries (journal.py) and logs a real
    conflict itself, so the notice is noise that would bury real warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("truncating already-applied log entries")


logging.getLogger(_pysyncobj_module.__name__).addFilter(_DropMatchedTruncationNotice())


class _Raft(SyncObj):  # type: ignore[misc]
    """The pysyncobj object. Its one replicated method carries encoded command bytes only."""

    def __init__(
        self,
        apply: Callable[[object], tuple[Any, ...]],
        self_address: str,
        others: list[str],
        conf: SyncObjConf,
        limits: TransportLimits,
    ):
        # Set before SyncObj.__init__: its tick thread may apply journal entries at once.
        self._headwater_apply = apply
        super().__init__(self_address, others, conf, transportClass=bounded_transport_class(limits))

    @replicated  # type: ignore[untyped-decorator]
    def apply_encoded(self, raw: bytes) -> tuple[Any, ...]:
        return self._headwater_apply(raw)


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """Stands in for a log entry that is not a command; ``ClusterMetadata.apply`` refuses it."""


_UNDECODABLE = _Undecodable()


def _entry_to_json(entry: Any) -> list[Any]:
    command, idx, term = entry
    return [bytes(command).hex(), int(idx), int(term)]


def _entry_from_json(doc: Any) -> tuple[bytes, int, int]:
    if type(doc) is not list or len(doc) != 3 or type(doc[0]) is not str:
        raise ValueError("dump entry is not [hex, index, term]")
    if type(doc[1]) is not int or type(doc[2]) is not int:
        raise ValueError("dump entry index and term must be integers")
    return bytes.fromhex(doc[0]), doc[1], doc[2]


_NOT_APPENDED = {FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER, FAIL_REASON.DISCARDED}
_Deliver = Callable[[Result | None, QuorumError | None], None]


# ------------------------------------------------------------------------------ the binding


class MetadataQuorum:
    """One metadata-quorum voter: pysyncobj Raft over ``ClusterMetadata``.

    ``voters`` maps every voter's node id to its Raft ``host:port`` (the same map on every voter;
    membership is static). ``data_dir`` holds the journal, the dump and a lock file (one voter per
    directory). ``secret`` is the cluster secret; it is required.

    Construct it on a thread that outlives it (the main thread, or the node's loop thread):
    pysyncobj stops ticking when the thread that created it exits. The constructor blocks until the
    Raft port is bound (up to ``settings.bind_attempts`` seconds) and raises QuorumError otherwise.
    """

    def __init__(
        self,
        node_id: int,
        voters: Mapping[int, str],
        data_dir: str | os.PathLike[str],
        secret: str,
        *,
        on_applied: Callable[[int, Command, Result], None] | None = None,
        on_snapshot_loaded: Callable[[ClusterMetadata], None] | None = None,
        settings: QuorumSettings | None = None,
    ) -> None:
        if not isinstance(secret, str) or not secret:
            raise ValueError("a cluster secret is required to run a Raft voter")
        if not voters:
            raise ValueError("voters is empty")
        checked = {int(i): _check_address(a) for i, a in voters.items()}
        if len(set(checked.values())) != len(checked):
            raise ValueError("two voters share a raft address")
        if node_id not in checked:
            raise ValueError(f"node {node_id} is not one of the voters {sorted(checked)}")
        self._settings = s = settings or QuorumSettings()
        limits = s.transport_limits()  # raises ValueError on nonsense bounds, before anything opens
        self._node_id = node_id
        self._voters = checked
        self._id_by_address = {a: i for i, a in checked.items()}
        self._address = checked[node_id]
        self._data_dir = os.fspath(data_dir)
        self._on_applied = on_applied
        self._on_snapshot_loaded = on_snapshot_loaded
        # Replaced (never mutated) on the tick thread; see the module docstring.
        self._metadata = ClusterMetadata()
        # Guards _pending and _closed.
        self._lock = threading.Lock()
        self._pending: dict[int, _Deliver] = {}
        self._tokens = itertools.count()
        self._closed = False

        os.makedirs(self._data_dir, exist_ok=True)
        self._lock_fd: int | None = os.open(
            os.path.join(self._data_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise QuorumError(f"another voter is using {self._data_dir}") from None

        conf = SyncObjConf(
            password=secret,
            bindAddress=self._address,
            journalFile=os.path.join(self._data_dir, JOURNAL_FILE),
            fullDumpFile=os.path.join(self._data_dir, DUMP_FILE),
            serializer=self._write_dump,
            deserializer=self._read_dump,
            dynamicMembershipChange=False,
            autoTick=True,
            commandsWaitLeader=False,
            commandsQueueSize=s.max_pending_proposals,
            raftMinTimeout=s.raft_min_timeout_s,
            raftMaxTimeout=s.raft_max_timeout_s,
            appendEntriesPeriod=s.append_entries_period_s,
            connectionTimeout=s.connection_timeout_s,
            connectionRetryTime=s.connection_retry_s,
            leaderFallbackTimeout=s.leader_fallback_timeout_s,
            logCompactionMinEntries=s.log_compaction_min_entries,
            logCompactionMinTime=s.log_compaction_min_time_s,
            appendEntriesUseBatch=s.append_entries_use_batch,
            maxBindRetries=s.bind_attempts,
            bindRetryTime=1.0,
        )
        others = [a for i, a in checked.items() if i != node_id]
        journal_path = os.path.join(self._data_dir, JOURNAL_FILE)
        try:
            self._raft = _Raft(self._apply_entry, self._address, others, conf, limits)
        except BaseException:
            with _JOURNALS_LOCK:
                _JOURNALS.pop(journal_path, None)
            self._release_lock()
            raise
        with _JOURNALS_LOCK:
            self._journal = _JOURNALS.pop(journal_path)
        # pysyncobj derived its encryption key in the constructor and never reads the password
        # again; do not keep the secret around in the object graph.
        conf.password = None
        try:
            self._raft.waitBinded()
        except Exception:
            self._stop_raft()
            self._release_lock()
            raise QuorumError(f"cannot bind raft address {self._address}") from None

    # ------------------------------------------------------------------------- tick thread

    def _apply_entry(self, raw: object) -> tuple[Any, ...]:
        """Apply one committed log entry (pysyncobj's tick thread). Never raises: pysyncobj
        would retry a raising entry on every tick."""
        cmd: Command | None = None
        reason = ""
        try:
            if type(raw) is not bytes:
                raise ValueError(f"log entry is {type(raw).__name__}, not bytes")
            cmd = decode_command(raw)
        except Exception as e:  # JSON nesting too deep raises RecursionError, etc.
            reason = f"undecodable command: {type(e).__name__}: {e}"[:500]
        new = self._metadata.copy()
        try:
            result = new.apply(cmd if cmd is not None else cast(Command, _UNDECODABLE))
        except Exception:
            # A bug in the state machine. It is deterministic, so every voter meets it at the same
            # entry; refuse the entry the same way everywhere rather than stall the log.
            logger.exception("applying metadata command failed; refusing it")
            cmd, reason = None, "command failed to apply"
            new = self._metadata.copy()
            result = new.apply(cast(Command, _UNDECODABLE))
        if cmd is None:
            result = dataclasses.replace(result, message=reason)
        self._metadata = new
        if cmd is not None and self._on_applied is not None:
            try:
                self._on_applied(result.metadata_offset, cmd, result)
            except Exception:
                logger.exception("on_applied callback failed")
        return dataclasses.astuple(result)

    def _write_dump(self, file_name: str, data: Any) -> None:
        """pysyncobj's serializer, called on the tick thread right after it applied up to the
        entry ``data[0]``, so ``self._metadata`` is exactly the state at that entry."""
        last_entry, prev_entry, cluster = data
        doc = {
            "format": DUMP_FORMAT,
            "version": DUMP_VERSION,
            "last_entry": _entry_to_json(last_entry),
            "prev_entry": _entry_to_json(prev_entry),
            "cluster": sorted(getattr(n, "address", str(n)) for n in cluster),
            "metadata": self._metadata.to_snapshot().decode("ascii"),
        }
        # Fsynced before pysyncobj deletes the journal entries this dump replaces.
        with open(file_name, "wb") as f:
            f.write(json.dumps(doc, separators=(",", ":")).encode())
            f.flush()
            os.fsync(f.fileno())

    def _read_dump(self, file_name: str) -> tuple[Any, ...]:
        """pysyncobj's deserializer (tick thread): at start-up, or when the leader sent its dump.
        Raises on anything but a dump ``_write_dump`` wrote (pysyncobj logs and ignores it)."""
        with open(file_name, "rb") as f:
            # A dump the leader sent was renamed into place unsynced; make it durable before
            # pysyncobj acknowledges it and drops the journal it replaces.
            os.fsync(f.fileno())
            doc = json.loads(f.read())
        fsync_dir(os.path.dirname(os.path.abspath(file_name)))
        if type(doc) is not dict or doc.get("format") != DUMP_FORMAT or doc.get("version") != DUMP_VERSION:
            raise ValueError(f"{file_name} is not a version {DUMP_VERSION} {DUMP_FORMAT}")
        last_entry = _entry_from_json(doc.get("last_entry"))
        prev_entry = _entry_from_json(doc.get("prev_entry"))
        cluster = doc.get("cluster")
        if type(cluster) is not list or not all(type(a) is str for a in cluster):
            raise ValueError("dump cluster is not a list of addresses")
        snapshot = doc.get("metadata")
        if type(snapshot) is not str:
            raise ValueError("dump has no metadata snapshot")
        md = ClusterMetadata.from_snapshot(snapshot.encode())
        self._metadata = md
        logger.info("loaded metadata dump at metadata offset %d", md.metadata_offset)
        if self._on_snapshot_loaded is not None:
            try:
                self._on_snapshot_loaded(md)
            except Exception:
                logger.exception("on_snapshot_loaded callback failed")
        return last_entry, prev_entry, cluster

    # -------------------------------------------------------------------------- proposing

    def _outcome(self, res: Any, err: Any) -> tuple[Result | None, QuorumError | None]:
        if err == FAIL_REASON.SUCCESS:
            return Result(*res), None
        if err in _NOT_APPENDED:
            return None, NotLeaderError(self.leader_id)
        if err == FAIL_REASON.QUEUE_FULL:
            return None, QuorumBusyError(self._settings.max_pending_proposals)
        if err in (FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME):
            return None, OutcomeUnknownError(f"raft reported {err}")
        return None, QuorumError(f"raft refused the command ({err})", E.ERROR_CODE_UNKNOWN_SERVER_ERROR, True)

    def _submit(self, raw: bytes, deliver: _Deliver) -> int:
        with self._lock:
            if self._closed:
                raise QuorumClosedError()
            if not self._raft._isLeader():
                raise NotLeaderError(self.leader_id)
            if len(self._pending) >= self._settings.max_pending_proposals:
                raise QuorumBusyError(self._settings.max_pending_proposals)
            token = next(self._tokens)
            self._pending[token] = deliver

        def on_done(res: Any, err: Any) -> None:  # pysyncobj's thread (or this one on QUEUE_FULL)
            with self._lock:
                waiting = self._pending.pop(token, None)
            if waiting is None:
                return
            try:
                waiting(*self._outcome(res, err))
            except Exception:
                logger.exception("delivering a proposal's outcome failed")

        try:
            self._raft.apply_encoded(raw, callback=on_done)
        except BaseException:
            with self._lock:
                self._pending.pop(token, None)
            raise
        return token

    def propose(self, cmd: Command, timeout_s: float) -> Result:
        """Commit ``cmd`` through Raft and return its Result, blocking up to ``timeout_s``.

        Raises ValueError for a malformed command, and the QuorumErrors of the module docstring.
        The Result is this voter's apply of the committed entry (committed on a majority first).
        """
        raw = encode_command(cmd)
        done = threading.Event()
        box: list[tuple[Result | None, QuorumError | None]] = []

        def deliver(result: Result | None, error: QuorumError | None) -> None:
            box.append((result, error))
            done.set()

        token = self._submit(raw, deliver)
        if not done.wait(timeout_s):
            with self._lock:
                still_waiting = self._pending.pop(token, None) is not None
            if still_waiting:
                raise QuorumTimeoutError(timeout_s)
            done.wait()  # the outcome raced the timeout and is being delivered now
        result, error = box[0]
        if error is not None:
            raise error
        assert result is not None
        return result

    async def propose_async(self, cmd: Command, timeout_s: float) -> Result:
        """``propose`` for asyncio: the outcome, which pysyncobj reports on its own thread, is
        handed to this loop with ``call_soon_threadsafe``; no asyncio object is touched elsewhere."""
        raw = encode_command(cmd)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()

        def settle(result: Result | None, error: QuorumError | None) -> None:  # on the loop
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(cast(Result, result))

        def deliver(result: Result | None, error: QuorumError | None) -> None:  # any thread
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

        token = self._submit(raw, deliver)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise QuorumTimeoutError(timeout_s) from None
        finally:
            with self._lock:
                self._pending.pop(token, None)

    # ----------------------------------------------------------------------------- reading

    @property
    def node_id(self) -> int:
        return self._node_id

    @property
    def raft_address(self) -> str:
        return self._address

    @property
    def voters(self) -> dict[int, str]:
        return dict(self._voters)

    @property
    def metadata(self) -> ClusterMetadata:
        """The latest applied state: a consistent object that is never changed after it is
        published (copy-on-write), safe to read from any thread. Do not mutate it."""
        return self._metadata

    @property
    def metadata_offset(self) -> int:
        """Offset of the last applied command (-1 before the first)."""
        return self._metadata.metadata_offset

    @property
    def is_leader(self) -> bool:
        """Whether this voter is the Raft leader (the active controller) as far as it knows."""
        return bool(self._raft._isLeader())

    @property
    def leader_id(self) -> int | None:
        """The node id of the leader this voter last heard of, or None."""
        leader = self._raft._getLeader()
        if leader is None:
            return None
        return self._id_by_address.get(getattr(leader, "address", None))  # type: ignore[arg-type]

    @property
    def raft_term(self) -> int:
        return int(self._raft.raftCurrentTerm)

    @property
    def commit_index(self) -> int:
        """Raft commit index (pysyncobj's log index, which also counts its own no-op entries)."""
        return int(self._raft.raftCommitIndex)

    @property
    def low_space(self) -> bool:
        """The journal's disk is (nearly) full: refuse new commands until space returns."""
        if self._journal.low_space:
            return True
        try:
            st = os.statvfs(self._data_dir)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < MIN_FREE_BYTES

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_for_leader(self, timeout_s: float) -> int:
        """Block until this voter knows a leader and return its id; QuorumTimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            leader = self.leader_id
            if leader is not None:
                return leader
            if self._closed:
                raise QuorumClosedError()
            if time.monotonic() >= deadline:
                raise QuorumTimeoutError(timeout_s)
            time.sleep(0.02)

    def status(self) -> dict[str, Any]:
        """Plain facts for ``cluster describe`` and metrics. Never contains the secret."""
        raft = self._raft
        connected = [i for i, a in self._voters.items() if i != self._node_id and self._connected(a)]
        state = "leader" if raft._isLeader() else ("closed" if self._closed else "follower")
        return {
            "node_id": self._node_id,
            "raft_address": self._address,
            "voters": dict(self._voters),
            "state": state,
            "leader_id": self.leader_id,
            "raft_term": self.raft_term,
            "commit_index": self.commit_index,
            "last_applied": int(raft.raftLastApplied),
            "metadata_offset": self.metadata_offset,
            "has_quorum": bool(raft.hasQuorum),
            "connected_voters": sorted(connected),
        }

    def _connected(self, address: str) -> bool:
        for node in self._raft.otherNodes:
            if node.address == address:
                return bool(self._raft.isNodeConnected(node))
        return False

    def __repr__(self) -> str:
        return (
            f"MetadataQuorum(node_id={self._node_id}, raft_address={self._address!r}, "
            f"voters={sorted(self._voters)}, closed={self._closed})"
        )

    # ----------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Stop this voter: fail waiting proposals, stop pysyncobj's thread, free the port and the
        data dir. Idempotent; safe from any thread (from the tick thread it does not wait)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = self._pending, {}
        for deliver in pending.values():
            try:
                deliver(None, QuorumClosedError())
            except Exception:
                logger.exception("delivering close to a proposal failed")
        self._stop_raft()
        self._release_lock()

    def _stop_raft(self) -> None:
        raft = self._raft if hasattr(self, "_raft") else None
        if raft is None:
            return
        thread = getattr(raft, "_SyncObj__thread", None)
        if thread is not None and thread.is_alive():
            raft.destroy()
            if thread is not threading.current_thread():
                thread.join(10.0)
        else:
            raft._doDestroy()  # the tick thread already gave up (bind failure): clean up here

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> MetadataQuorum:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
